//! Telling systemd how the daemon is doing (`Type=notify`): ready once `started` is written
//! (the programs attached and the first route reading in the kernel), reloading while a
//! policy is read again, stopping. Outside systemd (no `NOTIFY_SOCKET`) nothing is sent.

use sd_notify::NotifyState;
use tracing::debug;

pub fn ready() {
    send(&[NotifyState::Ready, NotifyState::Status("auditing")]);
}

/// `MONOTONIC_USEC` goes with `RELOADING=1`: systemd 253 and later want it to tell this
/// reload from an earlier one.
pub fn reloading() {
    match NotifyState::monotonic_usec_now() {
        Ok(now) => send(&[NotifyState::Reloading, now]),
        Err(error) => {
            debug!("cannot read CLOCK_MONOTONIC for systemd ({error})");
            send(&[NotifyState::Reloading]);
        }
    }
}

/// After a reload, whether or not the new policy was taken: the daemon audits on.
pub fn reloaded() {
    send(&[NotifyState::Ready]);
}

pub fn stopping() {
    send(&[NotifyState::Stopping]);
}

fn send(state: &[NotifyState]) {
    // A message systemd does not get only costs it the state; auditing goes on.
    if let Err(error) = sd_notify::notify(state) {
        debug!("cannot notify systemd: {error}");
    }
}

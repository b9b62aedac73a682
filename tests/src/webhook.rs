//! A real HTTPS webhook receiver for the webhook sink tests: Python's `http.server` behind
//! `ssl`, with a certificate for 127.0.0.1 from a CA of the test's own. It writes one line
//! per POST: `{"content_type": …, "alerts": [the body's JSON array]}`, or, started with
//! [`WebhookReceiver::start_refusing`], answers 400 to a POST whose body holds a marker.
//! Stopped on drop.

use std::{
    path::PathBuf,
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use crate::DELIVERY_TIMEOUT;

const RECEIVER: &str = r#"
import http.server, json, ssl, sys
port, cert, key, out, refuse = sys.argv[1:]
class Receiver(http.server.BaseHTTPRequestHandler):
    def do_POST(self):
        body = self.rfile.read(int(self.headers["Content-Length"]))
        if refuse and refuse.encode() in body:
            answer = b"rejected: the batch holds " + refuse.encode()
            self.send_response(400)
            self.send_header("Content-Length", str(len(answer)))
            self.end_headers()
            self.wfile.write(answer)
            return
        line = {"content_type": self.headers.get("Content-Type"), "alerts": json.loads(body)}
        with open(out, "a") as log:
            log.write(json.dumps(line) + "\n")
        self.send_response(200)
        self.end_headers()
    def log_message(self, *args):
        pass
server = http.server.HTTPServer(("127.0.0.1", int(port)), Receiver)
context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
context.load_cert_chain(cert, key)
server.socket = context.wrap_socket(server.socket, server_side=True)
server.serve_forever()
"#;

/// A CA and a certificate it signed for 127.0.0.1, as PEM files in `folder`.
pub struct TestCertificates {
    folder: tempfile::TempDir,
    /// The CA certificate, for `--sink-ca`.
    pub ca: PathBuf,
}

impl TestCertificates {
    pub fn new() -> Self {
        use rcgen::{BasicConstraints, CertificateParams, IsCa, Issuer, KeyPair};
        let folder = tempfile::tempdir().expect("a folder for certificates");
        let ca_key = KeyPair::generate().unwrap();
        let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        let ca_cert = ca_params.self_signed(&ca_key).unwrap();
        let issuer = Issuer::new(ca_params, ca_key);
        let key = KeyPair::generate().unwrap();
        let cert = CertificateParams::new(vec!["127.0.0.1".to_owned()])
            .unwrap()
            .signed_by(&key, &issuer)
            .unwrap();
        let write = |name: &str, pem: String| {
            let path = folder.path().join(name);
            std::fs::write(&path, pem).unwrap();
            path
        };
        let ca = write("ca.pem", ca_cert.pem());
        write("cert.pem", cert.pem());
        write("key.pem", key.serialize_pem());
        Self { folder, ca }
    }
}

impl TestCertificates {
    /// The certificate for 127.0.0.1 (PEM), for a server.
    pub fn certificate(&self) -> PathBuf {
        self.folder.path().join("cert.pem")
    }

    /// The certificate's private key (PEM).
    pub fn key(&self) -> PathBuf {
        self.folder.path().join("key.pem")
    }
}

impl Default for TestCertificates {
    fn default() -> Self {
        Self::new()
    }
}

pub struct WebhookReceiver {
    child: Child,
    out: PathBuf,
    _folder: tempfile::TempDir,
}

impl WebhookReceiver {
    /// Listens on https://127.0.0.1:`port`/ with `certificates`, once it takes connections.
    pub fn start(port: u16, certificates: &TestCertificates) -> Self {
        Self::start_refusing(port, certificates, "")
    }

    /// As [`WebhookReceiver::start`], answering 400 (for good) to every POST whose body
    /// holds `marker`, and recording none of them.
    pub fn start_refusing(port: u16, certificates: &TestCertificates, marker: &str) -> Self {
        let folder = tempfile::tempdir().expect("a folder for the receiver");
        let script = folder.path().join("receiver.py");
        std::fs::write(&script, RECEIVER).unwrap();
        let out = folder.path().join("received.jsonl");
        let certs = certificates.folder.path();
        // Debian's own Python, whatever PATH a test machine has.
        let child = Command::new("/usr/bin/python3")
            .arg(&script)
            .arg(port.to_string())
            .arg(certs.join("cert.pem"))
            .arg(certs.join("key.pem"))
            .arg(&out)
            .arg(marker)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("starting the webhook receiver (python3)");
        let receiver = Self {
            child,
            out,
            _folder: folder,
        };
        crate::wait_until_listening(port, "the webhook receiver");
        receiver
    }

    /// Every POST received so far, once `done` holds for them (waiting up to
    /// [`DELIVERY_TIMEOUT`]).
    pub fn wait_for(&self, done: impl Fn(&[serde_json::Value]) -> bool) -> Vec<serde_json::Value> {
        let deadline = Instant::now() + DELIVERY_TIMEOUT;
        loop {
            let text = std::fs::read_to_string(&self.out).unwrap_or_default();
            let posts: Vec<serde_json::Value> = text
                .lines()
                .map(|line| serde_json::from_str(line).expect("the receiver writes JSON"))
                .collect();
            if done(&posts) {
                return posts;
            }
            assert!(
                Instant::now() < deadline,
                "the webhook receiver never got what was expected: {posts:#?}"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

impl Drop for WebhookReceiver {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

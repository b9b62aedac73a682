//! A real name server for the host-name tests: dnsmasq, inside a test namespace, answering
//! from a hosts file of its own with a short TTL. Stopped on drop.

use std::{
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use nix::{sys::signal::Signal, unistd::Pid};

use crate::Netns;

pub struct NameServer {
    child: Child,
    folder: tempfile::TempDir,
    /// A resolv.conf that names this server (for `--resolv-conf`).
    pub resolv_conf: std::path::PathBuf,
}

impl NameServer {
    /// Starts dnsmasq in `netns` on `address`:53, answering `name` with `addresses` and a
    /// TTL of `ttl_seconds`, and nothing else (no upstream, no /etc/hosts).
    pub fn start(netns: &Netns, address: &str, name: &str, addresses: &[&str], ttl: u32) -> Self {
        let folder = tempfile::tempdir().expect("a folder for dnsmasq");
        let resolv_conf = folder.path().join("resolv.conf");
        std::fs::write(
            &resolv_conf,
            format!("nameserver {address}\noptions timeout:1 attempts:2\n"),
        )
        .expect("writing resolv.conf");
        // Written before dnsmasq starts, which reads it once then (and again on SIGHUP).
        write_hosts(folder.path(), name, addresses);
        let mut server = Self {
            child: Command::new("ip")
                .args([
                    "netns",
                    "exec",
                    &netns.name,
                    "dnsmasq",
                    "--keep-in-foreground",
                ])
                .arg("--conf-file=/dev/null")
                .args([
                    "--no-resolv",
                    "--no-hosts",
                    "--no-poll",
                    "--bind-interfaces",
                ])
                // The only authority for the name's domain: no upstream to refuse for.
                .arg(format!("--local=/{}/", domain_of(name)))
                .arg(format!("--listen-address={address}"))
                .arg(format!(
                    "--addn-hosts={}",
                    folder.path().join("hosts").display()
                ))
                .arg(format!("--local-ttl={ttl}"))
                .arg(format!(
                    "--pid-file={}",
                    folder.path().join("dnsmasq.pid").display()
                ))
                .args(["--user=root", "--log-facility=-"])
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::inherit())
                .spawn()
                .expect("starting dnsmasq (cargo xtask setup installs it)"),
            folder,
            resolv_conf,
        };
        let deadline = Instant::now() + crate::SERVER_START_TIMEOUT;
        while !listening(netns) {
            if let Ok(Some(status)) = server.child.try_wait() {
                panic!("dnsmasq exited at start ({status}); its stderr is above");
            }
            assert!(
                Instant::now() < deadline,
                "dnsmasq did not start answering on {address}"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        server
    }

    /// From now on, `name` stands for `addresses`: dnsmasq reads its hosts file again on
    /// SIGHUP, and forgets what it cached.
    pub fn change(&self, name: &str, addresses: &[&str]) {
        write_hosts(self.folder.path(), name, addresses);
        nix::sys::signal::kill(Pid::from_raw(self.pid()), Signal::SIGHUP)
            .expect("SIGHUP to dnsmasq");
    }

    /// `ip netns exec` execs dnsmasq, which stays in the foreground: the child is dnsmasq.
    fn pid(&self) -> i32 {
        i32::try_from(self.child.id()).expect("a pid fits in i32")
    }
}

/// The hosts file dnsmasq answers from, in `folder`: `name` stands for `addresses`.
fn write_hosts(folder: &std::path::Path, name: &str, addresses: &[&str]) {
    let hosts: String = addresses
        .iter()
        .map(|address| format!("{address} {name}\n"))
        .collect();
    std::fs::write(folder.join("hosts"), hosts).expect("writing the hosts file");
}

/// `api.partner.example` → `partner.example`.
fn domain_of(name: &str) -> &str {
    name.split_once('.').map_or(name, |(_, domain)| domain)
}

/// Whether something listens on UDP port 53 in `netns`.
fn listening(netns: &Netns) -> bool {
    Command::new("ip")
        .args(["netns", "exec", &netns.name, "ss", "-Hlun", "sport = :53"])
        .output()
        .is_ok_and(|output| !output.stdout.is_empty())
}

impl Drop for NameServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

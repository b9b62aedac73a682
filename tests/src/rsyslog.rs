//! A real rsyslogd for the syslog sink tests: it listens on a unix socket, and on UDP and
//! TCP on loopback, and writes each message it parsed as one line
//! `INPUT|APP-NAME|MSGID|STRUCTURED-DATA|MSG` to a file. Stopped on drop.

use std::{
    path::PathBuf,
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use crate::DELIVERY_TIMEOUT;

pub struct Rsyslog {
    child: Child,
    folder: tempfile::TempDir,
    /// The unix datagram socket it reads (`syslog:PATH`).
    pub socket: PathBuf,
}

impl Rsyslog {
    /// Starts rsyslogd with UDP and TCP inputs on 127.0.0.1:`port`, and waits until both
    /// the unix socket and the TCP port take connections.
    pub fn start(port: u16) -> Self {
        let folder = tempfile::tempdir().expect("a folder for rsyslogd");
        let socket = folder.path().join("log.sock");
        let out = folder.path().join("out.log");
        let config = folder.path().join("rsyslog.conf");
        std::fs::write(
            &config,
            format!(
                r#"global(workDirectory="{dir}")
module(load="imuxsock" SysSock.Use="off")
module(load="imudp")
module(load="imtcp")
input(type="imuxsock" Socket="{socket}" useSpecialParser="off" parseHostname="on")
input(type="imudp" address="127.0.0.1" port="{port}")
input(type="imtcp" address="127.0.0.1" port="{port}")
template(name="fields" type="string" string="%inputname%|%app-name%|%msgid%|%structured-data%|%msg%\n")
*.* action(type="omfile" file="{out}" template="fields")
"#,
                dir = folder.path().display(),
                socket = socket.display(),
                out = out.display(),
            ),
        )
        .expect("writing rsyslog.conf");
        let child = Command::new("rsyslogd")
            .arg("-n")
            .arg("-f")
            .arg(&config)
            .arg("-i")
            .arg(folder.path().join("rsyslogd.pid"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("starting rsyslogd (cargo xtask setup installs it)");
        let rsyslog = Self {
            child,
            folder,
            socket,
        };
        let deadline = Instant::now() + crate::SERVER_START_TIMEOUT;
        while !(rsyslog.socket.exists()
            && std::net::TcpStream::connect(("127.0.0.1", port)).is_ok())
        {
            assert!(
                Instant::now() < deadline,
                "rsyslogd did not start listening"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        rsyslog
    }

    /// The lines written so far, once one satisfies `wanted` (waiting up to
    /// [`DELIVERY_TIMEOUT`]).
    pub fn wait_for(&self, what: &str, wanted: impl Fn(&str) -> bool) -> Vec<String> {
        let deadline = Instant::now() + DELIVERY_TIMEOUT;
        loop {
            let text =
                std::fs::read_to_string(self.folder.path().join("out.log")).unwrap_or_default();
            let lines: Vec<String> = text.lines().map(str::to_owned).collect();
            if lines.iter().any(|line| wanted(line)) {
                return lines;
            }
            assert!(
                Instant::now() < deadline,
                "rsyslogd got no {what} line; it has: {lines:#?}"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Rsyslog {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

//! Reading srcip's `--metrics` as Prometheus would.

use std::{
    io::{Read as _, Write as _},
    net::TcpStream,
};

use crate::Netns;

/// `GET /metrics` on port `port` of the loopback of `netns` (this process's namespace when
/// `None`), where the daemon runs: the content type and the parsed samples.
pub fn scrape(netns: Option<&Netns>, port: u16) -> (String, prometheus_parse::Scrape) {
    let connect = || TcpStream::connect(("127.0.0.1", port)).expect("connecting to /metrics");
    let mut stream = match netns {
        None => connect(),
        Some(netns) => {
            let namespace = std::fs::File::open(format!("/run/netns/{}", netns.name)).unwrap();
            // setns moves only the calling thread: a thread of its own enters the namespace.
            std::thread::scope(|scope| {
                scope
                    .spawn(|| {
                        nix::sched::setns(&namespace, nix::sched::CloneFlags::CLONE_NEWNET)
                            .expect("entering the daemon's namespace");
                        connect()
                    })
                    .join()
                    .unwrap()
            })
        }
    };
    stream
        .write_all(b"GET /metrics HTTP/1.0\r\nHost: srcip\r\n\r\n")
        .unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).unwrap();
    let (head, body) = response.split_once("\r\n\r\n").expect("an HTTP response");
    assert!(
        head.starts_with("HTTP/1.0 200") || head.starts_with("HTTP/1.1 200"),
        "{head}"
    );
    let content_type = head
        .lines()
        .find_map(|line| line.strip_prefix("content-type: "))
        .unwrap_or_default()
        .to_owned();
    let lines = body.lines().map(|line| Ok(line.to_owned()));
    (
        content_type,
        prometheus_parse::Scrape::parse(lines).expect("Prometheus text"),
    )
}

pub fn value(scrape: &prometheus_parse::Scrape, name: &str, labels: &[(&str, &str)]) -> f64 {
    try_value(scrape, name, labels)
        .unwrap_or_else(|| panic!("no {name} {labels:?} in {:#?}", scrape.samples))
}

pub fn try_value(
    scrape: &prometheus_parse::Scrape,
    name: &str,
    labels: &[(&str, &str)],
) -> Option<f64> {
    scrape
        .samples
        .iter()
        .find(|sample| {
            sample.metric == name
                && labels
                    .iter()
                    .all(|(key, value)| sample.labels.get(key) == Some(value))
        })
        .map(|sample| match sample.value {
            prometheus_parse::Value::Counter(value)
            | prometheus_parse::Value::Gauge(value)
            | prometheus_parse::Value::Untyped(value) => value,
            _ => f64::NAN,
        })
}

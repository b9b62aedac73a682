//! How fast user space decides a connection against a policy of 100,000 rules: the work
//! behind every record the kernel sends (a violation, or a connection under `--all`).

use std::{hint::black_box, net::IpAddr, path::Path};

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use srcip_userspace::policy::{self, ConnectionKey, Matcher, Protocol};

const RULES: u32 = 100_000;

/// One rule per destination 10.a.b.c, as a fleet's inventory of partners would generate.
fn policy_text() -> String {
    let mut text = String::new();
    for index in 0..RULES {
        let [_, a, b, c] = index.to_be_bytes();
        text.push_str(&format!(
            "[[rule]]\nname = \"partner-{index}\"\ndestinations = [\"10.{a}.{b}.{c}\"]\nports = [443]\nallowed_sources = [\"203.0.113.10\"]\n"
        ));
    }
    text
}

fn decide(criterion: &mut Criterion) {
    let policy = policy::parse(Path::new("generated.toml"), &policy_text()).expect("valid");
    let matcher = Matcher::new(policy).expect("compiles");
    // Destinations spread over the policy, a quarter of them matching no rule.
    let connections: Vec<ConnectionKey> = (0..4096u32)
        .map(|index| {
            let spread = index.wrapping_mul(2_654_435_761) % (RULES * 4 / 3);
            let [_, a, b, c] = spread.to_be_bytes();
            ConnectionKey {
                protocol: Protocol::Tcp,
                src: IpAddr::from([203, 0, 113, 11]),
                dst: IpAddr::from([10, a, b, c]),
                dst_port: 443,
            }
        })
        .collect();
    let mut group = criterion.benchmark_group("matcher");
    group.throughput(Throughput::Elements(connections.len() as u64));
    group.bench_function("decide_100k_rules", |bencher| {
        bencher.iter(|| {
            for connection in &connections {
                black_box(matcher.decide(black_box(connection)));
            }
        });
    });
    group.finish();
}

criterion_group!(benches, decide);
criterion_main!(benches);

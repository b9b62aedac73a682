//! `srcip check`: for every destination of a policy, the source the kernel would choose now,
//! whether the policy allows it, why the kernel chose it, and how to fix it. Nothing is
//! sent and no eBPF is loaded; it needs only the routing tables (any user may run it).
//!
//! `srcip check ADDR[:PORT][/tcp|udp] [--from SOURCE]` asks the same of one destination with
//! no policy: it is checked as a one-rule policy made for the question, whose allowed source
//! is SOURCE (or, without `--from`, any: the question is then only which source and why).

use std::{
    collections::HashSet,
    io::Write as _,
    net::IpAddr,
    path::{Path, PathBuf},
    time::Duration,
};

use ipnet::{IpNet, Ipv4Net, Ipv6Net};
use prefix_trie::PrefixMap;
use serde::Serialize;

use crate::{
    output::Format,
    policy::{self, Destination, HostNames, Policy, ProtocolSelector, Rule},
    route::{self, Fix, HostRouting, Program, Query, Router},
};

pub struct CheckConfig {
    pub question: Question,
    pub format: Format,
    /// Name servers for the policy's host names (`--resolv-conf`); the system's when `None`.
    pub resolv_conf: Option<PathBuf>,
    /// The program to predict for (`--uid`, `--mark`).
    pub program: Program,
}

/// What `check` is asked about.
pub enum Question {
    /// Every destination of the policy file.
    Policy(PathBuf),
    /// One destination, and whether `from` would be its source.
    Destination {
        destination: AdHocDestination,
        from: Option<IpAddr>,
    },
}

/// `ADDR[:PORT][/tcp|udp]`: an address or host name, and the port and protocol of the
/// connection to predict (port- and protocol-keyed policy routing depends on them).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AdHocDestination {
    /// As given.
    pub text: String,
    pub host: String,
    pub port: Option<u16>,
    pub protocol: Option<policy::Protocol>,
}

impl std::str::FromStr for AdHocDestination {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, String> {
        let usage = |why: &str| {
            format!(
                "{text:?}: {why}; give ADDR[:PORT][/tcp|udp], e.g. 198.51.100.50:443/tcp, [2001:db8::50]:443 or api.example.com:443"
            )
        };
        let (rest, protocol) = match text.rsplit_once('/') {
            Some((rest, "tcp")) => (rest, Some(policy::Protocol::Tcp)),
            Some((rest, "udp")) => (rest, Some(policy::Protocol::Udp)),
            Some(_) => {
                return Err(usage(
                    "after / comes tcp or udp (one destination, not a prefix)",
                ));
            }
            None => (text, None),
        };
        let port = |port: &str| {
            port.parse::<u16>()
                .ok()
                .filter(|port| *port != 0)
                .ok_or_else(|| usage("the port is a number from 1 to 65535"))
        };
        let (host, port) = if let Some(bracketed) = rest.strip_prefix('[') {
            let (host, after) = bracketed
                .split_once(']')
                .ok_or_else(|| usage("a [ without its ]"))?;
            match after.strip_prefix(':') {
                Some(given) => (host, Some(port(given)?)),
                None if after.is_empty() => (host, None),
                None => return Err(usage("after ] comes :PORT")),
            }
        } else if rest.parse::<IpAddr>().is_ok() {
            // An IPv6 address without brackets has no port.
            (rest, None)
        } else {
            match rest.rsplit_once(':') {
                Some((host, given)) => (host, Some(port(given)?)),
                None => (rest, None),
            }
        };
        let is_name = !host.is_empty()
            && host.split('.').all(|label| {
                !label.is_empty() && label.chars().all(|c| c.is_ascii_alphanumeric() || c == '-')
            });
        if host.parse::<IpAddr>().is_err() && !is_name {
            return Err(usage("not an address or a host name"));
        }
        Ok(Self {
            text: text.to_owned(),
            host: host.to_owned(),
            port,
            protocol,
        })
    }
}

impl AdHocDestination {
    /// The one-rule policy that asks the question: named after it, allowing `from` (any
    /// source without it).
    fn policy(&self, from: Option<IpAddr>) -> Result<policy::Policy, policy::PolicyLoadError> {
        let mut toml = format!(
            "[[rule]]\nname = \"{}\"\ndestinations = [\"{}\"]\n",
            self.text, self.host
        );
        if let Some(port) = self.port {
            toml += &format!("ports = [{port}]\n");
        }
        if let Some(protocol) = self.protocol {
            toml += &format!("protocol = \"{}\"\n", protocol.as_str());
        }
        toml += &match from {
            Some(from) => format!("allowed_sources = [\"{from}\"]\n"),
            None => "allowed_sources = [\"0.0.0.0/0\", \"::/0\"]\n".to_owned(),
        };
        policy::parse(Path::new(&self.text), &toml)
    }
}

/// One destination of the policy, as `check --format json` prints it, and as `route_drift`
/// and `route_recovered` alerts carry it.
#[derive(Debug, Clone, Serialize)]
pub struct DestinationCheck {
    pub rule: String,
    /// The policy's destination, as a prefix (host names resolved).
    pub destination: String,
    /// The address looked up: the destination itself, or a representative of its prefix.
    pub dst: IpAddr,
    pub protocol: Option<&'static str>,
    pub dst_port: Option<u16>,
    /// The program's uid and mark the lookup was made with, when given.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub uid: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub mark: Option<u32>,
    pub predicted_src: Option<IpAddr>,
    pub oif: Option<String>,
    pub gateway: Option<IpAddr>,
    pub table: Option<String>,
    pub allowed_sources: Vec<String>,
    pub compliant: bool,
    pub reason: String,
    pub fix: Vec<String>,
    /// Source-keyed rules that do not protect this destination (`explain.rs`).
    pub warnings: Vec<String>,
    /// The prediction holds for every address of the destination and every program that
    /// binds no source, sets no mark and names no device (`HostRouting::predicts_whole`):
    /// `block` may refuse at `connect()` on it.
    #[serde(skip)]
    pub exact: bool,
    /// Why the kernel chose `predicted_src`: `reason` without what `pin` adds, and what a
    /// violation that left with that source carries.
    #[serde(skip)]
    pub route_reason: String,
}

/// Whether a `pin` rule's pin source would bind a connection to a destination: a pinned
/// connection leaves with it whatever the kernel would choose.
enum PinOutlook {
    /// Not a `pin` rule, or none of its sources is of the destination's family.
    NotPinned,
    /// The host has the pin source: pin binds to it.
    Applies(IpAddr),
    /// The host does not have the pin source: pin cannot bind to it, and the kernel's
    /// choice decides.
    SourceMissing(IpAddr),
}

impl PinOutlook {
    fn of(rule: &Rule, dst: IpAddr, host: &HostRouting) -> Self {
        let pin_source = rule
            .pin_sources
            .iter()
            .map(|(source, _)| *source)
            .find(|source| source.is_ipv4() == dst.is_ipv4());
        match pin_source {
            None => Self::NotPinned,
            Some(source) if host.owns(source) => Self::Applies(source),
            Some(source) => Self::SourceMissing(source),
        }
    }

    fn explain(&self, route_reason: &str) -> String {
        match self {
            Self::NotPinned => route_reason.to_owned(),
            Self::Applies(source) => format!(
                "pin binds the rule's connections to {source}, an address of this host; \
                 without pin: {route_reason}"
            ),
            Self::SourceMissing(source) => {
                format!("pin cannot apply: {source} is not an address of this host; {route_reason}")
            }
        }
    }
}

/// Checks every destination; `Ok(true)` when every one is compliant (with no `--from`, a
/// single destination always is: nothing was asked of its source).
pub async fn check(config: CheckConfig) -> anyhow::Result<bool> {
    let names = HostNames::new(config.resolv_conf.as_deref(), Duration::ZERO)?;
    let (policy, asked, judged) = match &config.question {
        Question::Policy(path) => (policy::load(path)?, path.display().to_string(), true),
        Question::Destination { destination, from } => (
            destination.policy(*from)?,
            destination.text.clone(),
            from.is_some(),
        ),
    };
    let (policy, _) = names.resolve(policy).await?;
    let router = Router::new()?;
    let host = router.host().await?;
    let mut all_compliant = true;
    let mut stdout = std::io::stdout().lock();
    if config.format == Format::Text {
        print_header(&mut stdout, &asked)?;
    }
    let shared = SharedDestinations::of(&policy);
    for (place, rule) in policy.rules.iter().enumerate() {
        for (destination, _) in &rule.destinations {
            let Destination::Prefix(prefix) = destination else {
                continue;
            };
            let mut row = check_destination(
                &router,
                &host,
                (&policy, &shared),
                place,
                *prefix,
                config.program,
            )
            .await?;
            if !judged {
                // Any source was "allowed": say that none was asked about.
                row.allowed_sources.clear();
                row.compliant = true;
                row.fix.clear();
            }
            all_compliant &= row.compliant;
            match config.format {
                Format::Json => writeln!(stdout, "{}", serde_json::to_string(&row)?)?,
                Format::Text => print_row(&mut stdout, &row)?,
            }
        }
    }
    Ok(all_compliant)
}

/// The lookup a connection of `rule` to `dst` by `program` would make: with the protocol
/// and the first port when the rule names them, so that port- and protocol-keyed policy
/// routing applies.
pub fn query_for(rule: &Rule, dst: IpAddr, program: Program) -> Query {
    let dst_port = rule
        .ports
        .as_ref()
        .and_then(|ranges| ranges.first())
        .map(|range| range.first);
    let protocol = match rule.protocol {
        ProtocolSelector::Only(protocol) => Some(protocol),
        ProtocolSelector::Any => dst_port.map(|_| policy::Protocol::Tcp),
    };
    Query {
        dst,
        protocol,
        dst_port,
        program,
    }
}

/// The address a prefix is checked with: the address itself for a single host, else the
/// first address after the network's own (one a host could have).
pub fn representative(prefix: IpNet) -> IpAddr {
    let network = prefix.network();
    if prefix.prefix_len() + 1 >= prefix.max_prefix_len() {
        return network;
    }
    match network {
        IpAddr::V4(v4) => IpAddr::V4((u32::from(v4) + 1).into()),
        IpAddr::V6(v6) => IpAddr::V6((u128::from(v6) + 1).into()),
    }
}

/// The destinations of a policy that another rule shares while allowing other sources
/// ([`Fix::shared`]: their fixes must not undo each other), found once per policy: a check,
/// and each of the drift watch's readings, judge every destination, so asking the whole
/// policy again for each would be quadratic in its size.
pub struct SharedDestinations {
    shared: HashSet<(usize, IpNet)>,
}

/// The rules naming one prefix, as far as sharing goes: whether they all allow the same
/// sources (those of the rule at `first`).
enum Namers {
    Alike { first: usize },
    Mixed,
}

impl Namers {
    fn differ_from(&self, rules: &[Rule], rule: usize) -> bool {
        match self {
            Self::Alike { first } => rules[*first].allowed_sources != rules[rule].allowed_sources,
            Self::Mixed => true,
        }
    }
}

impl SharedDestinations {
    pub fn of(policy: &Policy) -> Self {
        let mut v4: PrefixMap<Ipv4Net, Namers> = PrefixMap::new();
        let mut v6: PrefixMap<Ipv6Net, Namers> = PrefixMap::new();
        let note = |namers: Option<&mut Namers>, rule: usize| match namers {
            Some(namers) => {
                if namers.differ_from(&policy.rules, rule) {
                    *namers = Namers::Mixed;
                }
                None
            }
            None => Some(Namers::Alike { first: rule }),
        };
        let named = || {
            policy.rules.iter().enumerate().flat_map(|(place, rule)| {
                rule.destinations
                    .iter()
                    .filter_map(move |(destination, _)| match destination {
                        Destination::Prefix(prefix) => Some((place, *prefix)),
                        Destination::Host(_) => None,
                    })
            })
        };
        for (place, prefix) in named() {
            match prefix {
                IpNet::V4(net) => {
                    if let Some(new) = note(v4.get_mut(&net), place) {
                        v4.insert(net, new);
                    }
                }
                IpNet::V6(net) => {
                    if let Some(new) = note(v6.get_mut(&net), place) {
                        v6.insert(net, new);
                    }
                }
            }
        }
        // A prefix overlaps the ones that cover it and the ones it covers (itself among
        // both: other rules naming the same prefix).
        let shared = named()
            .filter(|(place, prefix)| {
                let differs = |namers: &Namers| namers.differ_from(&policy.rules, *place);
                match prefix {
                    IpNet::V4(net) => v4
                        .cover(net)
                        .chain(v4.children(net))
                        .any(|(_, namers)| differs(namers)),
                    IpNet::V6(net) => v6
                        .cover(net)
                        .chain(v6.children(net))
                        .any(|(_, namers)| differs(namers)),
                }
            })
            .collect();
        Self { shared }
    }

    /// Whether `destination` of the rule at `place` in the policy is shared.
    pub fn contains(&self, place: usize, destination: IpNet) -> bool {
        self.shared.contains(&(place, destination))
    }
}

/// Predicts `destination` of the rule at `place` in `policy` (checked at its
/// representative address) for a connection of `program`; `shared` is the policy's
/// [`SharedDestinations`].
pub async fn check_destination(
    router: &Router,
    host: &HostRouting,
    (policy, shared): (&Policy, &SharedDestinations),
    place: usize,
    destination: IpNet,
    program: Program,
) -> anyhow::Result<DestinationCheck> {
    let rule = &policy.rules[place];
    let dst = representative(destination);
    let query = query_for(rule, dst, program);
    let prediction = router.predict(&query, host).await?;
    let route_reason = route::reason(&query, &prediction, host);
    let pin = PinOutlook::of(rule, dst, host);
    let compliant = matches!(pin, PinOutlook::Applies(_))
        || prediction.src.is_some_and(|src| rule.allows_source(src));
    let fix = if compliant {
        Vec::new()
    } else {
        route::fixes(&Fix {
            rule,
            destination,
            prediction: &prediction,
            host,
            shared: shared.contains(place, destination),
            place,
        })
    };
    Ok(DestinationCheck {
        rule: rule.name.to_string(),
        destination: policy::display_net(destination),
        dst,
        protocol: query.protocol.map(policy::Protocol::as_str),
        dst_port: query.dst_port,
        uid: program.uid,
        mark: (program.mark != 0).then_some(program.mark),
        predicted_src: prediction.src,
        oif: prediction.oif.clone(),
        gateway: prediction.gateway,
        table: prediction.table.map(route::table_name),
        allowed_sources: rule
            .allowed_sources
            .iter()
            .map(|net| policy::display_net(*net))
            .collect(),
        compliant,
        reason: pin.explain(&route_reason),
        route_reason,
        warnings: route::unprotecting_rules(rule, &query, &prediction, host),
        exact: host.predicts_whole(destination, prediction.route.as_ref()),
        fix,
    })
}

fn print_header(out: &mut impl std::io::Write, asked: &str) -> std::io::Result<()> {
    writeln!(out, "srcip check: {asked}")?;
    writeln!(
        out,
        "{:<20} {:<32} {:<26} {:<10} VERDICT",
        "RULE", "DESTINATION", "PREDICTED SOURCE", "OIF"
    )
}

fn print_row(out: &mut impl std::io::Write, row: &DestinationCheck) -> std::io::Result<()> {
    let destination = if row.destination == row.dst.to_string() {
        row.destination.clone()
    } else {
        format!("{} ({})", row.destination, row.dst)
    };
    let predicted = row
        .predicted_src
        .map_or_else(|| "none".to_owned(), |src| src.to_string());
    let verdict = if row.allowed_sources.is_empty() {
        "-".to_owned()
    } else if row.compliant {
        "allowed".to_owned()
    } else {
        format!("NOT ALLOWED (allowed: {})", row.allowed_sources.join(", "))
    };
    writeln!(
        out,
        "{:<20} {:<32} {:<26} {:<10} {verdict}",
        row.rule,
        destination,
        predicted,
        row.oif.as_deref().unwrap_or("-")
    )?;
    writeln!(out, "    reason: {}", row.reason)?;
    for warning in &row.warnings {
        writeln!(out, "    warning: {warning}")?;
    }
    for fix in &row.fix {
        writeln!(out, "    fix: {fix}")?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_prefix_is_checked_at_its_first_host_address() {
        let at = |prefix: &str| representative(prefix.parse().unwrap()).to_string();
        assert_eq!(at("198.51.100.50/32"), "198.51.100.50");
        assert_eq!(at("198.51.100.0/24"), "198.51.100.1");
        assert_eq!(at("198.51.100.6/31"), "198.51.100.6");
        assert_eq!(at("2001:db8:50::/64"), "2001:db8:50::1");
        assert_eq!(at("0.0.0.0/0"), "0.0.0.1");
    }

    #[test]
    fn a_destination_is_an_address_or_name_with_an_optional_port_and_protocol() {
        let parsed = |text: &str| {
            text.parse::<AdHocDestination>()
                .map(|asked| (asked.host, asked.port, asked.protocol))
        };
        let tcp = Some(policy::Protocol::Tcp);
        assert_eq!(
            parsed("198.51.100.50:443/tcp"),
            Ok(("198.51.100.50".into(), Some(443), tcp))
        );
        assert_eq!(
            parsed("198.51.100.50"),
            Ok(("198.51.100.50".into(), None, None))
        );
        assert_eq!(
            parsed("2001:db8::50"),
            Ok(("2001:db8::50".into(), None, None))
        );
        assert_eq!(
            parsed("[2001:db8::50]:53/udp"),
            Ok(("2001:db8::50".into(), Some(53), Some(policy::Protocol::Udp)))
        );
        assert_eq!(
            parsed("api.example.com:8443"),
            Ok(("api.example.com".into(), Some(8443), None))
        );
        for wrong in [
            "198.51.100.0/24",
            "198.51.100.50:0",
            "198.51.100.50:https",
            "[2001:db8::50",
            "a b",
            "",
            "host/sctp",
        ] {
            let error = parsed(wrong).unwrap_err();
            assert!(error.contains("ADDR[:PORT]"), "{wrong}: {error}");
        }
    }

    #[test]
    fn the_question_is_a_valid_one_rule_policy() {
        let asked: AdHocDestination = "198.51.100.50:443/tcp".parse().unwrap();
        let policy = asked.policy(Some("203.0.113.10".parse().unwrap())).unwrap();
        let rule = &policy.rules[0];
        assert_eq!(&*rule.name, "198.51.100.50:443/tcp");
        assert!(rule.allows_source("203.0.113.10".parse().unwrap()));
        assert!(!rule.allows_source("203.0.113.11".parse().unwrap()));
        let any = asked.policy(None).unwrap();
        assert!(any.rules[0].allows_source("2001:db8::11".parse().unwrap()));
    }

    #[test]
    fn a_destination_is_shared_when_an_overlapping_one_allows_other_sources() {
        let rule = |name: &str, destination: &str, source: &str| {
            format!(
                "[[rule]]\nname = \"{name}\"\ndestinations = [\"{destination}\"]\nallowed_sources = [\"{source}\"]\n{}\n",
                // e and f share their prefix: each must keep to its own protocol.
                match name {
                    "e" => "protocol = \"tcp\"\n",
                    "f" => "protocol = \"udp\"\n",
                    _ => "",
                }
            )
        };
        let text = [
            rule("a", "198.51.100.0/24", "203.0.113.10"),
            rule("b", "198.51.100.50", "203.0.113.11"),
            rule("c", "192.0.2.0/24", "203.0.113.10"),
            rule("d", "192.0.2.0/25", "203.0.113.10"),
            rule("e", "2001:db8::/32", "2001:db8:1::10"),
            rule("f", "2001:db8::/32", "2001:db8:1::11"),
            rule("g", "2001:db9::/32", "2001:db8:1::11"),
        ]
        .concat();
        let policy = policy::parse(Path::new("test.toml"), &text).unwrap();
        let shared = SharedDestinations::of(&policy);
        let verdicts: Vec<bool> = policy
            .rules
            .iter()
            .enumerate()
            .map(|(place, rule)| match rule.destinations[0].0 {
                Destination::Prefix(prefix) => shared.contains(place, prefix),
                Destination::Host(_) => unreachable!("the policy names no host"),
            })
            .collect();
        // a covers b and allows another source; c and d overlap but agree; e and f name
        // the same prefix and disagree; g overlaps nothing.
        assert_eq!(verdicts, [true, true, false, false, true, true, false]);
    }

    #[test]
    fn the_lookup_carries_the_rules_protocol_and_first_port() {
        let policy = policy::parse(
            Path::new("test.toml"),
            "[[rule]]\nname = \"a\"\ndestinations = [\"192.0.2.1\"]\nports = [443, \"8000-8080\"]\nallowed_sources = [\"203.0.113.10\"]\n\n[[rule]]\nname = \"b\"\ndestinations = [\"192.0.2.2\"]\nprotocol = \"udp\"\nallowed_sources = [\"203.0.113.10\"]\n",
        )
        .unwrap();
        let dst: IpAddr = "192.0.2.1".parse().unwrap();
        let with_ports = query_for(&policy.rules[0], dst, Program::default());
        assert_eq!(
            (with_ports.protocol, with_ports.dst_port),
            (Some(policy::Protocol::Tcp), Some(443))
        );
        let udp = query_for(&policy.rules[1], dst, Program::default());
        assert_eq!(
            (udp.protocol, udp.dst_port),
            (Some(policy::Protocol::Udp), None)
        );
    }
}

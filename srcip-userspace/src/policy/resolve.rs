//! Host names in `destinations`: resolved when the policy is loaded, and again when their
//! records expire, so that a partner that moves its service to new addresses is audited at
//! the new ones without a reload.
//!
//! The resolver (hickory) asks the name servers of `/etc/resolv.conf` (or `--resolv-conf`)
//! and reads `/etc/hosts`, and it says how long each answer is valid: its TTL. An address
//! stays in force for `keep` after the last answer that held it, because programs cache
//! their own answers (a JVM for a long while, a connection pool until it reconnects) and
//! round-robin names return a different subset each time: an address dropped from the
//! policy at once would leave their connections unaudited.

use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    net::IpAddr,
    path::Path,
    sync::Arc,
    time::Duration,
};

use hickory_resolver::{
    TokioResolver,
    config::{ResolverConfig, ResolverOpts},
    net::{NetError, runtime::TokioRuntimeProvider},
};
use ipnet::IpNet;
use tokio::time::Instant;
use tracing::{debug, info, warn};

use super::{Destination, Location, Policy, PolicyError, PolicyLoadError, parse::canonical};

/// An answer valid for less than this is asked again only after it: a TTL of 0 would
/// otherwise have srcip ask without pause.
const MIN_TTL: Duration = Duration::from_secs(1);
/// Where the system names its name servers.
const SYSTEM_RESOLV_CONF: &str = "/etc/resolv.conf";
/// After a failed lookup, how long until the next try; the addresses in force stay.
const RETRY_AFTER_FAILURE: Duration = Duration::from_secs(30);

/// The host names of the policy in force, with the addresses each stands for now.
pub struct HostNames {
    /// Or why there is none.
    resolver: Result<Resolver, String>,
    /// How long an address stays in force after the last answer that held it.
    keep: Duration,
    names: HashMap<String, Name>,
    /// The policy in force as its file says, when it names hosts (see [`Answers`]).
    written: Option<Arc<Policy>>,
}

/// A resolver, and what it asks, for messages.
struct Resolver {
    lookup: TokioResolver,
    /// The name servers, as "the name servers of FILE (ADDRESSES)".
    servers: String,
    /// How long it waits for one answer, and how many times it asks each server.
    timeout: Duration,
    attempts: usize,
}

impl Resolver {
    /// A resolver configured as the resolv.conf `path` says (`config` and `options`).
    fn configured(
        path: &Path,
        config: ResolverConfig,
        options: ResolverOpts,
    ) -> Result<Self, String> {
        let servers: BTreeSet<String> = config
            .name_servers()
            .iter()
            .map(|server| server.ip.to_string())
            .collect();
        let servers = format!(
            "the name servers of {} ({})",
            path.display(),
            servers.into_iter().collect::<Vec<_>>().join(", ")
        );
        let (timeout, attempts) = (options.timeout, options.attempts);
        let mut builder =
            TokioResolver::builder_with_config(config, TokioRuntimeProvider::default());
        *builder.options_mut() = options;
        let lookup = builder.build().map_err(|error| error.to_string())?;
        Ok(Self {
            lookup,
            servers,
            timeout,
            attempts,
        })
    }

    /// Why `name` did not resolve, in words an operator can act on.
    fn explain(&self, error: &NetError) -> String {
        if error.is_nx_domain() {
            format!("no such name (NXDOMAIN, resolving with {})", self.servers)
        } else if error.is_no_records_found() {
            format!(
                "the name has no A or AAAA record (resolving with {})",
                self.servers
            )
        } else if matches!(error, NetError::Timeout | NetError::NoConnections) {
            format!(
                "no answer from {} after {} {} of {} s each: check that they are reachable, or give srcip others with --resolv-conf",
                self.servers,
                self.attempts,
                if self.attempts == 1 { "try" } else { "tries" },
                self.timeout.as_secs()
            )
        } else {
            format!("resolving with {} failed: {error}", self.servers)
        }
    }
}

/// `--resolv-conf` names a file srcip cannot ask name servers with: bad input (exit 2).
#[derive(Debug, thiserror::Error)]
#[error("--resolv-conf {}: {reason}", path.display())]
pub struct ResolvConfError {
    path: std::path::PathBuf,
    reason: String,
}

/// A policy's host names resolved, not yet in force.
pub struct Answers {
    names: HashMap<String, Name>,
    /// The policy as its file says, with its host names, to compile again when their
    /// addresses change. Only a policy that names hosts is kept so: one of addresses alone
    /// would be a second copy of every rule (a kilobyte each) for nothing.
    written: Option<Arc<Policy>>,
}

impl Answers {
    /// The policy as its file says, when it names hosts.
    pub fn written(&self) -> Option<&Policy> {
        self.written.as_deref()
    }

    /// `policy` (as written, with host names) with each name replaced by these addresses,
    /// each at the name's location.
    pub fn apply(&self, policy: &Policy) -> Policy {
        apply(&self.names, policy.clone())
    }
}

#[derive(Clone)]
struct Name {
    /// Addresses in force, each with when an answer last held it.
    addresses: BTreeMap<IpAddr, Instant>,
    /// When the answer expires and the name is asked again.
    expires: Instant,
}

/// A name that now stands for other addresses than before.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NameChange {
    pub name: String,
    /// The addresses in force now.
    pub addresses: Vec<IpAddr>,
    pub added: Vec<IpAddr>,
    pub removed: Vec<IpAddr>,
}

impl HostNames {
    /// A resolver configured by `resolv_conf`, or by the system's `/etc/resolv.conf` when
    /// `None`. A system without a usable one is refused only once a policy names a host:
    /// policies of addresses alone need no name server.
    pub fn new(resolv_conf: Option<&Path>, keep: Duration) -> Result<Self, ResolvConfError> {
        let resolver = match resolv_conf {
            None => hickory_resolver::system_conf::read_system_conf()
                .map_err(|error| error.to_string())
                .and_then(|(config, options)| {
                    Resolver::configured(Path::new(SYSTEM_RESOLV_CONF), config, options)
                })
                .map_err(|error| format!("no usable {SYSTEM_RESOLV_CONF}: {error}")),
            Some(path) => Ok(configured_by(path)?),
        };
        Ok(Self {
            resolver,
            keep,
            names: HashMap::new(),
            written: None,
        })
    }

    /// Resolves every host name of `policy` now (a load or a reload) and returns the policy
    /// with each name replaced by its addresses, and the answers, which [`Self::adopt`] puts
    /// in force once the policy is. Addresses a name held before and still keeps are kept
    /// too. A name that does not resolve is an error at its location.
    pub async fn resolve(&self, policy: Policy) -> Result<(Policy, Answers), PolicyLoadError> {
        // Each name is asked once, however often the policy names it; a failure is an error
        // at every place.
        let mut fresh = HashMap::new();
        let mut errors = Vec::new();
        let count = host_names(&policy)
            .map(|(name, _)| name)
            .collect::<BTreeSet<_>>()
            .len();
        if let (Ok(resolver), 1..) = (&self.resolver, count) {
            // A name server that does not answer makes this take seconds: say what waits.
            info!(
                "resolving {count} host name{} with {}",
                if count == 1 { "" } else { "s" },
                resolver.servers
            );
        }
        for (name, location) in host_names(&policy) {
            if !fresh.contains_key(name) {
                let answer = self.lookup(name).await;
                fresh.insert(name.to_owned(), answer);
            }
            if let Err(error) = &fresh[name] {
                errors.push(PolicyError {
                    location,
                    message: format!("cannot resolve host name \"{name}\": {error}"),
                });
            }
        }
        if !errors.is_empty() {
            return Err(PolicyLoadError::Invalid {
                path: policy.path,
                errors,
            });
        }
        let now = Instant::now();
        let mut names = HashMap::with_capacity(fresh.len());
        for (text, answer) in fresh {
            let Ok((addresses, expires)) = answer else {
                continue;
            };
            let mut name = self.names.get(&text).cloned().unwrap_or(Name {
                addresses: BTreeMap::new(),
                expires,
            });
            name.update(addresses, expires, now, self.keep);
            names.insert(text, name);
        }
        let (resolved, written) = if names.is_empty() {
            (policy, None)
        } else {
            (apply(&names, policy.clone()), Some(Arc::new(policy)))
        };
        Ok((resolved, Answers { names, written }))
    }

    /// Puts in force the answers of the policy that now is.
    pub fn adopt(&mut self, answers: Answers) {
        self.names = answers.names;
        self.written = answers.written;
    }

    /// When the first answer expires; `None` without host names.
    pub fn next_expiry(&self) -> Option<Instant> {
        self.names.values().map(|name| name.expires).min()
    }

    /// Asks again for every name whose answer has expired. Returns the answers, which
    /// [`Self::adopt`] puts in force once the policy compiled with them is, and the names
    /// that now stand for other addresses. A failed lookup keeps the name's addresses and is
    /// tried again later.
    pub async fn refresh(&self) -> (Answers, Vec<NameChange>) {
        let now = Instant::now();
        let mut names = self.names.clone();
        let mut changes = Vec::new();
        for (text, name) in &mut names {
            if name.expires > now {
                continue;
            }
            let before: BTreeSet<IpAddr> = name.addresses.keys().copied().collect();
            match self.lookup(text).await {
                Ok((addresses, expires)) => {
                    name.update(addresses, expires, Instant::now(), self.keep)
                }
                Err(error) => {
                    warn!(
                        "cannot resolve host name \"{text}\" again ({error}); its addresses stay in force, next try in {}s",
                        RETRY_AFTER_FAILURE.as_secs()
                    );
                    name.expires = Instant::now() + RETRY_AFTER_FAILURE;
                }
            }
            let after: BTreeSet<IpAddr> = name.addresses.keys().copied().collect();
            if before != after {
                changes.push(NameChange {
                    name: text.clone(),
                    addresses: after.iter().copied().collect(),
                    added: after.difference(&before).copied().collect(),
                    removed: before.difference(&after).copied().collect(),
                });
            }
        }
        let written = self.written.clone();
        (Answers { names, written }, changes)
    }

    /// After answers that could not be put in force (the policy compiled with them is
    /// invalid): the addresses in force stay, and each name is asked again after
    /// [`RETRY_AFTER_FAILURE`] rather than at once.
    pub fn retry_later(&mut self) {
        let next = Instant::now() + RETRY_AFTER_FAILURE;
        for name in self.names.values_mut() {
            name.expires = name.expires.max(next);
        }
    }

    /// The name's addresses (IPv4 and IPv6) and when the answer expires.
    /// `name`'s addresses and when the answer expires; or why not, in words to act on.
    async fn lookup(&self, name: &str) -> Result<(Vec<IpAddr>, Instant), String> {
        let resolver = self.resolver.as_ref()?;
        let answer = resolver
            .lookup
            .lookup_ip(name)
            .await
            .map_err(|error| resolver.explain(&error))?;
        let addresses: Vec<IpAddr> = answer.iter().collect();
        let valid_until = Instant::from_std(answer.valid_until());
        let expires = valid_until.max(Instant::now() + MIN_TTL);
        debug!(
            "{name} resolves to {addresses:?}, valid for {:?}",
            expires - Instant::now()
        );
        Ok((addresses, expires))
    }
}

impl Name {
    /// Puts a new answer in force: its addresses are seen now; those not seen for `keep`
    /// leave.
    fn update(&mut self, answer: Vec<IpAddr>, expires: Instant, now: Instant, keep: Duration) {
        for address in answer {
            self.addresses.insert(address, now);
        }
        self.addresses
            .retain(|_, seen| now.duration_since(*seen) <= keep);
        self.expires = expires;
    }
}

/// A resolver asking the name servers `path` (resolv.conf format) names.
fn configured_by(path: &Path) -> Result<Resolver, ResolvConfError> {
    let refused = |reason: String| ResolvConfError {
        path: path.to_owned(),
        reason,
    };
    let text = std::fs::read(path).map_err(|error| refused(error.to_string()))?;
    let (config, options): (ResolverConfig, _) =
        hickory_resolver::system_conf::parse_resolv_conf(text)
            .map_err(|error| refused(format!("not a usable resolv.conf: {error}")))?;
    Resolver::configured(path, config, options).map_err(refused)
}
/// Every host name of `policy` with where it is written.
fn host_names(policy: &Policy) -> impl Iterator<Item = (&str, Location)> {
    policy.rules.iter().flat_map(|rule| {
        rule.destinations
            .iter()
            .filter_map(|(destination, location)| match destination {
                Destination::Host(name) => Some((name.as_str(), *location)),
                Destination::Prefix(_) => None,
            })
    })
}

/// `policy` with each host name replaced by its addresses in `names`, at the name's location.
fn apply(names: &HashMap<String, Name>, mut policy: Policy) -> Policy {
    for rule in &mut policy.rules {
        let mut resolved: Vec<(Destination, Location)> =
            Vec::with_capacity(rule.destinations.len());
        for (destination, location) in rule.destinations.drain(..) {
            let Destination::Host(text) = &destination else {
                resolved.push((destination, location));
                continue;
            };
            let addresses = names
                .get(text)
                .into_iter()
                .flat_map(|name| name.addresses.keys());
            for address in addresses {
                let prefix = Destination::Prefix(canonical(IpNet::from(*address)));
                if !resolved.iter().any(|(known, _)| *known == prefix) {
                    resolved.push((prefix, location));
                }
            }
        }
        rule.destinations = resolved;
    }
    policy
}

#[cfg(test)]
mod tests {
    use super::*;

    fn addresses(name: &Name) -> Vec<IpAddr> {
        name.addresses.keys().copied().collect()
    }

    #[test]
    fn an_address_stays_for_keep_after_the_last_answer_that_held_it() {
        let (a, b) = ("192.0.2.1".parse().unwrap(), "192.0.2.2".parse().unwrap());
        let keep = Duration::from_secs(60);
        let start = Instant::now();
        let mut name = Name {
            addresses: BTreeMap::new(),
            expires: start,
        };
        name.update(vec![a], start, start, keep);
        name.update(vec![b], start, start + Duration::from_secs(30), keep);
        assert_eq!(addresses(&name), [a, b], "a was seen 30 s ago: kept");
        name.update(vec![b], start, start + Duration::from_secs(61), keep);
        assert_eq!(addresses(&name), [b], "a was last seen 61 s ago: gone");
    }
}

//! Host names in `destinations`, resolved once when the policy is loaded for `run`.

use std::net::ToSocketAddrs;

use ipnet::IpNet;

use super::{Destination, Policy, PolicyError, PolicyLoadError, parse::canonical};

/// Replaces every host name by the addresses it resolves to now, keeping the location of the
/// name for later error messages. A name that does not resolve is an error at its location.
pub fn resolve_hosts(mut policy: Policy) -> Result<Policy, PolicyLoadError> {
    let mut errors = Vec::new();
    for rule in &mut policy.rules {
        let mut resolved = Vec::with_capacity(rule.destinations.len());
        for (destination, location) in rule.destinations.drain(..) {
            let Destination::Host(name) = &destination else {
                resolved.push((destination, location));
                continue;
            };
            match (name.as_str(), 0).to_socket_addrs() {
                Ok(addresses) => {
                    for address in addresses {
                        let prefix = Destination::Prefix(canonical(IpNet::from(address.ip())));
                        if !resolved.iter().any(|(known, _)| *known == prefix) {
                            resolved.push((prefix, location));
                        }
                    }
                }
                Err(error) => errors.push(PolicyError {
                    location,
                    message: format!("cannot resolve host name \"{name}\": {error}"),
                }),
            }
        }
        rule.destinations = resolved;
    }
    if errors.is_empty() {
        Ok(policy)
    } else {
        Err(PolicyLoadError::Invalid {
            path: policy.path,
            errors,
        })
    }
}

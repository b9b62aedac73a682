//! The compiled policy in the kernel's maps, written at start and replaced on reload without
//! a moment in which a connection sees no policy, or half of one (the order is in
//! `srcip_common::policy`); and what the route module tells enforcement beside it.

use std::{collections::HashSet, net::IpAddr};

use aya::maps::{Array, HashMap, LpmTrie, MapData, lpm_trie::Key};
use ipnet::IpNet;
use srcip_common::{
    names,
    policy::{Candidates, KernelRule, PinSource, PolicyState, PredictedSource},
    record::{AF_INET, AF_INET6},
};

use crate::policy::KernelTables;

/// A reload that cannot be written: the maps were sized at start.
#[derive(Debug, thiserror::Error)]
#[error(
    "the new policy has {rules} rules and {prefixes} destination prefixes; this srcip run has room for {room} of each, a quarter more than at start: restart srcip to load it"
)]
pub struct TooLarge {
    rules: usize,
    prefixes: usize,
    room: usize,
}

pub struct KernelPolicy {
    /// The tries of even generations' policies, then odd ones'.
    v4: [Trie<4>; 2],
    v6: [Trie<16>; 2],
    rules: Array<MapData, KernelRule>,
    state: Array<MapData, PolicyState>,
    /// Rules (and prefixes per family) that fit: half of `RULES`, one trie.
    room: usize,
    /// The generation in force.
    generation: u32,
    /// `SRCIP_TEST_FAIL_RELOAD_AT`: the trie write of the next reload that fails, counted
    /// from 1; once.
    injected_failure: Option<usize>,
}

/// One destination trie, and the prefixes written into it, which emptying it deletes.
struct Trie<const N: usize> {
    name: &'static str,
    map: LpmTrie<MapData, [u8; N], Candidates>,
    written: HashSet<(u32, [u8; N])>,
}

impl<const N: usize> Trie<N> {
    fn take(ebpf: &mut aya::Ebpf, name: &'static str) -> Result<Self, WriteError> {
        Ok(Self {
            name,
            map: take(ebpf, name)?,
            written: HashSet::new(),
        })
    }

    /// Deletes every prefix written, as far as it gets: what stays is still listed.
    fn empty(&mut self) -> Result<(), WriteError> {
        for (length, network) in std::mem::take(&mut self.written) {
            match self.map.remove(&Key::new(length, network)) {
                Ok(()) => {}
                // Already gone: the kernel and this list agree again.
                Err(aya::maps::MapError::KeyNotFound) => {}
                Err(source) => {
                    self.written.insert((length, network));
                    return Err(WriteError::Map {
                        name: self.name,
                        source,
                    });
                }
            }
        }
        Ok(())
    }

    fn insert(
        &mut self,
        length: u8,
        network: [u8; N],
        candidates: Candidates,
    ) -> Result<(), WriteError> {
        let length = u32::from(length);
        self.map
            .insert(&Key::new(length, network), candidates, 0)
            .map_err(map_error(self.name))?;
        self.written.insert((length, network));
        Ok(())
    }
}

impl KernelPolicy {
    /// Takes the policy maps, sized for `room` rules and prefixes per generation, and writes
    /// `tables` as generation 0.
    pub fn new(
        ebpf: &mut aya::Ebpf,
        room: usize,
        tables: &KernelTables,
    ) -> Result<Self, WriteError> {
        let injected_failure = std::env::var("SRCIP_TEST_FAIL_RELOAD_AT")
            .ok()
            .and_then(|at| at.parse().ok());
        let mut policy = Self {
            v4: [
                Trie::take(ebpf, names::V4_DESTINATIONS_EVEN)?,
                Trie::take(ebpf, names::V4_DESTINATIONS_ODD)?,
            ],
            v6: [
                Trie::take(ebpf, names::V6_DESTINATIONS_EVEN)?,
                Trie::take(ebpf, names::V6_DESTINATIONS_ODD)?,
            ],
            rules: take(ebpf, names::RULES)?,
            state: take(ebpf, names::POLICY_STATE)?,
            room,
            generation: 0,
            injected_failure: None,
        };
        // No program runs yet: nothing to wait for.
        policy.write(tables, 0, || {})?;
        policy.injected_failure = injected_failure;
        Ok(policy)
    }

    /// The generation of the policy in force.
    pub fn generation(&self) -> u32 {
        self.generation
    }

    /// The place in the policy in force of the rule the kernel names as `rule` of `RULES`,
    /// when the kernel decided under this policy (`generation`); `None` for a decision of an
    /// earlier policy.
    pub fn rule_in_force(&self, generation: u32, rule: u32) -> Option<usize> {
        if generation != self.generation {
            return None;
        }
        let offset = (generation % 2) as usize * self.room;
        (rule as usize)
            .checked_sub(offset)
            .filter(|index| *index < self.room)
    }

    /// Replaces the policy: the next decision of every connection uses `tables`. On error
    /// the policy in force stays, whole, in the kernel.
    pub fn replace(&mut self, tables: &KernelTables) -> Result<(), WriteError> {
        self.write(
            tables,
            self.generation.wrapping_add(1),
            wait_for_running_programs,
        )
    }

    /// Writes `tables` where the policy of `generation` lives (see `srcip_common::policy`),
    /// and puts it in force with its last write. `wait` returns once every program run that
    /// started before it has ended: it is called before the half is written (a run that
    /// read the generation before the last reload may still be reading this half) and
    /// before the generation is flipped (so that no run can see the new generation with
    /// the half as it was before: a program picks the half's trie by a branch on the
    /// generation, and a weakly ordered CPU such as arm64 may read that trie first).
    fn write(
        &mut self,
        tables: &KernelTables,
        generation: u32,
        wait: impl Fn(),
    ) -> Result<(), WriteError> {
        let prefixes = tables.v4.len().max(tables.v6.len());
        if tables.rules.len() > self.room || prefixes > self.room {
            return Err(WriteError::TooLarge(TooLarge {
                rules: tables.rules.len(),
                prefixes,
                room: self.room,
            }));
        }
        wait();
        let parity = (generation % 2) as usize;
        let offset = parity as u32 * self.room as u32;
        for (index, rule) in tables.rules.iter().enumerate() {
            self.rules
                .set(offset + index as u32, rule, 0)
                .map_err(map_error(names::RULES))?;
        }
        let shifted = |candidates: &Candidates| {
            let mut shifted = *candidates;
            for rule in shifted.rules.iter_mut().take(candidates.count as usize) {
                *rule += offset;
            }
            shifted
        };
        let (v4, v6) = (&mut self.v4[parity], &mut self.v6[parity]);
        v4.empty()?;
        v6.empty()?;
        let mut writes = 0;
        let mut count_write = || {
            writes += 1;
            if self.injected_failure == Some(writes) {
                self.injected_failure = None;
                return Err(WriteError::Injected);
            }
            Ok(())
        };
        for (net, candidates) in &tables.v4 {
            count_write()?;
            v4.insert(
                net.prefix_len(),
                net.network().octets(),
                shifted(candidates),
            )?;
        }
        for (net, candidates) in &tables.v6 {
            count_write()?;
            v6.insert(
                net.prefix_len(),
                net.network().octets(),
                shifted(candidates),
            )?;
        }
        wait();
        let state = PolicyState {
            report_unmatched: u32::from(tables.report_unmatched),
            generation,
            enforcing: u32::from(tables.enforcing),
        };
        self.state
            .set(0, state, 0)
            .map_err(map_error(names::POLICY_STATE))?;
        self.generation = generation;
        Ok(())
    }
}

#[derive(Debug, thiserror::Error)]
pub enum WriteError {
    #[error(transparent)]
    TooLarge(TooLarge),
    #[error("the eBPF object has no {0}: the build is broken, rebuild srcip")]
    Missing(&'static str),
    #[error("writing the kernel map {name} failed")]
    Map {
        name: &'static str,
        source: aya::maps::MapError,
    },
    /// What a failing kernel write does to a reload, for the tests: `SRCIP_TEST_FAIL_RELOAD_AT`.
    #[error("writing the kernel's destination tables failed (SRCIP_TEST_FAIL_RELOAD_AT)")]
    Injected,
}

/// Waits for an RCU grace period: every kernel program runs inside an RCU read-side section,
/// so each run that started before this call has ended when it returns, and a run that
/// starts after it sees every map write made before it. `membarrier(MEMBARRIER_CMD_GLOBAL)`
/// is `synchronize_rcu()` (Linux 4.16, a few milliseconds). It is refused on `nohz_full`
/// kernels; there a pause far longer than any program run stands in for it, which is as
/// good in practice, if not by proof.
fn wait_for_running_programs() {
    /// `MEMBARRIER_CMD_GLOBAL` in `linux/membarrier.h`.
    const MEMBARRIER_CMD_GLOBAL: libc::c_int = 1;
    // SAFETY: the syscall takes a command, flags and a CPU number, and touches no memory
    // of ours.
    let result = unsafe { libc::syscall(libc::SYS_membarrier, MEMBARRIER_CMD_GLOBAL, 0, 0) };
    if result != 0 {
        tracing::debug!(
            "membarrier: {}; pausing instead of waiting for a grace period",
            std::io::Error::last_os_error()
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
}

fn map_error(name: &'static str) -> impl Fn(aya::maps::MapError) -> WriteError {
    move |source| WriteError::Map { name, source }
}

fn take<M>(ebpf: &mut aya::Ebpf, name: &'static str) -> Result<M, WriteError>
where
    M: TryFrom<aya::maps::Map, Error = aya::maps::MapError>,
{
    let map = ebpf.take_map(name).ok_or(WriteError::Missing(name))?;
    M::try_from(map).map_err(map_error(name))
}

/// What the route module knows that enforcement needs in the kernel, which the drift watch
/// rewrites after every change of routes, addresses or rules:
/// - the source the kernel is predicted to choose for each destination of a blocking rule
///   (`srcip_common::policy::PredictedSource`), which `block` judges a socket by when its
///   program bound none;
/// - which pin sources the host has (`srcip_common::policy::PinSource`), which a datagram's
///   source is set to only then.
pub struct RoutingMaps {
    predicted_v4: LpmTrie<MapData, [u8; 4], PredictedSource>,
    predicted_v6: LpmTrie<MapData, [u8; 16], PredictedSource>,
    present_pin_sources: HashMap<MapData, PinSource, u64>,
    /// srcip's own network namespace, whose routes and addresses are read.
    netns_cookie: u64,
    predicted: HashSet<IpNet>,
    present: HashSet<PinSource>,
}

impl RoutingMaps {
    /// `netns_cookie`: srcip's own network namespace's, whose routes the predictions read.
    pub fn new(
        predicted_v4: LpmTrie<MapData, [u8; 4], PredictedSource>,
        predicted_v6: LpmTrie<MapData, [u8; 16], PredictedSource>,
        present_pin_sources: HashMap<MapData, PinSource, u64>,
        netns_cookie: u64,
    ) -> Self {
        Self {
            predicted_v4,
            predicted_v6,
            present_pin_sources,
            netns_cookie,
            predicted: HashSet::new(),
            present: HashSet::new(),
        }
    }

    /// Makes the present pin sources exactly `sources`.
    pub fn replace_present_pin_sources(&mut self, sources: &[IpAddr]) -> Result<(), WriteError> {
        let now: HashSet<PinSource> = sources.iter().map(|source| pin_source(*source)).collect();
        for source in &now {
            self.present_pin_sources
                .insert(source, self.netns_cookie, 0)
                .map_err(map_error(names::PRESENT_PIN_SOURCES))?;
        }
        for gone in self.present.difference(&now) {
            self.present_pin_sources
                .remove(gone)
                .map_err(map_error(names::PRESENT_PIN_SOURCES))?;
        }
        self.present = now;
        Ok(())
    }

    /// Makes the predicted sources `predictions` (destination prefix, predicted source) and nothing
    /// else. Each entry is replaced on its own, so a connection sees the old prediction or
    /// the new one.
    pub fn replace_predictions(
        &mut self,
        predictions: &[(IpNet, IpAddr)],
    ) -> Result<(), WriteError> {
        let mut now = HashSet::new();
        for (prefix, src) in predictions {
            let value = |addr: [u8; 16]| PredictedSource {
                addr,
                netns_cookie: self.netns_cookie,
            };
            match (prefix, src) {
                (IpNet::V4(net), IpAddr::V4(src)) => {
                    let mut addr = [0; 16];
                    addr[..4].copy_from_slice(&src.octets());
                    let key = Key::new(u32::from(net.prefix_len()), net.network().octets());
                    self.predicted_v4
                        .insert(&key, value(addr), 0)
                        .map_err(map_error(names::PREDICTED_V4_SOURCES))?;
                }
                (IpNet::V6(net), IpAddr::V6(src)) => {
                    let key = Key::new(u32::from(net.prefix_len()), net.network().octets());
                    self.predicted_v6
                        .insert(&key, value(src.octets()), 0)
                        .map_err(map_error(names::PREDICTED_V6_SOURCES))?;
                }
                // A source of the other family is no prediction for this prefix.
                _ => continue,
            }
            now.insert(*prefix);
        }
        for gone in self.predicted.difference(&now) {
            match gone {
                IpNet::V4(net) => {
                    let key = Key::new(u32::from(net.prefix_len()), net.network().octets());
                    self.predicted_v4
                        .remove(&key)
                        .map_err(map_error(names::PREDICTED_V4_SOURCES))?;
                }
                IpNet::V6(net) => {
                    let key = Key::new(u32::from(net.prefix_len()), net.network().octets());
                    self.predicted_v6
                        .remove(&key)
                        .map_err(map_error(names::PREDICTED_V6_SOURCES))?;
                }
            }
        }
        self.predicted = now;
        Ok(())
    }
}

/// The kernel's key for a pin source: family and record layout.
fn pin_source(source: IpAddr) -> PinSource {
    let mut addr = [0; 16];
    let family = match source {
        IpAddr::V4(v4) => {
            addr[..4].copy_from_slice(&v4.octets());
            AF_INET
        }
        IpAddr::V6(v6) => {
            addr = v6.octets();
            AF_INET6
        }
    };
    PinSource {
        family: u32::from(family),
        addr,
    }
}

//! srcip's user space. The `srcip` binary (`main.rs`) wires the subcommands; the benchmarks
//! (`benches/`) reach the policy matcher through this library. Modules are public only where
//! one of those two needs them.

mod adopt;
pub mod alerts;
mod attribute;
mod audit;
pub mod cgroup;
pub mod check;
pub mod cli;
pub mod delivery;
pub mod demo;
mod drift;
mod events;
pub mod features;
mod folding;
pub mod learn;
mod loader;
mod manual;
mod metrics;
mod netns;
pub mod output;
pub mod policy;
mod policy_maps;
mod reload;
mod route;
pub mod run;
mod system;
mod systemd;
mod workload;

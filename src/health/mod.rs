//! Uplink health: the agent probes the uplinks of every outbound list with a fallback
//! (`probe.rs`), judges each with hysteresis (`tracker.rs`), and shares what it decided through the
//! state directory (`view.rs`), so that a CNI ADD, CHECK, `reconcile` and the agent itself all
//! route the pods' own traffic by the same uplink. Without a live agent nothing switches.

pub mod probe;
pub mod tracker;
pub mod view;

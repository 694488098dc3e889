//! Uplink health: the agent probes the uplinks of every outbound list with a fallback, in each
//! family the uplink has an address of (`probe.rs`, its packets in `packet.rs`, its socket in
//! `socket.rs`), judges each uplink per family with hysteresis (`tracker.rs`, `verdict.rs`), and
//! shares what it decided through the
//! state directory (`view.rs`), so that a CNI ADD, CHECK, `reconcile` and the agent itself all
//! route the pods' own traffic by the same uplink. Without a live agent nothing switches.

pub mod packet;
pub mod probe;
pub mod socket;
pub mod tracker;
pub mod verdict;
pub mod view;

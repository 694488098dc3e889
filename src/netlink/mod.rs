//! Netfilter over netlink, spoken directly: the message framing and sockets (nfnetlink.rs), and
//! conntrack entry clearing (conntrack.rs). The nftables backend builds on the same framing.

pub mod closer;
pub mod conntrack;
pub mod nfnetlink;

//! What the agent is told to do. The command line (cli/) builds it, so the agent knows nothing of
//! how options are spelled and the two do not depend on each other.

use crate::config::Settings;
use std::net::SocketAddr;

#[derive(Debug, Clone)]
pub struct WatchOptions {
    /// The records, log and firewall tools it works with, as the plugin's config names them.
    pub settings: Settings,
    /// The safety reconcile's period, in seconds.
    pub interval_secs: u64,
    /// Where to serve /metrics and /healthz; None: nowhere.
    pub metrics: Option<SocketAddr>,
}

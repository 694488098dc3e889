//! The CNI commands, one pipeline each, in one file each:
//!   add:    validate → plan → lock → claim host ports → record intent → hold shared objects →
//!           sysctls, firewall (one transaction), routing → record result
//!   del:    lock → read the record → release holds → routing, firewall → forget the record
//!   check:  lock → read the record → compare with the config → verify the kernel (changes nothing)
//!   gc:     lock → read every record → drop the forgotten ones → rebuild index and firewall
//!   status: lock → probe the state directory and the backend
//! and the operator's: list.rs (every record, as a person reads it), uninstall.rs (everything
//! bridge-nat put on the node), reconcile.rs (the node against its records).
//! The shared steps live in node.rs (state, holds, install/remove with their fallback, rollback)
//! and kernel.rs (sysctls, routing, table names, conntrack).

mod add;
mod check;
mod del;
mod gc;
mod kernel;
mod list;
mod node;
mod reconcile;
mod snat6;
mod status;
mod uninstall;
mod uplinks;

pub use add::add;
pub use check::check;
pub use del::del;
pub use gc::gc;
pub use list::{list, Listed, ListedForward, ListedMark, ListedTable};
pub use reconcile::{problems_of, problems_per_attachment, reconcile, routing_problems};
pub use status::status;
pub use uninstall::{uninstall, Survey};
pub use uplinks::{egress_status, render_egress};

use crate::cni::Env;
use crate::config::{AttachmentId, NetConf};

/// The node lock, for the operator's commands that read the node as CNI calls leave it.
pub fn lock_node(settings: &crate::config::Settings) -> crate::error::Result<crate::state::Lock> {
    node::Node::open(settings)?.lock(settings.lock_timeout)
}

fn attachment_id(conf: &NetConf, env: &Env) -> AttachmentId {
    AttachmentId { network: conf.name.clone(), container_id: env.container_id.clone(), ifname: env.ifname.clone() }
}

//! The CNI commands, one pipeline each, in one file each:
//!   add:    validate → plan → lock → claim host ports → record intent → hold shared objects →
//!           sysctls, firewall (one transaction), routing → record result
//!   del:    lock → read the record → release holds → routing, firewall → forget the record
//!   check:  lock → read the record → compare with the config → verify the kernel (changes nothing)
//!   gc:     lock → read every record → drop the forgotten ones → rebuild index and firewall
//!   status: lock → probe the state directory and the backend
//! The shared steps live in node.rs (state, holds, install/remove with their fallback, rollback)
//! and kernel.rs (sysctls, routing, table names, conntrack).

mod add;
mod check;
mod del;
mod gc;
mod kernel;
mod node;
mod reconcile;
mod status;

pub use add::add;
pub use check::check;
pub use del::del;
pub use gc::gc;
pub use reconcile::{problems_per_attachment, reconcile};
pub use status::status;

use crate::cni::Env;
use crate::config::{AttachmentId, NetConf};

fn attachment_id(conf: &NetConf, env: &Env) -> AttachmentId {
    AttachmentId { network: conf.name.clone(), container_id: env.container_id.clone(), ifname: env.ifname.clone() }
}

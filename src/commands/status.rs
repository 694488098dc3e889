//! STATUS: can this node take an ADD now? The state directory must be writable and the configured
//! backend usable.

use super::node::Node;
use crate::backend;
use crate::config::NetConf;
use crate::error::{code, Error, Result};

pub fn status(conf: &NetConf) -> Result<()> {
    let unavailable = |e: Error| Error::new(code::NOT_AVAILABLE, e.msg);
    let node = Node::open(&conf.settings).map_err(unavailable)?;
    let _lock = node.lock(conf.settings.lock_timeout)?;
    node.store.probe_writable().map_err(unavailable)?;
    let mut fw = backend::open_for(&conf.settings);
    fw.usable().map_err(|e| Error::new(code::NOT_AVAILABLE, format!("{} unusable: {}", fw.kind().name(), e.msg)))
}

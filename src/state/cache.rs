//! The records kept in memory by a long-lived reader (the node agent), re-read only where the
//! state directory changed: a look costs a few `stat`s when nothing did, and one parse per
//! record written since, never a parse of every record on the node.

use super::record::Record;
use super::store::read_record;
use super::{read_dir_sorted, Store};
use crate::error::Result;
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::SystemTime;

#[derive(Default)]
pub struct RecordCache {
    /// The modification times of `records/` and each network directory at the last scan: a
    /// record written (renamed into place) or removed changes its directory's.
    dirs: Vec<(PathBuf, Option<SystemTime>)>,
    files: BTreeMap<PathBuf, (Option<SystemTime>, u64, Option<Record>)>,
}

fn mtime(path: &std::path::Path) -> Option<SystemTime> {
    std::fs::symlink_metadata(path).and_then(|m| m.modified()).ok()
}

impl RecordCache {
    /// Bring the cache up to date; true when any record came, changed or went.
    pub fn refresh(&mut self, store: &Store) -> Result<bool> {
        let root = store.dir().join("records");
        let unchanged = !self.dirs.is_empty() && self.dirs.iter().all(|(d, t)| mtime(d) == *t);
        if unchanged && mtime(&root) == self.dirs[0].1 {
            return Ok(false);
        }
        let mut dirs = vec![(root.clone(), mtime(&root))];
        let mut seen = BTreeMap::new();
        let mut changed = false;
        for net in read_dir_sorted(&root)? {
            if !net.is_dir() || net.is_symlink() {
                continue;
            }
            dirs.push((net.clone(), mtime(&net)));
            for file in read_dir_sorted(&net)?.into_iter().filter(|f| f.extension().is_some_and(|e| e == "json")) {
                let meta = std::fs::symlink_metadata(&file).ok();
                let stamp = (meta.as_ref().and_then(|m| m.modified().ok()), meta.map_or(0, |m| m.len()));
                let entry = match self.files.remove(&file) {
                    Some((t, len, rec)) if (t, len) == stamp => (t, len, rec),
                    _ => {
                        changed = true;
                        let rec = read_record(&file).inspect_err(|e| log::warn!("ignoring unreadable record: {e}"));
                        (stamp.0, stamp.1, rec.ok().flatten())
                    }
                };
                seen.insert(file, entry);
            }
        }
        changed |= !self.files.is_empty();
        self.files = seen;
        self.dirs = dirs;
        Ok(changed)
    }

    /// Every record file with the name of its network's directory: its record, or None when it
    /// cannot be read. Records of earlier boots included.
    pub fn entries(&self) -> impl Iterator<Item = (&str, Option<&Record>)> {
        self.files.iter().map(|(path, (_, _, rec))| {
            let network = path.parent().and_then(|d| d.file_name()).and_then(|n| n.to_str()).unwrap_or("");
            (network, rec.as_ref())
        })
    }

    /// The records of this boot.
    pub fn live(&self) -> Vec<&Record> {
        self.files.values().filter_map(|(_, _, r)| r.as_ref()).filter(|r| r.is_live()).collect()
    }
}

//! The records kept in memory by a long-lived reader (the node agent), re-read only where the
//! state directory changed: a look costs a few `stat`s when nothing did, and otherwise one listing
//! of each changed directory plus one parse per record written since. Records are written to a
//! temp file renamed into place, so a rewritten record has a new inode, which the listing gives
//! without a `stat` per file: on a node with 900 pods, every ADD used to cost the agent 900.

use super::record::Record;
use super::store::read_record;
use super::{read_dir_sorted, Store};
use crate::error::{Error, Result};
use std::collections::BTreeMap;
use std::os::unix::fs::DirEntryExt;
use std::path::PathBuf;
use std::time::SystemTime;

#[derive(Default)]
pub struct RecordCache {
    /// The modification times of `records/` and each network directory at the last scan: a
    /// record written (renamed into place) or removed changes its directory's.
    dirs: Vec<(PathBuf, Option<SystemTime>)>,
    /// Each record file with its inode when read, and what reading it gave.
    files: BTreeMap<PathBuf, (u64, Option<Record>)>,
}

fn mtime(path: &std::path::Path) -> Option<SystemTime> {
    std::fs::symlink_metadata(path).and_then(|m| m.modified()).ok()
}

impl RecordCache {
    /// Bring the cache up to date; true when any record came, changed or went.
    pub fn refresh(&mut self, store: &Store) -> Result<bool> {
        let root = store.dir().join("records");
        // dirs[0] is records/ itself: a network directory that came or went changes its time.
        if !self.dirs.is_empty() && self.dirs.iter().all(|(d, t)| mtime(d) == *t) {
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
            let listing = std::fs::read_dir(&net).map_err(|e| Error::io(format!("read {}", net.display()), e))?;
            for entry in listing.flatten() {
                let file = entry.path();
                if file.extension().is_none_or(|e| e != "json") {
                    continue;
                }
                let ino = entry.ino();
                let kept = match self.files.remove(&file) {
                    Some((was, rec)) if was == ino => (was, rec),
                    _ => {
                        changed = true;
                        let rec = read_record(&file).inspect_err(|e| log::warn!("ignoring unreadable record: {e}"));
                        (ino, rec.ok().flatten())
                    }
                };
                seen.insert(file, kept);
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
        self.files.iter().map(|(path, (_, rec))| {
            let network = path.parent().and_then(|d| d.file_name()).and_then(|n| n.to_str()).unwrap_or("");
            (network, rec.as_ref())
        })
    }

    /// The records of this boot.
    pub fn live(&self) -> Vec<&Record> {
        self.files.values().filter_map(|(_, r)| r.as_ref()).filter(|r| r.is_live()).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::AttachmentId;

    fn id(cid: &str) -> AttachmentId {
        AttachmentId { network: "dind".into(), container_id: cid.into(), ifname: "eth0".into() }
    }

    #[test]
    fn only_what_changed_is_read_again() {
        let dir = std::env::temp_dir().join(format!("bn-cache-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let store = Store::open(&dir).unwrap();
        let mut cache = RecordCache::default();
        assert!(!cache.refresh(&store).unwrap(), "nothing yet");
        for cid in ["a", "b"] {
            store.save(&Record::new(id(cid), "1.0.0")).unwrap();
        }
        assert!(cache.refresh(&store).unwrap());
        assert_eq!(cache.live().len(), 2);
        assert!(!cache.refresh(&store).unwrap(), "nothing changed");
        let mut b = Record::new(id("b"), "1.0.0");
        b.bridge = "dind-br0".into();
        store.save(&b).unwrap();
        assert!(cache.refresh(&store).unwrap(), "a record rewritten (renamed into place)");
        assert!(cache.live().iter().any(|r| r.bridge == "dind-br0"));
        store.remove(&id("a")).unwrap();
        assert!(cache.refresh(&store).unwrap(), "a record removed");
        assert_eq!(cache.live().len(), 1);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}

//! Records on disk: one JSON file per attachment, written atomically, 0600 in a 0700 directory.

use super::record::{Record, RECORD_FORMAT};
use super::{encode_ifname, ensure_private_dir, read_dir_sorted};
use crate::config::AttachmentId;
use crate::error::{code, Error, Result};
use std::fs::{self, File, OpenOptions};
use std::io::{Read, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

pub struct Store {
    pub(super) dir: PathBuf,
}

impl Store {
    /// Open (creating if needed) the state directory, refusing one that others could tamper with.
    pub fn open(dir: &Path) -> Result<Store> {
        ensure_private_dir(dir)?;
        ensure_private_dir(&dir.join("records"))?;
        Ok(Store { dir: dir.to_path_buf() })
    }

    /// The state directory if it exists, checked as `open` does, creating nothing: for the
    /// commands that only read, or must change nothing (list, uninstall without --yes).
    pub fn open_existing(dir: &Path) -> Result<Option<Store>> {
        match fs::symlink_metadata(dir) {
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            _ => ensure_private_dir(dir).map(|()| Some(Store { dir: dir.to_path_buf() })),
        }
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    fn network_dir(&self, network: &str) -> PathBuf {
        self.dir.join("records").join(network)
    }

    fn record_path(&self, id: &AttachmentId) -> PathBuf {
        self.network_dir(&id.network).join(format!("{}.{}.json", id.container_id, encode_ifname(&id.ifname)))
    }

    pub fn load(&self, id: &AttachmentId) -> Result<Option<Record>> {
        read_record(&self.record_path(id))
    }

    /// Every readable record on the node. Unreadable ones are logged and skipped: a half-written or
    /// corrupt file must never block other attachments.
    pub fn load_all(&self) -> Result<Vec<Record>> {
        Ok(self
            .scan()?
            .into_iter()
            .filter_map(|(_, r)| r.inspect_err(|e| log::warn!("ignoring unreadable record: {e}")).ok())
            .collect())
    }

    /// Every record file with what reading it gave, unreadable ones included.
    pub fn scan(&self) -> Result<Vec<(PathBuf, Result<Record>)>> {
        let mut out = Vec::new();
        for net in read_dir_sorted(&self.dir.join("records"))? {
            if !net.is_dir() || net.is_symlink() {
                continue;
            }
            for file in read_dir_sorted(&net)? {
                // Temp files of a write in progress start with a dot and do not end in .json.
                if file.extension().is_some_and(|e| e == "json") {
                    match read_record(&file) {
                        Ok(Some(r)) => out.push((file, Ok(r))),
                        Ok(None) => {}
                        Err(e) => out.push((file, Err(e))),
                    }
                }
            }
        }
        Ok(out)
    }

    /// STATUS: can a record be written here right now?
    pub fn probe_writable(&self) -> Result<()> {
        let probe = self.dir.join(format!(".status-probe.{}", std::process::id()));
        let result = write_atomic(&probe, b"{}");
        let _ = fs::remove_file(&probe);
        result.map_err(|e| e.context("state directory is not writable"))
    }

    /// Delete this network's record files that cannot be read (GC); returns how many.
    pub fn remove_unreadable(&self, network: &str) -> Result<usize> {
        let mut removed = 0;
        for file in read_dir_sorted(&self.network_dir(network))? {
            if file.extension().is_some_and(|e| e == "json") && read_record(&file).is_err() {
                fs::remove_file(&file).map_err(|e| Error::io(format!("remove {}", file.display()), e))?;
                log::warn!("removed unreadable record {}", file.display());
                removed += 1;
            }
        }
        Ok(removed)
    }

    pub fn save(&self, rec: &Record) -> Result<()> {
        ensure_private_dir(&self.network_dir(&rec.id.network))?;
        let data =
            serde_json::to_vec_pretty(rec).map_err(|e| Error::new(code::INTERNAL, format!("encode record: {e}")))?;
        write_atomic(&self.record_path(&rec.id), &data)
    }

    pub fn remove(&self, id: &AttachmentId) -> Result<()> {
        let path = self.record_path(id);
        match fs::remove_file(&path) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(Error::io(format!("remove record {}", path.display()), e)),
        }
    }
}

pub(super) fn read_record(path: &Path) -> Result<Option<Record>> {
    let mut file = match OpenOptions::new().read(true).custom_flags(nix::libc::O_NOFOLLOW).open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(Error::io(format!("open record {}", path.display()), e)),
    };
    let mut data = Vec::new();
    file.read_to_end(&mut data).map_err(|e| Error::io(format!("read record {}", path.display()), e))?;
    let rec: Record = serde_json::from_slice(&data)
        .map_err(|e| Error::new(code::IO, format!("record {} is corrupt: {e}", path.display())))?;
    if rec.format != RECORD_FORMAT {
        return Err(Error::new(code::IO, format!("record {} has unknown format {}", path.display(), rec.format)));
    }
    Ok(Some(rec))
}

/// Temp file, fsync, rename, fsync the directory: a reader sees the old record or the new one.
fn write_atomic(path: &Path, data: &[u8]) -> Result<()> {
    let dir = path.parent().expect("record paths have a parent");
    let tmp = dir.join(format!(".{}.tmp.{}", path.file_name().unwrap().to_string_lossy(), std::process::id()));
    let _ = fs::remove_file(&tmp);
    let write = || -> std::io::Result<()> {
        let mut f = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .custom_flags(nix::libc::O_NOFOLLOW)
            .open(&tmp)?;
        f.write_all(data)?;
        f.sync_all()?;
        fs::rename(&tmp, path)?;
        File::open(dir)?.sync_all()
    };
    write().map_err(|e| {
        let _ = fs::remove_file(&tmp);
        Error::io(format!("write record {}", path.display()), e)
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::MetadataExt;
    use std::time::Duration;

    fn temp_dir(tag: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("bnat-state-{tag}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&d);
        d
    }

    fn id(cid: &str) -> AttachmentId {
        AttachmentId { network: "dind".into(), container_id: cid.into(), ifname: "net1".into() }
    }

    #[test]
    fn save_load_remove_round_trip() {
        let dir = temp_dir("rt");
        let store = Store::open(&dir).unwrap();
        let rec = Record::new(id("abc"), "1.0.0");
        store.save(&rec).unwrap();
        assert_eq!(store.load(&id("abc")).unwrap(), Some(rec.clone()));
        assert_eq!(store.load_all().unwrap(), vec![rec]);
        let mode = fs::metadata(store.record_path(&id("abc"))).unwrap().mode() & 0o777;
        assert_eq!(mode, 0o600);
        store.remove(&id("abc")).unwrap();
        store.remove(&id("abc")).unwrap();
        assert!(store.load_all().unwrap().is_empty());
        fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn corrupt_record_is_skipped_by_load_all() {
        let dir = temp_dir("corrupt");
        let store = Store::open(&dir).unwrap();
        store.save(&Record::new(id("good"), "1.0.0")).unwrap();
        fs::write(store.network_dir("dind").join("bad.net1.json"), b"{\"format\": 1, \"id\"").unwrap();
        assert_eq!(store.load_all().unwrap().len(), 1);
        fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn symlinked_state_dir_is_refused() {
        let dir = temp_dir("link");
        let target = temp_dir("link-target");
        fs::create_dir_all(&target).unwrap();
        std::os::unix::fs::symlink(&target, &dir).unwrap();
        assert_eq!(Store::open(&dir).err().unwrap().code, code::IO);
        fs::remove_file(&dir).unwrap();
        fs::remove_dir_all(&target).unwrap();
    }

    #[test]
    fn lock_times_out_with_code_11() {
        let dir = temp_dir("lock");
        let store = Store::open(&dir).unwrap();
        let _held = store.lock(Duration::from_millis(50)).unwrap();
        // A second open file description conflicts with the first, as another process would.
        let err = store.lock(Duration::from_millis(30)).err().unwrap();
        assert_eq!(err.code, code::TRY_AGAIN_LATER);
        fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn ifname_encoding_keeps_file_names_safe() {
        assert_eq!(encode_ifname("net1"), "net1");
        assert_eq!(encode_ifname("a/b.c"), "a%2fb%2ec");
    }
}

//! The record of what each attachment installed, and the lock that serialises every call.
//!
//! Layout under the state directory (0700, root):
//!   lock                                   one lock for every call that reads or changes the node
//!   records/<network>/<container>.<ifname>.json   one record per attachment, written atomically

use crate::config::{AttachmentId, Backend};
use crate::error::{code, Error, Result};
use crate::firewall::Rule;
use crate::nft::elements::Element;
use crate::plan::{HostPort, Sysctl};
use crate::routing::{IpRule, Route, TableSpec};
use serde::{Deserialize, Serialize};
use std::fs::{self, File, OpenOptions};
use std::io::{Read, Write};
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

const RECORD_FORMAT: u32 = 1;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Status {
    /// Written before the node is changed: if the call dies, the next one reconciles from the kernel.
    Applying,
    Applied,
}

/// What ADD installed for one attachment. DEL, CHECK and GC work from this alone.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Record {
    pub format: u32,
    pub id: AttachmentId,
    pub status: Status,
    /// Rules vanish on reboot; a record from another boot describes nothing installed.
    pub boot_id: String,
    pub cni_version: String,
    pub bridge: String,
    pub addresses: Vec<String>,
    pub host_ports: Vec<HostPort>,
    /// Every firewall rule this attachment needs, shared ones included.
    pub rules: Vec<Rule>,
    pub sysctls: Vec<Sysctl>,
    #[serde(default)]
    pub ip_rules: Vec<IpRule>,
    #[serde(default)]
    pub tables: Vec<TableSpec>,
    /// Routes as installed, next hops resolved at the time: what ADD did, for people reading the
    /// record. DEL flushes whole tables instead, and CHECK resolves next hops again.
    #[serde(default)]
    pub routes: Vec<Route>,
    #[serde(default)]
    pub backend: Backend,
    /// nftables backend: the table contents this attachment needs (its `rules` stay empty).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub nft: Option<NftRecord>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct NftRecord {
    pub own: Vec<Element>,
    pub shared: Vec<Element>,
    /// (mark, mask) pairs whose chains this attachment's forwards jump to.
    pub marks: Vec<(u32, u32)>,
}

impl Record {
    pub fn new(id: AttachmentId, cni_version: &str) -> Record {
        Record {
            format: RECORD_FORMAT,
            id,
            status: Status::Applying,
            boot_id: current_boot_id(),
            cni_version: cni_version.to_string(),
            bridge: String::new(),
            addresses: Vec::new(),
            host_ports: Vec::new(),
            rules: Vec::new(),
            sysctls: Vec::new(),
            ip_rules: Vec::new(),
            tables: Vec::new(),
            routes: Vec::new(),
            backend: Backend::Iptables,
            nft: None,
        }
    }

    /// True when the rules it lists are believed to be on the node.
    pub fn is_live(&self) -> bool {
        self.boot_id == current_boot_id()
    }
}

pub fn current_boot_id() -> String {
    fs::read_to_string("/proc/sys/kernel/random/boot_id").map(|s| s.trim().to_string()).unwrap_or_default()
}

pub struct Store {
    dir: PathBuf,
}

/// Held for the whole call; released when dropped (or when the process dies).
pub struct Lock {
    _file: File,
}

impl Store {
    /// Open (creating if needed) the state directory, refusing one that others could tamper with.
    pub fn open(dir: &Path) -> Result<Store> {
        ensure_private_dir(dir)?;
        ensure_private_dir(&dir.join("records"))?;
        Ok(Store { dir: dir.to_path_buf() })
    }

    /// Take the node-wide lock, waiting at most `timeout`.
    pub fn lock(&self, timeout: Duration) -> Result<Lock> {
        let path = self.dir.join("lock");
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o600)
            .custom_flags(nix::libc::O_NOFOLLOW)
            .open(&path)
            .map_err(|e| Error::io(format!("open lock file {}", path.display()), e))?;
        let deadline = Instant::now() + timeout;
        loop {
            match file.try_lock() {
                Ok(()) => return Ok(Lock { _file: file }),
                Err(std::fs::TryLockError::WouldBlock) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(5));
                }
                Err(std::fs::TryLockError::WouldBlock) => {
                    return Err(Error::new(
                        code::TRY_AGAIN_LATER,
                        format!("lock {} still held by another call after {} ms", path.display(), timeout.as_millis()),
                    ))
                }
                Err(std::fs::TryLockError::Error(e)) => return Err(Error::io(format!("lock {}", path.display()), e)),
            }
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

    /// A record file is there (readable or not).
    pub fn exists(&self, id: &AttachmentId) -> bool {
        fs::symlink_metadata(self.record_path(id)).is_ok()
    }

    /// Every readable record on the node. Unreadable ones are logged and skipped: a half-written or
    /// corrupt file must never block other attachments.
    pub fn load_all(&self) -> Result<Vec<Record>> {
        let mut out = Vec::new();
        let records = self.dir.join("records");
        for net in read_dir_sorted(&records)? {
            if !net.is_dir() || net.is_symlink() {
                continue;
            }
            for file in read_dir_sorted(&net)? {
                if file.extension().is_some_and(|e| e == "json") {
                    match read_record(&file) {
                        Ok(Some(r)) => out.push(r),
                        Ok(None) => {}
                        Err(e) => log::warn!("ignoring unreadable record: {e}"),
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

/// Interface names may hold characters unsafe in file names; keep the safe ones, escape the rest.
pub(crate) fn encode_ifname(ifname: &str) -> String {
    ifname
        .bytes()
        .map(|b| match b {
            b'a'..=b'z' | b'A'..=b'Z' | b'0'..=b'9' | b'_' | b'-' => (b as char).to_string(),
            _ => format!("%{b:02x}"),
        })
        .collect()
}

fn read_dir_sorted(dir: &Path) -> Result<Vec<PathBuf>> {
    let entries = match fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(Error::io(format!("read {}", dir.display()), e)),
    };
    let mut paths: Vec<PathBuf> = entries.filter_map(|e| e.ok().map(|e| e.path())).collect();
    paths.sort();
    Ok(paths)
}

fn read_record(path: &Path) -> Result<Option<Record>> {
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

/// Create `dir` 0700 if missing; refuse a symlink, or a directory owned by someone else or
/// writable by others, since records decide what DEL removes.
pub(crate) fn ensure_private_dir(dir: &Path) -> Result<()> {
    match fs::symlink_metadata(dir) {
        Ok(meta) => {
            if meta.file_type().is_symlink() || !meta.is_dir() {
                return Err(Error::new(
                    code::IO,
                    format!("state directory {} is not a plain directory", dir.display()),
                ));
            }
            if meta.uid() != nix::unistd::geteuid().as_raw() || meta.mode() & 0o022 != 0 {
                return Err(Error::new(
                    code::IO,
                    format!("state directory {} must be owned by this user and not writable by others", dir.display()),
                ));
            }
            Ok(())
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            if let Some(parent) = dir.parent() {
                fs::create_dir_all(parent).map_err(|e| Error::io(format!("create {}", parent.display()), e))?;
            }
            match fs::DirBuilder::new().mode(0o700).create(dir) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => return ensure_private_dir(dir),
                Err(e) => return Err(Error::io(format!("create state directory {}", dir.display()), e)),
            }
            fs::set_permissions(dir, fs::Permissions::from_mode(0o700))
                .map_err(|e| Error::io(format!("chmod {}", dir.display()), e))
        }
        Err(e) => Err(Error::io(format!("stat state directory {}", dir.display()), e)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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

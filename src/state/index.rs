//! Who holds what, so a call answers "is this host port taken?" and "does anyone else still need
//! this shared object?" without reading every record. Entries are empty files, named for their
//! holder, in one directory per object; adding and removing them is idempotent, so a call killed
//! halfway is repaired by its retry, and GC rebuilds the whole index from the records.
//!
//! Layout under the state directory (everything dies with the boot, like the kernel state):
//!   index/<boot id>/claims/<proto>-<port>/<holder>    content: the claim as JSON
//!   index/<boot id>/holders/<object>/<holder>

use crate::config::AttachmentId;
use crate::error::{Error, Result};
use crate::plan::HostPort;
use std::fs;
use std::path::{Path, PathBuf};

pub struct Index {
    dir: PathBuf,
}

/// A file name for an attachment, unique across networks (network names never hold '~').
pub fn holder_name(id: &AttachmentId) -> String {
    format!("{}~{}.{}", id.network, id.container_id, crate::state::encode_ifname(&id.ifname))
}

/// Object keys may hold '/' (subnets); file names may not. Keys too long for a file name (an
/// iptables rule can be) keep a readable start and end in a hash of the whole key.
fn object_dir_name(key: &str) -> String {
    let name = key.replace('%', "%25").replace('/', "%2f");
    if name.len() <= 200 {
        return name;
    }
    let mut cut = 150;
    while !name.is_char_boundary(cut) {
        cut -= 1;
    }
    format!("{}~{:016x}", &name[..cut], fnv1a(key.as_bytes()))
}

/// FNV-1a, 64 bits: stable across builds and releases, unlike std's hasher.
fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |h, b| (h ^ u64::from(*b)).wrapping_mul(0x0100_0000_01b3))
}

fn key_of_dir_name(name: &str) -> String {
    name.replace("%2f", "/").replace("%25", "%")
}

fn io(what: &str, path: &Path, e: std::io::Error) -> Error {
    Error::io(format!("{what} {}", path.display()), e)
}

fn ignore_missing(r: std::io::Result<()>) -> std::io::Result<()> {
    match r {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        other => other,
    }
}

impl Index {
    /// The index of this boot; indexes of earlier boots are removed.
    pub fn open(state_dir: &Path, boot_id: &str) -> Result<Index> {
        let root = state_dir.join("index");
        crate::state::ensure_private_dir(&root)?;
        let dir = root.join(if boot_id.is_empty() { "unknown-boot" } else { boot_id });
        if !dir.is_dir() {
            for old in fs::read_dir(&root).map_err(|e| io("read", &root, e))?.flatten() {
                if let Err(e) = fs::remove_dir_all(old.path()) {
                    log::warn!("remove index of an earlier boot {}: {e}", old.path().display());
                }
            }
            crate::state::ensure_private_dir(&dir)?;
        }
        Ok(Index { dir })
    }

    /// This boot's index if it exists, creating and removing nothing (uninstall without --yes).
    pub fn existing(state_dir: &Path, boot_id: &str) -> Option<Index> {
        let dir = state_dir.join("index").join(if boot_id.is_empty() { "unknown-boot" } else { boot_id });
        dir.is_dir().then_some(Index { dir })
    }

    /// Forget everything (GC rebuilds from the records).
    pub fn clear(&self) -> Result<()> {
        for sub in ["claims", "holders"] {
            let p = self.dir.join(sub);
            ignore_missing(fs::remove_dir_all(&p)).map_err(|e| io("clear index", &p, e))?;
        }
        Ok(())
    }

    fn claim_dir(&self, hp: &HostPort) -> PathBuf {
        self.dir.join("claims").join(format!("{}-{}", hp.protocol.as_str(), hp.port))
    }

    fn object_dir(&self, key: &str) -> PathBuf {
        self.dir.join("holders").join(object_dir_name(key))
    }

    /// Claims on the same protocol and port by other attachments.
    pub fn claims(&self, hp: &HostPort, except: &AttachmentId) -> Result<Vec<(AttachmentId, HostPort)>> {
        let dir = self.claim_dir(hp);
        let me = holder_name(except);
        let mut out = Vec::new();
        let entries = match fs::read_dir(&dir) {
            Ok(e) => e,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(out),
            Err(e) => return Err(io("read", &dir, e)),
        };
        for entry in entries.flatten() {
            if entry.file_name().to_string_lossy() == me {
                continue;
            }
            let path = entry.path();
            let data = fs::read(&path).map_err(|e| io("read claim", &path, e))?;
            let claim: Vec<(AttachmentId, HostPort)> = serde_json::from_slice(&data)
                .map_err(|e| Error::new(crate::error::code::IO, format!("claim {}: {e}", path.display())))?;
            out.extend(claim.into_iter().filter(|(_, h)| h.port == hp.port && h.protocol == hp.protocol));
        }
        Ok(out)
    }

    /// Record `ports` as held by `id` (one file per protocol and port, listing all of them).
    pub fn claim(&self, id: &AttachmentId, ports: &[HostPort]) -> Result<()> {
        let claim: Vec<(&AttachmentId, &HostPort)> = ports.iter().map(|p| (id, p)).collect();
        let data = serde_json::to_vec(&claim).expect("claims serialize");
        for hp in ports {
            let dir = self.claim_dir(hp);
            fs::create_dir_all(&dir).map_err(|e| io("create", &dir, e))?;
            let path = dir.join(holder_name(id));
            fs::write(&path, &data).map_err(|e| io("write claim", &path, e))?;
        }
        Ok(())
    }

    pub fn unclaim(&self, id: &AttachmentId, ports: &[HostPort]) -> Result<()> {
        for hp in ports {
            let dir = self.claim_dir(hp);
            let path = dir.join(holder_name(id));
            ignore_missing(fs::remove_file(&path)).map_err(|e| io("remove claim", &path, e))?;
            // Fails while others still claim the port: that is the point.
            let _ = fs::remove_dir(&dir);
        }
        Ok(())
    }

    /// Keys starting with `prefix` that someone holds (the prefix removed).
    pub fn held_keys(&self, prefix: &str) -> Result<Vec<String>> {
        let dir = self.dir.join("holders");
        let entries = match fs::read_dir(&dir) {
            Ok(e) => e,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(io("read", &dir, e)),
        };
        let mut out = Vec::new();
        for entry in entries.flatten() {
            let key = key_of_dir_name(&entry.file_name().to_string_lossy());
            if let Some(rest) = key.strip_prefix(prefix) {
                if self.is_held(&key)? {
                    out.push(rest.to_string());
                }
            }
        }
        Ok(out)
    }

    /// Drop every hold and claim of `id`, wherever it is (its record is unreadable).
    pub fn release_everywhere(&self, id: &AttachmentId) -> Result<()> {
        let me = holder_name(id);
        for sub in ["claims", "holders"] {
            let Ok(entries) = fs::read_dir(self.dir.join(sub)) else { continue };
            for entry in entries.flatten() {
                let path = entry.path().join(&me);
                ignore_missing(fs::remove_file(&path)).map_err(|e| io("remove", &path, e))?;
                let _ = fs::remove_dir(entry.path());
            }
        }
        Ok(())
    }

    /// Whether anyone holds `key`.
    pub fn is_held(&self, key: &str) -> Result<bool> {
        let dir = self.object_dir(key);
        match fs::read_dir(&dir) {
            Ok(mut e) => Ok(e.next().is_some()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(false),
            Err(e) => Err(io("read", &dir, e)),
        }
    }

    pub fn hold(&self, key: &str, id: &AttachmentId) -> Result<()> {
        let dir = self.object_dir(key);
        fs::create_dir_all(&dir).map_err(|e| io("create", &dir, e))?;
        let path = dir.join(holder_name(id));
        fs::write(&path, b"").map_err(|e| io("write holder", &path, e))
    }

    /// Drop `id`'s hold on `key`; true when nobody holds it any more.
    pub fn release(&self, key: &str, id: &AttachmentId) -> Result<bool> {
        let dir = self.object_dir(key);
        let path = dir.join(holder_name(id));
        ignore_missing(fs::remove_file(&path)).map_err(|e| io("remove holder", &path, e))?;
        match fs::remove_dir(&dir) {
            Ok(()) => Ok(true),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(true),
            Err(e) if e.raw_os_error() == Some(nix::libc::ENOTEMPTY) => Ok(false),
            Err(e) => Err(io("remove", &dir, e)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Protocol;

    fn temp(tag: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("bridge-nat-index-{tag}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&d);
        d
    }

    fn id(cid: &str) -> AttachmentId {
        AttachmentId { network: "net".into(), container_id: cid.into(), ifname: "eth0".into() }
    }

    #[test]
    fn holders_count_down_to_release() {
        let dir = temp("holders");
        let idx = Index::open(&dir, "boot1").unwrap();
        let key = "elem:own4 { 10.20.0.0/24 . \"br0\" }";
        idx.hold(key, &id("a")).unwrap();
        idx.hold(key, &id("b")).unwrap();
        idx.hold(key, &id("b")).unwrap();
        assert!(idx.is_held(key).unwrap());
        assert!(!idx.release(key, &id("a")).unwrap());
        assert!(idx.release(key, &id("b")).unwrap());
        assert!(idx.release(key, &id("b")).unwrap());
        assert!(!idx.is_held(key).unwrap());
        idx.hold("rtname:100:up/1", &id("a")).unwrap();
        assert_eq!(idx.held_keys("rtname:").unwrap(), vec!["100:up/1".to_string()]);
        idx.release_everywhere(&id("a")).unwrap();
        assert!(idx.held_keys("rtname:").unwrap().is_empty());
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn claims_are_seen_by_others_only_and_die_with_the_boot() {
        let dir = temp("claims");
        let hp = HostPort { port: 8080, protocol: Protocol::Tcp, host_ip: None };
        let idx = Index::open(&dir, "boot1").unwrap();
        idx.claim(&id("a"), &[hp]).unwrap();
        assert_eq!(idx.claims(&hp, &id("a")).unwrap(), vec![]);
        assert_eq!(idx.claims(&hp, &id("b")).unwrap(), vec![(id("a"), hp)]);
        let udp = HostPort { protocol: Protocol::Udp, ..hp };
        assert!(idx.claims(&udp, &id("b")).unwrap().is_empty());
        let next_boot = Index::open(&dir, "boot2").unwrap();
        assert!(next_boot.claims(&hp, &id("b")).unwrap().is_empty());
        next_boot.claim(&id("a"), &[hp]).unwrap();
        next_boot.unclaim(&id("a"), &[hp]).unwrap();
        assert!(next_boot.claims(&hp, &id("b")).unwrap().is_empty());
        fs::remove_dir_all(&dir).unwrap();
    }
}

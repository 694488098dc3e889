//! What bridge-nat remembers: a record per attachment, an index of who holds what, and the lock.
//!
//! Layout under the state directory (0700, root):
//!   lock                                   one lock for every call that reads or changes the node
//!   records/<network>/<container>.<ifname>.json   one record per attachment, written atomically
//!   index/<boot id>/...                    who holds what (see index.rs)
//! The agent keeps the records in memory and re-reads only what changed (cache.rs).

mod cache;
pub mod index;
mod lock;
mod record;
mod store;

pub use cache::RecordCache;
pub use index::Index;
pub use lock::Lock;
pub use record::{current_boot_id, Record, Status};
pub use store::Store;

use crate::error::{code, Error, Result};
use std::fs;
use std::os::unix::fs::{DirBuilderExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

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

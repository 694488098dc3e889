//! The one lock that serialises every call that reads or changes the node.

use super::Store;
use crate::error::{code, Error, Result};
use std::fs::{File, OpenOptions};
use std::os::unix::fs::OpenOptionsExt;
use std::time::{Duration, Instant};

/// Held for the whole call; released when dropped (or when the process dies).
pub struct Lock {
    _file: File,
}

impl Store {
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
}

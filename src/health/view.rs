//! `<stateDir>/health.json`: the live agent's judgement of each probed uplink. It is trusted only
//! while the agent that wrote it lives and keeps writing it (a lease of a few probe intervals): a
//! killed or hung agent's last word must not keep the pods on a fallback for ever.

use crate::error::{code, Error, Result};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct View {
    pub pid: u32,
    pub written_ms: u64,
    pub lease_ms: u64,
    pub uplinks: BTreeMap<String, UplinkHealth>,
    /// Which uplink each network's pods leave by now.
    #[serde(default)]
    pub egress: BTreeMap<String, String>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct UplinkHealth {
    pub healthy: bool,
    /// Why it is what it is: "answering", "no answer from 192.0.2.9 for 3 rounds", "link down".
    pub reason: String,
}

pub fn now_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0)
}

fn path(state_dir: &Path) -> PathBuf {
    state_dir.join("health.json")
}

fn alive(pid: u32) -> bool {
    let pid = nix::unistd::Pid::from_raw(pid as i32);
    matches!(nix::sys::signal::kill(pid, None), Ok(()) | Err(nix::errno::Errno::EPERM))
}

impl View {
    /// The view, if a live agent wrote it within its lease; otherwise None (nothing switches).
    pub fn load(state_dir: &Path) -> Option<View> {
        let data = std::fs::read(path(state_dir)).ok()?;
        let view: View = serde_json::from_slice(&data).ok()?;
        let fresh = now_ms().saturating_sub(view.written_ms) <= view.lease_ms;
        if !fresh || view.pid == 0 || !alive(view.pid) {
            log::debug!("uplink health from pid {} is not trusted (agent gone or silent)", view.pid);
            return None;
        }
        Some(view)
    }

    /// Whether the pods may leave by `uplink`: an uplink nobody probes counts as healthy.
    pub fn is_healthy(&self, uplink: &str) -> bool {
        self.uplinks.get(uplink).is_none_or(|u| u.healthy)
    }

    /// Written atomically (temp file, rename), 0600, in the state directory.
    pub fn save(&self, state_dir: &Path) -> Result<()> {
        let data =
            serde_json::to_vec_pretty(self).map_err(|e| Error::new(code::INTERNAL, format!("encode health: {e}")))?;
        let target = path(state_dir);
        let tmp = state_dir.join(format!(".health.json.tmp.{}", std::process::id()));
        let write = || -> std::io::Result<()> {
            let mut f = std::fs::OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(true)
                .mode(0o600)
                .custom_flags(nix::libc::O_NOFOLLOW)
                .open(&tmp)?;
            f.write_all(&data)?;
            std::fs::rename(&tmp, &target)
        };
        write().map_err(|e| Error::io(format!("write {}", target.display()), e))
    }
}

/// Health as every path that resolves routes must see it: the live agent's, or everything healthy.
/// The file is read at the first question, so a call whose network has no fallback never reads it.
pub fn healthy_in(state_dir: &Path) -> impl Fn(&str) -> bool + '_ {
    let view = std::cell::OnceCell::new();
    move |uplink| view.get_or_init(|| View::load(state_dir)).as_ref().is_none_or(|v| v.is_healthy(uplink))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dir() -> PathBuf {
        let d = std::env::temp_dir().join(format!("bn-health-{}-{}", std::process::id(), now_ms()));
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    fn view(pid: u32, written_ms: u64) -> View {
        let mut v = View { pid, written_ms, lease_ms: 5_000, ..View::default() };
        v.uplinks.insert("wan1".into(), UplinkHealth { healthy: false, reason: "link down".into() });
        v
    }

    #[test]
    fn a_live_writer_within_its_lease_is_trusted_and_unknown_uplinks_are_healthy() {
        let d = dir();
        view(std::process::id(), now_ms()).save(&d).unwrap();
        let v = View::load(&d).expect("trusted");
        assert!(!v.is_healthy("wan1"));
        assert!(v.is_healthy("wan0"));
        assert!(!healthy_in(&d)("wan1"));
        std::fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn a_dead_writer_or_an_expired_lease_is_not_trusted() {
        let d = dir();
        view(std::process::id(), now_ms() - 60_000).save(&d).unwrap();
        assert!(View::load(&d).is_none(), "expired lease");
        // pid_max is at most 2^22: this pid cannot be alive.
        view(4_194_304 + 7, now_ms()).save(&d).unwrap();
        assert!(View::load(&d).is_none(), "dead writer");
        assert!(healthy_in(&d)("wan1"));
        std::fs::remove_dir_all(&d).unwrap();
        assert!(View::load(&d).is_none(), "no file");
    }
}

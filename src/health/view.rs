//! `<stateDir>/health.json`: the live agent's judgement of each probed uplink. It is trusted only
//! while the agent that wrote it lives and keeps writing it (a lease of a few probe intervals): a
//! killed or hung agent's last word must not keep the pods on a fallback for ever.

use crate::error::{code, Error, Result};
use crate::family::Family;
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
    /// Which uplink each network's pods leave by now: their IPv4 traffic (a network without an
    /// IPv4 range: their IPv6 traffic).
    #[serde(default)]
    pub egress: BTreeMap<String, String>,
    /// Which uplink the pods' IPv6 traffic of each network with an IPv6 range leaves by now.
    #[serde(default)]
    pub egress6: BTreeMap<String, String>,
}

/// An uplink judged per family. IPv4's verdict sits where the one verdict of an agent that
/// judged both families as one sat, so a file of either age reads: an older reader takes it for
/// both families, as its writer meant, and a file without `ipv6` (an older writer's) judges IPv6
/// by it too.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct UplinkHealth {
    #[serde(flatten)]
    pub ipv4: FamilyHealth,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ipv6: Option<FamilyHealth>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct FamilyHealth {
    pub healthy: bool,
    /// Why it is what it is: "answering", "no answer from the targets for 3 rounds", "link down",
    /// "no stable global IPv6 address".
    pub reason: String,
    /// The uplink has an address of the family; without one it is unhealthy in it, but that says
    /// nothing of its provider. Files of older agents did not say: they judged only uplinks they
    /// could probe.
    #[serde(default = "yes")]
    pub addressed: bool,
}

fn yes() -> bool {
    true
}

impl Default for FamilyHealth {
    fn default() -> Self {
        FamilyHealth { healthy: true, reason: String::new(), addressed: true }
    }
}

impl UplinkHealth {
    pub fn family(&self, family: Family) -> &FamilyHealth {
        match family {
            Family::Ipv4 => &self.ipv4,
            Family::Ipv6 => self.ipv6.as_ref().unwrap_or(&self.ipv4),
        }
    }

    /// One word for the uplink: healthy when every family it has an address of answers (none:
    /// unhealthy, it carries nothing).
    pub fn healthy(&self) -> bool {
        let addressed: Vec<&FamilyHealth> =
            [Some(&self.ipv4), self.ipv6.as_ref()].into_iter().flatten().filter(|f| f.addressed).collect();
        !addressed.is_empty() && addressed.iter().all(|f| f.healthy)
    }
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

    /// Whether the pods' traffic of `family` may leave by `uplink`: an uplink nobody probes counts
    /// as healthy.
    pub fn is_healthy(&self, uplink: &str, family: Family) -> bool {
        self.uplinks.get(uplink).is_none_or(|u| u.family(family).healthy)
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
pub fn healthy_in(state_dir: &Path) -> impl Fn(&str, Family) -> bool + '_ {
    let view = std::cell::OnceCell::new();
    move |uplink, family| {
        view.get_or_init(|| View::load(state_dir)).as_ref().is_none_or(|v| v.is_healthy(uplink, family))
    }
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
        let down = FamilyHealth { healthy: false, reason: "link down".into(), addressed: true };
        v.uplinks.insert("wan1".into(), UplinkHealth { ipv4: down, ipv6: None });
        v
    }

    #[test]
    fn a_live_writer_within_its_lease_is_trusted_and_unknown_uplinks_are_healthy() {
        let d = dir();
        view(std::process::id(), now_ms()).save(&d).unwrap();
        let v = View::load(&d).expect("trusted");
        assert!(!v.is_healthy("wan1", Family::Ipv4));
        assert!(v.is_healthy("wan0", Family::Ipv4));
        assert!(!healthy_in(&d)("wan1", Family::Ipv4));
        std::fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn an_old_file_judges_both_families_by_its_one_verdict_and_a_new_one_each_by_its_own() {
        let old = r#"{"pid": 1, "writtenMs": 2, "leaseMs": 3, "egress": {"dind": "wan0"},
                      "uplinks": {"wan1": {"healthy": false, "reason": "no answer"}}}"#;
        let v: View = serde_json::from_str(old).unwrap();
        assert!(!v.is_healthy("wan1", Family::Ipv4) && !v.is_healthy("wan1", Family::Ipv6));
        assert!(!v.uplinks["wan1"].healthy());
        // wan1 carries IPv6 only: unhealthy for IPv4 (no address), healthy for IPv6, healthy.
        let u = UplinkHealth {
            ipv4: FamilyHealth { healthy: false, reason: "no IPv4 address".into(), addressed: false },
            ipv6: Some(FamilyHealth { healthy: true, reason: "answering".into(), addressed: true }),
        };
        let mut v = View { pid: 1, ..View::default() };
        v.uplinks.insert("wan1".into(), u);
        let text = serde_json::to_string(&v).unwrap();
        assert!(
            text.contains(r#""wan1":{"healthy":false,"reason":"no IPv4 address","addressed":false,"ipv6":{"#),
            "{text}"
        );
        let back: View = serde_json::from_str(&text).unwrap();
        assert_eq!(back, v);
        assert!(!back.is_healthy("wan1", Family::Ipv4) && back.is_healthy("wan1", Family::Ipv6));
        assert!(back.uplinks["wan1"].healthy());
        // Without an address of either family it carries nothing.
        let none = FamilyHealth { healthy: false, reason: "no address".into(), addressed: false };
        assert!(!UplinkHealth { ipv4: none.clone(), ipv6: Some(none) }.healthy());
    }

    #[test]
    fn a_dead_writer_or_an_expired_lease_is_not_trusted() {
        let d = dir();
        view(std::process::id(), now_ms() - 60_000).save(&d).unwrap();
        assert!(View::load(&d).is_none(), "expired lease");
        // pid_max is at most 2^22: this pid cannot be alive.
        view(4_194_304 + 7, now_ms()).save(&d).unwrap();
        assert!(View::load(&d).is_none(), "dead writer");
        assert!(healthy_in(&d)("wan1", Family::Ipv4));
        std::fs::remove_dir_all(&d).unwrap();
        assert!(View::load(&d).is_none(), "no file");
    }
}

//! Runs transactions with `iptables-restore --noflush` (one process per family, one commit) and
//! reads the node with `iptables-save`. No shell is involved: scripts go over stdin.

use super::rules::{parse_save, Current, Family, Transaction};
use crate::error::{code, Error, Result};
use std::io::Write;
use std::process::{Command, Stdio};
use std::time::Duration;

/// True when `tool` (as configured: a name or an absolute path) is iptables-legacy.
pub fn is_legacy(tool: &str) -> bool {
    tool.rsplit('/').next() == Some("iptables-legacy")
}

/// The nf_tables variant of the configured tool, in the same directory: what changes the FORWARD
/// chains nf_tables reports.
pub fn nft_variant(tool: &str) -> String {
    match tool.rsplit_once('/') {
        Some((dir, _)) => format!("{dir}/iptables-nft"),
        None => "iptables-nft".to_string(),
    }
}

pub struct Iptables {
    /// `iptables`, `iptables-legacy`, `iptables-nft`, or an absolute path to one of them.
    base: String,
    wait: Duration,
}

impl Iptables {
    pub fn new(base: &str, wait: Duration) -> Iptables {
        Iptables { base: base.to_string(), wait }
    }

    fn tool(&self, family: Family, suffix: &str) -> String {
        let base = match family {
            Family::Ipv4 => self.base.clone(),
            Family::Ipv6 => match self.base.rsplit_once('/') {
                Some((dir, name)) => format!("{dir}/{}", name.replacen("iptables", "ip6tables", 1)),
                None => self.base.replacen("iptables", "ip6tables", 1),
            },
        };
        format!("{base}{suffix}")
    }

    /// Apply a transaction. Each family's changes are one restore: with iptables-nft one kernel
    /// transaction, with iptables-legacy one commit per table.
    pub fn apply(&self, tx: &Transaction, families: &[Family]) -> Result<()> {
        if tx.is_empty() {
            return Ok(());
        }
        for &family in families {
            if let Some(script) = tx.script(family) {
                log::debug!("{} input:\n{script}", self.tool(family, "-restore"));
                self.restore(family, &script)?;
            }
        }
        Ok(())
    }

    fn restore(&self, family: Family, script: &str) -> Result<()> {
        let tool = self.tool(family, "-restore");
        let wait = self.wait.as_secs().max(1).to_string();
        let mut child = Command::new(&tool)
            .args(["--noflush", "-w", &wait])
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|e| Error::new(code::FIREWALL, format!("run {tool}: {e}")))?;
        let written = child.stdin.take().expect("stdin is piped").write_all(script.as_bytes());
        let out = child.wait_with_output().map_err(|e| Error::new(code::FIREWALL, format!("wait for {tool}: {e}")))?;
        if let Err(e) = written {
            return Err(Error::new(code::FIREWALL, format!("write to {tool}: {e}")));
        }
        if !out.status.success() {
            let stderr = String::from_utf8_lossy(&out.stderr).trim().to_string();
            return Err(Error::new(code::FIREWALL, format!("{tool} failed ({}): {stderr}", out.status))
                .with_details(script.to_string()));
        }
        Ok(())
    }

    /// What the node holds of this plugin's chains and jumps, per family.
    pub fn read(&self, families: &[Family]) -> Result<Current> {
        let mut cur = Current::default();
        for &family in families {
            let tool = self.tool(family, "-save");
            let out = Command::new(&tool)
                .stdin(Stdio::null())
                .stderr(Stdio::piped())
                .output()
                .map_err(|e| Error::new(code::FIREWALL, format!("run {tool}: {e}")))?;
            if !out.status.success() {
                let stderr = String::from_utf8_lossy(&out.stderr).trim().to_string();
                return Err(Error::new(code::FIREWALL, format!("{tool} failed ({}): {stderr}", out.status)));
            }
            let part = parse_save(family, &String::from_utf8_lossy(&out.stdout));
            cur.rules.extend(part.rules);
            cur.chains.extend(part.chains);
        }
        Ok(cur)
    }

    /// True when the tool runs at all (STATUS).
    pub fn usable(&self) -> Result<()> {
        let tool = self.tool(Family::Ipv4, "-save");
        let out = Command::new(&tool)
            .args(["-t", "nat"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .output()
            .map_err(|e| Error::new(code::NOT_AVAILABLE, format!("run {tool}: {e}")))?;
        if out.status.success() {
            Ok(())
        } else {
            Err(Error::new(
                code::NOT_AVAILABLE,
                format!("{tool} failed: {}", String::from_utf8_lossy(&out.stderr).trim()),
            ))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ipv6_tools_follow_the_configured_variant() {
        let ipt = Iptables::new("/usr/sbin/iptables-legacy", Duration::from_secs(1));
        assert_eq!(ipt.tool(Family::Ipv6, "-restore"), "/usr/sbin/ip6tables-legacy-restore");
        assert_eq!(ipt.tool(Family::Ipv4, "-save"), "/usr/sbin/iptables-legacy-save");
        let ipt = Iptables::new("iptables", Duration::from_secs(1));
        assert_eq!(ipt.tool(Family::Ipv6, "-save"), "ip6tables-save");
    }

    #[test]
    fn the_nf_tables_variant_keeps_the_directory() {
        assert_eq!(nft_variant("iptables"), "iptables-nft");
        assert_eq!(nft_variant("/usr/sbin/iptables-legacy"), "/usr/sbin/iptables-nft");
        let ipt = Iptables::new(&nft_variant("iptables"), Duration::from_secs(1));
        assert_eq!(ipt.tool(Family::Ipv6, "-restore"), "ip6tables-nft-restore");
        assert!(is_legacy("/sbin/iptables-legacy") && is_legacy("iptables-legacy"));
        assert!(!is_legacy("iptables") && !is_legacy("/usr/sbin/iptables-nft"));
    }
}

//! cni-conf/with-host-iptables.sh, which the DaemonSet's agent runs under: it points
//! iptables-restore at the backend (legacy or nf_tables) the host's own rules are in. Run against
//! stub `*-save` tools, so no root and no firewall are needed.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;

fn repo(rel: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(rel)
}

/// Runs with-host-iptables against stub `*-save` tools printing `rulesets` (tool -> output);
/// returns where it pointed iptables-restore.
fn picked_backend(rulesets: &[(&str, &str)], mode: Option<&str>) -> Result<String, String> {
    let dir = std::env::temp_dir().join(format!("bnat-manifests-ipt-{}-{}", std::process::id(), next_tag()));
    let sbin = dir.join("sbin");
    std::fs::create_dir_all(&sbin).unwrap();
    for family in ["iptables", "ip6tables"] {
        for backend in ["legacy", "nft"] {
            for suffix in ["", "-save", "-restore"] {
                let tool = format!("{family}-{backend}{suffix}");
                let out = rulesets.iter().find(|(t, _)| *t == tool).map(|(_, o)| *o).unwrap_or("");
                std::fs::write(dir.join(&tool), out).unwrap();
                let stub = format!("#!/bin/sh\ncat '{}'\n", dir.join(&tool).display());
                std::fs::write(sbin.join(&tool), stub).unwrap();
                std::fs::set_permissions(sbin.join(&tool), std::fs::Permissions::from_mode(0o755)).unwrap();
            }
        }
    }
    let mut cmd = Command::new("sh");
    cmd.arg(repo("cni-conf/with-host-iptables.sh"))
        .args(["sh", "-c", r#"readlink "$(command -v iptables-restore)""#])
        .env("IPTABLES_SBIN", &sbin)
        .env("HOST_IPTABLES_DIR", dir.join("bin"))
        .env_remove("IPTABLES_MODE");
    if let Some(m) = mode {
        cmd.env("IPTABLES_MODE", m);
    }
    let out = cmd.output().unwrap();
    std::fs::remove_dir_all(&dir).unwrap();
    if !out.status.success() {
        return Err(String::from_utf8_lossy(&out.stderr).into());
    }
    let target = String::from_utf8_lossy(&out.stdout).trim().to_string();
    Ok(target.rsplit('/').next().unwrap().to_string())
}

fn next_tag() -> u64 {
    use std::sync::atomic::{AtomicU64, Ordering};
    static N: AtomicU64 = AtomicU64::new(0);
    N.fetch_add(1, Ordering::Relaxed)
}

#[test]
fn with_host_iptables_picks_the_backend_the_host_uses() {
    let rules = "*filter\n:INPUT ACCEPT [0:0]\n-A INPUT -j ACCEPT\n-A INPUT -j ACCEPT\nCOMMIT\n";
    let one_rule = "*filter\n:INPUT ACCEPT [0:0]\n-A INPUT -j ACCEPT\nCOMMIT\n";
    let ours = "*nat\n:BRIDGE-NAT-DNAT - [0:0]\nCOMMIT\n";
    let hint = "*mangle\n:KUBE-IPTABLES-HINT - [0:0]\nCOMMIT\n";
    let nft = Ok("iptables-nft-restore".to_string());
    let legacy = Ok("iptables-legacy-restore".to_string());
    assert_eq!(picked_backend(&[], None), nft, "nothing anywhere: nf_tables");
    assert_eq!(picked_backend(&[("ip6tables-legacy-save", rules)], None), legacy, "more rules in legacy");
    assert_eq!(picked_backend(&[("iptables-legacy-save", rules), ("iptables-nft-save", hint)], None), nft);
    let both = [("iptables-legacy-save", ours), ("iptables-nft-save", hint), ("ip6tables-nft-save", rules)];
    assert_eq!(picked_backend(&both, None), legacy, "bridge-nat's own chains decide first");
    assert_eq!(picked_backend(&[("iptables-nft-save", ours), ("iptables-legacy-save", one_rule)], None), nft);
    assert_eq!(picked_backend(&both, Some("nft")), nft, "IPTABLES_MODE overrides");
    assert!(picked_backend(&[], Some("xtables")).unwrap_err().contains("IPTABLES_MODE"));
}

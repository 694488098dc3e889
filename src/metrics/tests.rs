//! The metrics as a scraper reads them: the crate's text encoding of what the agent recorded.

use super::*;

fn metrics() -> (Metrics, std::path::PathBuf) {
    let dir = std::env::temp_dir().join(format!(
        "bridge-nat-metrics-{}-{:?}",
        std::process::id(),
        std::thread::current().id()
    ));
    let _ = std::fs::remove_dir_all(&dir);
    (Metrics::new(&dir).expect("metrics"), dir)
}

/// The value of the sample line that starts with `series` (name and labels as encoded).
fn sample(text: &str, series: &str) -> Option<f64> {
    text.lines().find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
}

#[test]
fn passes_count_their_repairs_by_kind_and_failures_by_pass() {
    let (m, dir) = metrics();
    let repairs = vec![
        "installed route 0.0.0.0/0 via 192.0.2.254 dev up2 table 101".to_string(),
        "installed route 10.20.0.0/24 dev dind-br0 table 101".to_string(),
        "added ip rule priority 100 fwmark 0x64/0x1fff lookup 100".to_string(),
    ];
    m.record_pass::<()>(Pass::Check, Duration::from_millis(3), &Ok(repairs));
    m.record_pass(Pass::Reconcile, Duration::from_millis(40), &Err("lock timeout"));
    let text = m.encode_text();
    assert_eq!(sample(&text, "bridge_nat_repairs_total{kind=\"route\"}"), Some(2.0), "{text}");
    assert_eq!(sample(&text, "bridge_nat_repairs_total{kind=\"ip_rule\"}"), Some(1.0));
    assert_eq!(sample(&text, "bridge_nat_repairs_total{kind=\"firewall\"}"), Some(0.0), "every kind from 0");
    assert_eq!(sample(&text, "bridge_nat_pass_duration_seconds_count{pass=\"check\"}"), Some(1.0));
    assert_eq!(sample(&text, "bridge_nat_pass_duration_seconds_count{pass=\"reconcile\"}"), Some(1.0));
    assert_eq!(sample(&text, "bridge_nat_pass_failures_total{pass=\"reconcile\"}"), Some(1.0));
    assert_eq!(sample(&text, "bridge_nat_pass_failures_total{pass=\"check\"}"), Some(0.0));
    assert!(sample(&text, "bridge_nat_last_success_timestamp_seconds").is_some_and(|t| t > 1.6e9), "{text}");
    let version = format!("bridge_nat_build_info{{version=\"{}\"}}", env!("CARGO_PKG_VERSION"));
    assert_eq!(sample(&text, &version), Some(1.0));
    assert!(text.contains("# TYPE bridge_nat_pass_duration_seconds histogram"), "{text}");
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn uplink_health_counts_transitions_and_egress_names_one_uplink() {
    let (m, dir) = metrics();
    m.set_uplink_health("wwan0", true);
    m.set_uplink_health("wwan0", true);
    m.set_uplink_health("wwan0", false);
    m.set_uplink_health("wwan0", true);
    m.observe_probe("wwan0", Some(Duration::from_millis(80)));
    m.observe_probe("wwan0", None);
    m.set_egress("dind", "eth0");
    m.set_egress("dind", "wwan0");
    m.set_uplink_family_health("wwan0", crate::family::Family::Ipv4, false);
    m.set_uplink_family_health("wwan0", crate::family::Family::Ipv6, true);
    let text = m.encode_text();
    let family = |f: &str| format!("bridge_nat_uplink_family_healthy{{uplink=\"wwan0\",family=\"{f}\"}}");
    assert_eq!((sample(&text, &family("ipv4")), sample(&text, &family("ipv6"))), (Some(0.0), Some(1.0)), "{text}");
    assert_eq!(sample(&text, "bridge_nat_uplink_healthy{uplink=\"wwan0\"}"), Some(1.0), "{text}");
    assert_eq!(sample(&text, "bridge_nat_uplink_transitions_total{uplink=\"wwan0\",to=\"unhealthy\"}"), Some(1.0));
    assert_eq!(sample(&text, "bridge_nat_uplink_transitions_total{uplink=\"wwan0\",to=\"healthy\"}"), Some(1.0));
    assert_eq!(sample(&text, "bridge_nat_uplink_probes_total{uplink=\"wwan0\",result=\"lost\"}"), Some(1.0));
    assert_eq!(sample(&text, "bridge_nat_uplink_probe_rtt_seconds_count{uplink=\"wwan0\"}"), Some(1.0));
    assert_eq!(sample(&text, "bridge_nat_network_egress_uplink{network=\"dind\",uplink=\"wwan0\"}"), Some(1.0));
    assert!(!text.contains("uplink=\"eth0\""), "the old egress series is gone:\n{text}");
    m.forget_failover(&["wwan0".to_string()], &[]);
    let text = m.encode_text();
    assert!(!text.contains("wwan0") && !text.contains("network=\"dind\""), "forgotten:\n{text}");
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn the_heartbeat_ages_until_the_loop_beats() {
    let (m, dir) = metrics();
    std::thread::sleep(Duration::from_millis(20));
    assert!(m.since_beat() >= Duration::from_millis(20));
    m.beat();
    assert!(m.since_beat() < Duration::from_millis(20));
    let _ = std::fs::remove_dir_all(dir);
}

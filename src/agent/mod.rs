//! `bridge-nat watch`: the node agent. It keeps the kernel equal to the records between CNI calls:
//! a full reconcile at start and every `--interval` seconds (the safety net, and the only trigger
//! iptables-legacy changes get), and after every burst of kernel notifications a read-only check
//! that reconciles only when something differs. Its own repairs raise notifications too; the check
//! that follows finds nothing and changes nothing, so it never loops. It takes the node lock only
//! to repair, and never removes anything when it stops.

mod events;
mod failover;
mod interest;
mod notice;
mod options;
mod records;

use crate::commands;
use crate::config::Settings;
use crate::error::Result;
use crate::metrics::{Metrics, Pass};
use events::{Events, Wake};
use failover::Failover;
use interest::Concern;
pub use options::WatchOptions;
use records::Records;
use std::time::{Duration, Instant};

/// Changes come in bursts (a link going down drops several routes): wait for the burst to end.
const DEBOUNCE: Duration = Duration::from_millis(250);
const MAX_BACKOFF: Duration = Duration::from_secs(30);

/// Run until SIGTERM or SIGINT; Ok(true) on a clean stop.
pub fn watch(opts: &WatchOptions) -> Result<bool> {
    let settings = &opts.settings;
    let mut events = Events::open()?;
    let mut node = Records::open(settings)?;
    // After Events::open: the server's threads inherit the signals it blocked.
    let metrics = Metrics::start(&settings.state_dir, opts.metrics)?;
    let interval = Duration::from_secs(opts.interval_secs);
    log::info!(
        "node agent started (pid {}): state {}, safety reconcile every {} s",
        std::process::id(),
        settings.state_dir.display(),
        opts.interval_secs
    );
    let mut full_due = Some(Instant::now());
    let mut check_due: Option<Instant> = None;
    let mut recheck_due: Option<Instant> = None;
    let mut pending: Option<Concern> = None;
    let mut backoff = Duration::ZERO;
    let mut fight = Fight::default();
    let mut next_safety = Instant::now() + interval;
    let mut failover = Failover::new(&settings.state_dir, metrics.clone());
    let mut followed = 0;
    loop {
        metrics.beat();
        if node.generation != followed {
            failover.follow(&node.live());
            followed = node.generation;
        }
        let now = Instant::now();
        let next =
            [full_due, check_due, recheck_due, Some(next_safety), failover.deadline()].into_iter().flatten().min();
        let next = next.expect("safety is set");
        match events.wait(next.saturating_duration_since(now), &failover.fds())? {
            Wake::Stop(signal) => {
                log::info!("{signal}: node agent stopping; nothing is removed");
                return Ok(true);
            }
            Wake::Change(notices) => {
                let links: Vec<&str> = notices
                    .iter()
                    .filter_map(|n| if let notice::Notice::Link { name, .. } = n { Some(name.as_str()) } else { None })
                    .collect();
                failover.link_changed(&links);
                if let Some(concern) = node.concern(&notices) {
                    pending = pending.max(Some(concern));
                    check_due.get_or_insert(Instant::now() + DEBOUNCE);
                }
                if node.has_unsure() {
                    recheck_due.get_or_insert(Instant::now() + DEBOUNCE);
                }
            }
            Wake::Probe => failover.read_replies(),
            Wake::Timeout => {}
        }
        if let Some(switch) = failover.tick(Instant::now()) {
            switch_egress(settings, &switch);
            crate::netlink::nfnetlink::release();
        }
        let now = Instant::now();
        if recheck_due.is_some_and(|d| now >= d) {
            recheck_due = None;
            match node.recheck() {
                Ok(Some(concern)) => {
                    pending = pending.max(Some(concern));
                    check_due.get_or_insert(now);
                }
                Ok(None) => {}
                Err(e) => log::warn!("read the records again: {e}"),
            }
        }
        if now >= next_safety {
            full_due = Some(now);
        }
        let full = full_due.is_some_and(|d| now >= d);
        let check = check_due.is_some_and(|d| now >= d);
        if !full && !check {
            continue;
        }
        let started = Instant::now();
        let outcome = if full { reconcile(settings) } else { node.check_then_reconcile(pending.take()) };
        metrics.record_pass(if full { Pass::Reconcile } else { Pass::Check }, started.elapsed(), &outcome);
        // A long-lived process must not keep every pass's netfilter sockets.
        crate::netlink::nfnetlink::release();
        match outcome {
            Ok(repairs) => {
                backoff = Duration::ZERO;
                (full_due, check_due) = (None, None);
                if full {
                    next_safety = now + interval;
                }
                if let Some(pause) = fight.after(repairs) {
                    check_due = Some(Instant::now() + pause);
                    pending = Some(Concern::Firewall);
                }
            }
            Err(e) => {
                backoff = (backoff * 2).clamp(Duration::from_secs(1), MAX_BACKOFF);
                log::error!("repair failed: {e}; trying again in {} s", backoff.as_secs());
                let retry = Some(Instant::now() + backoff);
                if full {
                    full_due = retry;
                } else {
                    check_due = retry;
                    pending = Some(Concern::Firewall);
                }
            }
        }
    }
}

fn reconcile(settings: &Settings) -> Result<Vec<String>> {
    commands::reconcile(settings).map(|r| r.repairs)
}

/// Move the pods' source rules where health now says (the reconcile reads the health just
/// written), then forget their flows masqueraded to the uplinks they left: a UDP session's next
/// datagram is then translated to the new uplink's address instead of leaving with the old one.
fn switch_egress(settings: &Settings, switch: &failover::Switch) {
    for (network, family, from, to) in &switch.moves {
        let family = crate::health::probe::name(*family);
        log::warn!("network {network}: the pods' own {family} traffic now leaves by {to} instead of {from}");
    }
    if let Err(e) = reconcile(settings) {
        log::error!("move the pods' egress: {e}");
    }
    let mut left = switch.left.clone();
    left.extend(left_ipv6_addresses(switch));
    match crate::netlink::conntrack::clear_masqueraded(&switch.subnets, &left) {
        Ok(n) => log::info!("forgot {n} connection(s) masqueraded to {left:?}"),
        Err(e) => log::warn!("forget connections masqueraded to {left:?}: {e}"),
    }
}

/// The global IPv6 addresses of the uplinks IPv6 traffic left, read now: a provider gone dark
/// keeps its link and so its addresses (a link that went down lost them, and the kernel forgot
/// their flows then).
fn left_ipv6_addresses(switch: &failover::Switch) -> Vec<std::net::IpAddr> {
    let mut out = Vec::new();
    let Ok(mut nl) = crate::routing::netlink::Netlink::open() else { return out };
    for (_, _, from, _) in switch.moves.iter().filter(|m| m.1 == crate::family::Family::Ipv6) {
        let Some(index) = crate::routing::netlink::link_index(from) else { continue };
        let addresses = nl.addresses6(index).unwrap_or_default();
        out.extend(addresses.iter().map(|a| a.ip()).filter(|ip| match ip {
            std::net::IpAddr::V6(v6) => !v6.is_unicast_link_local() && !v6.is_loopback(),
            std::net::IpAddr::V4(_) => false,
        }));
    }
    out.sort();
    out.dedup();
    out
}

/// Another program undoing our repairs as fast as we make them (a firewall manager that owns the
/// same objects) would keep both busy: after the same repairs three passes running, wait longer
/// and longer before looking again, and say so.
#[derive(Default)]
struct Fight {
    last: Vec<String>,
    rounds: u32,
}

impl Fight {
    fn after(&mut self, repairs: Vec<String>) -> Option<Duration> {
        if repairs.is_empty() || repairs != self.last {
            self.rounds = u32::from(!repairs.is_empty());
            self.last = repairs;
            return None;
        }
        self.rounds += 1;
        if self.rounds < 3 {
            return None;
        }
        let pause = Duration::from_secs(1 << (self.rounds - 3).min(5));
        log::warn!(
            "the same repairs were needed {} times running (does another program undo them?): {}; next look in {} s",
            self.rounds,
            self.last.join("; "),
            pause.as_secs()
        );
        Some(pause)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lines(v: &[&str]) -> Vec<String> {
        v.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn the_same_repairs_three_times_running_back_off() {
        let mut f = Fight::default();
        assert_eq!(f.after(lines(&["a"])), None);
        assert_eq!(f.after(lines(&["a"])), None);
        assert_eq!(f.after(lines(&["a"])), Some(Duration::from_secs(1)));
        assert_eq!(f.after(lines(&["a"])), Some(Duration::from_secs(2)));
        assert_eq!(f.after(lines(&[])), None);
        assert_eq!(f.after(lines(&["a"])), None);
        assert_eq!(f.after(lines(&["b"])), None);
    }
}

//! Egress failover in the agent: a probe round through each uplink of every outbound list with a
//! fallback, every `intervalMs`; each uplink judged with hysteresis; the pods' source rule moved
//! to the first healthy uplink; the decision shared through `<stateDir>/health.json` so that CNI
//! calls made meanwhile agree. The loop stays event-driven: rounds are deadlines, replies are fds.

use crate::config::HealthConfig;
use crate::health::probe::Probe;
use crate::health::tracker::{Round, Tracker};
use crate::health::view::{now_ms, UplinkHealth, View};
use crate::metrics::Metrics;
use crate::routing::egress::Egress;
use crate::state::Record;
use std::collections::{BTreeMap, BTreeSet};
use std::net::Ipv4Addr;
use std::os::fd::RawFd;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

struct Uplink {
    probe: Probe,
    /// This round's verdict is in already (the link could not carry a probe).
    judged: bool,
    tracker: Tracker,
    targets: Vec<std::net::IpAddr>,
    /// The address pods were masqueraded to while they left by this uplink.
    last_address: Option<Ipv4Addr>,
}

/// The pods of these networks now leave by another uplink.
pub struct Switch {
    /// (network, from, to) for the log.
    pub moves: Vec<(String, String, String)>,
    /// Pod subnets whose flows were masqueraded to `left`.
    pub subnets: Vec<ipnetwork::IpNetwork>,
    pub left: Vec<Ipv4Addr>,
}

fn record(name: &str, tracker: &mut Tracker, round: Round, metrics: Option<&crate::metrics::Metrics>) -> bool {
    let changed = tracker.record(round);
    if changed {
        let state = if tracker.healthy { "healthy" } else { "unhealthy" };
        log::warn!("uplink {name} is {state}: {}", tracker.reason);
    }
    if let Some(m) = metrics {
        m.set_uplink_health(name, tracker.healthy);
    }
    changed
}

#[derive(Default)]
pub struct Failover {
    state_dir: PathBuf,
    uplinks: BTreeMap<String, Uplink>,
    egress: Vec<Egress>,
    chosen: BTreeMap<String, String>,
    interval: Duration,
    timeout: Duration,
    next_round: Option<Instant>,
    round_ends: Option<Instant>,
    last_write: Option<Instant>,
    metrics: Option<Metrics>,
}

impl Failover {
    pub fn new(state_dir: &Path, metrics: Metrics) -> Failover {
        Failover { state_dir: state_dir.to_path_buf(), metrics: Some(metrics), ..Failover::default() }
    }

    /// Follow the records: networks with a fallback come and go. Trackers of uplinks that stay keep
    /// what they learnt.
    pub fn follow(&mut self, records: &[&Record]) {
        let egress: BTreeSet<&Egress> = records.iter().filter_map(|r| r.egress.as_ref()).collect();
        let egress: Vec<Egress> = egress.into_iter().cloned().collect();
        if egress == self.egress {
            return;
        }
        let mut wanted: BTreeMap<String, HealthConfig> = BTreeMap::new();
        for e in &egress {
            for u in &e.uplinks {
                wanted.entry(u.interface.clone()).or_insert_with(|| e.health.clone());
            }
        }
        let gone: Vec<String> = self.uplinks.keys().filter(|n| !wanted.contains_key(*n)).cloned().collect();
        self.uplinks.retain(|name, _| wanted.contains_key(name));
        for (name, cfg) in &wanted {
            let u = self.uplinks.entry(name.clone()).or_insert_with(|| Uplink {
                probe: Probe::new(name),
                judged: false,
                tracker: Tracker::new(cfg),
                targets: Vec::new(),
                last_address: None,
            });
            u.targets = cfg.targets.clone();
        }
        // One rhythm for every uplink: the quickest any network asks for.
        let cfg = egress.iter().map(|e| &e.health).min_by_key(|h| h.interval_ms);
        self.interval = Duration::from_millis(cfg.map_or(1000, |h| u64::from(h.interval_ms)));
        self.timeout = Duration::from_millis(cfg.map_or(800, |h| u64::from(h.timeout_ms)));
        self.chosen.retain(|net, _| egress.iter().any(|e| &e.network == net));
        if let Some(m) = &self.metrics {
            // An uplink no longer probed has no health to report, a network without fallback no egress.
            m.forget_failover(&gone, &egress.iter().map(|e| e.network.as_str()).collect::<Vec<_>>());
        }
        self.egress = egress;
        if self.egress.is_empty() {
            (self.next_round, self.round_ends) = (None, None);
            let _ = std::fs::remove_file(self.state_dir.join("health.json"));
        } else if self.next_round.is_none() && self.round_ends.is_none() {
            self.next_round = Some(Instant::now());
            log::info!(
                "probing uplinks {:?} every {} ms",
                self.uplinks.keys().collect::<Vec<_>>(),
                self.interval.as_millis()
            );
        }
    }

    /// When the loop must wake for the next round to start or the open one to end.
    pub fn deadline(&self) -> Option<Instant> {
        [self.round_ends, self.next_round].into_iter().flatten().min()
    }

    /// The sockets replies of the open round arrive on.
    pub fn fds(&self) -> Vec<RawFd> {
        if self.round_ends.is_none() {
            return Vec::new();
        }
        self.uplinks.values().filter_map(|u| u.probe.fd()).collect()
    }

    /// Replies arrived: read them; the round ends early once every uplink has answered.
    pub fn read_replies(&mut self) {
        // Every socket is read, whatever the others say: replies must not wait for the next wake.
        let answered: Vec<bool> = self.uplinks.values_mut().map(|u| u.probe.read_replies()).collect();
        if answered.iter().all(|a| *a) && self.round_ends.is_some() {
            self.round_ends = Some(Instant::now());
        }
    }

    /// Start or end a round when due; a `Switch` when the pods of some network must move.
    pub fn tick(&mut self, now: Instant) -> Option<Switch> {
        if self.round_ends.is_some_and(|end| now >= end) {
            self.round_ends = None;
            return self.close_round();
        }
        if self.round_ends.is_none() && self.next_round.is_some_and(|t| now >= t) {
            let mut changed = false;
            for (name, u) in &mut self.uplinks {
                u.probe.send_round(&u.targets);
                u.judged = false;
                // A link that cannot carry anything is judged now, not after the timeout.
                if let Some(round) = u.probe.take_unusable() {
                    u.judged = true;
                    changed |= record(name, &mut u.tracker, round, self.metrics.as_ref());
                }
            }
            self.round_ends = Some(now + self.timeout);
            self.next_round = Some(now + self.interval);
            if changed {
                return self.decide(true);
            }
        }
        None
    }

    /// A link of a probed uplink changed (a kernel notification): look at once instead of at the
    /// next round, so a link that goes down moves the pods within milliseconds.
    pub fn link_changed(&mut self, names: &[&str]) {
        if !names.iter().any(|n| self.uplinks.contains_key(*n)) {
            return;
        }
        match self.round_ends {
            Some(end) => self.next_round = Some(end),
            None if self.next_round.is_some() => self.next_round = Some(Instant::now()),
            None => {}
        }
    }

    fn close_round(&mut self) -> Option<Switch> {
        let mut changed = false;
        for (name, u) in &mut self.uplinks {
            let round = u.probe.finish_round();
            if std::mem::take(&mut u.judged) {
                continue;
            }
            if let Some(m) = &self.metrics {
                // A round of link state alone (no targets) is no probe answered or lost.
                if !u.targets.is_empty() {
                    m.observe_probe(name, u.probe.rtt.filter(|_| round == Round::Answered));
                }
            }
            changed |= record(name, &mut u.tracker, round, self.metrics.as_ref());
        }
        self.decide(changed)
    }

    /// Which uplink each network's pods leave by now; the health is shared when it changed.
    fn decide(&mut self, changed: bool) -> Option<Switch> {
        let healthy = |name: &str| self.uplinks.get(name).is_none_or(|u| u.tracker.healthy);
        let mut switch = Switch { moves: Vec::new(), subnets: Vec::new(), left: Vec::new() };
        for e in &self.egress {
            let to = e.chosen(healthy).interface.clone();
            let from = self.chosen.get(&e.network).cloned().unwrap_or_else(|| e.primary().interface.clone());
            if to != from {
                switch.subnets.extend(e.subnets.iter().copied());
                switch.left.extend(self.uplinks.get(&from).and_then(|u| u.last_address));
                switch.moves.push((e.network.clone(), from, to.clone()));
            }
            if let Some(m) = &self.metrics {
                m.set_egress(&e.network, &to);
            }
            self.chosen.insert(e.network.clone(), to);
        }
        for u in self.uplinks.values_mut() {
            u.last_address = u.probe.address.or(u.last_address);
        }
        // Written before the switch is applied: the reconcile that applies it reads it.
        let stale = self.last_write.is_none_or(|t| t.elapsed() * 3 >= self.lease());
        if changed || stale || !switch.moves.is_empty() {
            if let Err(e) = self.view().save(&self.state_dir) {
                log::error!("share uplink health: {e}");
            }
            self.last_write = Some(Instant::now());
        }
        (!switch.moves.is_empty()).then_some(switch)
    }

    /// Long enough to survive a slow round, short enough that a dead agent's word soon expires.
    fn lease(&self) -> Duration {
        (self.interval * 4).max(Duration::from_secs(2))
    }

    pub fn view(&self) -> View {
        let uplinks = self
            .uplinks
            .iter()
            .map(|(n, u)| (n.clone(), UplinkHealth { healthy: u.tracker.healthy, reason: u.tracker.reason.clone() }))
            .collect();
        View {
            pid: std::process::id(),
            written_ms: now_ms(),
            lease_ms: self.lease().as_millis() as u64,
            uplinks,
            egress: self.chosen.clone(),
        }
    }
}

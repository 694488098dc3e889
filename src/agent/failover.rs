//! Egress failover in the agent: a probe round through each uplink of every outbound list with a
//! fallback, every `intervalMs`, in each family the uplink has an address of; each uplink judged
//! per family with hysteresis; each family's source rule of the pods moved to the first uplink
//! healthy in that family; the decision shared through `<stateDir>/health.json` so that CNI calls
//! made meanwhile agree. The loop stays event-driven: rounds are deadlines, replies are fds.

use crate::config::HealthConfig;
use crate::family::{family_of, Family};
use crate::health::probe::{name as family_name, Probe};
use crate::health::tracker::{Round, Tracker};
use crate::health::verdict::{verdict, Judged};
use crate::health::view::{now_ms, UplinkHealth, View};
use crate::metrics::Metrics;
use crate::routing::egress::Egress;
use crate::state::Record;
use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;
use std::os::fd::RawFd;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

const FAMILIES: [Family; 2] = [Family::Ipv4, Family::Ipv6];

/// One uplink's probe and judgement in one family.
struct Lane {
    probe: Probe,
    /// This round's verdict is in already (the link could not carry a probe).
    judged: bool,
    tracker: Tracker,
}

struct Uplink {
    /// IPv4's, then IPv6's.
    lanes: [Lane; 2],
    /// A network whose pods have an IPv6 range leaves by it: without one, its IPv6 verdict would
    /// decide nothing, and an IPv4-only node would pay for IPv6 probes every round.
    ipv6: bool,
    targets: Vec<IpAddr>,
    /// The IPv4 address pods were masqueraded to while they left by this uplink.
    last_address: Option<IpAddr>,
}

impl Uplink {
    fn new(name: &str, cfg: &HealthConfig) -> Uplink {
        let lane = |family| Lane { probe: Probe::new(name, family), judged: false, tracker: Tracker::new(cfg) };
        Uplink { lanes: FAMILIES.map(lane), ipv6: false, targets: Vec::new(), last_address: None }
    }

    /// The lanes probed: IPv4's always (its verdict is the uplink's as before IPv6 was probed),
    /// IPv6's when pods with an IPv6 range may leave by the uplink.
    fn lanes(&mut self) -> impl Iterator<Item = &mut Lane> {
        let ipv6 = self.ipv6;
        self.lanes.iter_mut().filter(move |l| ipv6 || l.probe.family.is_ipv4())
    }

    fn judged(&self, at: usize) -> Judged<'_> {
        let family = FAMILIES[at];
        let probed = family.is_ipv4() || self.ipv6;
        let has_targets = probed && self.targets.iter().any(|t| family_of(*t) == family);
        Judged { family, tracker: &self.lanes[at].tracker, has_targets }
    }

    /// What the uplink is worth to each family now (see health/verdict.rs); no IPv6 verdict when
    /// it is not probed in IPv6.
    fn health(&self) -> UplinkHealth {
        let (v4, v6) = (self.judged(0), self.judged(1));
        UplinkHealth { ipv4: verdict(&v4, &v6), ipv6: self.ipv6.then(|| verdict(&v6, &v4)) }
    }
}

/// The pods of these networks now leave by another uplink, in one family or both.
pub struct Switch {
    /// (network, family, from, to) for the log.
    pub moves: Vec<(String, Family, String, String)>,
    /// The pod subnets, of the families that moved, whose flows were masqueraded to the uplinks left.
    pub subnets: Vec<ipnetwork::IpNetwork>,
    /// The IPv4 addresses of the uplinks left by IPv4 moves (IPv6's are read at the switch).
    pub left: Vec<IpAddr>,
}

/// Say what changed between two judgements of an uplink; true when its health in a family did.
fn report(name: &str, before: &UplinkHealth, after: &UplinkHealth, metrics: Option<&Metrics>) -> bool {
    let mut changed = false;
    for family in FAMILIES.into_iter().filter(|f| f.is_ipv4() || after.ipv6.is_some()) {
        let (was, now) = (before.family(family), after.family(family));
        if let Some(m) = metrics {
            m.set_uplink_family_health(name, family, now.healthy);
        }
        if was.healthy == now.healthy && was.addressed == now.addressed {
            continue;
        }
        changed |= was.healthy != now.healthy;
        let family = family_name(family);
        if !now.addressed {
            // A family the uplink does not carry is no fault to warn of.
            log::info!("uplink {name} carries no {family} ({}): not probed in it", now.reason);
        } else if was.healthy != now.healthy {
            let state = if now.healthy { "healthy" } else { "unhealthy" };
            log::warn!("uplink {name} is {state} for {family}: {}", now.reason);
        }
    }
    if let Some(m) = metrics {
        m.set_uplink_health(name, after.healthy());
    }
    changed
}

#[derive(Default)]
pub struct Failover {
    state_dir: PathBuf,
    uplinks: BTreeMap<String, Uplink>,
    egress: Vec<Egress>,
    /// The uplink each network's pods leave by now, per family.
    chosen: BTreeMap<(String, Family), String>,
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
        let mut ipv6: BTreeSet<&str> = BTreeSet::new();
        for e in &egress {
            for u in &e.uplinks {
                wanted.entry(u.interface.clone()).or_insert_with(|| e.health.clone());
                if e.families().contains(&Family::Ipv6) {
                    ipv6.insert(&u.interface);
                }
            }
        }
        let gone: Vec<String> = self.uplinks.keys().filter(|n| !wanted.contains_key(*n)).cloned().collect();
        self.uplinks.retain(|name, _| wanted.contains_key(name));
        for (name, cfg) in &wanted {
            let u = self.uplinks.entry(name.clone()).or_insert_with(|| Uplink::new(name, cfg));
            u.targets = cfg.targets.clone();
            u.ipv6 = ipv6.contains(name.as_str());
        }
        // One rhythm for every uplink: the quickest any network asks for.
        let cfg = egress.iter().map(|e| &e.health).min_by_key(|h| h.interval_ms);
        self.interval = Duration::from_millis(cfg.map_or(1000, |h| u64::from(h.interval_ms)));
        self.timeout = Duration::from_millis(cfg.map_or(800, |h| u64::from(h.timeout_ms)));
        self.chosen.retain(|(net, _), _| egress.iter().any(|e| &e.network == net));
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
        // Only the lanes probed: a socket nobody reads would wake the loop for ever.
        let probed = |u: &Uplink, l: &Lane| u.ipv6 || l.probe.family.is_ipv4();
        self.uplinks
            .values()
            .flat_map(|u| u.lanes.iter().filter(move |l| probed(u, l)).filter_map(|l| l.probe.fd()))
            .collect()
    }

    /// Replies arrived: read them; the round ends early once every uplink has answered.
    pub fn read_replies(&mut self) {
        // Every socket is read, whatever the others say: replies must not wait for the next wake.
        // A lane judged at the round's start (no address of its family, link down) waits for nothing.
        let answered: Vec<bool> =
            self.uplinks.values_mut().flat_map(|u| u.lanes().map(|l| l.probe.read_replies() || l.judged)).collect();
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
                let before = u.health();
                let targets = u.targets.clone();
                for lane in u.lanes() {
                    lane.probe.send_round(&targets);
                    lane.judged = false;
                    // A link that cannot carry anything (or anything of this family) is judged
                    // now, not after the timeout.
                    if let Some(round) = lane.probe.take_unusable() {
                        lane.judged = true;
                        lane.tracker.record(round);
                    }
                }
                changed |= report(name, &before, &u.health(), self.metrics.as_ref());
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
            let before = u.health();
            let targets = u.targets.clone();
            for lane in u.lanes() {
                let round = lane.probe.finish_round();
                if std::mem::take(&mut lane.judged) {
                    continue;
                }
                if let Some(m) = &self.metrics {
                    // A round of link state alone (no targets of the family) is no probe answered
                    // or lost.
                    if targets.iter().any(|t| family_of(*t) == lane.probe.family) {
                        m.observe_probe(name, lane.probe.rtt.filter(|_| round == Round::Answered));
                    }
                }
                lane.tracker.record(round);
            }
            changed |= report(name, &before, &u.health(), self.metrics.as_ref());
        }
        self.decide(changed)
    }

    /// Which uplink each network's pods leave by now, per family; the health is shared when it
    /// changed.
    fn decide(&mut self, changed: bool) -> Option<Switch> {
        let health: BTreeMap<&str, UplinkHealth> = self.uplinks.iter().map(|(n, u)| (n.as_str(), u.health())).collect();
        let healthy = |name: &str, family| health.get(name).is_none_or(|h| h.family(family).healthy);
        let mut switch = Switch { moves: Vec::new(), subnets: Vec::new(), left: Vec::new() };
        for e in &self.egress {
            for (i, family) in e.families().into_iter().enumerate() {
                let to = e.chosen(family, healthy).interface.clone();
                let key = (e.network.clone(), family);
                let from = self.chosen.get(&key).cloned().unwrap_or_else(|| e.primary().interface.clone());
                if to != from {
                    switch.subnets.extend(e.subnets.iter().filter(|s| family_of(s.ip()) == family));
                    if family == Family::Ipv4 {
                        switch.left.extend(self.uplinks.get(&from).and_then(|u| u.last_address));
                    }
                    switch.moves.push((e.network.clone(), family, from, to.clone()));
                }
                // One series per network: its first family's (IPv4 where it has both).
                if let Some(m) = self.metrics.as_ref().filter(|_| i == 0) {
                    m.set_egress(&e.network, &to);
                }
                self.chosen.insert(key, to);
            }
        }
        for u in self.uplinks.values_mut() {
            u.last_address = u.lanes[0].probe.address.or(u.last_address);
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
        let uplinks = self.uplinks.iter().map(|(n, u)| (n.clone(), u.health())).collect();
        let of = |family: Family| -> BTreeMap<String, String> {
            self.chosen.iter().filter(|((_, f), _)| *f == family).map(|((n, _), u)| (n.clone(), u.clone())).collect()
        };
        // `egress` is each network's first family's, as before IPv6 was judged on its own.
        let mut egress = of(Family::Ipv6);
        egress.extend(of(Family::Ipv4));
        View {
            pid: std::process::id(),
            written_ms: now_ms(),
            lease_ms: self.lease().as_millis() as u64,
            uplinks,
            egress,
            egress6: of(Family::Ipv6),
        }
    }
}

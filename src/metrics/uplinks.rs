//! The uplinks as failover probing sees them: health, probes and their round-trip time, and the
//! uplink each network's pods' own traffic leaves by. The families are registered from the start
//! so that their names and help are stable; they hold series only once probing runs.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;
use std::collections::BTreeMap;
use std::sync::Mutex;
use std::time::Duration;

/// Probes over a healthy link answer in milliseconds; a modem's, in hundreds of them.
const RTT_BUCKETS: [f64; 10] = [0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0];

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct UplinkLabels {
    uplink: String,
}

/// An uplink's health in one family: a label of its own metric, so that the series of
/// `uplink_healthy` keep the labels they had before IPv6 was judged on its own.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct FamilyLabels {
    uplink: String,
    family: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct TransitionLabels {
    uplink: String,
    to: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ProbeLabels {
    uplink: String,
    result: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct EgressLabels {
    network: String,
    uplink: String,
}

fn rtt_histogram() -> Histogram {
    Histogram::new(RTT_BUCKETS)
}

pub struct Uplinks {
    healthy: Family<UplinkLabels, Gauge>,
    family_healthy: Family<FamilyLabels, Gauge>,
    transitions: Family<TransitionLabels, Counter>,
    rtt: Family<UplinkLabels, Histogram, fn() -> Histogram>,
    probes: Family<ProbeLabels, Counter>,
    egress: Family<EgressLabels, Gauge>,
    /// The uplink each network's egress series names now, so a change removes the old series.
    egress_now: Mutex<BTreeMap<String, String>>,
}

impl Uplinks {
    pub fn register(registry: &mut Registry) -> Uplinks {
        let u = Uplinks {
            healthy: Family::default(),
            family_healthy: Family::default(),
            transitions: Family::default(),
            rtt: Family::new_with_constructor(rtt_histogram),
            probes: Family::default(),
            egress: Family::default(),
            egress_now: Mutex::new(BTreeMap::new()),
        };
        registry.register(
            "uplink_healthy",
            "1 when the uplink's probes answer, 0 when it is failed over",
            u.healthy.clone(),
        );
        registry.register(
            "uplink_family_healthy",
            "1 when the uplink's probes of the family (ipv4, ipv6) answer, 0 when the pods' traffic of that family is failed over from it or it has no address of the family",
            u.family_healthy.clone(),
        );
        registry.register(
            "uplink_transitions",
            "Times the uplink became healthy or unhealthy (label to)",
            u.transitions.clone(),
        );
        registry.register("uplink_probe_rtt_seconds", "Round-trip time of the uplink's answered probes", u.rtt.clone());
        registry.register(
            "uplink_probes",
            "Probes sent over the uplink, by result (answered, lost); loss = lost / all",
            u.probes.clone(),
        );
        registry.register(
            "network_egress_uplink",
            "1 for the uplink a network's pods' own traffic leaves by now (one series per network)",
            u.egress.clone(),
        );
        u
    }

    pub fn set_health(&self, uplink: &str, healthy: bool) {
        let labels = UplinkLabels { uplink: uplink.to_string() };
        let was = self.healthy.get(&labels).map(|g| g.get());
        self.healthy.get_or_create(&labels).set(i64::from(healthy));
        if was.is_some_and(|w| w != i64::from(healthy)) {
            let to = if healthy { "healthy" } else { "unhealthy" };
            self.transitions.get_or_create(&TransitionLabels { uplink: uplink.to_string(), to }).inc();
        }
    }

    pub fn set_family_health(&self, uplink: &str, family: &'static str, healthy: bool) {
        self.family_healthy.get_or_create(&FamilyLabels { uplink: uplink.to_string(), family }).set(i64::from(healthy));
    }

    pub fn observe_probe(&self, uplink: &str, rtt: Option<Duration>) {
        let result = if rtt.is_some() { "answered" } else { "lost" };
        self.probes.get_or_create(&ProbeLabels { uplink: uplink.to_string(), result }).inc();
        if let Some(rtt) = rtt {
            self.rtt.get_or_create(&UplinkLabels { uplink: uplink.to_string() }).observe(rtt.as_secs_f64());
        }
    }

    pub fn forget(&self, uplinks: &[String], networks: &[&str]) {
        for uplink in uplinks {
            let labels = UplinkLabels { uplink: uplink.clone() };
            self.healthy.remove(&labels);
            self.rtt.remove(&labels);
            for family in ["ipv4", "ipv6"] {
                self.family_healthy.remove(&FamilyLabels { uplink: uplink.clone(), family });
            }
            for to in ["healthy", "unhealthy"] {
                self.transitions.remove(&TransitionLabels { uplink: uplink.clone(), to });
            }
            for result in ["answered", "lost"] {
                self.probes.remove(&ProbeLabels { uplink: uplink.clone(), result });
            }
        }
        let mut now = self.egress_now.lock().unwrap_or_else(|e| e.into_inner());
        now.retain(|network, uplink| {
            let keep = networks.contains(&network.as_str());
            if !keep {
                self.egress.remove(&EgressLabels { network: network.clone(), uplink: uplink.clone() });
            }
            keep
        });
    }

    pub fn set_egress(&self, network: &str, uplink: &str) {
        let mut now = self.egress_now.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(old) = now.insert(network.to_string(), uplink.to_string()) {
            if old != uplink {
                self.egress.remove(&EgressLabels { network: network.to_string(), uplink: old });
            }
        }
        self.egress.get_or_create(&EgressLabels { network: network.to_string(), uplink: uplink.to_string() }).set(1);
    }
}

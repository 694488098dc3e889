//! What the node agent tells Prometheus (`bridge-nat watch --metrics ADDR:PORT`): its passes and
//! repairs, the attachments and forwards the records list, and, once failover probing runs, the
//! uplinks' health. The loop only bumps counters and stamps times here (atomics, a lock held for
//! nanoseconds); the text is made by the prometheus-client crate's encoder in the server's own
//! threads (serve.rs), so a scraper can never hold up a repair.

mod http;
mod records;
mod repairs;
mod serve;
mod uplinks;

use repairs::{classify_repair, KINDS as REPAIR_KINDS};
use serve::serve;

use crate::error::Result;
use crate::state::Store;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};
use uplinks::Uplinks;

/// A live loop wakes at least once a minute: events.rs caps its wait at 60 s, and a pass is
/// bounded by the lock wait (lockTimeoutMs, 20 s by default). Three minutes without a wake is
/// three missed minutes: the loop is stuck, and /healthz says so.
pub const STALE_AFTER: Duration = Duration::from_secs(180);

/// Check passes take milliseconds; a full reconcile with iptables-restore, up to seconds.
const PASS_BUCKETS: [f64; 14] = [0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0];

/// The agent's two kinds of pass.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Pass {
    /// The read-only check after a burst of notifications (it reconciles when it finds something).
    Check,
    /// The full reconcile at start and every `--interval`.
    Reconcile,
}

impl Pass {
    fn name(self) -> &'static str {
        match self {
            Pass::Check => "check",
            Pass::Reconcile => "reconcile",
        }
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct PassLabels {
    pass: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct KindLabels {
    kind: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct VersionLabels {
    version: &'static str,
}

/// The agent's metrics; clones share them.
#[derive(Clone)]
pub struct Metrics {
    inner: Arc<Inner>,
}

struct Inner {
    registry: Registry,
    born: Instant,
    /// Milliseconds after `born` of the loop's last wake.
    heartbeat_ms: AtomicU64,
    pass_seconds: Family<PassLabels, Histogram, fn() -> Histogram>,
    pass_failures: Family<PassLabels, Counter>,
    repairs: Family<KindLabels, Counter>,
    last_success: Gauge<f64, AtomicU64>,
    uplinks: Uplinks,
}

fn pass_histogram() -> Histogram {
    Histogram::new(PASS_BUCKETS)
}

impl Metrics {
    /// The agent's metrics, served at `addr` when given. Call it after the agent has blocked its
    /// signals (serve.rs says why).
    pub fn start(state_dir: &Path, addr: Option<SocketAddr>) -> Result<Metrics> {
        let metrics = Metrics::new(state_dir)?;
        if let Some(addr) = addr {
            let bound = serve(addr, metrics.clone())?;
            log::info!("serving metrics at http://{bound}/metrics and liveness at http://{bound}/healthz");
        }
        Ok(metrics)
    }

    /// The metrics of an agent over the records in `state_dir`.
    pub fn new(state_dir: &Path) -> Result<Metrics> {
        let mut registry = Registry::with_prefix("bridge_nat");
        let build = Family::<VersionLabels, Gauge>::default();
        build.get_or_create(&VersionLabels { version: env!("CARGO_PKG_VERSION") }).set(1);
        registry.register("build_info", "The agent's version, as a label; always 1", build);
        let pass_seconds = Family::<PassLabels, Histogram, fn() -> Histogram>::new_with_constructor(pass_histogram);
        let pass_failures = Family::<PassLabels, Counter>::default();
        // Every series from 0, so that increase() sees the first one.
        for pass in [Pass::Check, Pass::Reconcile] {
            let _ = pass_seconds.get_or_create(&PassLabels { pass: pass.name() });
            let _ = pass_failures.get_or_create(&PassLabels { pass: pass.name() });
        }
        registry.register(
            "pass_duration_seconds",
            "How long the agent's passes took (check: after kernel notifications; reconcile: at start and every --interval); _count counts them",
            pass_seconds.clone(),
        );
        registry.register(
            "pass_failures",
            "Passes that failed (they are retried with back-off)",
            pass_failures.clone(),
        );
        let repairs = Family::<KindLabels, Counter>::default();
        for kind in REPAIR_KINDS {
            let _ = repairs.get_or_create(&KindLabels { kind });
        }
        registry.register(
            "repairs",
            "Changes the agent made to bring the node back to the records, by kind (route, ip_rule, firewall, sysctl, table_name, other)",
            repairs.clone(),
        );
        let last_success = Gauge::<f64, AtomicU64>::default();
        registry.register(
            "last_success_timestamp_seconds",
            "When the last pass succeeded (Unix time; 0 until one has)",
            last_success.clone(),
        );
        let uplinks = Uplinks::register(&mut registry);
        registry.register_collector(Box::new(records::RecordsCollector::new(Store::open(state_dir)?)));
        let inner = Inner {
            registry,
            born: Instant::now(),
            heartbeat_ms: AtomicU64::new(0),
            pass_seconds,
            pass_failures,
            repairs,
            last_success,
            uplinks,
        };
        Ok(Metrics { inner: Arc::new(inner) })
    }

    /// The loop is alive: called whenever it wakes.
    pub fn beat(&self) {
        let ms = self.inner.born.elapsed().as_millis() as u64;
        self.inner.heartbeat_ms.store(ms, Ordering::Relaxed);
    }

    /// How long since the loop last woke.
    pub fn since_beat(&self) -> Duration {
        let last = Duration::from_millis(self.inner.heartbeat_ms.load(Ordering::Relaxed));
        self.inner.born.elapsed().saturating_sub(last)
    }

    /// One pass of the agent: how long it took, and the repairs it made or that it failed.
    pub fn record_pass<E>(&self, pass: Pass, took: Duration, outcome: &std::result::Result<Vec<String>, E>) {
        let labels = PassLabels { pass: pass.name() };
        self.inner.pass_seconds.get_or_create(&labels).observe(took.as_secs_f64());
        match outcome {
            Ok(repairs) => {
                for line in repairs {
                    self.inner.repairs.get_or_create(&KindLabels { kind: classify_repair(line) }).inc();
                }
                let now = SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default();
                self.inner.last_success.set(now.as_secs_f64());
            }
            Err(_) => {
                self.inner.pass_failures.get_or_create(&labels).inc();
            }
        }
    }

    /// Whether the uplink's probes say it works now (egress failover); a change is counted as a
    /// transition.
    pub fn set_uplink_health(&self, uplink: &str, healthy: bool) {
        self.inner.uplinks.set_health(uplink, healthy);
    }

    /// Whether the uplink's probes of `family` say the pods' traffic of that family may leave by it.
    pub fn set_uplink_family_health(&self, uplink: &str, family: crate::family::Family, healthy: bool) {
        let family = if family.is_ipv4() { "ipv4" } else { "ipv6" };
        self.inner.uplinks.set_family_health(uplink, family, healthy);
    }

    /// One probe of an uplink: its round-trip time, or None when it got no answer.
    pub fn observe_probe(&self, uplink: &str, rtt: Option<Duration>) {
        self.inner.uplinks.observe_probe(uplink, rtt);
    }

    /// The uplink a network's pods' own traffic leaves by now.
    pub fn set_egress(&self, network: &str, uplink: &str) {
        self.inner.uplinks.set_egress(network, uplink);
    }

    /// Drop the series of uplinks no longer probed, and the egress of networks not in `networks`.
    pub fn forget_failover(&self, uplinks: &[String], networks: &[&str]) {
        self.inner.uplinks.forget(uplinks, networks);
    }

    /// The metrics in Prometheus' text format (0.0.4), as the crate's encoder writes them.
    pub fn encode_text(&self) -> String {
        let mut out = String::new();
        // Writing to a String cannot fail.
        let _ = prometheus_client::encoding::prometheus_text::encode(&mut out, &self.inner.registry);
        out
    }
}

#[cfg(test)]
mod tests;

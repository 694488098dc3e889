//! Attachments and forwards on the node, counted from the records at each scrape. CNI calls are
//! short processes that keep no metrics; the records are what they leave. The scrape's own
//! record cache (the agent's way: a few `stat`s when nothing changed, one parse per record
//! written since) keeps this off the agent's loop and current to the second.

use crate::state::{RecordCache, Store};
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric};
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use std::collections::BTreeMap;
use std::sync::Mutex;

#[derive(Clone, Debug, Hash, PartialEq, Eq, PartialOrd, Ord, EncodeLabelSet)]
pub struct RecordLabels {
    pub network: String,
    pub backend: String,
    pub status: String,
}

/// Attachments and forwards per (network, backend, status).
pub type Counts = BTreeMap<RecordLabels, (i64, i64)>;

pub struct RecordsCollector {
    store: Store,
    cache: Mutex<RecordCache>,
}

impl std::fmt::Debug for RecordsCollector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RecordsCollector").field("state_dir", &self.store.dir()).finish()
    }
}

impl RecordsCollector {
    pub fn new(store: Store) -> RecordsCollector {
        RecordsCollector { store, cache: Mutex::new(RecordCache::default()) }
    }

    /// The counts now; None (and a warning) when the state directory cannot be read.
    pub fn count_records(&self) -> Option<Counts> {
        let mut cache = self.cache.lock().unwrap_or_else(|e| e.into_inner());
        if let Err(e) = cache.refresh(&self.store) {
            log::warn!("metrics: read the records for the attachment counts: {e}");
            return None;
        }
        let mut counts = Counts::new();
        for (network, rec) in cache.entries() {
            let (backend, status, forwards) = match rec {
                Some(r) => (r.backend.name(), r.status_name(), r.forward_count()),
                None => ("unknown", "unreadable", 0),
            };
            let labels =
                RecordLabels { network: network.to_string(), backend: backend.to_string(), status: status.to_string() };
            let entry = counts.entry(labels).or_default();
            entry.0 += 1;
            entry.1 += forwards as i64;
        }
        Some(counts)
    }
}

impl Collector for RecordsCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        // Unreadable records dir: the families are left out rather than reported as zero pods.
        let Some(counts) = self.count_records() else { return Ok(()) };
        let attachments = Family::<RecordLabels, Gauge>::default();
        let forwards = Family::<RecordLabels, Gauge>::default();
        for (labels, (a, f)) in &counts {
            attachments.get_or_create(labels).set(*a);
            forwards.get_or_create(labels).set(*f);
        }
        let help = "Attachments on the node (pods' interfaces), from the records, by network, backend and status.";
        attachments.encode(encoder.encode_descriptor("attachments", help, None, attachments.metric_type())?)?;
        let help = "Port forwards the attachments' records list, by network, backend and status.";
        forwards.encode(encoder.encode_descriptor("forwards", help, None, forwards.metric_type())?)?;
        Ok(())
    }
}

//! The records as the agent sees them: kept in memory, re-read where the state directory changed,
//! with the interest they give to kernel notifications. A check pass looks only at what the
//! notifications concerned: routing for the union of the records (cost by uplinks, not pods), or
//! the firewall attachment by attachment (as CHECK does).

use super::interest::{Concern, Interest};
use super::notice::Notice;
use crate::commands;
use crate::config::Settings;
use crate::error::Result;
use crate::state::{RecordCache, Store};

pub struct Records {
    settings: Settings,
    store: Store,
    cache: RecordCache,
    interest: Interest,
    /// Notifications read and passes run, for the debug log (and the tests that read it).
    ignored: u64,
    /// Bumped whenever the records changed, so others can follow them cheaply.
    pub generation: u64,
    /// Notices about links or tables the records read so far do not name.
    unsure: Vec<Notice>,
}

/// Past this many notices waiting for the records, a full check instead (a flood of them).
const MAX_UNSURE: usize = 4096;

impl Records {
    pub fn open(settings: &Settings) -> Result<Records> {
        let store = Store::open(&settings.state_dir)?;
        let mut records = Records {
            settings: settings.clone(),
            store,
            cache: RecordCache::default(),
            interest: Interest::default(),
            ignored: 0,
            generation: 1,
            unsure: Vec::new(),
        };
        records.refresh()?;
        Ok(records)
    }

    pub fn refresh(&mut self) -> Result<()> {
        if self.cache.refresh(&self.store)? {
            self.interest.rebuild(&self.cache.live());
            self.generation += 1;
        }
        Ok(())
    }

    /// The records of this boot, as last read.
    pub fn live(&self) -> Vec<&crate::state::Record> {
        self.cache.live()
    }

    /// What a burst of notifications concerns, if anything. Records are re-read first when a
    /// notice names a link or table the interest does not know (an uplink a new pod's config
    /// names may have just appeared).
    pub fn concern(&mut self, notices: &[Notice]) -> Option<Concern> {
        let mut concern = None;
        for n in notices {
            match self.interest.concern(n) {
                Some(c) => concern = concern.max(Some(c)),
                // Maybe a record written since names it (an uplink a new pod's config names has
                // just appeared): looked at again after the burst, not now, while pods are starting.
                None if self.interest.may_be_stale_for(n) && self.unsure.len() < MAX_UNSURE => {
                    self.unsure.push(n.clone())
                }
                None if self.interest.may_be_stale_for(n) => concern = Some(Concern::Firewall),
                None => self.ignored += 1,
            }
        }
        concern
    }

    /// Whether some notices wait for the records to be read again.
    pub fn has_unsure(&self) -> bool {
        !self.unsure.is_empty()
    }

    /// Read the records again and judge the notices that waited for it.
    pub fn recheck(&mut self) -> Result<Option<Concern>> {
        self.refresh()?;
        let unsure = std::mem::take(&mut self.unsure);
        let concern = unsure.iter().filter_map(|n| self.interest.concern(n)).max();
        log::trace!("{} notification(s) judged after the records were read again: {concern:?}", unsure.len());
        Ok(concern)
    }

    /// The read-only check of what changed; the lock and a reconcile only when something differs.
    pub fn check_then_reconcile(&mut self, concern: Option<Concern>) -> Result<Vec<String>> {
        self.refresh()?;
        let live = self.cache.live();
        let concern = concern.unwrap_or(Concern::Firewall);
        log::debug!("check pass ({concern:?}) over {} record(s)", live.len());
        let wrong: Vec<String> = match concern {
            Concern::Routing => commands::routing_problems(&self.settings, &live)?,
            Concern::Firewall => commands::problems_of(&self.settings, &live)?
                .into_iter()
                .filter(|(_, p)| !p.is_empty())
                .map(|(id, p)| format!("{}: {}", id.describe(), p.join("; ")))
                .collect(),
        };
        if wrong.is_empty() {
            return Ok(Vec::new());
        }
        log::info!("the node differs from the records: {}", wrong.join(" | "));
        let repairs = commands::reconcile(&self.settings).map(|r| r.repairs)?;
        self.refresh()?;
        Ok(repairs)
    }
}

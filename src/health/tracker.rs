//! One uplink's health in one family with hysteresis: unhealthy after `failAfter` rounds in a row
//! without an answer, or at once when its link is down, has no carrier or no address of the
//! family; healthy again after `recoverAfter` rounds in a row with one. Pure: rounds come in as
//! results.

use crate::config::HealthConfig;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Tracker {
    pub healthy: bool,
    pub reason: String,
    /// The uplink has an address of this family (as far as the last round saw): a family it
    /// does not carry is unhealthy, but no fault of the uplink's.
    pub addressed: bool,
    fails: u32,
    oks: u32,
    fail_after: u32,
    recover_after: u32,
}

/// What one round found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Round {
    /// At least one target answered (or, with no targets, the link is usable).
    Answered,
    /// The link is usable but no target answered.
    Silent(String),
    /// Down, no carrier: no probe can tell more.
    Unusable(String),
    /// No address of the family: the uplink cannot carry it, and is not probed in it.
    NoAddress(String),
}

impl Tracker {
    /// An uplink starts healthy: the primary is used until probes say otherwise.
    pub fn new(cfg: &HealthConfig) -> Tracker {
        Tracker {
            healthy: true,
            reason: "not probed yet".into(),
            addressed: true,
            fails: 0,
            oks: 0,
            fail_after: cfg.fail_after,
            recover_after: cfg.recover_after,
        }
    }

    /// Count a round; true when the judgement changed.
    pub fn record(&mut self, round: Round) -> bool {
        let was = self.healthy;
        self.addressed = !matches!(round, Round::NoAddress(_));
        match round {
            Round::Answered => {
                self.fails = 0;
                self.oks += 1;
                if !self.healthy && self.oks >= self.recover_after {
                    self.healthy = true;
                }
                if self.healthy {
                    self.reason = "answering".into();
                }
            }
            Round::Silent(why) => {
                self.oks = 0;
                self.fails += 1;
                if self.healthy && self.fails >= self.fail_after {
                    self.healthy = false;
                    self.reason = format!("{why} for {} rounds", self.fails);
                }
            }
            Round::Unusable(why) | Round::NoAddress(why) => {
                self.oks = 0;
                self.fails = self.fails.max(self.fail_after);
                self.healthy = false;
                self.reason = why;
            }
        }
        was != self.healthy
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tracker() -> Tracker {
        Tracker::new(&HealthConfig { fail_after: 3, recover_after: 2, ..HealthConfig::default() })
    }

    fn silent() -> Round {
        Round::Silent("no answer".into())
    }

    #[test]
    fn fails_after_n_silent_rounds_and_recovers_after_m_answered_ones() {
        let mut t = tracker();
        assert!(!t.record(silent()));
        assert!(!t.record(silent()));
        assert!(t.record(silent()), "third silent round");
        assert!(!t.healthy);
        assert_eq!(t.reason, "no answer for 3 rounds");
        assert!(!t.record(Round::Answered));
        assert!(!t.record(silent()), "a silent round restarts the count");
        assert!(!t.record(Round::Answered));
        assert!(t.record(Round::Answered), "second answered round in a row");
        assert!(t.healthy);
    }

    #[test]
    fn an_answer_resets_the_failures_and_an_unusable_link_fails_at_once() {
        let mut t = tracker();
        t.record(silent());
        t.record(silent());
        t.record(Round::Answered);
        assert!(!t.record(silent()), "the count started again");
        assert!(t.healthy);
        assert!(t.record(Round::Unusable("link down".into())));
        assert_eq!(t.reason, "link down");
        assert!(!t.record(Round::Answered));
        assert!(t.record(Round::Answered));
    }

    #[test]
    fn an_uplink_without_an_address_of_the_family_is_unhealthy_in_it_at_once_and_not_addressed() {
        let mut t = tracker();
        assert!(t.record(Round::NoAddress("no stable global IPv6 address".into())));
        assert!(!t.healthy && !t.addressed);
        assert_eq!(t.reason, "no stable global IPv6 address");
        assert!(!t.record(Round::Answered));
        assert!(t.addressed, "an address came: probed again");
        assert!(t.record(Round::Answered));
    }
}

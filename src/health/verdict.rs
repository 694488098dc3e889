//! An uplink's verdict per family, from its two trackers. Each family is judged by its own probes
//! (`targets` for IPv4, `targets6` for IPv6). A family without targets of its own borrows the
//! other family's verdict where the uplink is probed in that one: the provider is the same, and a
//! config written before IPv6 was probed (IPv4 targets only) keeps moving both families together,
//! as it did. Without targets in either family, link state and an address of the family decide.

use super::probe::name;
use super::tracker::Tracker;
use super::view::FamilyHealth;
use crate::family::Family;

/// One family's tracker, and whether that family has targets to probe.
pub struct Judged<'a> {
    pub family: Family,
    pub tracker: &'a Tracker,
    pub has_targets: bool,
}

fn own(j: &Judged) -> FamilyHealth {
    FamilyHealth { healthy: j.tracker.healthy, reason: j.tracker.reason.clone(), addressed: j.tracker.addressed }
}

/// `this` family's verdict, given the `other` family's.
pub fn verdict(this: &Judged, other: &Judged) -> FamilyHealth {
    let mine = own(this);
    let borrow = !this.has_targets && other.has_targets && other.tracker.addressed;
    if !borrow || !mine.healthy {
        return mine;
    }
    FamilyHealth {
        healthy: other.tracker.healthy,
        reason: format!(
            "{} (by its {} probes: no {} targets)",
            other.tracker.reason,
            name(other.family),
            name(this.family)
        ),
        addressed: mine.addressed,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::HealthConfig;
    use crate::health::tracker::Round;

    fn tracker(rounds: &[Round]) -> Tracker {
        let mut t = Tracker::new(&HealthConfig { fail_after: 1, recover_after: 1, ..HealthConfig::default() });
        for r in rounds {
            t.record(r.clone());
        }
        t
    }

    fn judge(v4: (&Tracker, bool), v6: (&Tracker, bool)) -> (FamilyHealth, FamilyHealth) {
        let a = Judged { family: Family::Ipv4, tracker: v4.0, has_targets: v4.1 };
        let b = Judged { family: Family::Ipv6, tracker: v6.0, has_targets: v6.1 };
        (verdict(&a, &b), verdict(&b, &a))
    }

    #[test]
    fn each_family_with_targets_is_judged_by_its_own_probes() {
        let silent = tracker(&[Round::Silent("no answer from the targets".into())]);
        let answering = tracker(&[Round::Answered]);
        let (v4, v6) = judge((&answering, true), (&silent, true));
        assert!(v4.healthy && !v6.healthy);
        assert_eq!(v6.reason, "no answer from the targets for 1 rounds");
    }

    #[test]
    fn an_ipv6_only_uplink_is_healthy_for_ipv6_and_unhealthy_for_ipv4_which_it_does_not_carry() {
        let absent = tracker(&[Round::NoAddress("no IPv4 address".into())]);
        let answering = tracker(&[Round::Answered]);
        // With IPv4 targets only, IPv6 cannot borrow from a family the uplink is not probed in.
        for v6_targets in [true, false] {
            let (v4, v6) = judge((&absent, true), (&answering, v6_targets));
            assert!(!v4.healthy && !v4.addressed, "{v4:?}");
            assert!(v6.healthy && v6.addressed, "{v6:?}");
        }
    }

    #[test]
    fn a_family_without_targets_follows_the_other_as_before_ipv6_was_probed() {
        let silent = tracker(&[Round::Silent("no answer from the targets".into())]);
        let link_only = tracker(&[Round::Answered]);
        let (v4, v6) = judge((&silent, true), (&link_only, false));
        assert!(!v4.healthy);
        assert!(!v6.healthy, "IPv6 moves with IPv4's verdict");
        assert_eq!(v6.reason, "no answer from the targets for 1 rounds (by its IPv4 probes: no IPv6 targets)");
        // ... but its own fault stands on its own.
        let absent = tracker(&[Round::NoAddress("no stable global IPv6 address".into())]);
        let (_, v6) = judge((&link_only, true), (&absent, false));
        assert_eq!((v6.healthy, v6.reason.as_str()), (false, "no stable global IPv6 address"));
        // Neither has targets: link state alone.
        let (v4, v6) = judge((&link_only, false), (&link_only, false));
        assert!(v4.healthy && v6.healthy);
    }
}

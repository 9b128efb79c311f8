//! The proxies a restarted control plane waits for.
//!
//! After a control plane restarts, its proxies reconnect on their own
//! schedules: Envoy's load-report stream may be back seconds before its
//! ADS stream. Meanwhile an acknowledgement count sees only the proxies
//! already back, and one still holding older weights goes unseen. So the
//! control plane records the node ids of its connected proxies as they
//! change, and after a restart a step is acknowledged only once each of
//! them is connected again, or once a grace period has passed, whichever
//! comes first.
//!
//! [`Returning`] is the bookkeeping alone (no I/O, no clock of its own);
//! the engine feeds it what is connected and persists what it asks to.

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

/// Proxies awaited after a restart, and what to persist.
#[derive(Debug)]
pub struct Returning {
    /// Connected before the restart and not back yet.
    awaited: BTreeSet<String>,
    /// When the wait for them ends regardless.
    until: Instant,
    /// What the store holds.
    saved: BTreeSet<String>,
}

/// What one observation changed.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Observed {
    /// The set to persist, when it differs from the stored one.
    pub save: Option<BTreeSet<String>>,
    /// Every awaited proxy is back (this observation ended the wait).
    pub all_back: bool,
    /// The grace period ended with these proxies still away.
    pub gave_up_on: Vec<String>,
}

impl Returning {
    /// `saved`: the proxies recorded before this start; they are awaited
    /// until `started + grace`.
    pub fn new(saved: BTreeSet<String>, started: Instant, grace: Duration) -> Self {
        Self {
            awaited: saved.clone(),
            until: started + grace,
            saved,
        }
    }

    /// Proxies connected before the restart that are not back yet.
    pub fn awaited(&self) -> usize {
        self.awaited.len()
    }

    /// Takes the proxies connected now.
    pub fn observe(&mut self, connected: &BTreeSet<String>, now: Instant) -> Observed {
        let mut observed = Observed::default();
        if !self.awaited.is_empty() {
            self.awaited.retain(|node| !connected.contains(node));
            if self.awaited.is_empty() {
                observed.all_back = true;
            } else if now >= self.until {
                observed.gave_up_on = std::mem::take(&mut self.awaited).into_iter().collect();
            }
        }
        // Those still awaited stay recorded, so a second restart within
        // the wait still waits for them.
        let record: BTreeSet<String> = connected.union(&self.awaited).cloned().collect();
        if record != self.saved {
            self.saved = record.clone();
            observed.save = Some(record);
        }
        observed
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn set(nodes: &[&str]) -> BTreeSet<String> {
        nodes.iter().map(|n| n.to_string()).collect()
    }

    #[test]
    fn a_restart_waits_for_every_proxy_connected_before_it() {
        let t0 = Instant::now();
        let mut r = Returning::new(set(&["a", "b"]), t0, Duration::from_secs(30));
        assert_eq!(r.awaited(), 2);
        // `a` is back: `b` is still awaited and stays recorded.
        let o = r.observe(&set(&["a"]), t0 + Duration::from_secs(1));
        assert_eq!(r.awaited(), 1);
        assert_eq!(o.save, None, "a and b are what the store holds already");
        assert!(!o.all_back);
        let o = r.observe(&set(&["a", "b", "c"]), t0 + Duration::from_secs(2));
        assert!(o.all_back);
        assert_eq!(r.awaited(), 0);
        assert_eq!(o.save, Some(set(&["a", "b", "c"])));
        // From now on the record follows what is connected.
        let o = r.observe(&set(&["c"]), t0 + Duration::from_secs(3));
        assert_eq!(o.save, Some(set(&["c"])));
        assert_eq!(
            r.observe(&set(&["c"]), t0 + Duration::from_secs(4)),
            Observed::default()
        );
    }

    #[test]
    fn the_wait_ends_after_the_grace_period() {
        let t0 = Instant::now();
        let mut r = Returning::new(set(&["a", "gone"]), t0, Duration::from_secs(30));
        r.observe(&set(&["a"]), t0 + Duration::from_secs(29));
        assert_eq!(r.awaited(), 1);
        let o = r.observe(&set(&["a"]), t0 + Duration::from_secs(30));
        assert_eq!(o.gave_up_on, vec!["gone".to_string()]);
        assert_eq!(r.awaited(), 0);
        assert_eq!(o.save, Some(set(&["a"])));
    }

    #[test]
    fn a_first_start_awaits_nobody() {
        let t0 = Instant::now();
        let mut r = Returning::new(BTreeSet::new(), t0, Duration::from_secs(30));
        assert_eq!(r.awaited(), 0);
        let o = r.observe(&set(&["a"]), t0);
        assert_eq!(o.save, Some(set(&["a"])));
        assert!(!o.all_back);
    }
}

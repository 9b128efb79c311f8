//! What the other control planes of an HA deployment observe.
//!
//! Proxies connect to any control plane, so the leader alone sees neither
//! every proxy's acknowledgements nor every load report. Each control plane
//! publishes an [`Observation`] through the shared store about once a
//! second; the leader's gates and acknowledgement waits add its peers'
//! (fresh) observations to its own.

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use ferry_xds::lrs::{Load, LoadReports};
use ferry_xds::status::ClientRegistry;
use ferry_xds::{ResourceType, Snapshot};
use serde::{Deserialize, Serialize};

use crate::policy::now_ms;

/// One control plane's view, as shared with its peers.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Observation {
    pub node: String,
    /// The policy version its served snapshot was translated with.
    pub served_policy: u64,
    /// Its connected proxies that take routes, and how many of them hold
    /// the routes it serves now.
    pub current_clients: usize,
    pub total_clients: usize,
    /// Load its proxies reported since it started: (service, cluster,
    /// requests, errors).
    pub loads: Vec<(String, String, u64, u64)>,
}

/// This control plane's clients holding routes of policy `policy_version`
/// or later, out of all its clients that take routes.
pub fn local_acks(
    snapshot: &Snapshot,
    clients: &ClientRegistry,
    policy_version: u64,
) -> (usize, usize) {
    let route = ResourceType::Route;
    let (current, total) = clients.ack_share(route.short(), |client| {
        snapshot.last_changed_for(client, route)
    });
    if snapshot.policy_version >= policy_version {
        (current, total)
    } else {
        (0, total)
    }
}

/// This control plane's observation now.
pub fn observe(
    node: &str,
    snapshot: &Snapshot,
    clients: &ClientRegistry,
    loads: &LoadReports,
) -> Observation {
    let (current_clients, total_clients) = local_acks(snapshot, clients, 0);
    Observation {
        node: node.to_owned(),
        served_policy: snapshot.policy_version,
        current_clients,
        total_clients,
        loads: loads
            .totals()
            .into_iter()
            .map(|((s, c), l)| (s, c, l.requests, l.errors))
            .collect(),
    }
}

#[derive(Debug)]
struct Peer {
    seen: Instant,
    observation: Observation,
}

/// The peers' latest observations.
#[derive(Debug)]
pub struct Fleet {
    peers: Mutex<BTreeMap<String, Peer>>,
    /// A peer not heard from for this long is gone (its proxies have
    /// reconnected elsewhere, or will).
    fresh_for: Duration,
}

impl Default for Fleet {
    fn default() -> Self {
        Self::new(Duration::from_secs(3))
    }
}

impl Fleet {
    pub fn new(fresh_for: Duration) -> Self {
        Self {
            peers: Mutex::new(BTreeMap::new()),
            fresh_for,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, Peer>> {
        self.peers.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Takes a peer's observation; the load its proxies reported since its
    /// previous one goes into `loads` (a restarted peer starts from zero).
    pub fn update(&self, observation: Observation, loads: &LoadReports) {
        let mut peers = self.lock();
        let previous: BTreeMap<(&str, &str), (u64, u64)> = peers
            .get(&observation.node)
            .map(|p| {
                p.observation
                    .loads
                    .iter()
                    .map(|(s, c, r, e)| ((s.as_str(), c.as_str()), (*r, *e)))
                    .collect()
            })
            .unwrap_or_default();
        let now = now_ms();
        for (service, cluster, requests, errors) in &observation.loads {
            let (r0, e0) = previous
                .get(&(service.as_str(), cluster.as_str()))
                .copied()
                .unwrap_or((0, 0));
            let delta = if *requests >= r0 && *errors >= e0 {
                Load {
                    requests: requests - r0,
                    errors: errors - e0,
                }
            } else {
                Load {
                    requests: *requests,
                    errors: *errors,
                }
            };
            loads.record_remote(service, cluster, delta, now);
        }
        peers.insert(
            observation.node.clone(),
            Peer {
                seen: Instant::now(),
                observation,
            },
        );
    }

    /// Proxies of fresh peers holding routes of `policy_version` or later,
    /// out of all their proxies.
    pub fn acks(&self, policy_version: u64) -> (usize, usize) {
        let peers = self.lock();
        let (mut acked, mut total) = (0, 0);
        for peer in peers
            .values()
            .filter(|p| p.seen.elapsed() <= self.fresh_for)
        {
            let o = &peer.observation;
            total += o.total_clients;
            if o.served_policy >= policy_version {
                acked += o.current_clients;
            }
        }
        (acked, total)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn obs(node: &str, served: u64, current: usize, total: usize, requests: u64) -> Observation {
        Observation {
            node: node.into(),
            served_policy: served,
            current_clients: current,
            total_clients: total,
            loads: vec![("web.shop".into(), "new".into(), requests, requests / 10)],
        }
    }

    #[test]
    fn peers_add_their_acks_and_their_load_deltas() {
        let fleet = Fleet::new(Duration::from_secs(60));
        let loads = LoadReports::default();
        fleet.update(obs("b", 7, 2, 3, 100), &loads);
        fleet.update(obs("c", 5, 4, 4, 50), &loads);
        // c serves an older policy: its proxies do not count for version 7.
        assert_eq!(fleet.acks(7), (2, 7));
        assert_eq!(fleet.acks(5), (6, 7));
        // Cumulative counters become deltas; a restart starts over.
        fleet.update(obs("b", 7, 3, 3, 130), &loads);
        fleet.update(obs("c", 7, 4, 4, 20), &loads);
        let total = loads.since("web.shop", "new", 0);
        assert_eq!(total.requests, 100 + 50 + 30 + 20);
        assert_eq!(fleet.acks(7), (7, 7));
    }

    #[test]
    fn silent_peers_stop_counting() {
        let fleet = Fleet::new(Duration::from_millis(0));
        fleet.update(obs("b", 7, 2, 3, 0), &LoadReports::default());
        std::thread::sleep(Duration::from_millis(5));
        assert_eq!(fleet.acks(7), (0, 0));
    }
}

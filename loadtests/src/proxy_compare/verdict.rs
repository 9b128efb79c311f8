//! Ferry's proxy held to its targets (issue 16, part 2): against nginx
//! and HAProxy for speed and tail latency, against the backend reached
//! directly for overhead, against Envoy for memory.

use serde::Serialize;

use super::peers::PeerKind;
use super::report::PeerResult;
use super::saturation::Protocol;

/// The targets.
pub mod targets {
    /// Requests per second, as a share of the backend reached directly.
    pub const OF_DIRECT: f64 = 0.7;
    /// Resident memory under load, as a share of Envoy's (configured by
    /// Ferry).
    pub const RSS_VS_ENVOY: f64 = 1.0 / 3.0;
}

/// The peers Ferry's requests per second are held against.
pub const RATE_PEERS: [PeerKind; 2] = [PeerKind::Nginx, PeerKind::Haproxy];

/// Ferry's proxy against the other peers; 0 where a peer did not run.
#[derive(Debug, Clone, Serialize)]
pub struct Comparison {
    /// The fixed rate every peer got.
    pub fixed_rate_rps: f64,
    /// The proxy whose HTTP/1.1 maximum set it (the slowest).
    pub fixed_rate_set_by: Option<PeerKind>,
    /// Ferry's requests/s over the best of nginx's and HAProxy's.
    pub h1_vs_best_peer: f64,
    pub h2_vs_best_peer: f64,
    pub h1_of_direct: f64,
    pub h2_of_direct: f64,
    /// HTTP/1.1 saturation p99 (`wrk`): Ferry's and the best other proxy's.
    pub p99_saturation_ms: f64,
    pub best_p99_saturation_ms: f64,
    /// p99 at the fixed rate: Ferry's and the best other proxy's.
    pub p99_fixed_rate_ms: f64,
    pub best_p99_fixed_rate_ms: f64,
    /// Ferry's RSS under load over Envoy's.
    pub rss_load_vs_envoy: f64,
}

/// Which targets Ferry's proxy met.
#[derive(Debug, Clone, Serialize)]
pub struct Verdict {
    /// Both protocols at least nginx's and HAProxy's requests/s.
    pub rps_vs_nginx_haproxy: bool,
    /// Both protocols at least [`targets::OF_DIRECT`] of direct.
    pub of_direct: bool,
    /// p99 at saturation no higher than any other proxy's.
    pub p99_saturation: bool,
    /// p99 at the fixed rate no higher than any other proxy's.
    pub p99_fixed_rate: bool,
    /// Under load at most [`targets::RSS_VS_ENVOY`] of Envoy's.
    pub rss_vs_envoy: bool,
}

pub fn ratio(a: f64, b: f64) -> f64 {
    if b > 0.0 { a / b } else { 0.0 }
}

/// The fixed rate: `share` of the slowest proxy's HTTP/1.1 maximum, so
/// every peer can hold it; the peer that set it.
pub fn fixed_rate(peers: &[(PeerKind, f64)], share: f64) -> Option<(f64, PeerKind)> {
    peers
        .iter()
        .filter(|(kind, rps)| kind.is_proxy() && *rps > 0.0)
        .min_by(|a, b| a.1.total_cmp(&b.1))
        .map(|(kind, rps)| ((rps * share).max(1.0), *kind))
}

pub fn compare(peers: &[PeerResult], rate: f64, set_by: Option<PeerKind>) -> Comparison {
    let by = |kind: PeerKind| peers.iter().find(|p| p.peer == kind);
    let rps = |kind: PeerKind, protocol: Protocol| {
        by(kind).map_or(0.0, |p| match protocol {
            Protocol::Http1 => p.h1.measured.rps,
            Protocol::Http2 => p.h2.measured.rps,
        })
    };
    let best_rps = |protocol| {
        RATE_PEERS
            .iter()
            .map(|k| rps(*k, protocol))
            .fold(0.0, f64::max)
    };
    let others = || {
        peers
            .iter()
            .filter(|p| p.peer.is_proxy() && p.peer != PeerKind::Ferry)
    };
    let lowest = |values: Vec<f64>| {
        values
            .into_iter()
            .filter(|v| *v > 0.0)
            .min_by(f64::total_cmp)
            .unwrap_or(0.0)
    };
    let ferry = by(PeerKind::Ferry);
    let rss_load = |kind| by(kind).and_then(|p| p.rss_load_bytes).unwrap_or(0) as f64;
    let (h1, h2) = (Protocol::Http1, Protocol::Http2);
    Comparison {
        fixed_rate_rps: rate,
        fixed_rate_set_by: set_by,
        h1_vs_best_peer: ratio(rps(PeerKind::Ferry, h1), best_rps(h1)),
        h2_vs_best_peer: ratio(rps(PeerKind::Ferry, h2), best_rps(h2)),
        h1_of_direct: ratio(rps(PeerKind::Ferry, h1), rps(PeerKind::Direct, h1)),
        h2_of_direct: ratio(rps(PeerKind::Ferry, h2), rps(PeerKind::Direct, h2)),
        p99_saturation_ms: ferry.and_then(PeerResult::saturation_p99_ms).unwrap_or(0.0),
        best_p99_saturation_ms: lowest(
            others().filter_map(PeerResult::saturation_p99_ms).collect(),
        ),
        p99_fixed_rate_ms: ferry.map_or(0.0, |p| p.fixed_rate.run.latency.p99_ms),
        best_p99_fixed_rate_ms: lowest(others().map(|p| p.fixed_rate.run.latency.p99_ms).collect()),
        rss_load_vs_envoy: ratio(rss_load(PeerKind::Ferry), rss_load(PeerKind::Envoy)),
    }
}

pub fn verdict(c: &Comparison) -> Verdict {
    let no_worse = |ferry: f64, best: f64| ferry > 0.0 && best > 0.0 && ferry <= best;
    Verdict {
        rps_vs_nginx_haproxy: c.h1_vs_best_peer >= 1.0 && c.h2_vs_best_peer >= 1.0,
        of_direct: c.h1_of_direct >= targets::OF_DIRECT && c.h2_of_direct >= targets::OF_DIRECT,
        p99_saturation: no_worse(c.p99_saturation_ms, c.best_p99_saturation_ms),
        p99_fixed_rate: no_worse(c.p99_fixed_rate_ms, c.best_p99_fixed_rate_ms),
        rss_vs_envoy: c.rss_load_vs_envoy > 0.0 && c.rss_load_vs_envoy <= targets::RSS_VS_ENVOY,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn verdicts_follow_the_targets() {
        let c = Comparison {
            fixed_rate_rps: 1000.0,
            fixed_rate_set_by: Some(PeerKind::Envoy),
            h1_vs_best_peer: 1.1,
            h2_vs_best_peer: 0.9,
            h1_of_direct: 0.8,
            h2_of_direct: 0.75,
            p99_saturation_ms: 1.0,
            best_p99_saturation_ms: 1.2,
            p99_fixed_rate_ms: 0.9,
            best_p99_fixed_rate_ms: 0.8,
            rss_load_vs_envoy: 0.3,
        };
        let v = verdict(&c);
        assert!(!v.rps_vs_nginx_haproxy && v.of_direct && v.p99_saturation);
        assert!(!v.p99_fixed_rate && v.rss_vs_envoy);
    }

    #[test]
    fn the_slowest_proxy_sets_the_fixed_rate() {
        let peers = [
            (PeerKind::Direct, 100.0),
            (PeerKind::Ferry, 60.0),
            (PeerKind::Envoy, 20.0),
            (PeerKind::Nginx, 0.0),
        ];
        assert_eq!(fixed_rate(&peers, 0.5), Some((10.0, PeerKind::Envoy)));
        assert_eq!(fixed_rate(&peers[..1], 0.5), None);
    }
}

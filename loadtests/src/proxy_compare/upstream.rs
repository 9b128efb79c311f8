//! How many connections each peer opened to the backend, so that a peer
//! that does not hold its upstream keep-alive connections shows as one.
//!
//! Two counts per peer and phase: the backend's own (connections it
//! accepted while that peer, alone, was running: the same measure for
//! every peer) and the peer's own report where it has one (Envoy's
//! `cluster.<name>.upstream_cx_total`, HAProxy's `connect` column of
//! `show stat`, `ferry proxy`'s `ferry_proxy_upstream_http1_connects_total`
//! and `…_http2_connects_total`). nginx reports no upstream connection
//! count: for it, the backend's count is the one.

use serde::Serialize;

/// A counter that could not be read from a peer's or the backend's text.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CountError {
    #[error("{what}: no line holds {key:?}")]
    Missing { what: &'static str, key: String },
    #[error("{what}: {value:?} is not a count")]
    NotACount { what: &'static str, value: String },
}

/// Connections opened to the backend during one phase of one peer.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct Opened {
    /// Accepted by the backend while the peer was running (its routing
    /// checks included).
    pub backend_accepted: Option<u64>,
    /// What the peer says it opened, over its whole life.
    pub peer_reported: Option<u64>,
}

fn count(what: &'static str, value: &str) -> Result<u64, CountError> {
    value.trim().parse().map_err(|_| CountError::NotACount {
        what,
        value: value.to_owned(),
    })
}

/// The sum of `cluster.<name>.upstream_cx_total` in Envoy's `/stats` text
/// over every cluster but `skip` (its xDS and load-report clusters).
pub fn envoy_upstream_cx_total(stats: &str, skip: &[&str]) -> Result<u64, CountError> {
    const WHAT: &str = "Envoy /stats";
    let mut total = None;
    for line in stats.lines() {
        let Some((name, value)) = line.split_once(": ") else {
            continue;
        };
        let Some(cluster) = name
            .strip_prefix("cluster.")
            .and_then(|n| n.strip_suffix(".upstream_cx_total"))
        else {
            continue;
        };
        if skip.contains(&cluster) {
            continue;
        }
        *total.get_or_insert(0) += count(WHAT, value)?;
    }
    total.ok_or_else(|| CountError::Missing {
        what: WHAT,
        key: "cluster.*.upstream_cx_total".to_owned(),
    })
}

/// The `connect` column (connection attempts) summed over the servers of
/// `backend` in HAProxy's stats CSV (`show stat`, `/stats;csv`).
pub fn haproxy_connects(csv: &str, backend: &str) -> Result<u64, CountError> {
    const WHAT: &str = "HAProxy stats CSV";
    let mut lines = csv.lines();
    let header = lines
        .next()
        .and_then(|h| h.strip_prefix("# "))
        .ok_or_else(|| CountError::Missing {
            what: WHAT,
            key: "# pxname,svname,…".to_owned(),
        })?;
    let column = header
        .split(',')
        .position(|c| c == "connect")
        .ok_or_else(|| CountError::Missing {
            what: WHAT,
            key: "connect".to_owned(),
        })?;
    let mut total = None;
    for line in lines {
        let fields: Vec<&str> = line.split(',').collect();
        let [proxy, server, ..] = fields[..] else {
            continue;
        };
        if proxy != backend || server == "BACKEND" || server == "FRONTEND" {
            continue;
        }
        let value = fields.get(column).copied().unwrap_or("");
        *total.get_or_insert(0) += count(WHAT, value)?;
    }
    total.ok_or_else(|| CountError::Missing {
        what: WHAT,
        key: format!("a server of backend {backend}"),
    })
}

/// The connections `ferry proxy` made to its upstreams, from its
/// Prometheus `/metrics` text: every series of
/// `ferry_proxy_upstream_http1_connects_total` and
/// `ferry_proxy_upstream_http2_connects_total` (every cluster and result)
/// summed.
pub fn ferry_upstream_connects(metrics: &str) -> Result<u64, CountError> {
    const WHAT: &str = "ferry proxy /metrics";
    const NAMES: [&str; 2] = [
        "ferry_proxy_upstream_http1_connects_total",
        "ferry_proxy_upstream_http2_connects_total",
    ];
    let mut total = None;
    for line in metrics.lines() {
        let Some((series, value)) = line.rsplit_once(' ') else {
            continue;
        };
        let name = series.split('{').next().unwrap_or(series);
        if !NAMES.contains(&name) {
            continue;
        }
        // Prometheus counters are floats in the text format.
        let value: f64 = value.trim().parse().map_err(|_| CountError::NotACount {
            what: WHAT,
            value: value.to_owned(),
        })?;
        *total.get_or_insert(0) += value as u64;
    }
    total.ok_or_else(|| CountError::Missing {
        what: WHAT,
        key: NAMES[0].to_owned(),
    })
}

/// The `accepts` figure of nginx's `stub_status` page:
///
/// ```text
/// Active connections: 1
/// server accepts handled requests
///  3 3 3
/// ```
pub fn nginx_accepts(status: &str) -> Result<u64, CountError> {
    const WHAT: &str = "nginx stub_status";
    let mut lines = status.lines();
    lines
        .find(|l| l.trim() == "server accepts handled requests")
        .ok_or_else(|| CountError::Missing {
            what: WHAT,
            key: "server accepts handled requests".to_owned(),
        })?;
    let figures = lines.next().unwrap_or("");
    count(WHAT, figures.split_whitespace().next().unwrap_or(""))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn envoy_counts_every_cluster_but_its_control_plane() {
        let stats = "cluster.echo.bench:8080@local.upstream_cx_total: 64\n\
                     cluster.echo.bench:8080@local.upstream_cx_active: 64\n\
                     cluster.ferry_xds.upstream_cx_total: 1\n\
                     cluster.other.upstream_cx_total: 2\n\
                     http.ingress.downstream_cx_total: 900\n";
        assert_eq!(envoy_upstream_cx_total(stats, &["ferry_xds"]), Ok(66));
        assert!(matches!(
            envoy_upstream_cx_total("cluster.ferry_xds.upstream_cx_total: 1\n", &["ferry_xds"]),
            Err(CountError::Missing { .. })
        ));
        assert!(matches!(
            envoy_upstream_cx_total("cluster.a.upstream_cx_total: many\n", &[]),
            Err(CountError::NotACount { .. })
        ));
    }

    #[test]
    fn haproxy_counts_the_servers_connects() {
        let csv = "# pxname,svname,qcur,connect,reuse,\n\
                   fe,FRONTEND,,,,\n\
                   be,s1,0,12,9000,\n\
                   be,s2,0,3,10,\n\
                   be,BACKEND,0,15,9010,\n";
        assert_eq!(haproxy_connects(csv, "be"), Ok(15));
        assert!(haproxy_connects(csv, "other").is_err());
        assert!(haproxy_connects("be,s1,0,1\n", "be").is_err());
        assert!(haproxy_connects("# pxname,svname,qcur\nbe,s1,0\n", "be").is_err());
    }

    #[test]
    fn ferry_counts_every_upstream_connect() {
        let page = "# TYPE ferry_proxy_upstream_http1_connects_total counter\n\
                    ferry_proxy_upstream_http1_connects_total{service=\"echo.bench\",cluster=\"echo.bench:8080@local\",result=\"ok\"} 64\n\
                    ferry_proxy_upstream_http1_connects_total{service=\"echo.bench\",cluster=\"echo.bench:8080@local\",result=\"error\"} 1\n\
                    ferry_proxy_upstream_http2_connects_total{result=\"ok\"} 2\n\
                    ferry_proxy_upstream_http2_connections 2\n\
                    ferry_proxy_requests_total{class=\"2xx\"} 9000\n";
        assert_eq!(ferry_upstream_connects(page), Ok(67));
        assert!(matches!(
            ferry_upstream_connects("ferry_proxy_requests_total 1\n"),
            Err(CountError::Missing { .. })
        ));
        assert!(matches!(
            ferry_upstream_connects("ferry_proxy_upstream_http1_connects_total{} many\n"),
            Err(CountError::NotACount { .. })
        ));
    }

    #[test]
    fn nginx_accepts_are_read() {
        let page = "Active connections: 1 \nserver accepts handled requests\n 3 3 7 \nReading: 0 Writing: 1 Waiting: 0 \n";
        assert_eq!(nginx_accepts(page), Ok(3));
        assert!(nginx_accepts("Active connections: 1\n").is_err());
    }
}

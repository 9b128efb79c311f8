//! Gates: the target judged against the sources over a step's window.

use super::*;

/// Judges the target against the source over one window.
pub fn judge(
    gates: &Gates,
    source: Load,
    target: Load,
    baseline: Option<Load>,
    latency: Latency,
) -> (GateOutcome, String) {
    let reference = if source.requests >= gates.min_requests {
        Some(source)
    } else {
        baseline.filter(|b| b.requests >= gates.min_requests)
    };
    let Some(reference) = reference.filter(|_| target.requests >= gates.min_requests) else {
        return (
            GateOutcome::NotEnoughData,
            format!(
                "target served {} requests, source {}; each needs {}",
                target.requests, source.requests, gates.min_requests
            ),
        );
    };
    let t = target.error_rate().unwrap_or(0.0);
    let s = reference.error_rate().unwrap_or(0.0);
    let describe = format!(
        "target error rate {:.2} % ({}/{}) vs source {:.2} % ({}/{})",
        t * 100.0,
        target.errors,
        target.requests,
        s * 100.0,
        reference.errors,
        reference.requests
    );
    if t > s + gates.max_error_rate_increase {
        return (
            GateOutcome::Fail,
            format!(
                "{describe}: more than {:.2} points above the source",
                gates.max_error_rate_increase * 100.0
            ),
        );
    }
    if gates.max_error_rate > 0.0 && t > gates.max_error_rate {
        return (
            GateOutcome::Fail,
            format!(
                "{describe}: above the ceiling of {:.2} %",
                gates.max_error_rate * 100.0
            ),
        );
    }
    let Some(gate) = &gates.latency else {
        return (GateOutcome::Pass, describe);
    };
    let Some(target_p99) = latency.target_p99_ms else {
        return (
            GateOutcome::NotEnoughData,
            format!("{describe}; no p99 for the target from Prometheus yet"),
        );
    };
    if gate.max_p99_ms > 0 && target_p99 > gate.max_p99_ms as f64 {
        return (
            GateOutcome::Fail,
            format!(
                "{describe}; target p99 {target_p99:.1} ms is above {} ms",
                gate.max_p99_ms
            ),
        );
    }
    if gate.max_p99_ratio > 0.0 {
        let Some(source_p99) = latency.source_p99_ms.filter(|s| *s > 0.0) else {
            return (
                GateOutcome::NotEnoughData,
                format!("{describe}; no p99 for the source from Prometheus yet"),
            );
        };
        if target_p99 > gate.max_p99_ratio * source_p99 {
            return (
                GateOutcome::Fail,
                format!(
                    "{describe}; target p99 {target_p99:.1} ms is more than {:.2} × the source's {source_p99:.1} ms",
                    gate.max_p99_ratio
                ),
            );
        }
        return (
            GateOutcome::Pass,
            format!("{describe}; p99 {target_p99:.1} ms vs {source_p99:.1} ms"),
        );
    }
    (
        GateOutcome::Pass,
        format!("{describe}; target p99 {target_p99:.1} ms"),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn gates(ratio: f64, max_ms: u64) -> Gates {
        Gates {
            min_requests: 10,
            latency: Some(LatencyGate {
                prometheus_url: "http://127.0.0.1:9090".into(),
                p99_query: DEFAULT_P99_QUERY.into(),
                max_p99_ratio: ratio,
                max_p99_ms: max_ms,
            }),
            ..Gates::default()
        }
    }

    #[test]
    fn latency_gates_need_readings_and_judge_them() {
        let load = Load {
            requests: 100,
            errors: 0,
        };
        let read = |s: Option<f64>, t: Option<f64>| Latency {
            source_p99_ms: s,
            target_p99_ms: t,
        };
        let judge_with = |g: &Gates, l| judge(g, load, load, None, l).0;
        assert_eq!(
            judge_with(&gates(2.0, 0), read(Some(10.0), None)),
            GateOutcome::NotEnoughData
        );
        assert_eq!(
            judge_with(&gates(2.0, 0), read(None, Some(10.0))),
            GateOutcome::NotEnoughData
        );
        assert_eq!(
            judge_with(&gates(2.0, 0), read(Some(10.0), Some(19.0))),
            GateOutcome::Pass
        );
        assert_eq!(
            judge_with(&gates(2.0, 0), read(Some(10.0), Some(25.0))),
            GateOutcome::Fail
        );
        assert_eq!(
            judge_with(&gates(0.0, 50), read(None, Some(49.0))),
            GateOutcome::Pass
        );
        let (outcome, detail) = judge(&gates(0.0, 50), load, load, None, read(None, Some(80.0)));
        assert_eq!(outcome, GateOutcome::Fail);
        assert!(detail.contains("p99 80.0 ms is above 50 ms"), "{detail}");
    }
}

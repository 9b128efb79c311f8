//! What the testkube integration tests share.
#![allow(dead_code)]

use std::time::Duration;

/// Polls `check` every 20 ms until it yields, panicking after `secs`.
pub async fn eventually<T, F: std::future::Future<Output = Option<T>>>(
    what: &str,
    secs: u64,
    mut check: impl FnMut() -> F,
) -> T {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(secs);
    loop {
        if let Some(v) = check().await {
            return v;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for: {what}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The `Status` of an API error, asserting its code and reason.
pub fn api_error(err: kube::Error, code: u16, reason: &str) -> Box<kube::core::Status> {
    match err {
        kube::Error::Api(status) => {
            assert_eq!(
                (status.code, status.reason.as_str()),
                (code, reason),
                "{status:?}"
            );
            status
        }
        other => panic!("expected a {code} {reason} Status, got {other:?}"),
    }
}

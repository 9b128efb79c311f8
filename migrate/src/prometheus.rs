//! Latency readings for the gates from a Prometheus server's HTTP query
//! API (`/api/v1/query`, instant queries).

use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;

/// A Prometheus query client.
#[derive(Debug, Clone)]
pub struct Prometheus {
    client: Client<HttpConnector, Full<Bytes>>,
    timeout: Duration,
}

impl Default for Prometheus {
    fn default() -> Self {
        Self {
            client: Client::builder(TokioExecutor::new()).build_http(),
            timeout: Duration::from_secs(2),
        }
    }
}

/// Fills a query template's `{name}`, `{namespace}`, `{cluster}` and
/// `{window}` (seconds, at least 5 so a rate has samples).
pub fn render(
    template: &str,
    name: &str,
    namespace: &str,
    cluster: &str,
    window: Duration,
) -> String {
    template
        .replace("{name}", name)
        .replace("{namespace}", namespace)
        .replace("{cluster}", cluster)
        .replace("{window}", &format!("{}s", window.as_secs().max(5)))
}

impl Prometheus {
    /// The value of an instant query that yields one sample; `None` when
    /// it yields no sample or NaN (no data in the window).
    pub async fn scalar(&self, base_url: &str, promql: &str) -> Result<Option<f64>, String> {
        let body: String = form_urlencoded::Serializer::new(String::new())
            .append_pair("query", promql)
            .finish();
        let url = format!("{}/api/v1/query", base_url.trim_end_matches('/'));
        let request = hyper::Request::post(&url)
            .header("content-type", "application/x-www-form-urlencoded")
            .body(Full::new(Bytes::from(body)))
            .map_err(|e| format!("{url}: {e}"))?;
        let response = tokio::time::timeout(self.timeout, async {
            let response = self
                .client
                .request(request)
                .await
                .map_err(|e| e.to_string())?;
            let status = response.status();
            let bytes = response
                .into_body()
                .collect()
                .await
                .map_err(|e| e.to_string())?
                .to_bytes();
            Ok::<_, String>((status, bytes))
        })
        .await
        .map_err(|_| format!("{url}: no answer within {:?}", self.timeout))?
        .map_err(|e| format!("{url}: {e}"))?;
        let (status, bytes) = response;
        let json: serde_json::Value = serde_json::from_slice(&bytes)
            .map_err(|e| format!("{url}: HTTP {status}, not JSON: {e}"))?;
        if json["status"] != "success" {
            return Err(format!(
                "{url}: {} ({})",
                json["error"].as_str().unwrap_or("query failed"),
                json["errorType"].as_str().unwrap_or("?")
            ));
        }
        parse_vector(&json["data"]).map_err(|e| format!("{url}: {e}"))
    }
}

/// The single value of a `vector` (or `scalar`) result.
fn parse_vector(data: &serde_json::Value) -> Result<Option<f64>, String> {
    let value = match data["resultType"].as_str() {
        Some("vector") => match data["result"].as_array().map(|r| r.as_slice()) {
            Some([]) | None => return Ok(None),
            Some([one]) => &one["value"],
            Some(many) => {
                return Err(format!(
                    "the query gives {} series; it must give one (aggregate with sum/max)",
                    many.len()
                ));
            }
        },
        Some("scalar") => &data["result"],
        other => return Err(format!("unexpected result type {other:?}")),
    };
    let text = value[1]
        .as_str()
        .ok_or_else(|| format!("unexpected sample {value}"))?;
    let v: f64 = text.parse().map_err(|e| format!("sample {text:?}: {e}"))?;
    Ok(v.is_finite().then_some(v))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn results_parse_to_one_value_or_none() {
        let v = |text: &str| parse_vector(&serde_json::from_str(text).unwrap());
        assert_eq!(
            v(r#"{"resultType":"vector","result":[{"metric":{},"value":[1.5,"12.5"]}]}"#),
            Ok(Some(12.5))
        );
        assert_eq!(
            v(r#"{"resultType":"vector","result":[{"metric":{},"value":[1.5,"NaN"]}]}"#),
            Ok(None)
        );
        assert_eq!(v(r#"{"resultType":"vector","result":[]}"#), Ok(None));
        assert_eq!(
            v(r#"{"resultType":"scalar","result":[1.5,"3"]}"#),
            Ok(Some(3.0))
        );
        assert!(
            v(r#"{"resultType":"vector","result":[{"value":[1,"1"]},{"value":[1,"2"]}]}"#).is_err()
        );
        assert_eq!(
            render(
                super::super::migration::DEFAULT_P99_QUERY,
                "web",
                "shop",
                "new",
                Duration::from_secs(30)
            ),
            r#"histogram_quantile(0.99, sum by (le) (rate(envoy_cluster_upstream_rq_time_bucket{envoy_cluster_name=~"web_shop_[0-9]+_new"}[30s])))"#
        );
    }
}

//! Turns the parsed YAML shape into the catalog model, checking every
//! rule a catalog must follow; the first broken rule refuses the file with
//! an error naming the service and the field.

use std::collections::{BTreeMap, HashMap};
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::Duration;

use super::schema::{
    RawClusterSecrets, RawEndpoint, RawEndpointDetail, RawHealthCheck, RawKubernetes,
    RawOutlierDetection, RawPort, RawRetries, RawService, RawSticky,
};
use super::{CatalogError, QUOTE_BYTES};
use crate::kubernetes::{Access, ClusterConfig, ClusterSecrets, KubernetesConfig};
use crate::model::{
    Backend, ClientCert, Endpoint, EndpointState, HealthCheck, OutlierDetection, Protocol,
    RequestPolicy, Retries, RetryOn, Service, ServicePort, StickyKey, UpstreamTls,
};
use crate::names::{ClusterName, ServiceName, check_dns_label};
use crate::untrusted::quote;

/// A name made of letters, digits, `-`, `_` and `.`.
fn token(text: &str) -> bool {
    !text.is_empty()
        && text
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || b == b'.')
}
use crate::weights::Weights;

/// A DNS name as TLS clients take it: dot-separated labels of letters,
/// digits and inner hyphens.
fn dns_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 253
        && name.split('.').all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && !label.starts_with('-')
                && !label.ends_with('-')
                && label
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-')
        })
}

pub(super) struct Validator<'a> {
    path: &'a Path,
    service: String,
}

impl<'a> Validator<'a> {
    pub(super) fn new(path: &'a Path) -> Self {
        Self {
            path,
            service: String::new(),
        }
    }

    fn err(&self, field: impl Into<String>, reason: impl Into<String>) -> CatalogError {
        // Fields and reasons quote the file's own values: bounded and
        // escaped, so a hostile value cannot flood or forge the log.
        CatalogError::Invalid {
            path: self.path.to_owned(),
            service: self.service.clone(),
            field: quote(&field.into(), QUOTE_BYTES),
            reason: quote(&reason.into(), QUOTE_BYTES),
        }
    }

    pub(super) fn kubernetes(
        &mut self,
        raw: RawKubernetes,
    ) -> Result<KubernetesConfig, CatalogError> {
        self.service = "-".to_owned();
        for (i, ns) in raw.namespaces.iter().enumerate() {
            check_dns_label(ns)
                .map_err(|e| self.err(format!("kubernetes.namespaces[{i}]"), e.to_string()))?;
        }
        let mut clusters: Vec<ClusterConfig> = Vec::new();
        let mut deploy = BTreeMap::new();
        for (i, c) in raw.clusters.into_iter().enumerate() {
            let field = format!("kubernetes.clusters[{i}]");
            let name = ClusterName::new(&c.name)
                .map_err(|e| self.err(format!("{field}.name"), e.to_string()))?;
            if clusters.iter().any(|k| k.name == name) {
                return Err(self.err(
                    format!("{field}.name"),
                    format!("cluster {name} is listed twice"),
                ));
            }
            let access = self.access(&field, c.kubeconfig, c.context, c.in_cluster)?;
            match (c.deploy_kubeconfig, c.deploy_context) {
                (Some(path), context) => {
                    let access = self.access(
                        &format!("{field}.deploy_kubeconfig"),
                        Some(path),
                        context,
                        false,
                    )?;
                    deploy.insert(name.clone(), access);
                }
                (None, Some(_)) => {
                    return Err(self.err(
                        format!("{field}.deploy_context"),
                        "`deploy_context` goes with `deploy_kubeconfig: PATH`",
                    ));
                }
                (None, None) => {}
            }
            clusters.push(ClusterConfig { name, access });
        }
        let cluster_secrets = match raw.cluster_secrets {
            None | Some(RawClusterSecrets::Enabled(false)) => None,
            Some(RawClusterSecrets::Enabled(true)) => Some(ClusterSecrets {
                namespace: None,
                access: Access::InCluster,
            }),
            Some(RawClusterSecrets::Detailed(d)) => {
                let field = "kubernetes.cluster_secrets";
                if let Some(ns) = &d.namespace {
                    check_dns_label(ns)
                        .map_err(|e| self.err(format!("{field}.namespace"), e.to_string()))?;
                }
                let in_cluster = d.in_cluster || d.kubeconfig.is_none();
                Some(ClusterSecrets {
                    namespace: d.namespace,
                    access: self.access(field, d.kubeconfig, d.context, in_cluster)?,
                })
            }
        };
        Ok(KubernetesConfig {
            namespaces: raw.namespaces,
            clusters,
            cluster_secrets,
            deploy,
        })
    }

    /// `kubeconfig: PATH` (relative to the catalog file) with an optional
    /// `context`, or `in_cluster: true`.
    fn access(
        &self,
        field: &str,
        kubeconfig: Option<PathBuf>,
        context: Option<String>,
        in_cluster: bool,
    ) -> Result<Access, CatalogError> {
        let base = self.path.parent().unwrap_or(Path::new("."));
        match (kubeconfig, in_cluster) {
            (Some(path), false) => Ok(Access::Kubeconfig {
                path: if path.is_absolute() {
                    path
                } else {
                    base.join(path)
                },
                context,
            }),
            (None, true) if context.is_none() => Ok(Access::InCluster),
            (None, true) => Err(self.err(
                format!("{field}.context"),
                "`context` goes with `kubeconfig: PATH`",
            )),
            _ => Err(self.err(
                field,
                "give exactly one of `kubeconfig: PATH` or `in_cluster: true`",
            )),
        }
    }

    pub(super) fn catalog(&mut self, raw: Vec<RawService>) -> Result<Vec<Service>, CatalogError> {
        let mut services: Vec<Service> = Vec::with_capacity(raw.len());
        let mut seen: HashMap<ServiceName, usize> = HashMap::new();
        let mut host_owner: HashMap<String, ServiceName> = HashMap::new();
        for (index, raw_service) in raw.into_iter().enumerate() {
            self.service = format!(
                "{}.{} (services[{index}])",
                quote(&raw_service.name, QUOTE_BYTES),
                quote(&raw_service.namespace, QUOTE_BYTES)
            );
            let service = self.service_entry(raw_service)?;
            if let Some(first) = seen.insert(service.name.clone(), index) {
                return Err(self.err(
                    "name",
                    format!("duplicate service, first at services[{first}]"),
                ));
            }
            for domain in claimed_domains(&service) {
                if let Some(owner) = host_owner.insert(domain.clone(), service.name.clone()) {
                    return Err(self.err(
                        "hosts",
                        format!("domain {domain:?} is already routed to service {owner}"),
                    ));
                }
            }
            services.push(service);
        }
        Ok(services)
    }

    fn service_entry(&self, raw: RawService) -> Result<Service, CatalogError> {
        let name = ServiceName::new(&raw.name, &raw.namespace).map_err(|e| {
            let field = if check_dns_label(&raw.name).is_err() {
                "name"
            } else {
                "namespace"
            };
            self.err(field, e.to_string())
        })?;
        let ports = self.ports(raw.ports)?;
        let hosts = self.hosts(raw.hosts)?;
        if raw.backends.is_empty() {
            return Err(self.err("backends", "at least one cluster backend is required"));
        }
        let mut backends = BTreeMap::new();
        for (cluster, backend) in raw.backends {
            let cluster_name = ClusterName::new(&cluster)
                .map_err(|e| self.err(format!("backends.{cluster}"), e.to_string()))?;
            let endpoints = backend
                .endpoints
                .into_iter()
                .enumerate()
                .map(|(i, e)| self.endpoint(&cluster, i, e, &ports))
                .collect::<Result<Vec<_>, _>>()?;
            backends.insert(cluster_name, Backend::from(endpoints));
        }
        let weights = raw
            .weights
            .map(|w| self.weights(w, &backends))
            .transpose()?;
        let sticky = match raw.sticky {
            None => None,
            Some(RawSticky {
                header: Some(header),
                cookie: None,
            }) => {
                let name = header.trim().to_ascii_lowercase();
                if !token(&name) || name.contains('.') {
                    return Err(self.err(
                        "sticky.header",
                        format!("{header:?} is not an HTTP header name"),
                    ));
                }
                Some(StickyKey::Header(name))
            }
            Some(RawSticky {
                header: None,
                cookie: Some(cookie),
            }) => {
                let name = cookie.trim();
                if !token(name) {
                    return Err(
                        self.err("sticky.cookie", format!("{cookie:?} is not a cookie name"))
                    );
                }
                Some(StickyKey::Cookie(name.to_owned()))
            }
            Some(_) => {
                return Err(self.err("sticky", "give exactly one of header or cookie"));
            }
        };
        let mut requests = self.requests(
            raw.protocol,
            raw.timeout,
            raw.retries,
            raw.outlier_detection,
        )?;
        requests.health_check = raw.health_check.map(|h| self.health_check(h)).transpose()?;
        requests.upgrades = raw.upgrades.map(|u| self.upgrades(u)).transpose()?;
        requests.tls = match raw.tls {
            None => None,
            Some(t) => {
                let name = t.server_name.trim().to_ascii_lowercase();
                if !dns_name(&name) {
                    return Err(self.err(
                        "tls.server_name",
                        format!("{:?} is not a DNS name", t.server_name),
                    ));
                }
                let files = [
                    ("tls.ca_file", Some(&t.ca_file)),
                    ("tls.cert_file", t.cert_file.as_ref()),
                    ("tls.key_file", t.key_file.as_ref()),
                ];
                for (field, file) in files {
                    if let Some(file) = file
                        && !file.is_absolute()
                    {
                        return Err(self.err(
                            field,
                            format!(
                                "{} must be an absolute path (it is read on the proxies' hosts)",
                                file.display()
                            ),
                        ));
                    }
                }
                let client_cert = match (t.cert_file, t.key_file) {
                    (Some(cert_file), Some(key_file)) => Some(ClientCert {
                        cert_file,
                        key_file,
                    }),
                    (None, None) => None,
                    (Some(_), None) => {
                        return Err(self.err("tls.key_file", "cert_file needs its key_file"));
                    }
                    (None, Some(_)) => {
                        return Err(self.err("tls.cert_file", "key_file needs its cert_file"));
                    }
                };
                Some(UpstreamTls {
                    server_name: name,
                    ca_file: t.ca_file,
                    client_cert,
                })
            }
        };
        Ok(Service {
            name,
            ports,
            hosts,
            backends,
            weights,
            sticky,
            requests,
        })
    }

    fn duration(&self, field: &str, text: &str) -> Result<Duration, CatalogError> {
        let d = humantime::parse_duration(text)
            .map_err(|e| self.err(field, format!("{text:?} is not a duration: {e}")))?;
        if d.is_zero() {
            return Err(self.err(field, "must be longer than 0"));
        }
        Ok(d)
    }

    fn health_check(&self, raw: RawHealthCheck) -> Result<HealthCheck, CatalogError> {
        if !raw.path.starts_with('/') || raw.path.contains(char::is_whitespace) {
            return Err(self.err(
                "health_check.path",
                format!("{:?} is not an absolute request path", raw.path),
            ));
        }
        let interval = match raw.interval {
            Some(t) => self.duration("health_check.interval", &t)?,
            None => Duration::from_secs(5),
        };
        let timeout = match raw.timeout {
            Some(t) => self.duration("health_check.timeout", &t)?,
            None => Duration::from_secs(1),
        };
        if timeout > interval {
            return Err(self.err(
                "health_check.timeout",
                "must not be longer than the interval",
            ));
        }
        let threshold = |field: &str, v: Option<u32>, default: u32| match v {
            Some(0) => Err(self.err(field, "must be at least 1")),
            Some(v) => Ok(v),
            None => Ok(default),
        };
        Ok(HealthCheck {
            path: raw.path,
            interval,
            timeout,
            unhealthy_threshold: threshold(
                "health_check.unhealthy_threshold",
                raw.unhealthy_threshold,
                3,
            )?,
            healthy_threshold: threshold(
                "health_check.healthy_threshold",
                raw.healthy_threshold,
                2,
            )?,
        })
    }

    fn requests(
        &self,
        protocol: Option<String>,
        timeout: Option<String>,
        retries: Option<RawRetries>,
        outlier: Option<RawOutlierDetection>,
    ) -> Result<RequestPolicy, CatalogError> {
        let protocol = match protocol.as_deref() {
            None | Some("http1") => Protocol::Http1,
            Some("http2") | Some("grpc") => Protocol::Http2,
            Some(other) => {
                return Err(self.err(
                    "protocol",
                    format!("{other:?} is not one of http1, http2, grpc"),
                ));
            }
        };
        let timeout = timeout.map(|t| self.duration("timeout", &t)).transpose()?;
        let retries = match retries {
            None => None,
            Some(r) => {
                if r.attempts > 10 {
                    return Err(self.err("retries.attempts", "at most 10 retries"));
                }
                let mut on = Vec::with_capacity(r.on.len());
                for (i, name) in r.on.iter().enumerate() {
                    let Some(condition) = RetryOn::parse(name) else {
                        return Err(self.err(
                            format!("retries.on[{i}]"),
                            format!(
                                "{name:?} is not one of connect-failure, reset, 5xx, gateway-error"
                            ),
                        ));
                    };
                    if !on.contains(&condition) {
                        on.push(condition);
                    }
                }
                on.sort_unstable();
                let per_try_timeout = r
                    .per_try_timeout
                    .map(|t| self.duration("retries.per_try_timeout", &t))
                    .transpose()?;
                Some(Retries {
                    attempts: r.attempts,
                    on,
                    per_try_timeout,
                })
            }
        };
        let outlier_detection = match outlier {
            None => None,
            Some(o) => {
                let defaults = OutlierDetection::default();
                let consecutive_5xx = o.consecutive_5xx.unwrap_or(defaults.consecutive_5xx);
                if consecutive_5xx == 0 {
                    return Err(self.err("outlier_detection.consecutive_5xx", "must be at least 1"));
                }
                let max_ejection_percent = o
                    .max_ejection_percent
                    .unwrap_or(defaults.max_ejection_percent);
                if max_ejection_percent > 100 {
                    return Err(self.err(
                        "outlier_detection.max_ejection_percent",
                        "must be between 0 and 100",
                    ));
                }
                let base_ejection_time = o
                    .base_ejection_time
                    .map(|t| self.duration("outlier_detection.base_ejection_time", &t))
                    .transpose()?
                    .unwrap_or(defaults.base_ejection_time);
                Some(OutlierDetection {
                    consecutive_5xx,
                    base_ejection_time,
                    max_ejection_percent,
                })
            }
        };
        Ok(RequestPolicy {
            protocol,
            timeout,
            retries,
            outlier_detection,
            health_check: None,
            tls: None,
            upgrades: None,
        })
    }

    /// Upgrade protocols: tokens, lowercase, never `h2c` (a tunnelled h2c
    /// connection would bypass the proxy's routing).
    fn upgrades(&self, raw: Vec<String>) -> Result<Vec<String>, CatalogError> {
        let mut out: Vec<String> = Vec::with_capacity(raw.len());
        for (i, name) in raw.iter().enumerate() {
            let lower = name.trim().to_ascii_lowercase();
            if !lower.split('/').all(token) {
                return Err(self.err(
                    format!("upgrades[{i}]"),
                    format!("{name:?} is not a protocol name"),
                ));
            }
            if lower == "h2c" {
                return Err(self.err(
                    format!("upgrades[{i}]"),
                    "h2c is never forwarded: proxies speak HTTP/2 to clients themselves",
                ));
            }
            if !out.contains(&lower) {
                out.push(lower);
            }
        }
        Ok(out)
    }

    fn ports(&self, raw: Vec<RawPort>) -> Result<Vec<ServicePort>, CatalogError> {
        if raw.is_empty() {
            return Err(self.err("ports", "at least one port is required"));
        }
        let mut ports: Vec<ServicePort> = Vec::with_capacity(raw.len());
        for (i, p) in raw.into_iter().enumerate() {
            check_dns_label(&p.name)
                .map_err(|e| self.err(format!("ports[{i}].name"), e.to_string()))?;
            if p.port == 0 {
                return Err(self.err(format!("ports[{i}].port"), "port 0 is not a valid port"));
            }
            if ports.iter().any(|q| q.name == p.name || q.port == p.port) {
                return Err(self.err(format!("ports[{i}]"), "duplicate port name or number"));
            }
            ports.push(ServicePort {
                name: p.name,
                port: p.port,
            });
        }
        Ok(ports)
    }

    fn hosts(&self, raw: Vec<String>) -> Result<Vec<String>, CatalogError> {
        for (i, host) in raw.iter().enumerate() {
            if !is_hostname(host) {
                return Err(self.err(
                    format!("hosts[{i}]"),
                    format!("{host:?} is not a lowercase DNS name (an optional leading \"*.\" is allowed)"),
                ));
            }
        }
        Ok(raw)
    }

    fn endpoint(
        &self,
        cluster: &str,
        index: usize,
        raw: RawEndpoint,
        ports: &[ServicePort],
    ) -> Result<Endpoint, CatalogError> {
        let field = format!("backends.{cluster}.endpoints[{index}]");
        let detail = match raw {
            RawEndpoint::Address(address) => RawEndpointDetail {
                address,
                ports: BTreeMap::new(),
                ready: true,
                terminating: false,
                zone: None,
            },
            RawEndpoint::Detailed(d) => d,
        };
        let (ip, address_port) = parse_address(&detail.address).ok_or_else(|| {
            self.err(
                format!("{field}.address"),
                format!("{:?} is not an IP address with an optional port (\"10.0.0.1:8080\", \"[::1]:8080\")", detail.address),
            )
        })?;
        let mut target_ports = BTreeMap::new();
        for port in ports {
            // An explicit port by name; else the address's port for a
            // single-port service; else the service port, as in Kubernetes.
            let target = detail
                .ports
                .get(&port.name)
                .copied()
                .or(address_port.filter(|_| ports.len() == 1))
                .unwrap_or(port.port);
            if target == 0 {
                return Err(self.err(
                    format!("{field}.ports.{}", port.name),
                    "port 0 is not a valid port",
                ));
            }
            target_ports.insert(port.name.clone(), target);
        }
        if let Some(unknown) = detail
            .ports
            .keys()
            .find(|k| !ports.iter().any(|p| &p.name == *k))
        {
            return Err(self.err(
                format!("{field}.ports.{unknown}"),
                "no service port of that name",
            ));
        }
        if address_port.is_some() && ports.len() > 1 && detail.ports.is_empty() {
            return Err(self.err(
                format!("{field}.address"),
                "the service has several ports: give the address without a port and `ports: {name: port, ...}`",
            ));
        }
        let state = match (detail.ready, detail.terminating) {
            (_, true) => EndpointState::Terminating,
            (true, false) => EndpointState::Ready,
            (false, false) => EndpointState::NotReady,
        };
        if let Some(zone) = &detail.zone
            && zone.is_empty()
        {
            return Err(self.err(format!("{field}.zone"), "zone must not be empty"));
        }
        Ok(Endpoint {
            ip,
            ports: target_ports,
            state,
            zone: detail.zone,
        })
    }

    fn weights(
        &self,
        raw: BTreeMap<String, u32>,
        backends: &BTreeMap<ClusterName, Backend>,
    ) -> Result<Weights, CatalogError> {
        let mut entries = BTreeMap::new();
        for (cluster, bp) in raw {
            let name = ClusterName::new(&cluster)
                .ok()
                .filter(|c| backends.contains_key(c))
                .ok_or_else(|| {
                    self.err(
                        format!("weights.{cluster}"),
                        "no backend in that cluster (weights may only name clusters listed under backends)",
                    )
                })?;
            entries.insert(name, bp);
        }
        Weights::new(entries).map_err(|e| self.err("weights", e.to_string()))
    }
}

/// Every domain a service is routed by, for collision checks.
fn claimed_domains(service: &Service) -> Vec<String> {
    let (n, ns) = (service.name.name(), service.name.namespace());
    let mut domains = vec![
        format!("{n}.{ns}"),
        format!("{n}.{ns}.svc"),
        format!("{n}.{ns}.svc.cluster.local"),
    ];
    domains.extend(service.hosts.iter().cloned());
    domains
}

fn is_hostname(host: &str) -> bool {
    let host = host.strip_prefix("*.").unwrap_or(host);
    !host.is_empty()
        && host.len() <= 253
        && host.split('.').all(|label| check_dns_label(label).is_ok())
}

fn parse_address(address: &str) -> Option<(IpAddr, Option<u16>)> {
    if let Ok(sa) = address.parse::<SocketAddr>() {
        return Some((sa.ip(), Some(sa.port())));
    }
    address.parse::<IpAddr>().ok().map(|ip| (ip, None))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::file::parse_catalog;

    fn parse(text: &str) -> Result<Vec<Service>, CatalogError> {
        parse_catalog(Path::new("catalog.yaml"), text)
    }

    fn error(text: &str) -> String {
        match parse(text) {
            Ok(_) => panic!("expected an error for:\n{text}"),
            Err(e) => e.to_string(),
        }
    }

    const GOOD: &str = r#"
services:
  - name: checkout
    namespace: shop
    ports: [{name: http, port: 8080}]
    hosts: [checkout.example.com]
    backends:
      old: {endpoints: ["127.0.0.1:9001", {address: "127.0.0.1:9002", ready: false, zone: a}]}
      new: {endpoints: ["127.0.0.1:9101"]}
    weights: {old: 9000, new: 1000}
"#;

    #[test]
    fn parses_the_documented_shape() {
        let services = parse(GOOD).unwrap();
        assert_eq!(services.len(), 1);
        let s = &services[0];
        assert_eq!(s.name.to_string(), "checkout.shop");
        let old = &s.backends[&ClusterName::new("old").unwrap()];
        assert_eq!(old.endpoints.len(), 2);
        assert_eq!(old.endpoints[0].ports["http"], 9001);
        assert_eq!(old.endpoints[1].state, EndpointState::NotReady);
        assert_eq!(old.endpoints[1].zone.as_deref(), Some("a"));
        let w = s.weights.as_ref().unwrap();
        assert_eq!(
            w.get(&ClusterName::new("new").unwrap()).basis_points(),
            1000
        );
    }

    #[test]
    fn upgrades_are_listed_per_service_and_never_h2c() {
        let s = parse(&format!("{GOOD}    upgrades: [WebSocket, tls/1.3]\n")).unwrap();
        assert_eq!(
            s[0].requests.upgrades,
            Some(vec!["websocket".to_owned(), "tls/1.3".to_owned()])
        );
        let none = parse(&format!("{GOOD}    upgrades: []\n")).unwrap();
        assert_eq!(none[0].requests.upgrades, Some(Vec::new()));
        let e = error(&format!("{GOOD}    upgrades: [websocket, h2c]\n"));
        assert!(e.contains("upgrades[1]") && e.contains("h2c"), "{e}");
        let e = error(&format!("{GOOD}    upgrades: [\"web socket\"]\n"));
        assert!(e.contains("upgrades[0]"), "{e}");
    }

    #[test]
    fn bad_weights_name_the_service_and_field() {
        let e = error(&GOOD.replace("new: 1000", "new: 999"));
        assert!(e.contains("catalog.yaml"), "{e}");
        assert!(e.contains("checkout.shop"), "{e}");
        assert!(e.contains("weights") && e.contains("9999"), "{e}");

        let e = error(&GOOD.replace("new: 1000}", "new: 500, other: 500}"));
        assert!(e.contains("weights.other"), "{e}");
    }

    #[test]
    fn request_policies_parse_and_name_bad_fields() {
        let text = format!(
            "{GOOD}    protocol: grpc\n    timeout: 3s\n    retries: {{attempts: 2, on: [5xx, connect-failure], per_try_timeout: 500ms}}\n    outlier_detection: {{consecutive_5xx: 3, base_ejection_time: 2s}}\n"
        );
        let services = parse(&text).unwrap();
        let r = &services[0].requests;
        assert_eq!(r.protocol, Protocol::Http2);
        assert_eq!(r.timeout, Some(Duration::from_secs(3)));
        let retries = r.retries.as_ref().unwrap();
        assert_eq!(retries.attempts, 2);
        assert_eq!(
            retries.on,
            vec![RetryOn::ConnectFailure, RetryOn::ServerError]
        );
        assert_eq!(retries.per_try_timeout, Some(Duration::from_millis(500)));
        let o = r.outlier_detection.as_ref().unwrap();
        assert_eq!((o.consecutive_5xx, o.max_ejection_percent), (3, 50));
        assert_eq!(o.base_ejection_time, Duration::from_secs(2));
        assert_eq!(parse(GOOD).unwrap()[0].requests, RequestPolicy::default());
        let checked = parse(&format!(
            "{GOOD}    health_check: {{path: /healthz, interval: 2s}}\n"
        ))
        .unwrap();
        let h = checked[0].requests.health_check.as_ref().unwrap();
        assert_eq!(
            (h.path.as_str(), h.interval, h.timeout),
            ("/healthz", Duration::from_secs(2), Duration::from_secs(1))
        );
        assert_eq!((h.unhealthy_threshold, h.healthy_threshold), (3, 2));
        let mutual = parse(&format!(
            "{GOOD}    tls: {{server_name: Checkout.Internal, ca_file: /ca.pem, cert_file: /c.pem, key_file: /k.pem}}\n"
        ))
        .unwrap();
        let tls = mutual[0].requests.tls.as_ref().unwrap();
        assert_eq!(tls.server_name, "checkout.internal");
        assert_eq!(
            tls.client_cert,
            Some(ClientCert {
                cert_file: "/c.pem".into(),
                key_file: "/k.pem".into()
            })
        );
        for (extra, field) in [
            ("    protocol: http3\n", "protocol"),
            ("    timeout: soon\n", "timeout"),
            ("    health_check: {path: healthz}\n", "health_check.path"),
            (
                "    tls: {server_name: \"a b\", ca_file: /ca.pem}\n",
                "tls.server_name",
            ),
            (
                "    tls: {server_name: a.internal, ca_file: ca.pem}\n",
                "tls.ca_file",
            ),
            (
                "    tls: {server_name: a.internal, ca_file: /ca.pem, cert_file: /c.pem}\n",
                "tls.key_file",
            ),
            (
                "    tls: {server_name: a.internal, ca_file: /ca.pem, key_file: /k.pem}\n",
                "tls.cert_file",
            ),
            (
                "    tls: {server_name: a.internal, ca_file: /ca.pem, cert_file: c.pem, key_file: /k.pem}\n",
                "tls.cert_file",
            ),
            (
                "    health_check: {path: /h, interval: 1s, timeout: 2s}\n",
                "health_check.timeout",
            ),
            (
                "    health_check: {path: /h, healthy_threshold: 0}\n",
                "health_check.healthy_threshold",
            ),
            ("    timeout: 0s\n", "timeout"),
            (
                "    retries: {attempts: 1, on: [teapot]}\n",
                "retries.on[0]",
            ),
            ("    retries: {attempts: 99}\n", "retries.attempts"),
            (
                "    outlier_detection: {consecutive_5xx: 0}\n",
                "outlier_detection.consecutive_5xx",
            ),
            (
                "    outlier_detection: {max_ejection_percent: 101}\n",
                "outlier_detection.max_ejection_percent",
            ),
        ] {
            let e = error(&format!("{GOOD}{extra}"));
            assert!(e.contains(field), "{extra}: {e}");
        }
    }

    #[test]
    fn sticky_headers_are_header_names() {
        let sticky = format!("{GOOD}    sticky: {{header: X-User-Id}}\n");
        let services = parse(&sticky).unwrap();
        assert_eq!(
            services[0].sticky,
            Some(StickyKey::Header("x-user-id".into()))
        );
        let e = error(&format!("{GOOD}    sticky: {{header: \"x user\"}}\n"));
        assert!(e.contains("sticky.header") && e.contains("x user"), "{e}");
        let cookie = parse(&format!("{GOOD}    sticky: {{cookie: session}}\n")).unwrap();
        assert_eq!(cookie[0].sticky, Some(StickyKey::Cookie("session".into())));
        let e = error(&format!("{GOOD}    sticky: {{cookie: \"a;b\"}}\n"));
        assert!(e.contains("sticky.cookie"), "{e}");
        let e = error(&format!("{GOOD}    sticky: {{header: x, cookie: y}}\n"));
        assert!(e.contains("exactly one"), "{e}");
    }

    #[test]
    fn bad_addresses_and_duplicates_are_refused() {
        let e = error(&GOOD.replace("127.0.0.1:9101", "not-an-ip:80"));
        assert!(e.contains("backends.new.endpoints[0].address"), "{e}");

        let twice = format!("{GOOD}{}", GOOD.replace("services:\n", ""));
        let e = error(&twice);
        assert!(e.contains("duplicate service"), "{e}");

        let e = error("services: [ {name: x");
        assert!(e.contains("invalid YAML"), "{e}");

        let e = error(&GOOD.replace("name: checkout", "name: Checkout"));
        assert!(e.contains(": name:"), "{e}");
    }

    #[test]
    fn hosts_may_not_collide_across_services() {
        let other = r#"
  - name: cart
    namespace: shop
    ports: [{name: http, port: 8080}]
    hosts: [checkout.example.com]
    backends: {old: {endpoints: ["127.0.0.1:1"]}}
"#;
        let e = error(&format!("{GOOD}{other}"));
        assert!(e.contains("cart.shop") && e.contains("hosts"), "{e}");
    }

    #[test]
    fn multi_port_endpoints_name_their_ports() {
        let text = r#"
services:
  - name: api
    namespace: shop
    ports: [{name: http, port: 8080}, {name: grpc, port: 9090}]
    backends:
      old: {endpoints: [{address: "10.0.0.1", ports: {http: 18080, grpc: 19090}}, "10.0.0.2"]}
"#;
        let s = &parse(text).unwrap()[0];
        let eps = &s.backends[&ClusterName::new("old").unwrap()].endpoints;
        assert_eq!(eps[0].ports["grpc"], 19090);
        // Without a port the service port is the target port, as in Kubernetes.
        assert_eq!(eps[1].ports["grpc"], 9090);

        let e = error(&text.replace("\"10.0.0.2\"", "\"10.0.0.2:1\""));
        assert!(e.contains("several ports"), "{e}");
    }

    #[test]
    fn errors_quote_hostile_values_short_and_escaped() {
        let long = "x".repeat(5000);
        let e = error(&GOOD.replace("checkout.example.com", &long));
        assert!(e.len() < 1000, "{} bytes: {e}", e.len());
        assert!(e.contains("…(50"), "{e}");
        let e = error(&GOOD.replace("old: {", "\"o\\nINFO forged\": {"));
        assert!(!e.contains('\n'), "{e}");
        assert!(e.contains("o\\nINFO forged"), "{e}");
    }
}

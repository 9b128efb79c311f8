//! EDS clusters: one per service port and Kubernetes cluster.

use std::collections::HashMap;
use std::time::Duration;

use ferry_discovery::{Protocol, RequestPolicy, ServiceName};
use ferry_proto::envoy::config::cluster::v3::{Cluster, OutlierDetection, cluster};
use ferry_proto::envoy::config::core::v3::{HealthCheck, health_check};
use ferry_proto::envoy::extensions::upstreams::http::v3::{
    HttpProtocolOptions, http_protocol_options,
};
use ferry_proto::envoy::r#type::matcher::v3::{StringMatcher, string_matcher};
use ferry_proto::envoy::r#type::v3::{CodecClientType, Percent};
use ferry_proto::google::protobuf::UInt32Value;
use ferry_proto::pack;

use super::UpstreamTlsMode;

use super::{TranslateOptions, ads_config_source, pb_duration};

/// The Envoy resource name of one service port in one cluster.
pub fn cluster_resource_name(service: &ServiceName, port: u16, cluster: &str) -> String {
    let service = service.to_string();
    ferry_xds_core::BackendKey::new(&service, port, cluster).to_string()
}

/// The name a cluster's statistics go by (Envoy's `alt_stat_name`):
/// `name_namespace_port_cluster`. Envoy cuts stat names at dots, so the
/// resource name itself would garble the `envoy_cluster_name` label; every
/// part is a DNS label (no `_`), so this one splits back unambiguously.
pub fn cluster_stat_name(service: &ServiceName, port: u16, cluster: &str) -> String {
    format!(
        "{}_{}_{port}_{cluster}",
        service.name(),
        service.namespace()
    )
}

/// The transport socket name of TLS to endpoints.
pub const UPSTREAM_TLS: &str = "envoy.transport_sockets.tls";

/// The extension key Envoy reads a cluster's upstream HTTP options from.
pub const HTTP_PROTOCOL_OPTIONS: &str = "envoy.extensions.upstreams.http.v3.HttpProtocolOptions";

pub(super) fn eds_cluster(
    name: &str,
    stat_name: &str,
    requests: &RequestPolicy,
    options: &TranslateOptions,
) -> Cluster {
    let timeout = options.connect_timeout;
    let mut protocol_options = HashMap::new();
    if requests.protocol == Protocol::Http2 {
        protocol_options.insert(
            HTTP_PROTOCOL_OPTIONS.to_owned(),
            pack(&HttpProtocolOptions {
                upstream_protocol_options: Some(
                    http_protocol_options::UpstreamProtocolOptions::ExplicitHttpConfig(
                        http_protocol_options::ExplicitHttpConfig {
                            protocol_config: Some(
                                http_protocol_options::explicit_http_config::ProtocolConfig::Http2ProtocolOptions(
                                    Default::default(),
                                ),
                            ),
                        },
                    ),
                ),
                ..Default::default()
            }),
        );
    }
    let outlier_detection = requests
        .outlier_detection
        .as_ref()
        .map(|o| OutlierDetection {
            consecutive_5xx: Some(UInt32Value {
                value: o.consecutive_5xx,
            }),
            // Connect failures count as 5xx (Envoy's default), the same
            // as in Ferry's proxy.
            base_ejection_time: Some(pb_duration(o.base_ejection_time)),
            max_ejection_percent: Some(UInt32Value {
                value: o.max_ejection_percent,
            }),
            interval: Some(pb_duration(Duration::from_secs(1))),
            ..Default::default()
        });
    let health_checks = requests
        .health_check
        .iter()
        .map(|h| HealthCheck {
            timeout: Some(pb_duration(h.timeout)),
            interval: Some(pb_duration(h.interval)),
            unhealthy_threshold: Some(UInt32Value {
                value: h.unhealthy_threshold,
            }),
            healthy_threshold: Some(UInt32Value {
                value: h.healthy_threshold,
            }),
            health_checker: Some(health_check::HealthChecker::HttpHealthCheck(
                health_check::HttpHealthCheck {
                    path: h.path.clone(),
                    // Probes speak the service's protocol (gRPC servers
                    // answer HTTP/2 only); they go over the cluster's TLS.
                    codec_client_type: match requests.protocol {
                        Protocol::Http1 => CodecClientType::Http1,
                        Protocol::Http2 => CodecClientType::Http2,
                    } as i32,
                    ..Default::default()
                },
            )),
            ..Default::default()
        })
        .collect();
    let transport_socket = requests.tls.as_ref().map(|tls| {
        use ferry_proto::envoy::config::core::v3::{
            DataSource, TransportSocket, data_source, transport_socket,
        };
        use ferry_proto::envoy::extensions::transport_sockets::tls::v3::{
            CertificateValidationContext, CommonTlsContext, SdsSecretConfig, SubjectAltNameMatcher,
            TlsCertificate, UpstreamTlsContext, common_tls_context, subject_alt_name_matcher,
        };
        let file = |path: &std::path::Path| DataSource {
            specifier: Some(data_source::Specifier::Filename(path.display().to_string())),
            ..Default::default()
        };
        let sds = |name: String| SdsSecretConfig {
            name,
            sds_config: Some(ads_config_source()),
        };
        let alpn = match requests.protocol {
            Protocol::Http1 => "http/1.1",
            Protocol::Http2 => "h2",
        };
        // Envoy checks names only when told to.
        let names = CertificateValidationContext {
            match_typed_subject_alt_names: vec![SubjectAltNameMatcher {
                san_type: subject_alt_name_matcher::SanType::Dns as i32,
                matcher: Some(StringMatcher {
                    match_pattern: Some(string_matcher::MatchPattern::Exact(
                        tls.server_name.clone(),
                    )),
                    ..Default::default()
                }),
                ..Default::default()
            }],
            ..Default::default()
        };
        let (tls_certificates, tls_certificate_sds_secret_configs, validation) =
            match options.upstream_tls {
                UpstreamTlsMode::Files => (
                    tls.client_cert
                        .iter()
                        .map(|c| TlsCertificate {
                            certificate_chain: Some(file(&c.cert_file)),
                            private_key: Some(file(&c.key_file)),
                            ..Default::default()
                        })
                        .collect(),
                    Vec::new(),
                    common_tls_context::ValidationContextType::ValidationContext(
                        CertificateValidationContext {
                            trusted_ca: Some(file(&tls.ca_file)),
                            ..names
                        },
                    ),
                ),
                UpstreamTlsMode::Sds => {
                    let (ca, cert) = crate::secrets::secrets_of(tls);
                    (
                        Vec::new(),
                        cert.map(|c| sds(c.name())).into_iter().collect(),
                        common_tls_context::ValidationContextType::CombinedValidationContext(
                            common_tls_context::CombinedCertificateValidationContext {
                                default_validation_context: Some(names),
                                validation_context_sds_secret_config: Some(sds(ca.name())),
                                ..Default::default()
                            },
                        ),
                    )
                }
            };
        let context = UpstreamTlsContext {
            sni: tls.server_name.clone(),
            common_tls_context: Some(CommonTlsContext {
                alpn_protocols: vec![alpn.to_owned()],
                tls_certificates,
                tls_certificate_sds_secret_configs,
                validation_context_type: Some(validation),
                ..Default::default()
            }),
            ..Default::default()
        };
        TransportSocket {
            name: UPSTREAM_TLS.to_owned(),
            config_type: Some(transport_socket::ConfigType::TypedConfig(pack(&context))),
        }
    });
    Cluster {
        transport_socket,
        typed_extension_protocol_options: protocol_options,
        outlier_detection,
        health_checks,
        name: name.to_owned(),
        cluster_discovery_type: Some(cluster::ClusterDiscoveryType::Type(
            cluster::DiscoveryType::Eds as i32,
        )),
        eds_cluster_config: Some(cluster::EdsClusterConfig {
            eds_config: Some(ads_config_source()),
            service_name: String::new(),
        }),
        connect_timeout: Some(pb_duration(timeout)),
        alt_stat_name: stat_name.to_owned(),
        lb_policy: cluster::LbPolicy::LeastRequest as i32,
        // Never spread load onto unready endpoints: Envoy's default 50 %
        // panic threshold would send traffic to them when few are ready.
        common_lb_config: Some(cluster::CommonLbConfig {
            healthy_panic_threshold: Some(Percent { value: 0.0 }),
            ..Default::default()
        }),
        ..Default::default()
    }
}

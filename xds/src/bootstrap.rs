//! The Envoy bootstrap that points an Envoy at Ferry: every listener,
//! route, cluster and endpoint over one ADS stream, load reports over LRS.
//! `ferry demo`, the tests and the load tests start Envoy with it
//! (`examples/envoy-bootstrap.yaml` is the same, written out).

/// An Envoy bootstrap that takes everything from Ferry over one ADS
/// stream (`api_type`: `GRPC` or `DELTA_GRPC`) to `ads` and reports load
/// to `lrs`; admin on `admin`. With the ADS stream to `ads` and the load
/// reports to `lrs` (two upstream clusters when they differ), so a test can
/// hold one of them back.
pub fn envoy_bootstrap_split(
    node_id: &str,
    node_cluster: &str,
    api_type: &str,
    ads: std::net::SocketAddr,
    lrs: std::net::SocketAddr,
    admin: std::net::SocketAddr,
) -> String {
    let cluster = |name: &str, at: std::net::SocketAddr| {
        format!(
            r#"    - name: {name}
      type: STATIC
      connect_timeout: 1s
      typed_extension_protocol_options:
        envoy.extensions.upstreams.http.v3.HttpProtocolOptions:
          "@type": type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions
          explicit_http_config: {{http2_protocol_options: {{}}}}
      load_assignment:
        cluster_name: {name}
        endpoints: [{{lb_endpoints: [{{endpoint: {{address: {{socket_address: {{address: {ip}, port_value: {port}}}}}}}}}]}}]
"#,
            ip = at.ip(),
            port = at.port(),
        )
    };
    let (lrs_cluster, clusters) = if ads == lrs {
        ("ferry_xds", cluster("ferry_xds", ads))
    } else {
        (
            "ferry_lrs",
            cluster("ferry_xds", ads) + &cluster("ferry_lrs", lrs),
        )
    };
    format!(
        r#"node: {{id: {node_id}, cluster: {node_cluster}}}
dynamic_resources:
  ads_config:
    api_type: {api_type}
    transport_api_version: V3
    grpc_services: [{{envoy_grpc: {{cluster_name: ferry_xds}}}}]
    set_node_on_first_message_only: true
  cds_config: {{ads: {{}}, resource_api_version: V3}}
  lds_config: {{ads: {{}}, resource_api_version: V3}}
cluster_manager:
  load_stats_config:
    api_type: GRPC
    transport_api_version: V3
    grpc_services: [{{envoy_grpc: {{cluster_name: {lrs_cluster}}}}}]
static_resources:
  clusters:
{clusters}admin:
  address: {{socket_address: {{address: {admin_ip}, port_value: {admin_port}}}}}
"#,
        admin_ip = admin.ip(),
        admin_port = admin.port(),
    )
}

//! The one HTTP listener, which takes its routes from RDS.

use ferry_proto::envoy::config::listener::v3::{Filter, FilterChain, Listener, filter};
use ferry_proto::envoy::extensions::filters::http::router::v3::Router;
use ferry_proto::envoy::extensions::filters::network::http_connection_manager::v3::{
    HttpConnectionManager, HttpFilter, Rds, http_connection_manager, http_filter,
};
use ferry_proto::pack;

use crate::resources::Resource;

use super::endpoints::socket_address;
use super::{TranslateOptions, ads_config_source};

pub(super) fn listener(options: &TranslateOptions) -> Resource {
    let hcm = HttpConnectionManager {
        stat_prefix: options.listener_name.clone(),
        route_specifier: Some(http_connection_manager::RouteSpecifier::Rds(Rds {
            config_source: Some(ads_config_source()),
            route_config_name: options.listener_name.clone(),
        })),
        http_filters: vec![HttpFilter {
            name: "envoy.filters.http.router".to_owned(),
            config_type: Some(http_filter::ConfigType::TypedConfig(pack(
                &Router::default(),
            ))),
            ..Default::default()
        }],
        // WebSocket upgrades pass through to the service.
        upgrade_configs: vec![http_connection_manager::UpgradeConfig {
            upgrade_type: "websocket".to_owned(),
            ..Default::default()
        }],
        ..Default::default()
    };
    let listener = Listener {
        name: options.listener_name.clone(),
        address: Some(socket_address(options.listener_addr)),
        filter_chains: vec![FilterChain {
            filters: vec![Filter {
                name: "envoy.filters.network.http_connection_manager".to_owned(),
                config_type: Some(filter::ConfigType::TypedConfig(pack(&hcm))),
            }],
            ..Default::default()
        }],
        ..Default::default()
    };
    Resource::new(options.listener_name.clone(), &listener)
}

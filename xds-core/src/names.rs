//! Resource names both sides read.

use std::fmt;

/// The xDS name of one service port's backend in one Kubernetes cluster:
/// `name.namespace:port@cluster`, the name of its `Cluster` and
/// `ClusterLoadAssignment`. The control plane builds it; a proxy's load
/// reports and the control plane's gates read the service and the cluster
/// back out of it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct BackendKey<'a> {
    /// `name.namespace`.
    pub service: &'a str,
    pub port: u16,
    /// The Kubernetes cluster.
    pub cluster: &'a str,
}

impl<'a> BackendKey<'a> {
    pub fn new(service: &'a str, port: u16, cluster: &'a str) -> Self {
        Self {
            service,
            port,
            cluster,
        }
    }

    /// Reads a name made by [`Display`](fmt::Display); `None` for any
    /// other name (a control-plane cluster, a typo).
    pub fn parse(name: &'a str) -> Option<Self> {
        let (service_port, cluster) = name.rsplit_once('@')?;
        let (service, port) = service_port.rsplit_once(':')?;
        let port = port.parse().ok()?;
        (!service.is_empty() && !cluster.is_empty()).then_some(Self {
            service,
            port,
            cluster,
        })
    }
}

impl fmt::Display for BackendKey<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}@{}", self.service, self.port, self.cluster)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_name_reads_back_as_it_was_built() {
        let key = BackendKey::new("web.shop", 8080, "old-east");
        let name = key.to_string();
        assert_eq!(name, "web.shop:8080@old-east");
        assert_eq!(BackendKey::parse(&name), Some(key));
    }

    #[test]
    fn other_names_are_not_backends() {
        for name in [
            "xds",
            "web.shop@old",
            "web.shop:http@old",
            ":80@old",
            "web.shop:80@",
            "web.shop:99999@old",
        ] {
            assert_eq!(BackendKey::parse(name), None, "{name}");
        }
    }
}

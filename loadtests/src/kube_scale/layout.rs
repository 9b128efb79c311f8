//! The generated Kubernetes objects of the `kube_scale` test.
//!
//! `slices` EndpointSlices of `endpoints_per_slice` endpoints each, spread
//! over three fake clusters. Slice `i` belongs to service
//! `i / (3 × slices_per_backend)` in cluster `(i / slices_per_backend) % 3`,
//! so every service is exported (label `ferry.io/export=true`) in all three
//! clusters with `slices_per_backend` slices in each (the last service may
//! have fewer). Each endpoint has its own address in 10.0.0.0/8 (never
//! connected to) and one of three zones; all start ready.
//!
//! Change rounds flip the readiness of one endpoint of one slice; the
//! [`Objects`] remembers every flip so each slice can be re-rendered whole,
//! as an EndpointSlice controller would.

use std::collections::HashSet;
use std::net::Ipv4Addr;

use ferry_testkube::TestKube;

/// The fake clusters, in the order slices are dealt to them.
pub const CLUSTERS: [&str; 3] = ["east", "west", "north"];
/// Namespace of every generated object.
pub const NAMESPACE: &str = "scale";
/// Service port and endpoint port of every generated service.
pub const PORT: u16 = 8080;
/// The label that exports a Service to Ferry.
pub const EXPORT: &[(&str, &str)] = &[("ferry.io/export", "true")];
const ZONES: [&str; 3] = ["zone-a", "zone-b", "zone-c"];

/// 10.0.0.1 to 10.255.255.254.
const MAX_ENDPOINTS: usize = (1 << 24) - 2;

/// The shape of the generated clusters.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Layout {
    pub slices: usize,
    pub endpoints_per_slice: usize,
    /// Slices of one service in one cluster.
    pub slices_per_backend: usize,
}

/// Where one slice lives.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SlicePlace {
    pub service: usize,
    /// Index into [`CLUSTERS`].
    pub cluster: usize,
    /// The slice's index among its backend's slices.
    pub index: usize,
}

impl Layout {
    /// The smallest layout of whole slices holding at least `endpoints`
    /// endpoints (and at least one slice per cluster).
    pub fn for_endpoints(
        endpoints: usize,
        endpoints_per_slice: usize,
        slices_per_backend: usize,
    ) -> anyhow::Result<Self> {
        anyhow::ensure!(
            endpoints_per_slice > 0,
            "endpoints per slice must be at least 1"
        );
        anyhow::ensure!(
            slices_per_backend > 0,
            "slices per service and cluster must be at least 1"
        );
        let layout = Self {
            slices: endpoints
                .div_ceil(endpoints_per_slice)
                .max(CLUSTERS.len() * slices_per_backend),
            endpoints_per_slice,
            slices_per_backend,
        };
        anyhow::ensure!(
            layout.endpoints() <= MAX_ENDPOINTS,
            "at most {MAX_ENDPOINTS} endpoints fit in 10.0.0.0/8"
        );
        Ok(layout)
    }

    /// Endpoints over every cluster.
    pub fn endpoints(&self) -> usize {
        self.slices * self.endpoints_per_slice
    }

    /// Where slice `i` lives.
    pub fn place(&self, i: usize) -> SlicePlace {
        let k = self.slices_per_backend;
        SlicePlace {
            service: i / (CLUSTERS.len() * k),
            cluster: (i / k) % CLUSTERS.len(),
            index: i % k,
        }
    }

    /// Services (each exported in up to three clusters).
    pub fn services(&self) -> usize {
        self.slices
            .div_ceil(CLUSTERS.len() * self.slices_per_backend)
    }

    /// Service backends: Envoy clusters and load assignments.
    pub fn backends(&self) -> usize {
        self.slices.div_ceil(self.slices_per_backend)
    }

    /// Slices in cluster `c`.
    pub fn slices_in(&self, c: usize) -> usize {
        (0..self.slices)
            .filter(|i| self.place(*i).cluster == c)
            .count()
    }

    /// Services exported in cluster `c`.
    pub fn services_in(&self, c: usize) -> usize {
        (0..self.backends())
            .filter(|b| b % CLUSTERS.len() == c)
            .count()
    }

    /// The address of endpoint `e` of slice `i`.
    pub fn endpoint_ip(&self, slice: usize, endpoint: usize) -> Ipv4Addr {
        let n = (slice * self.endpoints_per_slice + endpoint + 1) as u32;
        Ipv4Addr::new(10, (n >> 16) as u8, (n >> 8) as u8, n as u8)
    }

    /// The slice and endpoint whose readiness round `round` (0-based)
    /// flips: the clusters take turns, and within a cluster consecutive
    /// turns visit different slices.
    pub fn round_target(&self, round: usize) -> (usize, usize) {
        let k = self.slices_per_backend;
        let cluster = round % CLUSTERS.len();
        let turn = round / CLUSTERS.len();
        // The `j`th slice of cluster `c` is slice `(3 (j / k) + c) k + j % k`.
        // 7,919 is prime: turns visit every slice of the cluster before one
        // repeats (unless their count is a multiple of it).
        let j = (turn * 7_919 + 1) % self.slices_in(cluster).max(1);
        let slice = (CLUSTERS.len() * (j / k) + cluster) * k + j % k;
        (slice, (round * 31) % self.endpoints_per_slice)
    }
}

/// Name of the `index`th service.
pub fn service_name(index: usize) -> String {
    format!("svc-{index:05}")
}

/// Name of a slice.
pub fn slice_name(place: SlicePlace) -> String {
    format!("{}-{}", service_name(place.service), place.index)
}

/// The Envoy cluster / load assignment of a service in a cluster.
pub fn load_assignment_name(service: usize, cluster: usize) -> String {
    format!(
        "{}.{NAMESPACE}:{PORT}@{}",
        service_name(service),
        CLUSTERS[cluster]
    )
}

/// The objects of every cluster, with the readiness flips made so far.
#[derive(Debug)]
pub struct Objects {
    pub layout: Layout,
    /// (slice, endpoint) pairs that are not ready.
    not_ready: HashSet<(usize, usize)>,
}

/// One readiness flip.
#[derive(Debug, Clone)]
pub struct Flip {
    pub place: SlicePlace,
    pub slice: usize,
    pub endpoint: usize,
    pub ip: Ipv4Addr,
    /// The endpoint's readiness after the flip.
    pub ready: bool,
    pub load_assignment: String,
}

impl Objects {
    pub fn new(layout: Layout) -> Self {
        Self {
            layout,
            not_ready: HashSet::new(),
        }
    }

    /// Creates every Service and EndpointSlice in `kubes` (one per entry
    /// of [`CLUSTERS`]).
    pub fn populate(&self, kubes: &[TestKube]) {
        let port = i32::from(PORT);
        for b in 0..self.layout.backends() {
            let (service, cluster) = (b / CLUSTERS.len(), b % CLUSTERS.len());
            kubes[cluster].apply_service(
                NAMESPACE,
                &service_name(service),
                EXPORT,
                &[("http", port)],
            );
        }
        for i in 0..self.layout.slices {
            self.apply_slice(kubes, i);
        }
    }

    /// Flips the readiness of round `round`'s endpoint and applies its
    /// slice. Returns what changed; the change is live when this returns.
    pub fn flip(&mut self, kubes: &[TestKube], round: usize) -> Flip {
        let flip = self.toggle(round);
        self.apply_slice(kubes, flip.slice);
        flip
    }

    /// Flips the readiness of round `round`'s endpoint in the model only.
    fn toggle(&mut self, round: usize) -> Flip {
        let (slice, endpoint) = self.layout.round_target(round);
        // Ready now if it was not before.
        let ready = self.not_ready.remove(&(slice, endpoint));
        if !ready {
            self.not_ready.insert((slice, endpoint));
        }
        let place = self.layout.place(slice);
        Flip {
            place,
            slice,
            endpoint,
            ip: self.layout.endpoint_ip(slice, endpoint),
            ready,
            load_assignment: load_assignment_name(place.service, place.cluster),
        }
    }

    fn apply_slice(&self, kubes: &[TestKube], slice: usize) {
        let place = self.layout.place(slice);
        let ips: Vec<String> = (0..self.layout.endpoints_per_slice)
            .map(|e| self.layout.endpoint_ip(slice, e).to_string())
            .collect();
        let endpoints: Vec<_> = ips
            .iter()
            .enumerate()
            .map(|(e, ip)| {
                let ready = !self.not_ready.contains(&(slice, e));
                (
                    ip.as_str(),
                    ready,
                    ready,
                    false,
                    Some(ZONES[e % ZONES.len()]),
                )
            })
            .collect();
        kubes[place.cluster].apply_endpoint_slice(
            NAMESPACE,
            &slice_name(place),
            &service_name(place.service),
            &endpoints,
            &[("http", i32::from(PORT))],
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rounds_up_to_whole_slices_spread_over_clusters() {
        let l = Layout::for_endpoints(100_000, 100, 1).unwrap();
        assert_eq!((l.slices, l.endpoints()), (1_000, 100_000));
        assert_eq!((l.services(), l.backends()), (334, 1_000));
        assert_eq!(
            (l.slices_in(0), l.slices_in(1), l.slices_in(2)),
            (334, 333, 333)
        );
        assert_eq!(
            (l.services_in(0), l.services_in(1), l.services_in(2)),
            (334, 333, 333)
        );
        assert_eq!(
            l.place(4),
            SlicePlace {
                service: 1,
                cluster: 1,
                index: 0
            }
        );
        let l = Layout::for_endpoints(3_050, 100, 2).unwrap();
        assert_eq!((l.slices, l.services(), l.backends()), (31, 6, 16));
        assert_eq!(
            l.place(7),
            SlicePlace {
                service: 1,
                cluster: 0,
                index: 1
            }
        );
        assert_eq!(Layout::for_endpoints(1, 100, 1).unwrap().slices, 3);
        assert!(Layout::for_endpoints(10, 0, 1).is_err());
        assert!(Layout::for_endpoints(20_000_000, 100, 1).is_err());
    }

    #[test]
    fn flips_alternate_readiness() {
        let layout = Layout::for_endpoints(300, 100, 1).unwrap();
        let mut objects = Objects::new(layout);
        let first = objects.toggle(0);
        assert!(!first.ready, "everything starts ready");
        assert!(objects.not_ready.contains(&(first.slice, first.endpoint)));
        // 3 slices, one per cluster: round 3 is the same slice again.
        let again = objects.toggle(3);
        assert_eq!((again.slice, again.endpoint), (first.slice, 93));
        assert!(!again.ready);
        let other = objects.toggle(1);
        assert_eq!(other.load_assignment, "svc-00000.scale:8080@west");
        assert_eq!(objects.not_ready.len(), 3);
    }

    #[test]
    fn addresses_are_distinct_and_in_ten_slash_eight() {
        let l = Layout::for_endpoints(100_000, 100, 1).unwrap();
        assert_eq!(l.endpoint_ip(0, 0), Ipv4Addr::new(10, 0, 0, 1));
        assert_eq!(l.endpoint_ip(2, 55), Ipv4Addr::new(10, 0, 1, 0));
        assert_eq!(l.endpoint_ip(999, 99), Ipv4Addr::new(10, 1, 134, 160));
    }

    #[test]
    fn rounds_visit_different_slices_and_clusters() {
        let l = Layout::for_endpoints(100_000, 100, 1).unwrap();
        let targets: HashSet<usize> = (0..40).map(|r| l.round_target(r).0).collect();
        assert_eq!(targets.len(), 40);
        for r in 0..40 {
            let (slice, endpoint) = l.round_target(r);
            assert!(slice < l.slices && endpoint < l.endpoints_per_slice);
            assert_eq!(l.place(slice).cluster, r % 3);
        }
        let small = Layout::for_endpoints(3_000, 100, 2).unwrap();
        let targets: HashSet<usize> = (0..9).map(|r| small.round_target(r).0).collect();
        assert_eq!(targets.len(), 9);
        for r in 0..30 {
            let (slice, _) = small.round_target(r);
            assert!(slice < small.slices);
            assert_eq!(small.place(slice).cluster, r % 3);
        }
        assert_eq!(load_assignment_name(3, 2), "svc-00003.scale:8080@north");
    }
}

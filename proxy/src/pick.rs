//! Choosing where a request goes: a route's weighted cluster, then one of
//! that cluster's endpoints.
//!
//! **Sticky shifting.** When a route names a hash key, the pick is weighted
//! rendezvous hashing: each cluster scores `weight / -ln(u)`, with `u` a
//! uniform number from hashing (key, cluster name), and the highest score
//! wins. It is a pure function of the key, the names and the weights, so
//! every proxy agrees. When one cluster's weight rises while the others
//! keep their proportions (as a migration's steps do), every other score
//! shrinks by the same factor: a key moves only to the rising cluster, at
//! most once, and never back while it keeps rising. (A cumulative-range
//! layout has this property for two clusters but not for several sources.)
//!
//! Without a key, the cluster is drawn by weight. The endpoint within the
//! cluster is the balancer's ([`crate::balance`]).

use xxhash_rust::xxh3::xxh3_64_with_seed;

use crate::config::Target;

/// The target for a request: by `key` (sticky) when given, else by weight.
pub fn cluster<'a>(targets: &'a [Target], key: Option<&[u8]>) -> Option<&'a Target> {
    match key {
        Some(key) => sticky(targets, key),
        None => weighted(targets, rand::random::<u64>()),
    }
}

/// By weight, from a uniform random `draw`.
pub fn weighted(targets: &[Target], draw: u64) -> Option<&Target> {
    let total: u64 = targets.iter().map(|t| u64::from(t.weight)).sum();
    if total == 0 {
        return None;
    }
    let mut point = draw % total;
    for t in targets {
        let w = u64::from(t.weight);
        if point < w {
            return Some(t);
        }
        point -= w;
    }
    None
}

/// Weighted rendezvous hashing of `key` over the targets.
pub fn sticky<'a>(targets: &'a [Target], key: &[u8]) -> Option<&'a Target> {
    let seed = xxh3_64_with_seed(key, 0x0066_6572_7279);
    targets
        .iter()
        .filter(|t| t.weight > 0)
        .map(|t| {
            let h = xxh3_64_with_seed(t.cluster.as_bytes(), seed);
            // u in (0, 1): never 0 or 1, so the logarithm is finite and < 0.
            let u = ((h >> 11) as f64 + 0.5) / (1u64 << 53) as f64;
            (f64::from(t.weight) / -u.ln(), t)
        })
        .max_by(|a, b| {
            a.0.total_cmp(&b.0)
                .then_with(|| b.1.cluster.cmp(&a.1.cluster))
        })
        .map(|(_, t)| t)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn targets(weights: &[(&str, u32)]) -> Vec<Target> {
        weights
            .iter()
            .map(|(c, w)| Target {
                cluster: (*c).to_owned(),
                weight: *w,
            })
            .collect()
    }

    /// A migration's step: the sources keep exactly their proportions
    /// (`k` × their shares), the target takes the rest.
    fn step(sources: &[(&'static str, u32)], k: u32) -> Vec<Target> {
        let mut out: Vec<(&str, u32)> = sources.iter().map(|(c, w)| (*c, k * w)).collect();
        let used: u32 = out.iter().map(|o| o.1).sum();
        out.push(("new", 10_000 - used));
        targets(&out)
    }

    proptest! {
        #[test]
        fn raising_the_target_moves_each_key_at_most_once_and_never_back(
            shares in proptest::collection::vec(1u32..10, 1..4),
            mut ks in proptest::collection::vec(0u32..=333, 1..8),
            keys in proptest::collection::vec(any::<u64>(), 200),
        ) {
            let names = ["old-a", "old-b", "old-c"];
            let sources: Vec<(&'static str, u32)> = names.iter().copied().zip(shares).collect();
            let total: u32 = sources.iter().map(|s| s.1).sum();
            let k0 = 10_000 / total;
            // Falling k: the target's share rises step by step.
            ks.iter_mut().for_each(|k| *k = (*k).min(k0));
            ks.sort_unstable_by(|a, b| b.cmp(a));
            for key in keys {
                let key = key.to_le_bytes();
                let first = sticky(&step(&sources, k0), &key).map(|t| t.cluster.clone());
                let mut on_new = first.as_deref() == Some("new");
                for k in &ks {
                    let now = sticky(&step(&sources, *k), &key).map(|t| t.cluster.clone());
                    if on_new {
                        prop_assert_eq!(now.as_deref(), Some("new"), "a key left the target");
                    } else if now.as_deref() == Some("new") {
                        on_new = true;
                    } else {
                        prop_assert_eq!(&now, &first, "a key moved between sources");
                    }
                }
            }
        }
    }

    #[test]
    fn sticky_picks_follow_the_weights() {
        let t = targets(&[("old", 7_000), ("new", 3_000)]);
        let n = 20_000u64;
        let on_new = (0..n)
            .filter(|k| sticky(&t, &k.to_le_bytes()).is_some_and(|t| t.cluster == "new"))
            .count() as f64;
        assert!(
            (on_new / n as f64 - 0.3).abs() < 0.02,
            "{}",
            on_new / n as f64
        );
        assert!(sticky(&targets(&[("old", 0)]), b"k").is_none());
    }

    #[test]
    fn weighted_draws_cover_every_basis_point() {
        let t = targets(&[("a", 1), ("b", 9_999)]);
        assert_eq!(weighted(&t, 0).map(|t| t.cluster.as_str()), Some("a"));
        assert_eq!(weighted(&t, 1).map(|t| t.cluster.as_str()), Some("b"));
        assert_eq!(weighted(&t, 10_000).map(|t| t.cluster.as_str()), Some("a"));
        assert!(weighted(&targets(&[("a", 0)]), 5).is_none());
    }
}

//! Traffic weights in basis points.
//!
//! A [`Weight`] is 0–10000 basis points (so a canary can take 0.01 %), and a
//! [`Weights`] set always sums to exactly [`TOTAL_WEIGHT`]: the rule is
//! checked when the set is built, and the rest of Ferry never rechecks it.

use std::collections::BTreeMap;
use std::fmt;

use crate::names::ClusterName;

/// The sum of every weight set: 100 % in basis points.
pub const TOTAL_WEIGHT: u32 = 10_000;

/// A share of traffic in basis points, 0..=10000.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct Weight(u16);

impl Weight {
    pub const ZERO: Weight = Weight(0);
    pub const ALL: Weight = Weight(TOTAL_WEIGHT as u16);

    pub fn new(basis_points: u32) -> Result<Self, WeightsError> {
        if basis_points > TOTAL_WEIGHT {
            return Err(WeightsError::OutOfRange(basis_points));
        }
        Ok(Self(basis_points as u16))
    }

    pub fn basis_points(self) -> u32 {
        u32::from(self.0)
    }
}

impl fmt::Display for Weight {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{:02}%", self.0 / 100, self.0 % 100)
    }
}

/// Why a weight set was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WeightsError {
    #[error("weight {0} is out of range 0..=10000 basis points")]
    OutOfRange(u32),
    #[error("weights sum to {0} basis points, must be exactly 10000")]
    BadSum(u32),
    #[error("weight set is empty")]
    Empty,
}

/// Splits `total` basis points in proportion to `shares` by the
/// largest-remainder method (ties to the cluster that sorts first), so the
/// parts sum to exactly `total`; with all shares zero, equally.
pub fn split_proportionally(
    total: u32,
    shares: &BTreeMap<ClusterName, u64>,
) -> BTreeMap<ClusterName, u32> {
    let sum: u64 = shares.values().sum();
    let equal = sum == 0;
    let sum = if equal { shares.len() as u64 } else { sum };
    let share = |s: u64| if equal { 1 } else { s };
    let mut floors: BTreeMap<ClusterName, u32> = BTreeMap::new();
    let mut remainders: Vec<(u64, &ClusterName)> = Vec::with_capacity(shares.len());
    for (cluster, &s) in shares {
        let scaled = share(s) * u64::from(total);
        floors.insert(cluster.clone(), (scaled / sum) as u32);
        remainders.push((scaled % sum, cluster));
    }
    let assigned: u32 = floors.values().sum();
    // Larger remainder first; equal remainders in name order (stable sort).
    remainders.sort_by_key(|r| std::cmp::Reverse(r.0));
    for (_, cluster) in remainders.into_iter().take((total - assigned) as usize) {
        if let Some(w) = floors.get_mut(cluster) {
            *w += 1;
        }
    }
    floors
}

/// Per-cluster weights of one service, summing to exactly 10000.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Weights(BTreeMap<ClusterName, Weight>);

impl Weights {
    /// Builds a set from basis points per cluster; the sum must be 10000.
    pub fn new(entries: BTreeMap<ClusterName, u32>) -> Result<Self, WeightsError> {
        if entries.is_empty() {
            return Err(WeightsError::Empty);
        }
        let mut sum = 0u32;
        let mut weights = BTreeMap::new();
        for (cluster, bp) in entries {
            let weight = Weight::new(bp)?;
            sum += weight.basis_points();
            weights.insert(cluster, weight);
        }
        if sum != TOTAL_WEIGHT {
            return Err(WeightsError::BadSum(sum));
        }
        Ok(Self(weights))
    }

    /// Splits 10000 basis points in proportion to `shares` (e.g. ready
    /// endpoints per cluster) by the largest-remainder method, ties going to
    /// the cluster that sorts first, so the result is deterministic and sums
    /// to exactly 10000. With no shares at all, every cluster gets an equal
    /// split.
    pub fn proportional(shares: &BTreeMap<ClusterName, u64>) -> Result<Self, WeightsError> {
        if shares.is_empty() {
            return Err(WeightsError::Empty);
        }
        Self::new(split_proportionally(TOTAL_WEIGHT, shares))
    }

    /// All traffic to one cluster.
    pub fn all_to(cluster: ClusterName) -> Self {
        Self(BTreeMap::from([(cluster, Weight::ALL)]))
    }

    /// The weight of `cluster` (zero when it has none).
    pub fn get(&self, cluster: &ClusterName) -> Weight {
        self.0.get(cluster).copied().unwrap_or(Weight::ZERO)
    }

    pub fn iter(&self) -> impl Iterator<Item = (&ClusterName, Weight)> {
        self.0.iter().map(|(c, w)| (c, *w))
    }

    pub fn clusters(&self) -> impl Iterator<Item = &ClusterName> {
        self.0.keys()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn c(name: &str) -> ClusterName {
        ClusterName::new(name).unwrap()
    }

    #[test]
    fn weights_must_sum_to_ten_thousand() {
        let ok = Weights::new(BTreeMap::from([(c("old"), 9000), (c("new"), 1000)])).unwrap();
        assert_eq!(ok.get(&c("old")).basis_points(), 9000);
        assert_eq!(ok.get(&c("gone")), Weight::ZERO);
        assert_eq!(
            Weights::new(BTreeMap::from([(c("old"), 9000), (c("new"), 999)])),
            Err(WeightsError::BadSum(9999))
        );
        assert_eq!(
            Weights::new(BTreeMap::from([(c("old"), 10001)])),
            Err(WeightsError::OutOfRange(10001))
        );
        assert_eq!(Weights::new(BTreeMap::new()), Err(WeightsError::Empty));
    }

    #[test]
    fn proportional_split_is_exact_and_deterministic() {
        let w = Weights::proportional(&BTreeMap::from([(c("a"), 1), (c("b"), 1), (c("c"), 1)]))
            .unwrap();
        // 3333 each and one spare basis point to the first by name.
        assert_eq!(w.get(&c("a")).basis_points(), 3334);
        assert_eq!(w.get(&c("b")).basis_points(), 3333);
        assert_eq!(w.get(&c("c")).basis_points(), 3333);

        let w = Weights::proportional(&BTreeMap::from([(c("old"), 2), (c("new"), 1)])).unwrap();
        assert_eq!(w.get(&c("old")).basis_points(), 6667);
        assert_eq!(w.get(&c("new")).basis_points(), 3333);

        let w = Weights::proportional(&BTreeMap::from([(c("old"), 0), (c("new"), 0)])).unwrap();
        assert_eq!(w.get(&c("new")).basis_points(), 5000);

        let w = Weights::proportional(&BTreeMap::from([(c("old"), 0), (c("new"), 7)])).unwrap();
        assert_eq!(w.get(&c("new")), Weight::ALL);
    }

    #[test]
    fn proportional_always_sums_exactly() {
        for a in 0..40u64 {
            for b in 0..40u64 {
                let w = Weights::proportional(&BTreeMap::from([
                    (c("x"), a),
                    (c("y"), b),
                    (c("z"), a * b % 7),
                ]))
                .unwrap();
                let sum: u32 = w.iter().map(|(_, w)| w.basis_points()).sum();
                assert_eq!(sum, TOTAL_WEIGHT);
            }
        }
    }

    #[test]
    fn weight_displays_as_percent() {
        assert_eq!(Weight::new(1).unwrap().to_string(), "0.01%");
        assert_eq!(Weight::new(9000).unwrap().to_string(), "90.00%");
    }
}

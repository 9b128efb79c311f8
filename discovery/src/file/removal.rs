//! The guard against a catalog edit that withdraws most services at once.
//!
//! A writer that truncates the file before writing it, a half-synced
//! ConfigMap or a bad template all look like a valid, much smaller
//! catalog. Served as is, it would withdraw those services' clusters from
//! every proxy. So a load that leaves no service, or removes more than
//! [`RemovalLimit::max_share`] of the services the last good load had, is
//! refused unless [`RemovalLimit::allow`] is set.

use std::collections::BTreeSet;

use crate::names::ServiceName;

/// How much of the catalog one load may remove.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RemovalLimit {
    /// The largest share (0.0–1.0) of the previous services one load may
    /// remove.
    pub max_share: f64,
    /// Accept any removal, an empty catalog included.
    pub allow: bool,
}

impl Default for RemovalLimit {
    fn default() -> Self {
        Self {
            max_share: 0.5,
            allow: false,
        }
    }
}

/// A load the limit refuses.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum RemovalError {
    #[error(
        "the catalog declares no services and no Kubernetes clusters; an empty catalog withdraws every service (a truncated write?). Start with --allow-mass-removal to accept it"
    )]
    Empty,
    #[error(
        "it would remove {removed} of {before} services ({share:.0} %, more than the {limit:.0} % allowed per load), e.g. {examples}; refused, the last good catalog keeps serving. Remove fewer at a time, raise --max-removed-share or start with --allow-mass-removal"
    )]
    TooMany {
        removed: usize,
        before: usize,
        share: f64,
        limit: f64,
        examples: String,
    },
}

impl RemovalLimit {
    /// Checks a load of `next` over the last good `previous` (`None` for
    /// the first load). `sources` says whether the file also names
    /// Kubernetes clusters, which supply services of their own.
    pub fn check(
        &self,
        previous: Option<&BTreeSet<ServiceName>>,
        next: &BTreeSet<ServiceName>,
        sources: bool,
    ) -> Result<(), RemovalError> {
        if self.allow {
            return Ok(());
        }
        if next.is_empty() && !sources {
            return Err(RemovalError::Empty);
        }
        let Some(previous) = previous.filter(|p| !p.is_empty()) else {
            return Ok(());
        };
        let removed: Vec<&ServiceName> = previous.difference(next).collect();
        let share = removed.len() as f64 / previous.len() as f64;
        if removed.len() == previous.len() || share > self.max_share {
            return Err(RemovalError::TooMany {
                removed: removed.len(),
                before: previous.len(),
                share: share * 100.0,
                limit: self.max_share * 100.0,
                examples: removed
                    .iter()
                    .take(3)
                    .map(|n| n.to_string())
                    .collect::<Vec<_>>()
                    .join(", "),
            });
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(list: &[&str]) -> BTreeSet<ServiceName> {
        list.iter()
            .map(|n| ServiceName::parse(n).unwrap())
            .collect()
    }

    #[test]
    fn an_empty_catalog_is_refused_unless_allowed() {
        let limit = RemovalLimit::default();
        assert_eq!(
            limit.check(None, &names(&[]), false),
            Err(RemovalError::Empty)
        );
        // Kubernetes clusters supply services: a file of only those is fine
        // on first load.
        assert_eq!(limit.check(None, &names(&[]), true), Ok(()));
        let allow = RemovalLimit {
            allow: true,
            ..limit
        };
        assert_eq!(
            allow.check(Some(&names(&["a.x"])), &names(&[]), false),
            Ok(())
        );
    }

    #[test]
    fn removing_more_than_the_share_is_refused() {
        let limit = RemovalLimit::default();
        let before = names(&["a.x", "b.x", "c.x", "d.x"]);
        // Half may go in one load; more may not, nor all.
        assert_eq!(
            limit.check(Some(&before), &names(&["a.x", "b.x"]), false),
            Ok(())
        );
        let e = limit
            .check(Some(&before), &names(&["a.x"]), false)
            .unwrap_err();
        assert!(e.to_string().contains("3 of 4 services (75 %"), "{e}");
        assert!(limit.check(Some(&before), &names(&[]), true).is_err());
        // Adding never counts.
        assert_eq!(
            limit.check(
                Some(&before),
                &names(&["a.x", "b.x", "c.x", "d.x", "e.x"]),
                false
            ),
            Ok(())
        );
        // Replacing the only service removes all of it.
        assert!(
            limit
                .check(Some(&names(&["a.x"])), &names(&["b.x"]), false)
                .is_err()
        );
    }
}

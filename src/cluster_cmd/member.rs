//! What a member cluster needs so Ferry can watch it: the objects of
//! `deploy/member/member.yaml` (one source for `kubectl apply -k
//! deploy/member` and `ferry cluster join`), and how to reach each of them
//! through the API.

use kube::api::{ApiResource, DynamicObject, GroupVersionKind};
use serde::Deserialize;

/// `deploy/member/member.yaml`, built into the binary.
const MEMBER_YAML: &str = include_str!("../../deploy/member/member.yaml");

/// The Secret of type `kubernetes.io/service-account-token` whose token
/// Ferry reads the member with.
pub const TOKEN_SECRET_TYPE: &str = "kubernetes.io/service-account-token";

/// One member object and its kind's API.
#[derive(Debug, Clone)]
pub struct MemberObject {
    pub object: DynamicObject,
    pub resource: ApiResource,
    pub namespaced: bool,
}

impl MemberObject {
    /// `Kind name` (`ClusterRole ferry-discovery`), or `Kind ns/name`.
    pub fn describe(&self) -> String {
        let name = self.object.metadata.name.clone().unwrap_or_default();
        match (&self.object.metadata.namespace, self.namespaced) {
            (Some(ns), true) => format!("{} {ns}/{name}", self.resource.kind),
            _ => format!("{} {name}", self.resource.kind),
        }
    }

    pub fn name(&self) -> &str {
        self.object.metadata.name.as_deref().unwrap_or_default()
    }

    pub fn is_token_secret(&self) -> bool {
        self.resource.kind == "Secret"
            && self.object.data.get("type").and_then(|t| t.as_str()) == Some(TOKEN_SECRET_TYPE)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum MemberYamlError {
    #[error("deploy/member/member.yaml: {0}")]
    Parse(#[from] serde_yaml_ng::Error),
    #[error("deploy/member/member.yaml: object {0} has no apiVersion or kind")]
    Untyped(usize),
    #[error("deploy/member/member.yaml: Ferry does not know how to create a {0}")]
    UnknownKind(String),
}

/// The kinds a member needs: (group, version, kind, plural, namespaced).
const KINDS: [(&str, &str, &str, &str, bool); 5] = [
    ("", "v1", "Namespace", "namespaces", false),
    ("", "v1", "ServiceAccount", "serviceaccounts", true),
    ("", "v1", "Secret", "secrets", true),
    (
        "rbac.authorization.k8s.io",
        "v1",
        "ClusterRole",
        "clusterroles",
        false,
    ),
    (
        "rbac.authorization.k8s.io",
        "v1",
        "ClusterRoleBinding",
        "clusterrolebindings",
        false,
    ),
];

/// The member objects, in the order they must be created.
pub fn member_objects() -> Result<Vec<MemberObject>, MemberYamlError> {
    let mut objects = Vec::new();
    for (i, document) in serde_yaml_ng::Deserializer::from_str(MEMBER_YAML).enumerate() {
        let object = DynamicObject::deserialize(document)?;
        let types = object.types.clone().ok_or(MemberYamlError::Untyped(i))?;
        let gvk = GroupVersionKind::try_from(&types)
            .map_err(|_| MemberYamlError::UnknownKind(types.kind.clone()))?;
        let Some((_, _, _, plural, namespaced)) = KINDS
            .iter()
            .find(|(g, v, k, _, _)| *g == gvk.group && *v == gvk.version && *k == gvk.kind)
        else {
            return Err(MemberYamlError::UnknownKind(types.kind));
        };
        objects.push(MemberObject {
            resource: ApiResource::from_gvk_with_plural(&gvk, plural),
            namespaced: *namespaced,
            object,
        });
    }
    Ok(objects)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_member_objects_are_the_ones_join_knows_how_to_make() {
        let objects = member_objects().expect("deploy/member/member.yaml parses");
        let described: Vec<String> = objects.iter().map(MemberObject::describe).collect();
        assert_eq!(
            described,
            [
                "Namespace ferry-system",
                "ServiceAccount ferry-system/ferry-reader",
                "ClusterRole ferry-discovery",
                "ClusterRoleBinding ferry-discovery",
                "Secret ferry-system/ferry-reader-token",
            ]
        );
        assert_eq!(objects.iter().filter(|o| o.is_token_secret()).count(), 1);
    }
}

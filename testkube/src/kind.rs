//! The resource types the test API server serves, with the names the REST
//! paths, API discovery, RBAC rules and error messages use for them.

/// The resource types the test API server serves.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum ResourceKind {
    /// core/v1 `Service`.
    Service,
    /// discovery.k8s.io/v1 `EndpointSlice`.
    EndpointSlice,
    /// multicluster.x-k8s.io/v1alpha1 `ServiceExport` (Multi-Cluster
    /// Services API). A custom resource: its CRD can be removed per server
    /// ([`crate::TestKube::set_service_export_crd`]).
    ServiceExport,
    /// core/v1 `Namespace` (cluster-scoped).
    Namespace,
    /// core/v1 `ServiceAccount`.
    ServiceAccount,
    /// core/v1 `Secret`.
    Secret,
    /// rbac.authorization.k8s.io/v1 `ClusterRole` (cluster-scoped).
    ClusterRole,
    /// rbac.authorization.k8s.io/v1 `ClusterRoleBinding` (cluster-scoped).
    ClusterRoleBinding,
    /// rbac.authorization.k8s.io/v1 `Role`.
    Role,
    /// rbac.authorization.k8s.io/v1 `RoleBinding`.
    RoleBinding,
    /// apps/v1 `Deployment`, with a simulated controller for its status and
    /// the `scale` subresource.
    Deployment,
    /// apps/v1 `StatefulSet`, with a simulated controller for its status and
    /// the `scale` subresource.
    StatefulSet,
    /// core/v1 `ConfigMap`.
    ConfigMap,
    /// autoscaling/v2 `HorizontalPodAutoscaler`.
    HorizontalPodAutoscaler,
    /// policy/v1 `PodDisruptionBudget`.
    PodDisruptionBudget,
}

impl ResourceKind {
    /// Every kind, in a fixed order.
    pub const ALL: [ResourceKind; 15] = [
        ResourceKind::Service,
        ResourceKind::EndpointSlice,
        ResourceKind::ServiceExport,
        ResourceKind::Namespace,
        ResourceKind::ServiceAccount,
        ResourceKind::Secret,
        ResourceKind::ClusterRole,
        ResourceKind::ClusterRoleBinding,
        ResourceKind::Role,
        ResourceKind::RoleBinding,
        ResourceKind::Deployment,
        ResourceKind::StatefulSet,
        ResourceKind::ConfigMap,
        ResourceKind::HorizontalPodAutoscaler,
        ResourceKind::PodDisruptionBudget,
    ];

    /// The object `kind` (`"Service"`, `"EndpointSlice"`, `"ClusterRole"`, ...).
    pub fn kind(self) -> &'static str {
        match self {
            ResourceKind::Service => "Service",
            ResourceKind::EndpointSlice => "EndpointSlice",
            ResourceKind::ServiceExport => "ServiceExport",
            ResourceKind::Namespace => "Namespace",
            ResourceKind::ServiceAccount => "ServiceAccount",
            ResourceKind::Secret => "Secret",
            ResourceKind::ClusterRole => "ClusterRole",
            ResourceKind::ClusterRoleBinding => "ClusterRoleBinding",
            ResourceKind::Role => "Role",
            ResourceKind::RoleBinding => "RoleBinding",
            ResourceKind::Deployment => "Deployment",
            ResourceKind::StatefulSet => "StatefulSet",
            ResourceKind::ConfigMap => "ConfigMap",
            ResourceKind::HorizontalPodAutoscaler => "HorizontalPodAutoscaler",
            ResourceKind::PodDisruptionBudget => "PodDisruptionBudget",
        }
    }

    /// The list `kind` (`"ServiceList"`, ...).
    pub fn list_kind(self) -> &'static str {
        match self {
            ResourceKind::Service => "ServiceList",
            ResourceKind::EndpointSlice => "EndpointSliceList",
            ResourceKind::ServiceExport => "ServiceExportList",
            ResourceKind::Namespace => "NamespaceList",
            ResourceKind::ServiceAccount => "ServiceAccountList",
            ResourceKind::Secret => "SecretList",
            ResourceKind::ClusterRole => "ClusterRoleList",
            ResourceKind::ClusterRoleBinding => "ClusterRoleBindingList",
            ResourceKind::Role => "RoleList",
            ResourceKind::RoleBinding => "RoleBindingList",
            ResourceKind::Deployment => "DeploymentList",
            ResourceKind::StatefulSet => "StatefulSetList",
            ResourceKind::ConfigMap => "ConfigMapList",
            ResourceKind::HorizontalPodAutoscaler => "HorizontalPodAutoscalerList",
            ResourceKind::PodDisruptionBudget => "PodDisruptionBudgetList",
        }
    }

    /// The API group (`""` for core).
    pub fn group(self) -> &'static str {
        match self {
            ResourceKind::Service
            | ResourceKind::Namespace
            | ResourceKind::ServiceAccount
            | ResourceKind::Secret
            | ResourceKind::ConfigMap => "",
            ResourceKind::Deployment | ResourceKind::StatefulSet => "apps",
            ResourceKind::HorizontalPodAutoscaler => "autoscaling",
            ResourceKind::PodDisruptionBudget => "policy",
            ResourceKind::EndpointSlice => "discovery.k8s.io",
            ResourceKind::ServiceExport => "multicluster.x-k8s.io",
            ResourceKind::ClusterRole
            | ResourceKind::ClusterRoleBinding
            | ResourceKind::Role
            | ResourceKind::RoleBinding => "rbac.authorization.k8s.io",
        }
    }

    /// The API version within the group.
    pub fn version(self) -> &'static str {
        match self {
            ResourceKind::ServiceExport => "v1alpha1",
            ResourceKind::HorizontalPodAutoscaler => "v2",
            _ => "v1",
        }
    }

    /// The `apiVersion` (`"v1"`, `"discovery.k8s.io/v1"`,
    /// `"multicluster.x-k8s.io/v1alpha1"`, `"rbac.authorization.k8s.io/v1"`,
    /// `"apps/v1"`, `"autoscaling/v2"`, `"policy/v1"`).
    pub fn api_version(self) -> &'static str {
        match self {
            ResourceKind::Service
            | ResourceKind::Namespace
            | ResourceKind::ServiceAccount
            | ResourceKind::Secret
            | ResourceKind::ConfigMap => "v1",
            ResourceKind::Deployment | ResourceKind::StatefulSet => "apps/v1",
            ResourceKind::HorizontalPodAutoscaler => "autoscaling/v2",
            ResourceKind::PodDisruptionBudget => "policy/v1",
            ResourceKind::EndpointSlice => "discovery.k8s.io/v1",
            ResourceKind::ServiceExport => "multicluster.x-k8s.io/v1alpha1",
            ResourceKind::ClusterRole
            | ResourceKind::ClusterRoleBinding
            | ResourceKind::Role
            | ResourceKind::RoleBinding => "rbac.authorization.k8s.io/v1",
        }
    }

    /// The plural resource name used in URL paths and RBAC rules.
    pub fn plural(self) -> &'static str {
        match self {
            ResourceKind::Service => "services",
            ResourceKind::EndpointSlice => "endpointslices",
            ResourceKind::ServiceExport => "serviceexports",
            ResourceKind::Namespace => "namespaces",
            ResourceKind::ServiceAccount => "serviceaccounts",
            ResourceKind::Secret => "secrets",
            ResourceKind::ClusterRole => "clusterroles",
            ResourceKind::ClusterRoleBinding => "clusterrolebindings",
            ResourceKind::Role => "roles",
            ResourceKind::RoleBinding => "rolebindings",
            ResourceKind::Deployment => "deployments",
            ResourceKind::StatefulSet => "statefulsets",
            ResourceKind::ConfigMap => "configmaps",
            ResourceKind::HorizontalPodAutoscaler => "horizontalpodautoscalers",
            ResourceKind::PodDisruptionBudget => "poddisruptionbudgets",
        }
    }

    /// The singular resource name, as API discovery reports it.
    pub fn singular(self) -> &'static str {
        match self {
            ResourceKind::Service => "service",
            ResourceKind::EndpointSlice => "endpointslice",
            ResourceKind::ServiceExport => "serviceexport",
            ResourceKind::Namespace => "namespace",
            ResourceKind::ServiceAccount => "serviceaccount",
            ResourceKind::Secret => "secret",
            ResourceKind::ClusterRole => "clusterrole",
            ResourceKind::ClusterRoleBinding => "clusterrolebinding",
            ResourceKind::Role => "role",
            ResourceKind::RoleBinding => "rolebinding",
            ResourceKind::Deployment => "deployment",
            ResourceKind::StatefulSet => "statefulset",
            ResourceKind::ConfigMap => "configmap",
            ResourceKind::HorizontalPodAutoscaler => "horizontalpodautoscaler",
            ResourceKind::PodDisruptionBudget => "poddisruptionbudget",
        }
    }

    /// The resource as the API server's error messages name it: the plural,
    /// qualified by the group outside core (`secrets`,
    /// `clusterroles.rbac.authorization.k8s.io`).
    pub fn qualified(self) -> String {
        match self.group() {
            "" => self.plural().to_owned(),
            group => format!("{}.{group}", self.plural()),
        }
    }

    /// Whether objects of the kind live in a namespace. Cluster-scoped
    /// objects (Namespaces, ClusterRoles, ClusterRoleBindings) have no
    /// `metadata.namespace` and use the namespace `""` in the Rust API.
    pub fn namespaced(self) -> bool {
        !matches!(
            self,
            ResourceKind::Namespace | ResourceKind::ClusterRole | ResourceKind::ClusterRoleBinding
        )
    }

    /// Whether the kind is a workload with replicas: its `status` is the
    /// simulated controller's, and it has the `scale` subresource.
    pub fn is_workload(self) -> bool {
        matches!(self, ResourceKind::Deployment | ResourceKind::StatefulSet)
    }

    /// Whether the server keeps `metadata.generation` for the kind (bumped
    /// by every change outside `metadata` and `status`), as for the
    /// built-in kinds with a spec and for custom resources.
    pub fn has_generation(self) -> bool {
        matches!(
            self,
            ResourceKind::Deployment
                | ResourceKind::StatefulSet
                | ResourceKind::HorizontalPodAutoscaler
                | ResourceKind::PodDisruptionBudget
                | ResourceKind::ServiceExport
        )
    }

    /// Whether the kind comes from a CRD (and so can be absent).
    pub fn is_custom(self) -> bool {
        self == ResourceKind::ServiceExport
    }

    /// Looks a kind up by its object `kind` name.
    pub fn from_kind(kind: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|k| k.kind() == kind)
    }

    /// The short name (`kubectl get svc`) or, for a kind that has none, its
    /// plural; also used in continue tokens.
    pub fn short(self) -> &'static str {
        match self {
            ResourceKind::Service => "svc",
            ResourceKind::EndpointSlice => "eps",
            ResourceKind::ServiceExport => "svcex",
            ResourceKind::Namespace => "ns",
            ResourceKind::ServiceAccount => "sa",
            ResourceKind::Deployment => "deploy",
            ResourceKind::StatefulSet => "sts",
            ResourceKind::ConfigMap => "cm",
            ResourceKind::HorizontalPodAutoscaler => "hpa",
            ResourceKind::PodDisruptionBudget => "pdb",
            other => other.plural(),
        }
    }

    /// The short names API discovery lists (none for Secrets and the RBAC
    /// kinds, as on a real server).
    pub(crate) fn short_names(self) -> Vec<&'static str> {
        match self {
            ResourceKind::Secret
            | ResourceKind::ClusterRole
            | ResourceKind::ClusterRoleBinding
            | ResourceKind::Role
            | ResourceKind::RoleBinding => Vec::new(),
            other => vec![other.short()],
        }
    }

    pub(crate) fn from_short(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|k| k.short() == s)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_unique_and_scopes_right() {
        let shorts: std::collections::BTreeSet<_> =
            ResourceKind::ALL.iter().map(|k| k.short()).collect();
        assert_eq!(shorts.len(), ResourceKind::ALL.len());
        assert!(!ResourceKind::Namespace.namespaced());
        assert!(ResourceKind::Secret.namespaced());
        assert!(ResourceKind::Role.namespaced());
        assert!(ResourceKind::RoleBinding.namespaced());
        assert!(!ResourceKind::ClusterRoleBinding.namespaced());
        assert_eq!(
            ResourceKind::RoleBinding.qualified(),
            "rolebindings.rbac.authorization.k8s.io"
        );
        assert_eq!(ResourceKind::from_kind("Role"), Some(ResourceKind::Role));
        assert_eq!(
            ResourceKind::ClusterRole.qualified(),
            "clusterroles.rbac.authorization.k8s.io"
        );
        assert_eq!(ResourceKind::Secret.qualified(), "secrets");
        assert_eq!(ResourceKind::Deployment.qualified(), "deployments.apps");
        for kind in ResourceKind::ALL {
            let expected = match kind.group() {
                "" => kind.version().to_owned(),
                group => format!("{group}/{}", kind.version()),
            };
            assert_eq!(kind.api_version(), expected, "{kind:?}");
        }
    }
}

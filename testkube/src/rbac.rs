//! Who a request is from and what it may do: the users the server
//! authenticates, the RBAC verbs of REST requests, and the RBAC authorizer
//! for service-account tokens (ClusterRoleBindings cluster-wide, and
//! RoleBindings in the request's namespace, with the rules of the Roles and
//! ClusterRoles they reference; the server's own token and client
//! certificates are cluster-admin).

use hyper::Method;
use serde_json::Value;

use crate::kind::ResourceKind;
use crate::store::Store;

/// The authenticated user of a request.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum User {
    /// The server's own bearer token: cluster-admin, named `admin`.
    Admin,
    /// A client certificate (its subject CN): cluster-admin.
    Certificate(String),
    /// A token the token controller minted: authorized by RBAC.
    ServiceAccount { namespace: String, name: String },
}

impl User {
    /// The user name as the API server reports it
    /// (`system:serviceaccount:NS:NAME` for service accounts).
    pub fn name(&self) -> String {
        match self {
            User::Admin => "admin".to_owned(),
            User::Certificate(cn) => cn.clone(),
            User::ServiceAccount { namespace, name } => {
                format!("system:serviceaccount:{namespace}:{name}")
            }
        }
    }
}

/// The RBAC verb of a resource request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Verb {
    Get,
    List,
    Watch,
    Create,
    Update,
    Patch,
    Delete,
}

impl Verb {
    /// The verb as RBAC rules name it.
    pub fn as_str(self) -> &'static str {
        match self {
            Verb::Get => "get",
            Verb::List => "list",
            Verb::Watch => "watch",
            Verb::Create => "create",
            Verb::Update => "update",
            Verb::Patch => "patch",
            Verb::Delete => "delete",
        }
    }

    /// The verb of `method` on one object (`named`) or on a collection;
    /// `None` for what the server does not serve (deletecollection, POST to
    /// an object, ...).
    pub fn of(method: &Method, named: bool, watch: bool) -> Option<Verb> {
        let verb = match (method.as_str(), named) {
            ("GET", true) => Verb::Get,
            ("GET", false) if watch => Verb::Watch,
            ("GET", false) => Verb::List,
            ("POST", false) => Verb::Create,
            ("PUT", true) => Verb::Update,
            ("PATCH", true) => Verb::Patch,
            ("DELETE", true) => Verb::Delete,
            _ => return None,
        };
        Some(verb)
    }
}

/// What a resource request asks to do.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Attributes<'a> {
    pub verb: Verb,
    pub kind: ResourceKind,
    pub namespace: Option<&'a str>,
    pub name: Option<&'a str>,
    /// The subresource (`scale`) of a request on one object's subresource.
    pub subresource: Option<&'a str>,
}

impl<'a> Attributes<'a> {
    /// The resource as RBAC rules name it: the plural, and for a
    /// subresource `plural/subresource` (`deployments/scale`).
    pub fn resource(&self) -> String {
        match self.subresource {
            Some(sub) => format!("{}/{sub}", self.kind.plural()),
            None => self.kind.plural().to_owned(),
        }
    }

    /// The namespace the request is in, `None` at the cluster scope. As on
    /// the real server, a request on one Namespace is in that namespace;
    /// lists of a namespaced kind across all namespaces are not in any.
    pub fn scope(&self) -> Option<&'a str> {
        match (self.kind, self.name) {
            (ResourceKind::Namespace, Some(name)) => Some(name),
            _ => self.namespace,
        }
    }

    /// The API server's 403 message for `user`, e.g. `services is
    /// forbidden: User "x" cannot list resource "services" in API group ""
    /// at the cluster scope`.
    pub fn forbidden_message(&self, user: &str) -> String {
        let resource = match self.name {
            Some(name) => format!("{} \"{name}\"", self.kind.qualified()),
            None => self.kind.qualified(),
        };
        let scope = match self.scope() {
            Some(ns) => format!("in the namespace \"{ns}\""),
            None => "at the cluster scope".to_owned(),
        };
        format!(
            "{resource} is forbidden: User \"{user}\" cannot {} resource \"{}\" in API group \"{}\" {scope}",
            self.verb.as_str(),
            self.resource(),
            self.kind.group(),
        )
    }
}

/// Whether RBAC in `store` grants the service account `namespace/name`
/// what `attrs` asks: a ClusterRoleBinding (its ClusterRole) anywhere, or,
/// for a request in a namespace ([`Attributes::scope`]), a RoleBinding in
/// that namespace whose `roleRef` is a Role in the same namespace or a
/// ClusterRole (granting its rules in that namespace only). Subjects match
/// by `ServiceAccount` (name and namespace), `User`
/// (`system:serviceaccount:NS:NAME`) or `Group` (`system:serviceaccounts`,
/// `system:serviceaccounts:NS`, `system:authenticated`); rules by
/// `apiGroups`, `resources` and `verbs` (`*` matches all; a subresource
/// request needs `plural/subresource` or `*/subresource` in `resources`)
/// and, when present, `resourceNames` (requests on a named object only).
/// `nonResourceURLs` rules grant nothing here. A binding whose role does
/// not exist grants nothing.
pub(crate) fn allows(store: &Store, namespace: &str, name: &str, attrs: &Attributes<'_>) -> bool {
    let user = User::ServiceAccount {
        namespace: namespace.to_owned(),
        name: name.to_owned(),
    }
    .name();
    let grants = |role: Value| {
        role.get("rules")
            .and_then(Value::as_array)
            .is_some_and(|rules| rules.iter().any(|rule| rule_allows(rule, attrs)))
    };
    let cluster_wide = store
        .objects(ResourceKind::ClusterRoleBinding)
        .filter(|binding| binds(binding, namespace, name, &user))
        .filter_map(|binding| bound_role(store, binding, None))
        .any(grants);
    if cluster_wide {
        return true;
    }
    let Some(scope) = attrs.scope() else {
        return false;
    };
    store
        .objects(ResourceKind::RoleBinding)
        .filter(|binding| {
            binding
                .pointer("/metadata/namespace")
                .and_then(Value::as_str)
                == Some(scope)
        })
        .filter(|binding| binds(binding, namespace, name, &user))
        .filter_map(|binding| bound_role(store, binding, Some(scope)))
        .any(grants)
}

fn binds(binding: &Value, namespace: &str, name: &str, user: &str) -> bool {
    let Some(subjects) = binding.get("subjects").and_then(Value::as_array) else {
        return false;
    };
    subjects.iter().any(|s| match str_of(s, "kind") {
        "ServiceAccount" => str_of(s, "name") == name && str_of(s, "namespace") == namespace,
        "User" => str_of(s, "name") == user,
        "Group" => {
            let group = str_of(s, "name");
            group == "system:serviceaccounts"
                || group == "system:authenticated"
                || group.strip_prefix("system:serviceaccounts:") == Some(namespace)
        }
        _ => false,
    })
}

fn str_of<'a>(subject: &'a Value, field: &str) -> &'a str {
    subject
        .get(field)
        .and_then(Value::as_str)
        .unwrap_or_default()
}

/// The role a binding references: a ClusterRole, or for a RoleBinding in
/// `binding_namespace`, a Role in that namespace (a ClusterRoleBinding
/// cannot reference a Role).
fn bound_role(store: &Store, binding: &Value, binding_namespace: Option<&str>) -> Option<Value> {
    let role_ref = binding.get("roleRef")?;
    let role = role_ref.get("name").and_then(Value::as_str)?;
    match (
        role_ref.get("kind").and_then(Value::as_str)?,
        binding_namespace,
    ) {
        ("ClusterRole", _) => store.get(ResourceKind::ClusterRole, "", role),
        ("Role", Some(ns)) => store.get(ResourceKind::Role, ns, role),
        _ => None,
    }
}

fn rule_allows(rule: &Value, attrs: &Attributes<'_>) -> bool {
    let names_ok = match rule.get("resourceNames").and_then(Value::as_array) {
        Some(names) if !names.is_empty() => attrs
            .name
            .is_some_and(|n| names.iter().any(|v| v.as_str() == Some(n))),
        _ => true,
    };
    names_ok
        && lists(rule, "verbs", attrs.verb.as_str())
        && lists(rule, "apiGroups", attrs.kind.group())
        && lists_resource(rule, attrs)
}

/// Whether `rule.resources` holds the request's resource, `*`, or for a
/// subresource `*/subresource`.
fn lists_resource(rule: &Value, attrs: &Attributes<'_>) -> bool {
    let resource = attrs.resource();
    let any_parent = attrs.subresource.map(|sub| format!("*/{sub}"));
    rule.get("resources")
        .and_then(Value::as_array)
        .is_some_and(|items| {
            items
                .iter()
                .filter_map(Value::as_str)
                .any(|v| v == "*" || v == resource || any_parent.as_deref() == Some(v))
        })
}

/// Whether `rule[field]` holds `want` or `*`.
fn lists(rule: &Value, field: &str, want: &str) -> bool {
    rule.get(field)
        .and_then(Value::as_array)
        .is_some_and(|items| {
            items
                .iter()
                .filter_map(Value::as_str)
                .any(|v| v == "*" || v == want)
        })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn attrs(verb: Verb, kind: ResourceKind, name: Option<&str>) -> Attributes<'_> {
        Attributes {
            verb,
            kind,
            namespace: None,
            name,
            subresource: None,
        }
    }

    #[test]
    fn rules_match_with_wildcards_and_resource_names() {
        let rule = json!({"apiGroups": [""], "resources": ["services"], "verbs": ["get", "list"]});
        assert!(rule_allows(
            &rule,
            &attrs(Verb::List, ResourceKind::Service, None)
        ));
        assert!(!rule_allows(
            &rule,
            &attrs(Verb::Watch, ResourceKind::Service, None)
        ));
        assert!(!rule_allows(
            &rule,
            &attrs(Verb::List, ResourceKind::Secret, None)
        ));
        let all = json!({"apiGroups": ["*"], "resources": ["*"], "verbs": ["*"]});
        assert!(rule_allows(
            &all,
            &attrs(Verb::Delete, ResourceKind::ClusterRole, None)
        ));
        let named = json!({"apiGroups": [""], "resources": ["secrets"], "verbs": ["get"], "resourceNames": ["a"]});
        assert!(rule_allows(
            &named,
            &attrs(Verb::Get, ResourceKind::Secret, Some("a"))
        ));
        assert!(!rule_allows(
            &named,
            &attrs(Verb::Get, ResourceKind::Secret, Some("b"))
        ));
        assert!(!rule_allows(
            &named,
            &attrs(Verb::Get, ResourceKind::Secret, None)
        ));
    }

    fn store_with(objects: &[(ResourceKind, Value)]) -> Store {
        let mut store = Store::new(100, tokio::sync::broadcast::channel(16).0, String::new());
        for (kind, object) in objects {
            store.apply(*kind, object.clone()).unwrap();
        }
        store
    }

    fn secrets_rule() -> Value {
        json!([{"apiGroups": [""], "resources": ["secrets"], "verbs": ["list"]}])
    }

    fn binding(kind: &str, ns: Option<&str>, role_kind: &str, role: &str) -> Value {
        let mut metadata = json!({"name": "b"});
        if let Some(ns) = ns {
            metadata["namespace"] = ns.into();
        }
        json!({
            "kind": kind,
            "metadata": metadata,
            "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": role_kind, "name": role},
            "subjects": [{"kind": "ServiceAccount", "name": "sa", "namespace": "home"}],
        })
    }

    fn list_secrets(namespace: Option<&str>) -> Attributes<'_> {
        Attributes {
            namespace,
            ..attrs(Verb::List, ResourceKind::Secret, None)
        }
    }

    #[test]
    fn role_bindings_grant_in_their_namespace_only() {
        let role = json!({"metadata": {"name": "r", "namespace": "a"}, "rules": secrets_rule()});
        let cluster_role = json!({"metadata": {"name": "cr"}, "rules": secrets_rule()});
        // A RoleBinding to a Role in its namespace.
        let store = store_with(&[
            (ResourceKind::Role, role.clone()),
            (
                ResourceKind::RoleBinding,
                binding("RoleBinding", Some("a"), "Role", "r"),
            ),
        ]);
        assert!(allows(&store, "home", "sa", &list_secrets(Some("a"))));
        assert!(!allows(&store, "home", "sa", &list_secrets(Some("b"))));
        assert!(!allows(&store, "home", "sa", &list_secrets(None)));
        assert!(!allows(&store, "home", "other", &list_secrets(Some("a"))));
        // A RoleBinding to a Role of another namespace grants nothing.
        let store = store_with(&[
            (ResourceKind::Role, role),
            (
                ResourceKind::RoleBinding,
                binding("RoleBinding", Some("b"), "Role", "r"),
            ),
        ]);
        assert!(!allows(&store, "home", "sa", &list_secrets(Some("a"))));
        assert!(!allows(&store, "home", "sa", &list_secrets(Some("b"))));
        // A RoleBinding to a ClusterRole: the ClusterRole's rules, in the
        // binding's namespace.
        let store = store_with(&[
            (ResourceKind::ClusterRole, cluster_role.clone()),
            (
                ResourceKind::RoleBinding,
                binding("RoleBinding", Some("a"), "ClusterRole", "cr"),
            ),
        ]);
        assert!(allows(&store, "home", "sa", &list_secrets(Some("a"))));
        assert!(!allows(&store, "home", "sa", &list_secrets(Some("b"))));
        assert!(!allows(&store, "home", "sa", &list_secrets(None)));
        // A ClusterRoleBinding: everywhere, the cluster scope included.
        let store = store_with(&[
            (ResourceKind::ClusterRole, cluster_role),
            (
                ResourceKind::ClusterRoleBinding,
                binding("ClusterRoleBinding", None, "ClusterRole", "cr"),
            ),
        ]);
        assert!(allows(&store, "home", "sa", &list_secrets(Some("b"))));
        assert!(allows(&store, "home", "sa", &list_secrets(None)));
    }

    #[test]
    fn a_request_on_one_namespace_is_in_that_namespace() {
        let role = json!({"metadata": {"name": "r", "namespace": "a"},
            "rules": [{"apiGroups": [""], "resources": ["namespaces"], "verbs": ["get"]}]});
        let store = store_with(&[
            (ResourceKind::Role, role),
            (
                ResourceKind::RoleBinding,
                binding("RoleBinding", Some("a"), "Role", "r"),
            ),
        ]);
        let get = |name| attrs(Verb::Get, ResourceKind::Namespace, Some(name));
        assert!(allows(&store, "home", "sa", &get("a")));
        assert!(!allows(&store, "home", "sa", &get("b")));
    }

    #[test]
    fn forbidden_messages_read_like_the_api_server() {
        let a = attrs(Verb::List, ResourceKind::Service, None);
        assert_eq!(
            a.forbidden_message("system:serviceaccount:ferry-system:ferry-reader"),
            "services is forbidden: User \"system:serviceaccount:ferry-system:ferry-reader\" cannot list resource \"services\" in API group \"\" at the cluster scope"
        );
        let b = Attributes {
            verb: Verb::Create,
            kind: ResourceKind::ClusterRoleBinding,
            namespace: None,
            name: None,
            subresource: None,
        };
        assert!(
            b.forbidden_message("admin")
                .starts_with("clusterrolebindings.rbac.authorization.k8s.io is forbidden")
        );
        let c = Attributes {
            namespace: Some("x"),
            name: Some("s"),
            ..attrs(Verb::Get, ResourceKind::Secret, None)
        };
        assert!(c.forbidden_message("u").ends_with("in the namespace \"x\""));
        let d = Attributes {
            verb: Verb::Patch,
            kind: ResourceKind::Deployment,
            namespace: Some("shop"),
            name: Some("web"),
            subresource: Some("scale"),
        };
        assert_eq!(
            d.forbidden_message("u"),
            "deployments.apps \"web\" is forbidden: User \"u\" cannot patch resource \"deployments/scale\" in API group \"apps\" in the namespace \"shop\""
        );
    }

    #[test]
    fn subresources_need_their_own_rules() {
        let scale = Attributes {
            subresource: Some("scale"),
            ..attrs(Verb::Patch, ResourceKind::Deployment, Some("web"))
        };
        let deployment = attrs(Verb::Patch, ResourceKind::Deployment, Some("web"));
        let rule = |resources: Value| json!({"apiGroups": ["apps"], "resources": resources, "verbs": ["patch"]});
        let parent = rule(json!(["deployments"]));
        assert!(rule_allows(&parent, &deployment));
        assert!(!rule_allows(&parent, &scale));
        let sub = rule(json!(["deployments/scale"]));
        assert!(rule_allows(&sub, &scale));
        assert!(!rule_allows(&sub, &deployment));
        assert!(rule_allows(&rule(json!(["*/scale"])), &scale));
        assert!(rule_allows(&rule(json!(["*"])), &scale));
        assert!(!rule_allows(&rule(json!(["statefulsets/scale"])), &scale));
    }
}

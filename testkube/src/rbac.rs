//! Who a request is from and what it may do: the users the server
//! authenticates, the RBAC verbs of REST requests, and the RBAC authorizer
//! for service-account tokens (ClusterRoleBindings and their ClusterRoles'
//! rules; the server's own token and client certificates are
//! cluster-admin).

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
}

impl Attributes<'_> {
    /// The API server's 403 message for `user`, e.g. `services is
    /// forbidden: User "x" cannot list resource "services" in API group ""
    /// at the cluster scope`.
    pub fn forbidden_message(&self, user: &str) -> String {
        let resource = match self.name {
            Some(name) => format!("{} \"{name}\"", self.kind.qualified()),
            None => self.kind.qualified(),
        };
        // As the real server, a request on a Namespace is in that namespace.
        let namespace = match (self.kind, self.name) {
            (ResourceKind::Namespace, Some(name)) => Some(name),
            _ => self.namespace,
        };
        let scope = match namespace {
            Some(ns) => format!("in the namespace \"{ns}\""),
            None => "at the cluster scope".to_owned(),
        };
        format!(
            "{resource} is forbidden: User \"{user}\" cannot {} resource \"{}\" in API group \"{}\" {scope}",
            self.verb.as_str(),
            self.kind.plural(),
            self.kind.group(),
        )
    }
}

/// Whether the ClusterRoleBindings in `store` grant the service account
/// `namespace/name` what `attrs` asks. Subjects match by `ServiceAccount`
/// (name and namespace), `User` (`system:serviceaccount:NS:NAME`) or
/// `Group` (`system:serviceaccounts`, `system:serviceaccounts:NS`,
/// `system:authenticated`); rules by `apiGroups`, `resources` and `verbs`
/// (`*` matches all) and, when present, `resourceNames` (requests on a
/// named object only). `nonResourceURLs` rules grant nothing here.
pub(crate) fn allows(store: &Store, namespace: &str, name: &str, attrs: &Attributes<'_>) -> bool {
    let user = User::ServiceAccount {
        namespace: namespace.to_owned(),
        name: name.to_owned(),
    }
    .name();
    store
        .objects(ResourceKind::ClusterRoleBinding)
        .filter(|binding| binds(binding, namespace, name, &user))
        .filter_map(|binding| bound_role(store, binding))
        .any(|role| {
            role.get("rules")
                .and_then(Value::as_array)
                .is_some_and(|rules| rules.iter().any(|rule| rule_allows(rule, attrs)))
        })
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

fn bound_role(store: &Store, binding: &Value) -> Option<Value> {
    let role_ref = binding.get("roleRef")?;
    if role_ref.get("kind").and_then(Value::as_str) != Some("ClusterRole") {
        return None;
    }
    let role = role_ref.get("name").and_then(Value::as_str)?;
    store.get(ResourceKind::ClusterRole, "", role)
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
        && lists(rule, "resources", attrs.kind.plural())
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
    }
}

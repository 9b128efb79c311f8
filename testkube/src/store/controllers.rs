//! The simulated controllers: the service-account token controller, the
//! workload controller of Deployments and StatefulSets, and Service
//! cluster IP allocation.

use super::*;

impl Store {
    /// The controllers: after a write of a Secret or a ServiceAccount, the
    /// token controller fills (or revokes) the tokens concerned; after a
    /// write of a workload, the workload controller updates its status.
    pub(super) fn reconcile(&mut self, kind: ResourceKind, key: &Key) {
        match kind {
            ResourceKind::Deployment | ResourceKind::StatefulSet => {
                self.reconcile_workload(kind, key);
            }
            ResourceKind::Secret => self.reconcile_token(key),
            ResourceKind::ServiceAccount => {
                let secrets = self.keys_where(ResourceKind::Secret, |k, secret| {
                    k.0 == key.0 && token_service_account(secret) == Some(key.1.as_str())
                });
                for secret in secrets {
                    self.reconcile_token(&secret);
                }
            }
            _ => {}
        }
    }

    /// The token controller for one Secret: a service-account token Secret
    /// whose ServiceAccount exists gets a token (kept while the Secret
    /// exists), the CA and its namespace in `data`; any other Secret has no
    /// token.
    pub(super) fn reconcile_token(&mut self, key: &Key) {
        let Some(secret) = self.get_key(ResourceKind::Secret, key) else {
            self.minted.remove(key);
            return;
        };
        let Some(sa_name) = token_service_account(secret).map(str::to_owned) else {
            self.minted.remove(key);
            return;
        };
        let sa_key = (key.0.clone(), sa_name.clone());
        let Some(sa_uid) = self
            .get_key(ResourceKind::ServiceAccount, &sa_key)
            .map(|sa| sa.pointer("/metadata/uid").cloned().unwrap_or(Value::Null))
        else {
            self.minted.remove(key);
            return;
        };
        let mut filled = secret.clone();
        let token = match self.minted.get(key) {
            Some(m) if m.service_account == sa_name => m.token.clone(),
            _ => {
                let token = random_hex(32);
                self.minted.insert(
                    key.clone(),
                    Minted {
                        service_account: sa_name,
                        token: token.clone(),
                    },
                );
                token
            }
        };
        let b64 = |s: &str| Value::String(STANDARD.encode(s.as_bytes()));
        if let Some(obj) = filled.as_object_mut() {
            let data = object_entry(obj, "data");
            data.insert("token".into(), b64(&token));
            data.insert("ca.crt".into(), b64(&self.ca_pem));
            data.insert("namespace".into(), b64(&key.0));
        }
        if let Some(meta) = filled.get_mut("metadata").and_then(Value::as_object_mut) {
            object_entry(meta, "annotations").insert(SA_UID_ANNOTATION.into(), sa_uid);
        }
        if Some(&filled) != self.get_key(ResourceKind::Secret, key) {
            let owned = json!({
                "data": {"token": "", "ca.crt": "", "namespace": ""},
                "metadata": {"annotations": {SA_UID_ANNOTATION: ""}},
            });
            let writer = Writer::update(CONTROLLER_MANAGER);
            self.write(ResourceKind::Secret, key.clone(), filled, writer, &owned);
        }
    }

    /// The workload controller for one Deployment or StatefulSet: its
    /// status reports `spec.replicas` (default 1) replicas, all of them
    /// updated, and as many ready and available as the test's limit allows
    /// ([`Store::set_available_limit`]), observed at the current
    /// generation. Writes only when the status changes.
    pub(super) fn reconcile_workload(&mut self, kind: ResourceKind, key: &Key) {
        let Some(workload) = self.get_key(kind, key) else {
            return;
        };
        let status = workload_status(kind, workload, self.available_limits.get(key).copied());
        if workload.get("status") == Some(&status) {
            return;
        }
        let mut updated = workload.clone();
        if let Some(obj) = updated.as_object_mut() {
            obj.insert("status".into(), status.clone());
        }
        let writer = Writer {
            manager: CONTROLLER_MANAGER,
            operation: Operation::Update,
            subresource: Some("status"),
        };
        let owned = json!({ "status": status });
        self.write(kind, key.clone(), updated, writer, &owned);
    }

    /// Fills in a Service's cluster IP as the API server's allocator does:
    /// kept from the request or, when the request has none, from the stored
    /// Service; otherwise a free address of 10.96.0.0/12 (from a cursor
    /// that starts at a random place, so two servers hand out different
    /// addresses). Headless (`None`) and `ExternalName` Services get none.
    pub(super) fn allocate_cluster_ip(&mut self, object: &mut Value, existing: Option<&Value>) {
        let Some(obj) = object.as_object_mut() else {
            return;
        };
        let spec = object_entry(obj, "spec");
        let service_type = spec
            .entry("type")
            .or_insert_with(|| "ClusterIP".into())
            .as_str()
            .unwrap_or_default()
            .to_owned();
        if service_type == "ExternalName" {
            return;
        }
        let given = |s: &Map<String, Value>| {
            s.get("clusterIP")
                .and_then(Value::as_str)
                .filter(|ip| !ip.is_empty())
                .map(str::to_owned)
        };
        let kept = existing
            .and_then(|old| old.get("spec"))
            .and_then(Value::as_object)
            .and_then(|old| given(old).map(|ip| (ip, old.get("clusterIPs").cloned())));
        let (ip, ips) = match (given(spec), kept) {
            (Some(ip), Some((old_ip, old_ips))) if ip == old_ip => (ip, old_ips),
            (Some(ip), _) => (ip, None),
            (None, Some((old_ip, old_ips))) => (old_ip, old_ips),
            (None, None) => (self.free_cluster_ip(), None),
        };
        if spec
            .get("clusterIPs")
            .and_then(Value::as_array)
            .is_none_or(Vec::is_empty)
        {
            spec.insert(
                "clusterIPs".into(),
                ips.unwrap_or_else(|| json!([ip.clone()])),
            );
        }
        spec.insert("clusterIP".into(), ip.into());
        spec.entry("ipFamilies").or_insert_with(|| json!(["IPv4"]));
        spec.entry("ipFamilyPolicy")
            .or_insert_with(|| "SingleStack".into());
        spec.entry("sessionAffinity")
            .or_insert_with(|| "None".into());
        spec.entry("internalTrafficPolicy")
            .or_insert_with(|| "Cluster".into());
    }

    /// The next cluster IP no Service uses.
    pub(super) fn free_cluster_ip(&mut self) -> String {
        let used: BTreeSet<String> = self
            .objects(ResourceKind::Service)
            .filter_map(|s| s.pointer("/spec/clusterIP").and_then(Value::as_str))
            .map(str::to_owned)
            .collect();
        loop {
            self.ip_seq = self.ip_seq.wrapping_add(1);
            let offset = (self.uid_prefix.wrapping_add(self.ip_seq.wrapping_mul(7919))) & 0xf_ffff;
            let addr = (10u32 << 24) | (96 << 16) | offset;
            let [a, b, c, d] = addr.to_be_bytes();
            if d == 0 || d == 255 {
                continue;
            }
            let ip = format!("{a}.{b}.{c}.{d}");
            if !used.contains(&ip) {
                return ip;
            }
        }
    }

    /// The ServiceAccount `(namespace, name)` a minted token authenticates,
    /// while its Secret and ServiceAccount exist.
    pub fn token_user(&self, token: &str) -> Option<(String, String)> {
        let (key, minted) = self.minted.iter().find(|(_, m)| m.token == token)?;
        self.get_key(ResourceKind::Secret, key)?;
        let sa_key = (key.0.clone(), minted.service_account.clone());
        self.get_key(ResourceKind::ServiceAccount, &sa_key)?;
        Some(sa_key)
    }

    /// The token minted for a Secret of ServiceAccount `ns/sa`, if any (the
    /// first Secret by name when it has several).
    pub fn token_for(&self, ns: &str, sa: &str) -> Option<String> {
        self.minted
            .iter()
            .find(|(k, m)| k.0 == ns && m.service_account == sa)
            .map(|(_, m)| m.token.clone())
    }
}

/// The status the workload controller reports for a Deployment or a
/// StatefulSet with `available_limit`: as the real controllers do, a
/// Deployment's zero counts are left out.
pub(super) fn workload_status(
    kind: ResourceKind,
    workload: &Value,
    available_limit: Option<i32>,
) -> Value {
    let desired = workload
        .pointer("/spec/replicas")
        .and_then(Value::as_i64)
        .and_then(|n| i32::try_from(n).ok())
        .unwrap_or(1)
        .max(0);
    let available = available_limit.map_or(desired, |l| l.clamp(0, desired));
    let generation = workload
        .pointer("/metadata/generation")
        .cloned()
        .unwrap_or_else(|| 1.into());
    let mut status = Map::new();
    status.insert("observedGeneration".into(), generation);
    if kind == ResourceKind::StatefulSet {
        status.insert("replicas".into(), desired.into());
        status.insert("availableReplicas".into(), available.into());
    }
    let counts = [
        ("replicas", desired),
        ("updatedReplicas", desired),
        ("readyReplicas", available),
        ("availableReplicas", available),
        ("currentReplicas", desired),
        ("unavailableReplicas", desired - available),
    ];
    for (field, n) in counts {
        let applies = match field {
            "currentReplicas" => kind == ResourceKind::StatefulSet,
            "unavailableReplicas" => kind == ResourceKind::Deployment,
            _ => true,
        };
        if applies && n > 0 {
            status.insert(field.into(), n.into());
        }
    }
    Value::Object(status)
}

/// The `autoscaling/v1` `Scale` of a workload: its desired replicas (left
/// out when zero, as the API server does), the replicas its status reports
/// and its selector as a label selector string.
pub(super) fn scale_of(workload: &Value) -> Value {
    let mut metadata = Map::new();
    for field in [
        "name",
        "namespace",
        "uid",
        "resourceVersion",
        "creationTimestamp",
    ] {
        if let Some(v) = workload.pointer(&format!("/metadata/{field}")) {
            metadata.insert(field.into(), v.clone());
        }
    }
    let mut spec = Map::new();
    if let Some(n) = workload
        .pointer("/spec/replicas")
        .and_then(Value::as_i64)
        .filter(|n| *n != 0)
    {
        spec.insert("replicas".into(), n.into());
    }
    let replicas = workload
        .pointer("/status/replicas")
        .and_then(Value::as_i64)
        .unwrap_or(0);
    let mut status = json!({ "replicas": replicas });
    if let Some(selector) = workload.pointer("/spec/selector") {
        status["selector"] = selector_string(selector).into();
    }
    json!({
        "kind": "Scale",
        "apiVersion": "autoscaling/v1",
        "metadata": metadata,
        "spec": spec,
        "status": status,
    })
}

/// A `LabelSelector` object as the string form (`app=web,tier in (a,b)`),
/// terms sorted by key.
pub(super) fn selector_string(selector: &Value) -> String {
    let mut terms: Vec<(String, String)> = Vec::new();
    if let Some(labels) = selector.get("matchLabels").and_then(Value::as_object) {
        for (k, v) in labels {
            terms.push((k.clone(), format!("{k}={}", v.as_str().unwrap_or_default())));
        }
    }
    for expr in selector
        .get("matchExpressions")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
    {
        let key = expr.get("key").and_then(Value::as_str).unwrap_or_default();
        let values: Vec<&str> = expr
            .get("values")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
            .filter_map(Value::as_str)
            .collect();
        let term = match expr.get("operator").and_then(Value::as_str) {
            Some("In") => format!("{key} in ({})", values.join(",")),
            Some("NotIn") => format!("{key} notin ({})", values.join(",")),
            Some("DoesNotExist") => format!("!{key}"),
            _ => key.to_owned(),
        };
        terms.push((key.to_owned(), term));
    }
    terms.sort();
    terms
        .into_iter()
        .map(|(_, t)| t)
        .collect::<Vec<_>>()
        .join(",")
}

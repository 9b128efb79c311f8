//! `--deploy kube`: Ferry copies a service's workload from its source
//! cluster to its target cluster(s) itself, with a write credential per
//! cluster (`deploy_kubeconfig` in the catalog; Ferry's own identity stays
//! read-only).
//!
//! - **Deploy** (DOUBLE_DEPLOY): the workload is the Deployment or
//!   StatefulSet whose pods the Service selects, with the ConfigMaps its
//!   pods use, its ServiceAccount, its HorizontalPodAutoscaler and the
//!   PodDisruptionBudgets that cover its pods, the Service itself and its
//!   ServiceExport; Secrets only with `copy_secrets`. Each object is
//!   stripped of what belongs to the source cluster (status, uid,
//!   resourceVersion, managedFields, clusterIPs, node ports, …), labelled
//!   `ferry.io/migration: <id>` and server-side applied (field manager
//!   `ferry`) in each target, unless the target already has an object of
//!   that name: those are never touched. The step then waits until each
//!   target's available replicas reach `min_capacity` of the source's.
//! - **Undo** (a rollback): deletes in each target only what carries the
//!   migration's label, so objects that were there before stay.
//! - **Retire** (CLEANUP, after the drain): scales the source workload to
//!   0 and keeps its objects, so a rollback stays cheap.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use ferry_discovery::ClusterName;
use ferry_discovery::kubernetes::{Access, KubernetesConfig, kube_client};
use kube::api::{
    ApiResource, DeleteParams, DynamicObject, GroupVersionKind, ListParams, Patch, PatchParams,
};
use kube::{Api, Client};
use serde_json::{Value, json};
use tokio::sync::watch;

use super::DeployError;
use crate::migration::Migration;

/// The label on every object Ferry creates in a target.
pub const MIGRATION_LABEL: &str = "ferry.io/migration";
const FIELD_MANAGER: &str = "ferry";

/// The kinds of a workload: (group, version, kind, plural).
type Kind = (&'static str, &'static str, &'static str, &'static str);
const SERVICE: Kind = ("", "v1", "Service", "services");
const CONFIG_MAP: Kind = ("", "v1", "ConfigMap", "configmaps");
const SECRET: Kind = ("", "v1", "Secret", "secrets");
const SERVICE_ACCOUNT: Kind = ("", "v1", "ServiceAccount", "serviceaccounts");
const DEPLOYMENT: Kind = ("apps", "v1", "Deployment", "deployments");
const STATEFUL_SET: Kind = ("apps", "v1", "StatefulSet", "statefulsets");
const HPA: Kind = (
    "autoscaling",
    "v2",
    "HorizontalPodAutoscaler",
    "horizontalpodautoscalers",
);
const PDB: Kind = (
    "policy",
    "v1",
    "PodDisruptionBudget",
    "poddisruptionbudgets",
);
const SERVICE_EXPORT: Kind = (
    "multicluster.x-k8s.io",
    "v1alpha1",
    "ServiceExport",
    "serviceexports",
);

/// Every kind `undo` looks in for what it created.
const COPIED: [Kind; 9] = [
    SERVICE_EXPORT,
    PDB,
    HPA,
    DEPLOYMENT,
    STATEFUL_SET,
    SERVICE,
    SERVICE_ACCOUNT,
    SECRET,
    CONFIG_MAP,
];

fn resource(kind: Kind) -> ApiResource {
    let (group, version, k, plural) = kind;
    ApiResource::from_gvk_with_plural(&GroupVersionKind::gvk(group, version, k), plural)
}

fn api(client: &Client, namespace: &str, kind: Kind) -> Api<DynamicObject> {
    Api::namespaced_with(client.clone(), namespace, &resource(kind))
}

fn fail(reason: impl Into<String>) -> DeployError {
    DeployError::Kube(reason.into())
}

/// Write access to the clusters, as the catalog names it.
#[derive(Debug, Clone)]
pub struct KubeDeployer {
    clusters: watch::Receiver<KubernetesConfig>,
}

impl KubeDeployer {
    pub fn new(clusters: watch::Receiver<KubernetesConfig>) -> Self {
        Self { clusters }
    }

    /// The clusters of `plan` without a write credential.
    pub fn missing(&self, clusters: &[ClusterName]) -> Vec<ClusterName> {
        let config = self.clusters.borrow();
        clusters
            .iter()
            .filter(|c| !config.deploy.contains_key(*c))
            .cloned()
            .collect()
    }

    async fn client(&self, cluster: &ClusterName) -> Result<Client, DeployError> {
        let access: Option<Access> = self.clusters.borrow().deploy.get(cluster).cloned();
        let access = access.ok_or_else(|| {
            fail(format!(
                "cluster {cluster} has no deploy_kubeconfig in the catalog"
            ))
        })?;
        kube_client(&access)
            .await
            .map_err(|e| fail(format!("cluster {cluster}: {e}")))
    }

    fn targets(m: &Migration) -> Vec<ClusterName> {
        m.plan.target_shares().into_iter().map(|(c, _)| c).collect()
    }

    /// Copies the workload to every target and waits for its capacity.
    pub async fn deploy(&self, m: &Migration, copy_secrets: bool) -> Result<(), DeployError> {
        let source_cluster = m
            .plan
            .from
            .first()
            .ok_or_else(|| fail("no source cluster"))?;
        let source = self.client(source_cluster).await?;
        let ns = m.plan.service.namespace();
        let workload = Workload::read(&source, ns, m.plan.service.name(), copy_secrets).await?;
        // One client per target, for the copy and the wait that follows.
        let mut targets = Vec::new();
        for target in Self::targets(m) {
            let client = self.client(&target).await?;
            targets.push((target, client));
        }
        for (target, client) in &targets {
            let mut created = Vec::new();
            for (kind, object) in &workload.objects {
                let name = object.metadata.name.clone().unwrap_or_default();
                let api = api(client, ns, *kind);
                if api
                    .get_opt(&name)
                    .await
                    .map_err(|e| fail(format!("reading {} {ns}/{name} in {target}: {e}", kind.2)))?
                    .is_some()
                {
                    tracing::info!(id = %m.id, cluster = %target, kind = kind.2, name, "already in the target; left as it is");
                    continue;
                }
                let body = copy_of(object, *kind, &m.id);
                api.patch(
                    &name,
                    &PatchParams::apply(FIELD_MANAGER).force(),
                    &Patch::Apply(&body),
                )
                .await
                .map_err(|e| fail(format!("applying {} {ns}/{name} to {target}: {e}", kind.2)))?;
                created.push(format!("{} {name}", kind.2));
            }
            tracing::info!(id = %m.id, cluster = %target, created = ?created, "workload copied");
        }
        // Capacity: each target's available replicas reach min_capacity of
        // the source's.
        let want = ((workload.available as f64) * m.plan.min_capacity).ceil() as i64;
        let mut delay = Duration::from_millis(200);
        loop {
            let mut short = Vec::new();
            for (target, client) in &targets {
                let have = available(client, ns, workload.kind, &workload.name).await?;
                if have < want.max(1) {
                    short.push(format!("{target} {have}/{}", want.max(1)));
                }
            }
            if short.is_empty() {
                return Ok(());
            }
            tracing::debug!(id = %m.id, waiting = ?short, "waiting for the targets' replicas");
            tokio::time::sleep(delay).await;
            delay = (delay * 2).min(Duration::from_secs(5));
        }
    }

    /// Deletes from every target what this migration created there.
    pub async fn undo(&self, m: &Migration) -> Result<(), DeployError> {
        let ns = m.plan.service.namespace();
        let selector = format!("{MIGRATION_LABEL}={}", m.id);
        for target in Self::targets(m) {
            let client = self.client(&target).await?;
            for kind in COPIED {
                let api = api(&client, ns, kind);
                let found = match api.list(&ListParams::default().labels(&selector)).await {
                    Ok(list) => list.items,
                    // A kind the cluster does not serve holds nothing.
                    Err(kube::Error::Api(s)) if s.code == 404 => continue,
                    Err(e) => return Err(fail(format!("listing {} in {target}: {e}", kind.3))),
                };
                for object in found {
                    let name = object.metadata.name.unwrap_or_default();
                    match api.delete(&name, &DeleteParams::default()).await {
                        Ok(_) => {
                            tracing::info!(id = %m.id, cluster = %target, kind = kind.2, name, "deleted")
                        }
                        Err(kube::Error::Api(s)) if s.code == 404 => {}
                        Err(e) => {
                            return Err(fail(format!(
                                "deleting {} {ns}/{name} in {target}: {e}",
                                kind.2
                            )));
                        }
                    }
                }
            }
        }
        Ok(())
    }

    /// Scales the source workload to 0, keeping its objects.
    pub async fn retire(&self, m: &Migration) -> Result<(), DeployError> {
        let ns = m.plan.service.namespace();
        for source in &m.plan.from {
            let client = self.client(source).await?;
            let workload = Workload::read(&client, ns, m.plan.service.name(), false).await?;
            let scale = json!({"spec": {"replicas": 0}});
            let api = api(&client, ns, workload.kind);
            api.patch_scale(
                &workload.name,
                &PatchParams::default(),
                &Patch::Merge(&scale),
            )
            .await
            .map_err(|e| {
                fail(format!(
                    "scaling {} {ns}/{} in {source} to 0: {e}",
                    workload.kind.2, workload.name
                ))
            })?;
            tracing::info!(id = %m.id, cluster = %source, kind = workload.kind.2, name = workload.name, "source scaled to 0");
        }
        Ok(())
    }
}

impl KubeDeployer {
    /// Deletes the source's copy of the workload (what [`Self::deploy`]
    /// copies), once the retention has passed.
    pub async fn delete_source(
        &self,
        m: &Migration,
        with_secrets: bool,
    ) -> Result<(), DeployError> {
        let ns = m.plan.service.namespace();
        for source in &m.plan.from {
            let client = self.client(source).await?;
            let workload =
                match Workload::read(&client, ns, m.plan.service.name(), with_secrets).await {
                    Ok(w) => w,
                    // Already gone (deleted by hand, or by an earlier attempt).
                    Err(e) if e.to_string().contains("no Service") => continue,
                    Err(e) => return Err(e),
                };
            for (kind, object) in workload.objects.iter().rev() {
                let name = object.metadata.name.clone().unwrap_or_default();
                match api(&client, ns, *kind)
                    .delete(&name, &DeleteParams::default())
                    .await
                {
                    Ok(_) => {
                        tracing::info!(id = %m.id, cluster = %source, kind = kind.2, name, "source object deleted")
                    }
                    Err(kube::Error::Api(s)) if s.code == 404 => {}
                    Err(e) => {
                        return Err(fail(format!(
                            "deleting {} {ns}/{name} in {source}: {e}",
                            kind.2
                        )));
                    }
                }
            }
        }
        Ok(())
    }
}

/// A service's workload in one cluster.
struct Workload {
    kind: Kind,
    name: String,
    /// Its available replicas.
    available: i64,
    /// Everything to copy, in the order to apply it.
    objects: Vec<(Kind, DynamicObject)>,
}

impl Workload {
    async fn read(
        client: &Client,
        ns: &str,
        service: &str,
        copy_secrets: bool,
    ) -> Result<Self, DeployError> {
        let get = |kind: Kind, name: String| {
            let api = api(client, ns, kind);
            async move {
                api.get_opt(&name)
                    .await
                    .map_err(|e| fail(format!("reading {} {ns}/{name}: {e}", kind.2)))
            }
        };
        let svc = get(SERVICE, service.to_owned())
            .await?
            .ok_or_else(|| fail(format!("no Service {ns}/{service} in the source")))?;
        let selector: BTreeMap<String, String> = svc
            .data
            .pointer("/spec/selector")
            .and_then(|s| serde_json::from_value(s.clone()).ok())
            .unwrap_or_default();
        if selector.is_empty() {
            return Err(fail(format!(
                "Service {ns}/{service} has no selector: no workload to copy"
            )));
        }
        let mut found = Vec::new();
        for kind in [DEPLOYMENT, STATEFUL_SET] {
            let list = api(client, ns, kind)
                .list(&ListParams::default())
                .await
                .map_err(|e| fail(format!("listing {} in {ns}: {e}", kind.3)))?;
            for w in list.items {
                if selects(&selector, w.data.pointer("/spec/template/metadata/labels")) {
                    found.push((kind, w));
                }
            }
        }
        let (kind, workload) = match found.len() {
            1 => found.remove(0),
            0 => {
                return Err(fail(format!(
                    "no Deployment or StatefulSet in {ns} runs the pods Service {service} selects"
                )));
            }
            _ => {
                let names: Vec<String> = found
                    .iter()
                    .map(|(k, w)| {
                        format!("{} {}", k.2, w.metadata.name.clone().unwrap_or_default())
                    })
                    .collect();
                return Err(fail(format!(
                    "Service {service} selects the pods of several workloads ({}): copy them by hand",
                    names.join(", ")
                )));
            }
        };
        let name = workload.metadata.name.clone().unwrap_or_default();
        let available = workload
            .data
            .pointer("/status/availableReplicas")
            .and_then(Value::as_i64)
            .unwrap_or(0);
        let pod = workload
            .data
            .pointer("/spec/template/spec")
            .cloned()
            .unwrap_or(Value::Null);
        let pod_labels = workload
            .data
            .pointer("/spec/template/metadata/labels")
            .cloned();
        let mut objects: Vec<(Kind, DynamicObject)> = Vec::new();
        for cm in referenced(&pod, "configMap") {
            if let Some(o) = get(CONFIG_MAP, cm).await? {
                objects.push((CONFIG_MAP, o));
            }
        }
        if copy_secrets {
            for secret in referenced(&pod, "secret") {
                if let Some(o) = get(SECRET, secret).await? {
                    objects.push((SECRET, o));
                }
            }
        }
        if let Some(sa) = pod
            .get("serviceAccountName")
            .and_then(Value::as_str)
            .filter(|sa| *sa != "default")
            && let Some(o) = get(SERVICE_ACCOUNT, sa.to_owned()).await?
        {
            objects.push((SERVICE_ACCOUNT, o));
        }
        objects.push((SERVICE, svc));
        match api(client, ns, SERVICE_EXPORT).get_opt(service).await {
            Ok(Some(export)) => objects.push((SERVICE_EXPORT, export)),
            Ok(None) | Err(kube::Error::Api(_)) => {}
            Err(e) => return Err(fail(format!("reading ServiceExport {ns}/{service}: {e}"))),
        }
        objects.push((kind, workload));
        for hpa in api(client, ns, HPA)
            .list(&ListParams::default())
            .await
            .map_err(|e| fail(format!("listing horizontalpodautoscalers in {ns}: {e}")))?
            .items
        {
            let target = hpa.data.pointer("/spec/scaleTargetRef");
            let kind_matches =
                target.and_then(|t| t.get("kind")).and_then(Value::as_str) == Some(kind.2);
            let name_matches =
                target.and_then(|t| t.get("name")).and_then(Value::as_str) == Some(name.as_str());
            if kind_matches && name_matches {
                objects.push((HPA, hpa));
            }
        }
        for pdb in api(client, ns, PDB)
            .list(&ListParams::default())
            .await
            .map_err(|e| fail(format!("listing poddisruptionbudgets in {ns}: {e}")))?
            .items
        {
            let wanted: BTreeMap<String, String> = pdb
                .data
                .pointer("/spec/selector/matchLabels")
                .and_then(|s| serde_json::from_value(s.clone()).ok())
                .unwrap_or_default();
            if !wanted.is_empty() && selects(&wanted, pod_labels.as_ref()) {
                objects.push((PDB, pdb));
            }
        }
        Ok(Self {
            kind,
            name,
            available,
            objects,
        })
    }
}

/// Whether `labels` carry every pair of `selector`.
fn selects(selector: &BTreeMap<String, String>, labels: Option<&Value>) -> bool {
    let Some(labels) = labels.and_then(Value::as_object) else {
        return false;
    };
    selector
        .iter()
        .all(|(k, v)| labels.get(k).and_then(Value::as_str) == Some(v.as_str()))
}

/// The names of the ConfigMaps (`what` = "configMap") or Secrets
/// ("secret") a pod spec uses: volumes, projected volumes, envFrom and
/// env.valueFrom, in every container and init container.
fn referenced(pod: &Value, what: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    let mut add = |v: Option<&Value>, key: &str| {
        if let Some(n) = v.and_then(|v| v.get(key)).and_then(Value::as_str) {
            names.insert(n.to_owned());
        }
    };
    let (volume_key, volume_name, ref_key, key_ref) = if what == "secret" {
        ("secret", "secretName", "secretRef", "secretKeyRef")
    } else {
        ("configMap", "name", "configMapRef", "configMapKeyRef")
    };
    for volume in pod
        .get("volumes")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
    {
        add(volume.get(volume_key), volume_name);
        for source in volume
            .pointer("/projected/sources")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
        {
            add(source.get(volume_key), "name");
        }
    }
    for list in ["containers", "initContainers"] {
        for c in pod
            .get(list)
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
        {
            for from in c
                .get("envFrom")
                .and_then(Value::as_array)
                .into_iter()
                .flatten()
            {
                add(from.get(ref_key), "name");
            }
            for env in c.get("env").and_then(Value::as_array).into_iter().flatten() {
                add(
                    env.pointer("/valueFrom").and_then(|v| v.get(key_ref)),
                    "name",
                );
            }
        }
    }
    names
}

/// `object` as it may go to another cluster: what belongs to the source
/// cluster removed, labelled with the migration.
fn copy_of(object: &DynamicObject, kind: Kind, migration: &str) -> Value {
    let (group, version, k, _) = kind;
    let api_version = if group.is_empty() {
        version.to_owned()
    } else {
        format!("{group}/{version}")
    };
    let mut labels = object.metadata.labels.clone().unwrap_or_default();
    labels.insert(MIGRATION_LABEL.to_owned(), migration.to_owned());
    let mut annotations = object.metadata.annotations.clone().unwrap_or_default();
    annotations.remove("kubectl.kubernetes.io/last-applied-configuration");
    annotations.remove("deployment.kubernetes.io/revision");
    let mut data = object.data.clone();
    if let Some(map) = data.as_object_mut() {
        map.remove("status");
    }
    match k {
        "Service" => {
            if let Some(spec) = data.get_mut("spec").and_then(Value::as_object_mut) {
                for field in [
                    "clusterIP",
                    "clusterIPs",
                    "healthCheckNodePort",
                    "loadBalancerIP",
                ] {
                    spec.remove(field);
                }
                for port in spec
                    .get_mut("ports")
                    .and_then(Value::as_array_mut)
                    .into_iter()
                    .flatten()
                {
                    if let Some(p) = port.as_object_mut() {
                        p.remove("nodePort");
                    }
                }
            }
        }
        "Secret"
            if data.get("type").and_then(Value::as_str)
                == Some("kubernetes.io/service-account-token") =>
        {
            // The target's token controller makes its own.
            if let Some(map) = data.as_object_mut() {
                map.remove("data");
            }
        }
        "ServiceAccount" => {
            if let Some(map) = data.as_object_mut() {
                map.remove("secrets");
            }
        }
        _ => {}
    }
    if let Some(spec) = data
        .pointer_mut("/spec/template/spec")
        .and_then(Value::as_object_mut)
    {
        spec.remove("nodeName");
    }
    let mut out = json!({
        "apiVersion": api_version,
        "kind": k,
        "metadata": {
            "name": object.metadata.name,
            "namespace": object.metadata.namespace,
            "labels": labels,
        },
    });
    if !annotations.is_empty() {
        out["metadata"]["annotations"] = json!(annotations);
    }
    if let (Some(out), Some(data)) = (out.as_object_mut(), data.as_object()) {
        for (key, value) in data {
            out.insert(key.clone(), value.clone());
        }
    }
    out
}

/// A workload's available replicas (0 when not reported).
async fn available(client: &Client, ns: &str, kind: Kind, name: &str) -> Result<i64, DeployError> {
    let object = api(client, ns, kind)
        .get_opt(name)
        .await
        .map_err(|e| fail(format!("reading {} {ns}/{name}: {e}", kind.2)))?;
    Ok(object
        .and_then(|o| {
            o.data
                .pointer("/status/availableReplicas")
                .and_then(Value::as_i64)
        })
        .unwrap_or(0))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_copy_leaves_the_source_clusters_fields_behind() {
        let svc: DynamicObject = serde_json::from_value(json!({
            "apiVersion": "v1", "kind": "Service",
            "metadata": {
                "name": "web", "namespace": "shop", "uid": "u-1", "resourceVersion": "42",
                "creationTimestamp": "2026-01-01T00:00:00Z",
                "managedFields": [{"manager": "kubectl"}],
                "labels": {"app": "web"},
                "annotations": {"kubectl.kubernetes.io/last-applied-configuration": "{}", "team": "a"},
            },
            "spec": {"clusterIP": "10.96.0.7", "clusterIPs": ["10.96.0.7"], "selector": {"app": "web"},
                     "ports": [{"port": 80, "nodePort": 30080}]},
            "status": {"loadBalancer": {}},
        }))
        .expect("object");
        let copy = copy_of(&svc, SERVICE, "mig-3");
        assert_eq!(copy["metadata"]["labels"]["ferry.io/migration"], "mig-3");
        assert_eq!(copy["metadata"]["labels"]["app"], "web");
        assert_eq!(copy["metadata"]["annotations"], json!({"team": "a"}));
        for gone in [
            "uid",
            "resourceVersion",
            "creationTimestamp",
            "managedFields",
        ] {
            assert!(copy["metadata"].get(gone).is_none(), "{gone}: {copy}");
        }
        assert!(copy.get("status").is_none());
        assert!(
            copy["spec"].get("clusterIP").is_none() && copy["spec"].get("clusterIPs").is_none()
        );
        assert!(copy["spec"]["ports"][0].get("nodePort").is_none());
        assert_eq!(copy["spec"]["selector"], json!({"app": "web"}));
    }

    #[test]
    fn a_pod_spec_names_the_config_maps_and_secrets_it_uses() {
        let pod = json!({
            "volumes": [
                {"name": "a", "configMap": {"name": "cm-volume"}},
                {"name": "b", "secret": {"secretName": "s-volume"}},
                {"name": "c", "projected": {"sources": [{"configMap": {"name": "cm-projected"}}, {"secret": {"name": "s-projected"}}]}},
            ],
            "containers": [{
                "envFrom": [{"configMapRef": {"name": "cm-envfrom"}}, {"secretRef": {"name": "s-envfrom"}}],
                "env": [{"name": "X", "valueFrom": {"configMapKeyRef": {"name": "cm-key", "key": "x"}}}],
            }],
            "initContainers": [{"env": [{"name": "Y", "valueFrom": {"secretKeyRef": {"name": "s-key", "key": "y"}}}]}],
        });
        assert_eq!(
            referenced(&pod, "configMap")
                .into_iter()
                .collect::<Vec<_>>(),
            ["cm-envfrom", "cm-key", "cm-projected", "cm-volume"]
        );
        assert_eq!(
            referenced(&pod, "secret").into_iter().collect::<Vec<_>>(),
            ["s-envfrom", "s-key", "s-projected", "s-volume"]
        );
    }
}

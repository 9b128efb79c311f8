//! How writes merge: resourceVersion preconditions, server-side apply's
//! merge, JSON merge patch, and the managedFields bookkeeping.

use super::*;

/// A `metadata.resourceVersion` in a write must be the stored one.
pub(super) fn check_precondition(stored: &Value, incoming: &Value) -> Result<(), WriteError> {
    let wanted = incoming
        .pointer("/metadata/resourceVersion")
        .and_then(Value::as_str)
        .filter(|rv| !rv.is_empty());
    match wanted {
        Some(rv)
            if stored
                .pointer("/metadata/resourceVersion")
                .and_then(Value::as_str)
                != Some(rv) =>
        {
            Err(WriteError::Conflict)
        }
        _ => Ok(()),
    }
}

/// The simplified server-side apply merge of `patch` into `stored` (see
/// [`Store::server_side_apply`]).
pub(super) fn apply_merge(stored: &Value, patch: &Value) -> Value {
    let mut merged = stored.clone();
    let (Some(out), Some(patch)) = (merged.as_object_mut(), patch.as_object()) else {
        return patch.clone();
    };
    for (field, value) in patch {
        match (field.as_str(), value.as_object()) {
            ("metadata", Some(meta)) => merge_metadata(object_entry(out, "metadata"), meta),
            _ => {
                out.insert(field.clone(), value.clone());
            }
        }
    }
    merged
}

pub(super) fn merge_metadata(out: &mut Map<String, Value>, patch: &Map<String, Value>) {
    for (field, value) in patch {
        match (field.as_str(), value.as_object()) {
            ("labels" | "annotations", Some(entries)) => {
                let target = object_entry(out, field);
                for (k, v) in entries {
                    if v.is_null() {
                        target.remove(k);
                    } else {
                        target.insert(k.clone(), v.clone());
                    }
                }
            }
            (f, _) if SERVER_METADATA.contains(&f) => {}
            _ => {
                out.insert(field.clone(), value.clone());
            }
        }
    }
}

/// RFC 7386 JSON merge patch.
pub(crate) fn json_merge_patch(target: &mut Value, patch: &Value) {
    let Value::Object(fields) = patch else {
        *target = patch.clone();
        return;
    };
    if !target.is_object() {
        *target = Value::Object(Map::new());
    }
    if let Some(out) = target.as_object_mut() {
        for (k, v) in fields {
            if v.is_null() {
                out.remove(k);
            } else {
                json_merge_patch(out.entry(k.clone()).or_insert(Value::Null), v);
            }
        }
    }
}

/// An object without its metadata and status: what `metadata.generation`
/// counts the changes of.
pub(super) fn desired_state(object: &Value) -> Value {
    match object.as_object() {
        Some(obj) => Value::Object(
            obj.iter()
                .filter(|(k, _)| !matches!(k.as_str(), "metadata" | "status"))
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect(),
        ),
        None => object.clone(),
    }
}

/// Records `writer`'s write in `metadata.managedFields`: one entry per
/// manager, operation and subresource (a later write of the same replaces
/// it), owning the fields of `owned` in the `FieldsV1` format (simplified:
/// lists are owned whole).
pub(super) fn record_manager(
    meta: &mut Map<String, Value>,
    kind: ResourceKind,
    writer: Writer<'_>,
    owned: &Value,
) {
    let mut entry = json!({
        "manager": writer.manager,
        "operation": writer.operation.as_str(),
        "apiVersion": kind.api_version(),
        "time": rfc3339_now(),
        "fieldsType": "FieldsV1",
        "fieldsV1": owned_fields(owned),
    });
    if let Some(sub) = writer.subresource {
        entry["subresource"] = sub.into();
    }
    let same = |e: &Value| {
        e.get("manager").and_then(Value::as_str) == Some(writer.manager)
            && e.get("operation").and_then(Value::as_str) == Some(writer.operation.as_str())
            && e.get("subresource").and_then(Value::as_str) == writer.subresource
    };
    let entries = meta
        .entry("managedFields")
        .or_insert_with(|| Value::Array(Vec::new()));
    if !entries.is_array() {
        *entries = Value::Array(Vec::new());
    }
    if let Value::Array(entries) = entries {
        match entries.iter_mut().find(|e| same(e)) {
            Some(e) => *e = entry,
            None => entries.push(entry),
        }
    }
}

/// The `fieldsV1` of what a write sent: every field but `apiVersion`,
/// `kind` and the metadata the server or the URL sets.
pub(super) fn owned_fields(owned: &Value) -> Value {
    let Some(obj) = owned.as_object() else {
        return json!({});
    };
    let mut fields = Map::new();
    for (k, v) in obj {
        match (k.as_str(), v) {
            ("apiVersion" | "kind", _) => {}
            ("metadata", Value::Object(meta)) => {
                let kept: Map<String, Value> = meta
                    .iter()
                    .filter(|(f, _)| {
                        matches!(
                            f.as_str(),
                            "labels" | "annotations" | "finalizers" | "ownerReferences"
                        )
                    })
                    .map(|(f, v)| (format!("f:{f}"), fields_v1(v)))
                    .collect();
                if !kept.is_empty() {
                    fields.insert("f:metadata".into(), Value::Object(kept));
                }
            }
            _ => {
                fields.insert(format!("f:{k}"), fields_v1(v));
            }
        }
    }
    Value::Object(fields)
}

pub(super) fn fields_v1(value: &Value) -> Value {
    match value {
        Value::Object(m) => Value::Object(
            m.iter()
                .map(|(k, v)| (format!("f:{k}"), fields_v1(v)))
                .collect(),
        ),
        _ => json!({}),
    }
}

//! Requests on one object and creates: `GET`, `POST` (create), `PUT`
//! (replace), `PATCH` (server-side apply and JSON merge patch) and `DELETE`,
//! and `GET`/`PUT`/`PATCH` of a workload's `scale` subresource, with the API
//! server's status codes and `Status` bodies.

use http_body_util::{BodyExt, Limited};
use hyper::body::{Bytes, Incoming};
use hyper::header::{CONTENT_TYPE, USER_AGENT};
use hyper::{Request, Response, StatusCode};
use serde_json::Value;

use crate::http::{Body, Query, Refusal, Shared, details, json_response, status_response};
use crate::kind::ResourceKind;
use crate::rbac::{Attributes, Verb};
use crate::store::{Operation, WriteError, json_merge_patch};

/// The largest request body accepted (the real server's limit is 3 MiB).
const MAX_BODY: usize = 3 << 20;

const APPLY_PATCH: &str = "application/apply-patch+yaml";
const MERGE_PATCH: &str = "application/merge-patch+json";

/// Serves an authorized get, create, update, patch or delete.
pub(crate) async fn object(
    shared: &Shared,
    attrs: &Attributes<'_>,
    query: &Query,
    req: Request<Incoming>,
) -> Response<Body> {
    let kind = attrs.kind;
    let ns = attrs.namespace.unwrap_or("");
    let name = attrs.name.unwrap_or("");
    if attrs.verb != Verb::Get && query.get("dryRun").is_some_and(|d| !d.is_empty()) {
        return status_response(
            400,
            "BadRequest",
            "dryRun is not supported by the test API server",
        );
    }
    if attrs.subresource.is_some() {
        return scale(shared, attrs, query, req)
            .await
            .unwrap_or_else(Refusal::into_response);
    }
    match attrs.verb {
        Verb::Get => match shared.store().get(kind, ns, name) {
            Some(obj) => json_response(StatusCode::OK, &obj),
            None => write_error(kind, name, WriteError::NotFound).into_response(),
        },
        Verb::Delete => match shared.store().remove(kind, ns, name) {
            Some(obj) => json_response(StatusCode::OK, &obj),
            None => write_error(kind, name, WriteError::NotFound).into_response(),
        },
        Verb::Create | Verb::Update | Verb::Patch => {
            let content_type = media_type(&req);
            let manager = field_manager(&req, query);
            let body = match read_body(req).await {
                Ok(body) => body,
                Err(refused) => return refused.into_response(),
            };
            let result = match attrs.verb {
                Verb::Create => create(shared, kind, ns, &content_type, &body, &manager),
                Verb::Update => update(shared, kind, ns, name, &content_type, &body, &manager),
                _ => patch(shared, kind, ns, name, &content_type, &body, &manager),
            };
            result.unwrap_or_else(Refusal::into_response)
        }
        // Lists and watches are served by the collection handler.
        Verb::List | Verb::Watch => status_response(
            405,
            "MethodNotAllowed",
            "the server does not allow this method on the requested resource",
        ),
    }
}

type Answer = Result<Response<Body>, Refusal>;

fn create(
    shared: &Shared,
    kind: ResourceKind,
    ns: &str,
    media: &str,
    body: &[u8],
    manager: &str,
) -> Answer {
    let object = parse(media, body)?;
    let name = object
        .pointer("/metadata/name")
        .and_then(Value::as_str)
        .unwrap_or_default()
        .to_owned();
    match shared.store().create(kind, ns, object, manager) {
        Ok(stored) => Ok(json_response(StatusCode::CREATED, &stored)),
        Err(e) => Err(write_error(kind, &name, e)),
    }
}

fn update(
    shared: &Shared,
    kind: ResourceKind,
    ns: &str,
    name: &str,
    media: &str,
    body: &[u8],
    manager: &str,
) -> Answer {
    let object = parse(media, body)?;
    match shared.store().replace(kind, ns, name, object, manager) {
        Ok(stored) => Ok(json_response(StatusCode::OK, &stored)),
        Err(e) => Err(write_error(kind, name, e)),
    }
}

fn patch(
    shared: &Shared,
    kind: ResourceKind,
    ns: &str,
    name: &str,
    media: &str,
    body: &[u8],
    manager: &Manager,
) -> Answer {
    match media {
        APPLY_PATCH => {
            let patch = parse_yaml(body)?;
            let manager = manager.for_apply()?;
            match shared
                .store()
                .server_side_apply(kind, ns, name, patch, manager)
            {
                Ok((stored, true)) => Ok(json_response(StatusCode::CREATED, &stored)),
                Ok((stored, false)) => Ok(json_response(StatusCode::OK, &stored)),
                Err(e) => Err(write_error(kind, name, e)),
            }
        }
        MERGE_PATCH => {
            let patch = parse_json(body)?;
            match shared.store().merge_patch(kind, ns, name, &patch, manager) {
                Ok(stored) => Ok(json_response(StatusCode::OK, &stored)),
                Err(e) => Err(write_error(kind, name, e)),
            }
        }
        _ => Err(unsupported_patch(media)),
    }
}

fn unsupported_patch(media: &str) -> Refusal {
    Refusal::new(
        415,
        "UnsupportedMediaType",
        &format!(
            "the body of the request was in an unknown format ({media}) - accepted media types include: {MERGE_PATCH}, {APPLY_PATCH}"
        ),
    )
}

/// A write's field manager: the `fieldManager` parameter or, when the
/// request has none, the start of its User-Agent (as the API server
/// does; `unknown` without one).
struct Manager {
    given: Option<String>,
    default: String,
}

impl Manager {
    /// The manager of a server-side apply, which must be given (else 400).
    fn for_apply(&self) -> Result<&str, Refusal> {
        self.given.as_deref().ok_or_else(|| {
            Refusal::new(
                400,
                "BadRequest",
                "PatchOptions.meta.k8s.io \"\" is invalid: fieldManager: Required value: is required for apply patch",
            )
        })
    }
}

impl std::ops::Deref for Manager {
    type Target = str;

    fn deref(&self) -> &str {
        self.given.as_deref().unwrap_or(&self.default)
    }
}

fn field_manager(req: &Request<Incoming>, query: &Query) -> Manager {
    let default = req
        .headers()
        .get(USER_AGENT)
        .and_then(|v| v.to_str().ok())
        .and_then(|ua| ua.split('/').next())
        .map(str::trim)
        .filter(|m| !m.is_empty())
        .unwrap_or("unknown")
        .to_owned();
    Manager {
        given: query
            .get("fieldManager")
            .filter(|m| !m.is_empty())
            .map(str::to_owned),
        default,
    }
}

/// The `scale` subresource of a Deployment or StatefulSet: `GET` answers
/// its `autoscaling/v1` `Scale`; `PUT` of a `Scale`, a JSON merge patch of
/// it or a server-side apply of one sets `spec.replicas`.
async fn scale(
    shared: &Shared,
    attrs: &Attributes<'_>,
    query: &Query,
    req: Request<Incoming>,
) -> Answer {
    let kind = attrs.kind;
    let ns = attrs.namespace.unwrap_or("");
    let name = attrs.name.unwrap_or("");
    let not_found = || write_error(kind, name, WriteError::NotFound);
    let current = shared
        .store()
        .get_scale(kind, ns, name)
        .ok_or_else(not_found)?;
    if attrs.verb == Verb::Get {
        return Ok(json_response(StatusCode::OK, &current));
    }
    let media = media_type(&req);
    let manager = field_manager(&req, query);
    let body = read_body(req).await?;
    let (scale, manager, operation) = match (attrs.verb, media.as_str()) {
        (Verb::Update, _) => (parse(&media, &body)?, &*manager, Operation::Update),
        (Verb::Patch, MERGE_PATCH) => {
            let patch = parse_json(&body)?;
            (
                merge_scale(current, &patch, name)?,
                &*manager,
                Operation::Update,
            )
        }
        (Verb::Patch, APPLY_PATCH) => {
            let patch = parse_yaml(&body)?;
            for field in ["apiVersion", "kind"] {
                if patch
                    .get(field)
                    .and_then(Value::as_str)
                    .is_none_or(str::is_empty)
                {
                    return Err(Refusal::new(
                        400,
                        "BadRequest",
                        &format!("{field} must be set in a server-side apply patch"),
                    ));
                }
            }
            let manager = manager.for_apply()?;
            (
                merge_scale(current, &patch, name)?,
                manager,
                Operation::Apply,
            )
        }
        (_, media) => return Err(unsupported_patch(media)),
    };
    check_scale(&scale, name)?;
    match shared
        .store()
        .set_scale(kind, ns, name, &scale, manager, operation)
    {
        Ok(stored) => Ok(json_response(StatusCode::OK, &stored)),
        Err(e) => Err(write_error(kind, name, e)),
    }
}

/// The current `Scale` with `patch` merged in (RFC 7386); its
/// `resourceVersion`, a precondition, only when the patch has one.
fn merge_scale(mut current: Value, patch: &Value, name: &str) -> Result<Value, Refusal> {
    check_scale(patch, name)?;
    if let Some(meta) = current.get_mut("metadata").and_then(Value::as_object_mut) {
        meta.remove("resourceVersion");
    }
    json_merge_patch(&mut current, patch);
    Ok(current)
}

/// A `Scale` body must be one (when it says what it is) and name the
/// object of the URL (when it names one).
fn check_scale(scale: &Value, name: &str) -> Result<(), Refusal> {
    let bad = |m: String| Err(Refusal::new(400, "BadRequest", &m));
    if !scale.is_object() {
        return bad("the body is not a JSON object".into());
    }
    for (field, expected) in [("kind", "Scale"), ("apiVersion", "autoscaling/v1")] {
        if let Some(given) = scale.get(field).and_then(Value::as_str)
            && !given.is_empty()
            && given != expected
        {
            return bad(format!(
                "the {field} in the data ({given}) does not match the expected {field} ({expected})"
            ));
        }
    }
    if let Some(given) = scale.pointer("/metadata/name").and_then(Value::as_str)
        && !given.is_empty()
        && given != name
    {
        return bad(format!(
            "the name of the object ({given}) does not match the name on the URL ({name})"
        ));
    }
    Ok(())
}

/// The request's media type, lower-cased, without parameters.
fn media_type(req: &Request<Incoming>) -> String {
    req.headers()
        .get(CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split(';').next())
        .unwrap_or("application/json")
        .trim()
        .to_ascii_lowercase()
}

async fn read_body(req: Request<Incoming>) -> Result<Bytes, Refusal> {
    match Limited::new(req.into_body(), MAX_BODY).collect().await {
        Ok(collected) => Ok(collected.to_bytes()),
        Err(e) if e.is::<http_body_util::LengthLimitError>() => Err(Refusal::new(
            413,
            "RequestEntityTooLarge",
            "the request body is too large",
        )),
        Err(e) => Err(Refusal::new(
            400,
            "BadRequest",
            &format!("reading the request body: {e}"),
        )),
    }
}

/// A create or replace body: YAML for a YAML media type, else JSON.
fn parse(media: &str, body: &[u8]) -> Result<Value, Refusal> {
    if media.contains("yaml") {
        parse_yaml(body)
    } else {
        parse_json(body)
    }
}

fn parse_json(body: &[u8]) -> Result<Value, Refusal> {
    serde_json::from_slice(body).map_err(|e| {
        Refusal::new(
            400,
            "BadRequest",
            &format!("the body is not valid JSON: {e}"),
        )
    })
}

/// YAML, which JSON (what kube-rs sends) is a subset of.
fn parse_yaml(body: &[u8]) -> Result<Value, Refusal> {
    serde_yaml_ng::from_slice(body).map_err(|e| {
        Refusal::new(
            400,
            "BadRequest",
            &format!("the body is not valid YAML: {e}"),
        )
    })
}

/// The API server's answer to a refused write of `kind` `name`.
pub(crate) fn write_error(kind: ResourceKind, name: &str, e: WriteError) -> Refusal {
    let resource = kind.qualified();
    let (code, reason, message) = match e {
        WriteError::NotFound => (404, "NotFound", format!("{resource} \"{name}\" not found")),
        WriteError::AlreadyExists => (
            409,
            "AlreadyExists",
            format!("{resource} \"{name}\" already exists"),
        ),
        WriteError::Conflict => (
            409,
            "Conflict",
            format!(
                "Operation cannot be fulfilled on {resource} \"{name}\": the object has been modified; please apply your changes to the latest version and try again"
            ),
        ),
        WriteError::BadRequest(m) => return Refusal::new(400, "BadRequest", &m),
        WriteError::Invalid(m) => {
            let message = format!("{} \"{name}\" is invalid: {m}", kind.kind());
            let mut details = details(kind, Some(name));
            details["kind"] = kind.kind().into();
            return Refusal::new(422, "Invalid", &message).with_details(details);
        }
    };
    Refusal::new(code, reason, &message).with_details(details(kind, Some(name)))
}

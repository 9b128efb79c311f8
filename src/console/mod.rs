//! The read-only web console on the admin address: `/` serves the page,
//! `/console/events` pushes the console's state ([`state::ConsoleState`],
//! JSON) about once a second as server-sent events, `/console/state`
//! answers it once. The page, its script and style, and uPlot (vendored,
//! MIT) are compiled into the binary: it works offline.
//!
//! With `--api-auth`, the page, the events and the state need a token of
//! the auth file (any role), as `Authorization: Bearer <token>` or, since
//! a browser's EventSource cannot set headers, `?token=<token>`. The
//! static files (script, style, chart library) hold no state and are
//! served to anyone.

pub mod state;

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::{Query, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use ferry_migrate::auth::AuthConfig;
use futures::{Stream, StreamExt};
use serde::Deserialize;
use tokio::sync::{Semaphore, watch};
use tokio_stream::wrappers::WatchStream;
use tokio_util::sync::CancellationToken;

use crate::admin::AdminState;

/// Event streams open at once; more are refused with 503.
const MAX_STREAMS: usize = 64;

/// How often the state is rebuilt while anyone watches.
const PERIOD: Duration = Duration::from_secs(1);

const INDEX_HTML: &str = include_str!("assets/index.html");
const APP_JS: &str = include_str!("assets/console.js");
const APP_CSS: &str = include_str!("assets/console.css");
const UPLOT_JS: &str = include_str!("vendor/uPlot.iife.min.js");
const UPLOT_CSS: &str = include_str!("vendor/uPlot.min.css");
const UPLOT_LICENSE: &str = include_str!("vendor/uPlot.LICENSE");

/// The console's shared parts: who may look, and the latest state.
#[derive(Clone)]
pub struct Console {
    auth: Option<Arc<AuthConfig>>,
    latest: watch::Sender<Arc<str>>,
    streams: Arc<Semaphore>,
}

impl Console {
    /// A console for the identities of `auth` (`None`: open to anyone
    /// who reaches the admin address).
    pub fn new(auth: Option<Arc<AuthConfig>>) -> Self {
        Self {
            auth,
            latest: watch::Sender::new(Arc::from("{}")),
            streams: Arc::new(Semaphore::new(MAX_STREAMS)),
        }
    }

    fn allows(&self, headers: &HeaderMap, query: &TokenQuery) -> bool {
        let Some(auth) = &self.auth else {
            return true;
        };
        let bearer = headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "));
        bearer
            .or(query.token.as_deref())
            .is_some_and(|token| auth.token_identity(token.trim()).is_some())
    }
}

/// The console's routes, to merge into the admin router.
pub fn routes() -> axum::Router<AdminState> {
    axum::Router::new()
        .route("/", get(index))
        .route("/console/events", get(events))
        .route("/console/state", get(one_state))
        .route(
            "/console/console.js",
            get(|| async { asset(APP_JS, "text/javascript") }),
        )
        .route(
            "/console/console.css",
            get(|| async { asset(APP_CSS, "text/css") }),
        )
        .route(
            "/console/uPlot.iife.min.js",
            get(|| async { asset(UPLOT_JS, "text/javascript") }),
        )
        .route(
            "/console/uPlot.min.css",
            get(|| async { asset(UPLOT_CSS, "text/css") }),
        )
        .route(
            "/console/uPlot.LICENSE",
            get(|| async { asset(UPLOT_LICENSE, "text/plain; charset=utf-8") }),
        )
}

/// Rebuilds the state once a second while an event stream is open, and
/// publishes it to them all.
pub async fn publish(state: AdminState, shutdown: CancellationToken) {
    let mut tick = tokio::time::interval(PERIOD);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tick.tick() => {}
        }
        if state.console.latest.receiver_count() == 0 {
            continue;
        }
        let json = render(&state).await;
        state.console.latest.send_replace(json);
    }
}

async fn render(state: &AdminState) -> Arc<str> {
    let started = std::time::Instant::now();
    let json = match serde_json::to_string(&state::build(state).await) {
        Ok(json) => json,
        Err(e) => {
            tracing::error!(error = %e, "cannot encode the console state");
            String::from("{}")
        }
    };
    metrics::histogram!("ferry_console_state_build_seconds")
        .record(started.elapsed().as_secs_f64());
    metrics::histogram!("ferry_console_state_bytes").record(json.len() as f64);
    Arc::from(json)
}

#[derive(Debug, Deserialize)]
struct TokenQuery {
    token: Option<String>,
}

fn unauthorized() -> Response {
    (
        StatusCode::UNAUTHORIZED,
        [(header::WWW_AUTHENTICATE, "Bearer")],
        "the console needs a token of --api-auth: `Authorization: Bearer <token>` or `?token=<token>`\n",
    )
        .into_response()
}

fn asset(body: &'static str, content_type: &'static str) -> impl IntoResponse {
    (
        [
            (header::CONTENT_TYPE, content_type),
            (header::CACHE_CONTROL, "no-cache"),
            (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
        ],
        body,
    )
}

async fn index(
    State(state): State<AdminState>,
    headers: HeaderMap,
    Query(query): Query<TokenQuery>,
) -> Response {
    if !state.console.allows(&headers, &query) {
        return unauthorized();
    }
    (
        [
            (header::CONTENT_TYPE, "text/html; charset=utf-8"),
            (header::CACHE_CONTROL, "no-cache"),
            (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
            (
                header::CONTENT_SECURITY_POLICY,
                "default-src 'self'; img-src 'self' data:; frame-ancestors 'none'",
            ),
            (header::REFERRER_POLICY, "no-referrer"),
        ],
        INDEX_HTML,
    )
        .into_response()
}

async fn one_state(
    State(state): State<AdminState>,
    headers: HeaderMap,
    Query(query): Query<TokenQuery>,
) -> Response {
    if !state.console.allows(&headers, &query) {
        return unauthorized();
    }
    (
        [(header::CONTENT_TYPE, "application/json")],
        render(&state).await.to_string(),
    )
        .into_response()
}

async fn events(
    State(state): State<AdminState>,
    headers: HeaderMap,
    Query(query): Query<TokenQuery>,
) -> Response {
    if !state.console.allows(&headers, &query) {
        return unauthorized();
    }
    let Ok(permit) = state.console.streams.clone().try_acquire_owned() else {
        return (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("{MAX_STREAMS} console streams are open already\n"),
        )
            .into_response();
    };
    metrics::gauge!("ferry_console_streams").increment(1.0);
    // The first event is this moment's state; then each published one.
    let first = render(&state).await;
    let updates = WatchStream::from_changes(state.console.latest.subscribe());
    let stream = futures::stream::once(async move { first })
        .chain(updates)
        .map(move |json| {
            let _held = &permit;
            Ok::<_, Infallible>(Event::default().event("state").data(&*json))
        });
    Sse::new(Counted(Box::pin(stream)))
        .keep_alive(KeepAlive::default())
        .into_response()
}

/// An event stream counted in `ferry_console_streams` while it lives.
struct Counted<S>(std::pin::Pin<Box<S>>);

impl<S: Stream> Stream for Counted<S> {
    type Item = S::Item;

    fn poll_next(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<S::Item>> {
        self.0.as_mut().poll_next(cx)
    }
}

impl<S> Drop for Counted<S> {
    fn drop(&mut self) {
        metrics::gauge!("ferry_console_streams").decrement(1.0);
    }
}

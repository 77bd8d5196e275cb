//! The HTTP edge: routes, bounded body reading, signature check, and the JSON answers.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::{Buf, Bytes, BytesMut};
use futures::{Stream, StreamExt};
use iac_shared::events::SyncRequest;
use iac_shared::names::{PUSH_SUBJECT, SYNC_SUBJECT};
use iac_shared::ops::{metrics_reply, status_reply};
use iac_shared::rules::{ALL_SERVICES, Rules};
use iac_shared::shutdown::Shutdown;
use iac_shared::signature::{
    NONCE_HEADER, SIGNATURE_HEADER, TIMESTAMP_HEADER, nonce_key, verify, verify_timestamped,
};
use prometheus_client::registry::Registry;
use secrecy::{ExposeSecret, SecretString};
use serde_json::{Value, json};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tracing::Instrument;
use warp::http::{HeaderMap, StatusCode};
use warp::reply::Response;
use warp::{Filter, Rejection, Reply};

use crate::deployments::Deployments;
use crate::error::GatewayError;
use crate::metrics::{EndpointLabels, Metrics, RequestLabels, SubjectLabels};
use crate::store::{EventStore, Stored};
use crate::webhook::{Decision, Rerun, decide, other_repository, payload_json, serialize_within};

const EVENT_HEADER: &str = "x-github-event";
const DELIVERY_HEADER: &str = "x-github-delivery";
const MAX_DELIVERY_ID_LEN: usize = 128;

/// Largest `/sync` body: a sync request is a few hundred bytes, so anything near this is abuse.
pub const SYNC_MAX_BODY_BYTES: u64 = 64 * 1024;

/// What the handlers share.
pub struct App {
    pub secret: SecretString,
    /// The secret of `/deploy` and `/deploy/status`.
    pub deploy_secret: SecretString,
    pub branch: String,
    /// The `owner/repo` pushes must be for, when known.
    pub repository: Option<String>,
    /// The environments `/deploy` accepts.
    pub envs: Vec<String>,
    /// The subject of each environment's deployments, in the order of `envs` (made once at
    /// start: the metrics label them).
    pub deploy_subjects: Vec<&'static str>,
    /// How long a `wait: true` deployment is held.
    pub wait_timeout: Duration,
    /// How long a final deployment is answered `cached`.
    pub cache_ttl: Duration,
    /// Whether `/sync` is served.
    pub legacy_sync: bool,
    /// `GITHUB_APP_ID`: the App whose check runs a Re-run is accepted for.
    pub github_app_id: Option<u64>,
    pub deployments: Deployments,
    /// Ends held deployment requests (answered in progress) when the gateway stops.
    pub shutdown: Shutdown,
    pub rules: Rules,
    pub store: EventStore,
    pub metrics: Metrics,
    pub registry: Registry,
    pub max_body_bytes: u64,
    pub body_read_timeout: Duration,
    /// Bytes of bodies whose signature is not checked yet, shared by all connections.
    pub pending_body_bytes: Arc<Semaphore>,
}

/// An answer and the outcome it is counted under.
pub(crate) struct Answer {
    pub(crate) outcome: &'static str,
    pub(crate) status: StatusCode,
    pub(crate) body: Value,
}

impl Answer {
    pub(crate) fn ok(outcome: &'static str, body: Value) -> Self {
        Answer {
            outcome,
            status: StatusCode::OK,
            body,
        }
    }
}

/// Every route, with one `recover` turning warp's own rejections into JSON.
pub fn routes(app: Arc<App>) -> impl Filter<Extract = (Response,), Error = Infallible> + Clone {
    let with_app = {
        let app = app.clone();
        warp::any().map(move || app.clone())
    };
    let health = warp::path!("health")
        .and(warp::get())
        .map(|| status_reply(StatusCode::OK, "healthy").into_response());
    let ready = warp::path!("ready")
        .and(warp::get())
        .and(with_app.clone())
        .map(|app: Arc<App>| {
            if app.store.is_ready() && app.deployments.is_ready() {
                status_reply(StatusCode::OK, "ready").into_response()
            } else {
                status_reply(StatusCode::SERVICE_UNAVAILABLE, "not ready").into_response()
            }
        });
    let metrics = warp::path!("metrics")
        .and(warp::get())
        .and(with_app.clone())
        .map(|app: Arc<App>| metrics_reply(&app.registry).into_response());
    let webhook = warp::path!("webhook")
        .and(warp::post())
        .and(with_app.clone())
        .and(warp::header::headers_cloned())
        .and(warp::body::stream())
        .then(|app: Arc<App>, headers: HeaderMap, body| async move {
            let delivery_id = delivery_id(&headers);
            let span = tracing::info_span!(
                "webhook",
                delivery_id = delivery_id.as_deref().unwrap_or("-"),
                event_id = tracing::field::Empty,
                event = header(&headers, EVENT_HEADER).unwrap_or("-"),
            );
            let handled = handle_webhook(&app, &headers, body, delivery_id);
            answer(&app, "webhook", handled).instrument(span).await
        });
    let sync = warp::path!("sync")
        .and(warp::post())
        .and(with_app.clone())
        .and(warp::header::headers_cloned())
        .and(warp::body::stream())
        .then(|app: Arc<App>, headers: HeaderMap, body| async move {
            let span = tracing::info_span!("sync", event_id = tracing::field::Empty);
            let handled = handle_sync(&app, &headers, body);
            answer(&app, "sync", handled).instrument(span).await
        });
    let deploy = warp::path!("deploy")
        .and(warp::post())
        .and(with_app.clone())
        .and(warp::header::headers_cloned())
        .and(warp::body::stream())
        .then(|app: Arc<App>, headers: HeaderMap, body| async move {
            let span = tracing::info_span!("deploy", deployment_id = tracing::field::Empty);
            let handled = crate::deploy_http::handle_deploy(&app, &headers, body);
            answer(&app, "deploy", handled).instrument(span).await
        });
    let deploy_status = warp::path!("deploy" / "status")
        .and(warp::post())
        .and(with_app)
        .and(warp::header::headers_cloned())
        .and(warp::body::stream())
        .then(|app: Arc<App>, headers: HeaderMap, body| async move {
            let span = tracing::info_span!("deploy_status", deployment_id = tracing::field::Empty);
            let handled = crate::deploy_http::handle_status(&app, &headers, body);
            answer(&app, "deploy_status", handled)
                .instrument(span)
                .await
        });
    health
        .or(ready)
        .unify()
        .or(metrics)
        .unify()
        .or(webhook)
        .unify()
        .or(sync)
        .unify()
        .or(deploy)
        .unify()
        .or(deploy_status)
        .unify()
        .recover(handle_rejection)
        .unify()
}

/// Runs a handler, logs and counts its outcome, and turns it into a response.
async fn answer(
    app: &App,
    endpoint: &'static str,
    handled: impl Future<Output = Result<Answer, GatewayError>>,
) -> Response {
    let started = Instant::now();
    let result = handled.await;
    let outcome = match &result {
        Ok(answer) => answer.outcome,
        Err(e) => e.outcome(),
    };
    app.metrics
        .requests
        .get_or_create(&RequestLabels { endpoint, outcome })
        .inc();
    app.metrics
        .duration
        .get_or_create(&EndpointLabels { endpoint })
        .observe(started.elapsed().as_secs_f64());
    match result {
        Ok(answer) => {
            warp::reply::with_status(warp::reply::json(&answer.body), answer.status).into_response()
        }
        Err(e) => {
            if e.status().is_server_error() {
                tracing::warn!(error = %e, "request refused: event not stored");
            } else {
                tracing::info!(error = %e, status = e.status().as_u16(), "request rejected");
            }
            error_reply(e.status(), &e.to_string())
        }
    }
}

fn error_reply(status: StatusCode, message: &str) -> Response {
    warp::reply::with_status(warp::reply::json(&json!({ "error": message })), status)
        .into_response()
}

/// Warp's own rejections (no route, wrong method, ...) as JSON; no internals in a 500.
async fn handle_rejection(rejection: Rejection) -> Result<Response, Infallible> {
    let reply = if rejection.is_not_found() {
        error_reply(StatusCode::NOT_FOUND, "Not found")
    } else if rejection.find::<warp::reject::MethodNotAllowed>().is_some() {
        error_reply(StatusCode::METHOD_NOT_ALLOWED, "Method not allowed")
    } else {
        tracing::error!(?rejection, "unexpected rejection");
        error_reply(StatusCode::INTERNAL_SERVER_ERROR, "Internal server error")
    };
    Ok(reply)
}

pub(crate) fn header<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a str> {
    headers.get(name).and_then(|v| v.to_str().ok())
}

/// `X-GitHub-Delivery` as sent, `None` when absent or empty.
fn delivery_id(headers: &HeaderMap) -> Option<String> {
    headers
        .get(DELIVERY_HEADER)
        .map(|v| String::from_utf8_lossy(v.as_bytes()).trim().to_string())
        .filter(|id| !id.is_empty())
}

fn is_valid_delivery_id(id: &str) -> bool {
    id.len() <= MAX_DELIVERY_ID_LEN && id.bytes().all(|b| b.is_ascii_graphic())
}

/// Reads the body up to `max` bytes (and `max_body_bytes`) within `body_read_timeout`, then
/// checks its signature; until then its bytes count against `pending_body_bytes`.
async fn verified_body<S, B>(
    app: &App,
    headers: &HeaderMap,
    body: S,
    max: u64,
) -> Result<Bytes, GatewayError>
where
    S: Stream<Item = Result<B, warp::Error>>,
    B: Buf,
{
    let (body, _unverified) = unverified_body(app, headers, body, max).await?;
    let signature = header(headers, SIGNATURE_HEADER);
    if !verify(app.secret.expose_secret().as_bytes(), &body, signature) {
        return Err(GatewayError::InvalidSignature);
    }
    Ok(body)
}

/// The body, read as [`read_body`] does, with its share of `pending_body_bytes`.
async fn unverified_body<S, B>(
    app: &App,
    headers: &HeaderMap,
    body: S,
    max: u64,
) -> Result<(Bytes, Option<OwnedSemaphorePermit>), GatewayError>
where
    S: Stream<Item = Result<B, warp::Error>>,
    B: Buf,
{
    let content_length = header(headers, "content-length").and_then(|v| v.parse::<u64>().ok());
    read_body(
        body,
        content_length,
        max.min(app.max_body_bytes),
        app.body_read_timeout,
        &app.pending_body_bytes,
    )
    .await
}

/// Reads a body signed in the timestamped form under `secret`, checks the timestamp, nonce and
/// signature, then records the nonce: a request is accepted once, by any gateway.
pub(crate) async fn timestamped_body<S, B>(
    app: &App,
    headers: &HeaderMap,
    body: S,
    secret: &SecretString,
) -> Result<Bytes, GatewayError>
where
    S: Stream<Item = Result<B, warp::Error>>,
    B: Buf,
{
    let (body, _unverified) = unverified_body(app, headers, body, SYNC_MAX_BODY_BYTES).await?;
    let timestamp = header(headers, TIMESTAMP_HEADER);
    let nonce = header(headers, NONCE_HEADER);
    verify_timestamped(
        secret.expose_secret().as_bytes(),
        &body,
        header(headers, SIGNATURE_HEADER),
        timestamp,
        nonce,
        unix_now(),
    )?;
    let key = nonce_key(nonce.unwrap_or_default());
    if !app
        .deployments
        .record_nonce(&key, timestamp.unwrap_or_default().trim())
        .await?
    {
        return Err(GatewayError::ReplayedNonce);
    }
    Ok(body)
}

fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// The whole body, refused as soon as it is known to exceed `max` (from `Content-Length`
/// before reading anything, or while a chunked body arrives), when it arrives too slowly, or
/// when `budget` has no room for it; returned with its share of `budget`.
async fn read_body<S, B>(
    body: S,
    content_length: Option<u64>,
    max: u64,
    timeout: Duration,
    budget: &Arc<Semaphore>,
) -> Result<(Bytes, Option<OwnedSemaphorePermit>), GatewayError>
where
    S: Stream<Item = Result<B, warp::Error>>,
    B: Buf,
{
    if content_length.is_some_and(|len| len > max) {
        return Err(GatewayError::TooLarge(max));
    }
    let read = async {
        let initial = content_length.unwrap_or(0).min(1 << 20) as usize;
        let mut buf = BytesMut::with_capacity(initial);
        let mut held: Option<OwnedSemaphorePermit> = None;
        let mut body = std::pin::pin!(body);
        while let Some(chunk) = body.next().await {
            let mut chunk = chunk.map_err(|_| GatewayError::BodyRead)?;
            if (buf.len() + chunk.remaining()) as u64 > max {
                return Err(GatewayError::TooLarge(max));
            }
            let bytes = u32::try_from(chunk.remaining()).map_err(|_| GatewayError::Busy)?;
            let share = budget
                .clone()
                .try_acquire_many_owned(bytes)
                .map_err(|_| GatewayError::Busy)?;
            match &mut held {
                Some(held) => held.merge(share),
                None => held = Some(share),
            }
            while chunk.has_remaining() {
                let part = chunk.chunk();
                buf.extend_from_slice(part);
                let n = part.len();
                chunk.advance(n);
            }
        }
        Ok((buf.freeze(), held))
    };
    tokio::time::timeout(timeout, read)
        .await
        .map_err(|_| GatewayError::BodyTimeout(timeout))?
}

async fn handle_webhook<S, B>(
    app: &App,
    headers: &HeaderMap,
    body: S,
    delivery_id: Option<String>,
) -> Result<Answer, GatewayError>
where
    S: Stream<Item = Result<B, warp::Error>>,
    B: Buf,
{
    let body = verified_body(app, headers, body, u64::MAX).await?;
    let delivery_id = match delivery_id {
        Some(id) if is_valid_delivery_id(&id) => id,
        Some(_) => return Err(GatewayError::BadDelivery),
        None => uuid::Uuid::new_v4().to_string(),
    };
    tracing::Span::current().record("event_id", delivery_id.as_str());
    let json = payload_json(header(headers, "content-type"), &body)?;
    let decision = decide(
        header(headers, EVENT_HEADER),
        &json,
        &delivery_id,
        &app.branch,
        &app.rules,
    )?;
    let mut plan = match decision {
        Decision::Pong { hook_id } => {
            tracing::info!(?hook_id, "ping answered");
            return Ok(Answer::ok(
                "pong",
                json!({ "status": "pong", "hook_id": hook_id }),
            ));
        }
        Decision::IgnoredEvent { event } => {
            tracing::info!(%event, "event ignored: only push, ping, check_run and check_suite are handled");
            return Ok(Answer::ok(
                "ignored",
                json!({ "status": "ignored", "event": event }),
            ));
        }
        Decision::IgnoredPush { reason } => {
            tracing::info!(%reason, "push ignored");
            return Ok(Answer::ok(
                "ignored",
                json!({ "status": "ignored", "reason": reason }),
            ));
        }
        Decision::IgnoredCheck { reason } => {
            tracing::info!(%reason, "check event ignored");
            return Ok(Answer::ok(
                "ignored",
                json!({ "status": "ignored", "reason": reason }),
            ));
        }
        Decision::Rerun(rerun) => return store_rerun(app, *rerun, &delivery_id).await,
        Decision::Store(plan) => *plan,
    };
    if let Some(reason) = other_repository(app.repository.as_deref(), &plan.event) {
        tracing::info!(%reason, "push ignored");
        return Ok(Answer::ok(
            "ignored",
            json!({ "status": "ignored", "reason": reason }),
        ));
    }
    let payload = serialize_within(&mut plan.event, app.store.payload_limit())?;
    if plan.event.paths_truncated {
        tracing::warn!(
            kept = plan.event.paths.len(),
            "path list cut to fit a NATS message; the worker decides from git"
        );
    }
    let stored = publish(app, PUSH_SUBJECT, &delivery_id, payload).await?;
    let status = if plan.services.is_empty() {
        "no_changes"
    } else {
        "accepted"
    };
    tracing::info!(
        commit = plan.commit.as_deref().unwrap_or("branch head"),
        services = ?plan.services,
        sequence = stored.sequence,
        duplicate = stored.duplicate,
        "push stored"
    );
    let mut body = json!({
        "status": status,
        "services": plan.services,
        "commit": plan.commit,
        "event_id": delivery_id,
    });
    if stored.duplicate {
        body["duplicate"] = json!(true);
    }
    Ok(Answer::ok(status, body))
}

/// Stores a Re-run asked on one of this runner's check runs (a forced sync of its service at
/// its commit) or suites (its push again), deduplicated by the delivery id.
async fn store_rerun(app: &App, rerun: Rerun, delivery_id: &str) -> Result<Answer, GatewayError> {
    let refused = match (app.github_app_id, rerun.app_id()) {
        (None, _) => Some("GITHUB_APP_ID is not set, so no check run is this runner's".to_string()),
        (Some(ours), theirs) if theirs != Some(ours) => Some(format!(
            "the check run belongs to another GitHub App than {ours}"
        )),
        _ => match (app.repository.as_deref(), rerun.repository()) {
            (Some(expected), Some(name)) if !name.eq_ignore_ascii_case(expected) => Some(format!(
                "the check run is on {}, not {expected}",
                iac_shared::events::truncate_chars(name, 200)
            )),
            _ => None,
        },
    };
    if let Some(reason) = refused {
        tracing::info!(%reason, "re-run ignored");
        return Ok(Answer::ok(
            "ignored",
            json!({ "status": "ignored", "reason": reason }),
        ));
    }
    let (subject, payload, services, commit) = match &rerun {
        Rerun::Service { request, .. } => (
            SYNC_SUBJECT,
            serde_json::to_vec(request).expect("a SyncRequest serializes"),
            request.services.clone(),
            request.git_ref.clone(),
        ),
        Rerun::Suite { push, .. } => (
            PUSH_SUBJECT,
            serde_json::to_vec(push).expect("a PushEvent serializes"),
            Vec::new(),
            push.after.clone(),
        ),
    };
    // Re-run means "run it again": the suite's push is stored forced, as a service's sync is.
    let stored = publish_event(app, subject, delivery_id, payload, true).await?;
    tracing::info!(
        services = ?services,
        commit = commit.as_deref().unwrap_or("-"),
        sequence = stored.sequence,
        duplicate = stored.duplicate,
        "re-run stored"
    );
    let mut body = json!({
        "status": "accepted",
        "services": services,
        "commit": commit,
        "event_id": delivery_id,
    });
    if stored.duplicate {
        body["duplicate"] = json!(true);
    }
    Ok(Answer::ok("accepted", body))
}

async fn handle_sync<S, B>(app: &App, headers: &HeaderMap, body: S) -> Result<Answer, GatewayError>
where
    S: Stream<Item = Result<B, warp::Error>>,
    B: Buf,
{
    if !app.legacy_sync {
        return Err(GatewayError::SyncDisabled);
    }
    // The original's clients send the timestamped form; older scripts sign the body alone.
    let timestamped =
        header(headers, TIMESTAMP_HEADER).is_some() || header(headers, NONCE_HEADER).is_some();
    let body = if timestamped {
        timestamped_body(app, headers, body, &app.secret).await?
    } else {
        verified_body(app, headers, body, SYNC_MAX_BODY_BYTES).await?
    };
    let request = SyncRequest::parse(&body)?;
    let event_id = uuid::Uuid::new_v4().to_string();
    tracing::Span::current().record("event_id", event_id.as_str());
    let services = if request.all {
        vec![ALL_SERVICES.to_string()]
    } else {
        request.services.clone()
    };
    let payload = serde_json::to_vec(&request).expect("a SyncRequest serializes");
    let stored = publish(app, SYNC_SUBJECT, &event_id, payload).await?;
    tracing::info!(
        services = ?services,
        git_ref = request.git_ref.as_deref().unwrap_or("branch head"),
        force = request.force,
        sequence = stored.sequence,
        "sync request stored"
    );
    Ok(Answer::ok(
        "accepted",
        json!({ "status": "accepted", "services": services, "event_id": event_id }),
    ))
}

/// Publishes through the store, counting what was stored, deduplicated or refused.
pub(crate) async fn publish(
    app: &App,
    subject: &'static str,
    event_id: &str,
    payload: Vec<u8>,
) -> Result<Stored, GatewayError> {
    publish_event(app, subject, event_id, payload, false).await
}

/// [`publish`], forced when `force` (`Iac-Force`: a Re-run runs tasks that would be skipped).
async fn publish_event(
    app: &App,
    subject: &'static str,
    event_id: &str,
    payload: Vec<u8>,
    force: bool,
) -> Result<Stored, GatewayError> {
    match app
        .store
        .publish_event(subject, event_id, payload, force)
        .await
    {
        Ok(stored) => {
            app.metrics
                .published
                .get_or_create(&SubjectLabels { subject })
                .inc();
            if stored.duplicate {
                app.metrics.duplicates.inc();
            }
            Ok(stored)
        }
        Err(e) => {
            app.metrics.publish_failures.inc();
            Err(e.into())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chunks(parts: &[&'static [u8]]) -> impl Stream<Item = Result<Bytes, warp::Error>> {
        futures::stream::iter(
            parts
                .iter()
                .map(|p| Ok(Bytes::from_static(p)))
                .collect::<Vec<_>>(),
        )
    }

    fn budget(bytes: usize) -> Arc<Semaphore> {
        Arc::new(Semaphore::new(bytes))
    }

    const SECOND: Duration = Duration::from_secs(1);

    #[tokio::test]
    async fn a_body_is_refused_once_it_grows_past_the_limit() {
        let limit = 10;
        let room = budget(100);
        let ok = read_body(chunks(&[b"12345", b"67890"]), None, limit, SECOND, &room).await;
        assert_eq!(ok.unwrap().0, Bytes::from_static(b"1234567890"));
        let over = read_body(chunks(&[b"12345", b"678901"]), None, limit, SECOND, &room).await;
        assert!(matches!(over, Err(GatewayError::TooLarge(10))));
        let announced = read_body(chunks(&[]), Some(11), limit, SECOND, &room).await;
        assert!(matches!(announced, Err(GatewayError::TooLarge(10))));
    }

    #[tokio::test]
    async fn a_body_that_never_ends_times_out() {
        let endless = futures::stream::pending::<Result<Bytes, warp::Error>>();
        let read = read_body(endless, Some(5), 10, Duration::from_millis(20), &budget(10)).await;
        assert!(matches!(read, Err(GatewayError::BodyTimeout(_))));
    }

    #[tokio::test]
    async fn unverified_bodies_share_one_budget_and_give_it_back() {
        let room = budget(8);
        let (_, first) = read_body(chunks(&[b"12345"]), None, 10, SECOND, &room)
            .await
            .unwrap();
        let second = read_body(chunks(&[b"1234"]), None, 10, SECOND, &room).await;
        assert!(matches!(second, Err(GatewayError::Busy)), "{second:?}");
        assert_eq!(room.available_permits(), 3, "a refused body holds nothing");
        drop(first);
        let third = read_body(chunks(&[b"1234"]), None, 10, SECOND, &room).await;
        assert!(third.is_ok());
    }

    #[test]
    fn delivery_ids_are_short_visible_ascii() {
        assert!(is_valid_delivery_id("72d3162e-cc78-11e3-81ab-4c9367dc0958"));
        assert!(!is_valid_delivery_id(&"a".repeat(129)));
        assert!(!is_valid_delivery_id("a b"));
    }
}

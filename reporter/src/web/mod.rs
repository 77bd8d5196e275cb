//! The run pages on `WEB_PORT`: `/runs` (recent runs, behind basic auth, off without
//! `WEB_USER` and `WEB_PASSWORD`), `/runs/<id>?t=<token>` (one run's output, outcomes and
//! selection reasons, live while it runs) and `/runs/<id>/live` (its server-sent events).
//!
//! - [`links`]: the signed run links and their secret.
//! - [`runs`]: the runs and their output, read from JetStream.
//! - [`html`]: the pages (pure).

pub mod html;
pub mod links;
pub mod runs;

use std::collections::HashMap;
use std::convert::Infallible;
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_nats::jetstream;
use base64::Engine as _;
use bytes::Bytes;
use futures::StreamExt;
use iac_shared::events::{FinishedState, SyncOutcome};
use iac_shared::names::RUNLOGS_STREAM;
use iac_shared::nats::{StreamSettings, run_log_subject};
use iac_shared::shutdown::Shutdown;
use percent_encoding::percent_decode_str;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;
use secrecy::{ExposeSecret, SecretString};
use sha2::{Digest, Sha256};
use warp::Filter;
use warp::http::{Response, StatusCode};
use warp::reply::Reply;

pub use links::{LinkSigner, RunLinks};
use runs::SharedIndex;

use crate::config::WebArgs;

/// Chunks of output read ahead of what a run page has sent.
const PAGE_CHUNKS_AHEAD: usize = 4;
/// Runs on one page of `/runs`.
const PAGE_SIZE: usize = 25;
/// How often the live view checks whether its run has ended.
const LIVE_CHECK_EVERY: Duration = Duration::from_millis(500);

/// The run pages' metrics.
#[derive(Debug, Clone)]
pub struct WebMetrics {
    served: Family<Vec<(&'static str, String)>, Counter>,
    render_seconds: Histogram,
}

impl WebMetrics {
    pub fn register(registry: &mut Registry) -> Self {
        let metrics = WebMetrics {
            served: Family::default(),
            render_seconds: Histogram::new([0.005, 0.02, 0.05, 0.1, 0.3, 1.0, 3.0]),
        };
        registry.register(
            "iac_reporter_run_pages",
            "Run page requests answered, by page (list, run, live) and HTTP code",
            metrics.served.clone(),
        );
        registry.register(
            "iac_reporter_run_page_seconds",
            "Time to read a run's output and start sending its page",
            metrics.render_seconds.clone(),
        );
        metrics
    }

    fn served(&self, page: &'static str, code: StatusCode) {
        self.served
            .get_or_create(&vec![
                ("page", page.to_string()),
                ("code", code.as_u16().to_string()),
            ])
            .inc();
    }
}

/// What the pages are served from.
struct Web {
    js: jetstream::Context,
    index: SharedIndex,
    signer: LinkSigner,
    /// SHA-256 of the expected `Authorization` header, so it is compared in constant time
    /// without keeping the password in clear beside it.
    list_auth: Option<[u8; 32]>,
    metrics: WebMetrics,
}

/// The secret run links are signed with: `RUN_LINK_SECRET` or the kept one.
pub async fn link_secret(
    js: &jetstream::Context,
    settings: &StreamSettings,
    args: &WebArgs,
) -> Result<SecretString, iac_shared::nats::ProvisionError> {
    links::secret(js, settings, args.run_link_secret.as_ref()).await
}

/// Serves the run pages on `WEB_PORT` until `shutdown`; returns the bound address, `None`
/// when `WEB_PORT=0`.
pub async fn serve(
    args: &WebArgs,
    js: jetstream::Context,
    signer: LinkSigner,
    metrics: WebMetrics,
    shutdown: Shutdown,
) -> std::io::Result<Option<SocketAddr>> {
    if args.port == 0 {
        return Ok(None);
    }
    let addr = SocketAddr::from((Ipv4Addr::UNSPECIFIED, args.port));
    let listener = tokio::net::TcpListener::bind(addr).await?;
    let bound = listener.local_addr()?;
    let index = SharedIndex::default();
    tokio::spawn(runs::follow_results(
        js.clone(),
        index.clone(),
        shutdown.clone(),
    ));
    let list_auth = match (&args.user, &args.password) {
        (Some(user), Some(password)) => Some(expected_auth(user, password)),
        _ => None,
    };
    let web = Arc::new(Web {
        js,
        index,
        signer,
        list_auth,
        metrics,
    });
    let routes = warp::get()
        .and(warp::path::full())
        .and(warp::query::<HashMap<String, String>>())
        .and(warp::header::optional::<String>("authorization"))
        .then(
            move |path: warp::path::FullPath,
                  query: HashMap<String, String>,
                  auth: Option<String>| {
                let web = web.clone();
                async move { web.route(path.as_str(), &query, auth.as_deref()).await }
            },
        );
    tokio::spawn(
        warp::serve(routes)
            .incoming(listener)
            .graceful(async move { shutdown.wait().await })
            .run(),
    );
    Ok(Some(bound))
}

fn expected_auth(user: &str, password: &SecretString) -> [u8; 32] {
    let pair = format!("{user}:{}", password.expose_secret());
    let header = format!(
        "Basic {}",
        base64::engine::general_purpose::STANDARD.encode(pair)
    );
    Sha256::digest(header.as_bytes()).into()
}

type Reply_ = warp::reply::Response;

fn not_found() -> Reply_ {
    warp::reply::with_status(
        warp::reply::html("<!doctype html><title>Not found</title><h1>Not found</h1>"),
        StatusCode::NOT_FOUND,
    )
    .into_response()
}

impl Web {
    async fn route(
        &self,
        path: &str,
        query: &HashMap<String, String>,
        auth: Option<&str>,
    ) -> Reply_ {
        let parts: Vec<&str> = path.trim_matches('/').split('/').collect();
        let token = query.get("t").map(String::as_str).unwrap_or("");
        let (page, reply) = match parts.as_slice() {
            ["runs"] => ("list", self.list(query, auth)),
            ["runs", id] => match self.run_id(id, token) {
                Some(id) => ("run", self.run(&id, token).await),
                None => ("run", not_found()),
            },
            ["runs", id, "live"] => match self.run_id(id, token) {
                Some(id) => {
                    let after = query.get("after").and_then(|a| a.parse().ok()).unwrap_or(0);
                    ("live", self.live(id, after))
                }
                None => ("live", not_found()),
            },
            _ => ("other", not_found()),
        };
        self.metrics.served(page, reply.status());
        reply
    }

    /// The run id of a path segment, when `token` is its token.
    fn run_id(&self, segment: &str, token: &str) -> Option<String> {
        let id = percent_decode_str(segment).decode_utf8().ok()?;
        self.signer.verify(&id, token).then(|| id.into_owned())
    }

    fn list(&self, query: &HashMap<String, String>, auth: Option<&str>) -> Reply_ {
        let Some(expected) = &self.list_auth else {
            return not_found();
        };
        let given: [u8; 32] = Sha256::digest(auth.unwrap_or("").as_bytes()).into();
        if !constant_time_eq(&given, expected) {
            return Response::builder()
                .status(StatusCode::UNAUTHORIZED)
                .header(
                    "www-authenticate",
                    "Basic realm=\"iac-runner runs\", charset=\"UTF-8\"",
                )
                .body("Unauthorized".into())
                .unwrap_or_else(|_| not_found());
        }
        let before = query.get("before").and_then(|b| b.parse().ok());
        let (runs, more) = match self.index.read() {
            Ok(index) => index.page(before, PAGE_SIZE),
            Err(_) => (Vec::new(), false),
        };
        let older = more.then(|| runs.last().map(|r| r.seq)).flatten();
        let page = html::list_page(&runs, older, |id| self.signer.path(id));
        no_store(warp::reply::html(page).into_response())
    }

    async fn run(&self, id: &str, token: &str) -> Reply_ {
        let began = Instant::now();
        let run = self
            .index
            .read()
            .ok()
            .and_then(|index| index.get(id).cloned());
        let output = match runs::read_output(&self.js, id).await {
            Ok(output) => output,
            Err(e) => {
                tracing::warn!(error = %e, "cannot read a run's output from {RUNLOGS_STREAM}");
                runs::RunOutput::default()
            }
        };
        if run.is_none() && output.services.is_empty() {
            return not_found();
        }
        // A run the index no longer holds (past MAX_RUNS) is long over: no live view.
        let running = run.as_ref().is_some_and(|r| r.state.is_none());
        let live = running.then(|| {
            format!(
                "{}/live?t={token}&after={}",
                self.signer.path(id).split('?').next().unwrap_or_default(),
                output.last_seq
            )
        });
        let pieces = html::run_page(id, run.as_ref(), output, live.as_deref());
        self.metrics
            .render_seconds
            .observe(began.elapsed().as_secs_f64());
        let reply = warp::reply::with_header(
            warp::reply::stream(self.page_body(pieces)),
            "content-type",
            "text/html; charset=utf-8",
        );
        no_store(reply.into_response())
    }

    /// The page's bytes, its output read from JetStream a few chunks ahead of what is sent: the
    /// whole output of a run is never in memory at once. A chunk that cannot be read is
    /// replaced by a line saying so.
    fn page_body(
        &self,
        pieces: Vec<html::Piece>,
    ) -> impl futures::Stream<Item = Result<Bytes, Infallible>> + Send + Sync + 'static {
        let (sender, receiver) = tokio::sync::mpsc::channel::<Bytes>(PAGE_CHUNKS_AHEAD);
        let js = self.js.clone();
        tokio::spawn(async move {
            let stream = js.get_stream(RUNLOGS_STREAM).await.ok();
            let stream = &stream;
            let mut bytes = futures::stream::iter(pieces)
                .map(|piece| async move {
                    match (piece, stream) {
                        (html::Piece::Html(html), _) => Bytes::from(html),
                        (html::Piece::Output(seq), Some(stream)) => {
                            match runs::chunk_text(stream, seq).await {
                                Ok(text) => html::escape_output(&text),
                                Err(e) => unreadable(seq, &e),
                            }
                        }
                        (html::Piece::Output(seq), None) => unreadable(seq, &"no stream"),
                    }
                })
                .buffered(PAGE_CHUNKS_AHEAD);
            while let Some(bytes) = bytes.next().await {
                if sender.send(bytes).await.is_err() {
                    break;
                }
            }
        });
        receiver_stream(receiver).map(Ok)
    }

    /// Server-sent events: `output` for each chunk stored after `after`, then `end` with the
    /// outcomes once the run has finished and everything it printed was sent.
    fn live(&self, id: String, after: u64) -> Reply_ {
        let js = self.js.clone();
        let index = self.index.clone();
        let events = async_stream(js, index, id, after);
        warp::sse::reply(warp::sse::keep_alive().stream(events)).into_response()
    }
}

fn no_store(mut reply: Reply_) -> Reply_ {
    reply.headers_mut().insert(
        "cache-control",
        warp::http::HeaderValue::from_static("no-store"),
    );
    reply
}

fn constant_time_eq(a: &[u8; 32], b: &[u8; 32]) -> bool {
    a.iter().zip(b).fold(0u8, |diff, (x, y)| diff | (x ^ y)) == 0
}

type SseItem = Result<warp::sse::Event, Infallible>;

/// The live events of one run, as a stream fed by a task that ends with the client.
fn async_stream(
    js: jetstream::Context,
    index: SharedIndex,
    id: String,
    after: u64,
) -> impl futures::Stream<Item = SseItem> + Send + Sync + 'static {
    let (events, receiver) = tokio::sync::mpsc::channel::<warp::sse::Event>(64);
    tokio::spawn(async move {
        if let Err(e) = send_live(&js, &index, &id, after, &events).await {
            tracing::debug!(error = %e, "the live view of a run ended");
        }
    });
    receiver_stream(receiver).map(Ok)
}

/// The items sent to `receiver`, as a stream.
fn receiver_stream<T: Send + 'static>(
    mut receiver: tokio::sync::mpsc::Receiver<T>,
) -> impl futures::Stream<Item = T> + Send + Sync + 'static {
    futures::stream::poll_fn(move |cx| receiver.poll_recv(cx))
}

fn unreadable(seq: u64, error: &dyn std::fmt::Display) -> Bytes {
    tracing::warn!(seq, %error, "cannot read a chunk of task output from {RUNLOGS_STREAM}");
    Bytes::from("\n[this part of the output could not be read; reload the page]\n")
}

async fn send_live(
    js: &jetstream::Context,
    index: &SharedIndex,
    id: &str,
    after: u64,
    events: &tokio::sync::mpsc::Sender<warp::sse::Event>,
) -> Result<(), async_nats::Error> {
    let stream = js.get_stream(RUNLOGS_STREAM).await?;
    let mut chunks = runs::follow_output(&stream, &run_log_subject(id), after + 1, false).await?;
    let mut sent = after;
    let mut check = tokio::time::interval(LIVE_CHECK_EVERY);
    loop {
        tokio::select! {
            chunk = chunks.next() => {
                let Some(chunk) = chunk else { return Ok(()) };
                let chunk = chunk?;
                sent = chunk.seq;
                let event = warp::sse::Event::default()
                    .event("output")
                    .id(chunk.seq.to_string())
                    .json_data(serde_json::json!({
                        "service": chunk.service,
                        "attempt": chunk.attempt,
                        "text": String::from_utf8_lossy(&chunk.text),
                    }))?;
                if events.send(event).await.is_err() {
                    return Ok(());
                }
            }
            _ = check.tick() => {
                if events.is_closed() {
                    return Ok(());
                }
                let finished = index.read().ok().and_then(|i| i.get(id).cloned()).filter(|r| r.state.is_some());
                let Some(run) = finished else { continue };
                if runs::last_output_seq(&stream, id).await? > sent {
                    continue;
                }
                let _ = events.send(end_event(&run)?).await;
                return Ok(());
            }
        }
    }
}

fn end_event(run: &runs::Run) -> Result<warp::sse::Event, async_nats::Error> {
    let (state, _) = html::state_word(run.state);
    let services: Vec<_> = run
        .services
        .iter()
        .map(|s| {
            serde_json::json!({
                "service": s.service,
                "outcome": html::outcome_word(s.outcome).0,
                "ok": s.outcome == Some(SyncOutcome::Synced),
            })
        })
        .collect();
    Ok(warp::sse::Event::default()
        .event("end")
        .json_data(serde_json::json!({
            "state": state,
            "ok": run.state == Some(FinishedState::Success),
            "services": services,
        }))?)
}

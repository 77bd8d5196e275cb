//! The operations endpoint of the worker and the reporter (`METRICS_PORT`):
//! `/metrics` (Prometheus text), `/health` and `/ready`.

use std::net::SocketAddr;
use std::sync::Arc;

use prometheus_client::registry::Registry;
use warp::Filter;
use warp::http::StatusCode;

use crate::shutdown::Shutdown;

/// Prometheus text exposition of `registry`.
pub fn render(registry: &Registry) -> String {
    let mut out = String::new();
    prometheus_client::encoding::text::encode(&mut out, registry)
        .expect("writing to a String cannot fail");
    out
}

/// A reply with the Prometheus content type.
pub fn metrics_reply(registry: &Registry) -> impl warp::Reply + use<> {
    warp::reply::with_header(
        render(registry),
        "content-type",
        "application/openmetrics-text; version=1.0.0; charset=utf-8",
    )
}

/// `{"status": "..."}` with `code`.
pub fn status_reply(code: StatusCode, status: &str) -> warp::reply::WithStatus<warp::reply::Json> {
    warp::reply::with_status(
        warp::reply::json(&serde_json::json!({ "status": status })),
        code,
    )
}

/// Serves `/metrics`, `/health` and `/ready` on `addr` until `shutdown`; returns the bound
/// address (port 0 picks a free one).
pub async fn serve(
    addr: SocketAddr,
    registry: Arc<Registry>,
    ready: Arc<dyn Fn() -> bool + Send + Sync>,
    shutdown: Shutdown,
) -> std::io::Result<SocketAddr> {
    let listener = tokio::net::TcpListener::bind(addr).await?;
    let bound = listener.local_addr()?;
    let metrics = warp::path!("metrics")
        .and(warp::get())
        .map(move || metrics_reply(&registry));
    let health = warp::path!("health")
        .and(warp::get())
        .map(|| status_reply(StatusCode::OK, "healthy"));
    let ready = warp::path!("ready").and(warp::get()).map(move || {
        if ready() {
            status_reply(StatusCode::OK, "ready")
        } else {
            status_reply(StatusCode::SERVICE_UNAVAILABLE, "not ready")
        }
    });
    let routes = metrics.or(health).or(ready);
    tokio::spawn(
        warp::serve(routes)
            .incoming(listener)
            .graceful(async move { shutdown.wait().await })
            .run(),
    );
    Ok(bound)
}

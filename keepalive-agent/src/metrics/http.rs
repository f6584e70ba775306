//! The `--metrics-listen` HTTP server: `GET /metrics`, `GET /healthz`, `GET /readyz`.
//!
//! It runs on the export runtime (tokio), not on the event loop's thread, so that it answers
//! while the loop is stalled: `/healthz` says so (503) when the loop has not turned for
//! [`super::HEALTH_STALE`].

use std::convert::Infallible;
use std::net::SocketAddr;

use bytes::Bytes;
use http_body_util::Full;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;

use super::{prom, Metrics, HEALTH_STALE};

/// Errors starting the server.
#[derive(Debug, thiserror::Error)]
pub enum HttpError {
    #[error("--metrics-listen {addr}: cannot bind")]
    Bind { addr: SocketAddr, source: std::io::Error },
}

/// Binds `addr` (on the current tokio runtime) and serves `metrics` until the runtime stops.
/// Returns the bound address (port 0 picks one).
pub fn serve(addr: SocketAddr, metrics: Metrics) -> Result<SocketAddr, HttpError> {
    let std_listener = std::net::TcpListener::bind(addr).map_err(|source| HttpError::Bind { addr, source })?;
    std_listener.set_nonblocking(true).map_err(|source| HttpError::Bind { addr, source })?;
    let bound = std_listener.local_addr().map_err(|source| HttpError::Bind { addr, source })?;
    let listener = tokio::net::TcpListener::from_std(std_listener).map_err(|source| HttpError::Bind { addr, source })?;
    tokio::spawn(async move {
        loop {
            let (stream, _) = match listener.accept().await {
                Ok(s) => s,
                Err(e) => {
                    log::warn!("metrics server: accept: {e}");
                    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                    continue;
                }
            };
            let metrics = metrics.clone();
            tokio::spawn(async move {
                let service = hyper::service::service_fn(move |req| {
                    let metrics = metrics.clone();
                    async move { Ok::<_, Infallible>(respond(&req, &metrics)) }
                });
                if let Err(e) = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), service)
                    .await
                {
                    log::debug!("metrics server: connection: {e}");
                }
            });
        }
    });
    Ok(bound)
}

fn respond<B>(req: &Request<B>, metrics: &Metrics) -> Response<Full<Bytes>> {
    if req.method() != Method::GET && req.method() != Method::HEAD {
        return text(StatusCode::METHOD_NOT_ALLOWED, "only GET\n".into());
    }
    match req.uri().path() {
        "/metrics" => {
            let accept = req.headers().get(hyper::header::ACCEPT).and_then(|v| v.to_str().ok());
            let (content_type, body) = prom::render(metrics, prom::wants_openmetrics(accept));
            let mut resp = Response::new(Full::new(Bytes::from(body)));
            resp.headers_mut().insert(hyper::header::CONTENT_TYPE, hyper::header::HeaderValue::from_static(content_type));
            resp
        }
        "/healthz" => {
            let since = metrics.health().since_beat();
            if !metrics.health().is_ready() {
                // Attaching can take seconds on emulated kernels: readiness says so, not liveness.
                text(StatusCode::OK, "starting: attaching the programs\n".into())
            } else if since < HEALTH_STALE {
                text(StatusCode::OK, format!("ok: the event loop turned {} ms ago\n", since.as_millis()))
            } else {
                text(
                    StatusCode::SERVICE_UNAVAILABLE,
                    format!("stalled: the event loop has not drained the ring buffer for {} ms\n", since.as_millis()),
                )
            }
        }
        "/readyz" => {
            if metrics.health().is_ready() {
                text(StatusCode::OK, "ready: every reachable hook is attached\n".into())
            } else {
                text(StatusCode::SERVICE_UNAVAILABLE, "not ready: attaching\n".into())
            }
        }
        _ => text(StatusCode::NOT_FOUND, "not found: /metrics, /healthz, /readyz\n".into()),
    }
}

fn text(status: StatusCode, body: String) -> Response<Full<Bytes>> {
    let mut resp = Response::new(Full::new(Bytes::from(body)));
    *resp.status_mut() = status;
    resp.headers_mut()
        .insert(hyper::header::CONTENT_TYPE, hyper::header::HeaderValue::from_static("text/plain; charset=utf-8"));
    resp
}

//! `GET /metrics`: Prometheus text exposition of every `metrics` counter and histogram of the
//! process (HTTP requests, commands, consumers, quota refusals).

use std::sync::{Arc, OnceLock};

use axum::extract::State;

use axum::http::{header, HeaderValue};
use axum::response::{IntoResponse, Response};
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};

use crate::app::App;

/// Media type of the Prometheus text format.
pub const PROMETHEUS_CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

static HANDLE: OnceLock<Option<PrometheusHandle>> = OnceLock::new();

/// The process's Prometheus recorder handle, installing the recorder globally on first use.
/// `None` when another global `metrics` recorder was installed first (the page is then empty).
pub fn handle() -> Option<&'static PrometheusHandle> {
    HANDLE
        .get_or_init(|| match PrometheusBuilder::new().install_recorder() {
            Ok(h) => Some(h),
            Err(e) => {
                tracing::warn!(error = %e, "metrics recorder not installed; /metrics will be empty");
                None
            }
        })
        .as_ref()
}

/// Renders the exposition page (empty when no recorder of ours is installed).
pub fn render() -> String {
    match handle() {
        Some(h) => {
            h.run_upkeep();
            h.render()
        }
        None => String::new(),
    }
}

/// `GET /metrics` handler; observes the consumers' progress first, so the consumer gauges
/// (`tektree_consumer_lag`, `…_stalled`, `…_seconds_since_progress`) are current.
pub async fn metrics(State(app): State<Arc<App>>) -> Response {
    if let Err(e) = app.progress().await {
        tracing::warn!(error = %e, "consumer progress unavailable for /metrics");
    }
    let mut resp = render().into_response();
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static(PROMETHEUS_CONTENT_TYPE),
    );
    resp
}

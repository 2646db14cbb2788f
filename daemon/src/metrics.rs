//! Prometheus metrics on their own HTTP listener (`--metrics-listen`, `GET /metrics`), with
//! Triton's names and labels where the meaning is the same — so dashboards and autoscalers
//! written for Triton read opreg unchanged — and opreg's own under `opreg_`.
//!
//! Counters are updated where things happen (a request ends, a swap is decided); what is a
//! state rather than an event (the registry generation, quarantined plugins, models ready) is
//! read from the registry and repository at scrape time, so it can never drift. The text
//! format is the `prometheus` crate's encoder.

use crate::app::App;
use prometheus::{
    Encoder, Histogram, HistogramOpts, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts,
    Registry, TextEncoder,
};
use std::{net::SocketAddr, sync::Weak};

/// Labels of per-model metrics, as Triton names them.
const MODEL: &[&str] = &["model", "version"];

/// Every metric the daemon exports.
pub struct Metrics {
    registry: Registry,
    pub request_success: IntCounterVec,
    /// Labels: model, version, reason (`REJECTED`, `CANCELED`, `BACKEND`, `OTHER`: Triton's).
    pub request_failure: IntCounterVec,
    pub inference_count: IntCounterVec,
    pub exec_count: IntCounterVec,
    pub request_duration_us: IntCounterVec,
    pub queue_duration_us: IntCounterVec,
    pub compute_input_duration_us: IntCounterVec,
    pub compute_infer_duration_us: IntCounterVec,
    pub compute_output_duration_us: IntCounterVec,
    pub cancelled: IntCounterVec,
    pub device_copies: IntCounterVec,
    pub device_copy_bytes: IntCounterVec,
    /// The most bytes a request's values held at once.
    pub request_peak_bytes: Histogram,
    /// Label: plugin.
    pub swaps: IntCounterVec,
    pub swaps_refused: IntCounter,
    pub rollbacks: IntCounterVec,
    generation: IntGauge,
    plugins: IntGauge,
    quarantined: IntGaugeVec,
    models_ready: IntGauge,
}

fn counter(r: &Registry, name: &str, help: &str, labels: &[&str]) -> IntCounterVec {
    let c = IntCounterVec::new(Opts::new(name, help), labels).expect("valid metric");
    r.register(Box::new(c.clone())).expect("unique metric");
    c
}

fn gauge(r: &Registry, name: &str, help: &str) -> IntGauge {
    let g = IntGauge::new(name, help).expect("valid metric");
    r.register(Box::new(g.clone())).expect("unique metric");
    g
}

impl Metrics {
    // The names and label sets are constants: `expect` can only fail on a typo here, which
    // the metrics test catches; nothing from a request or model reaches these calls.
    #[allow(clippy::new_without_default)]
    pub fn new() -> Metrics {
        let r = Registry::new();
        let peak = Histogram::with_opts(
            HistogramOpts::new(
                "opreg_request_peak_bytes",
                "Most bytes a request's values held at once (inputs, intermediates, outputs)",
            )
            .buckets(prometheus::exponential_buckets(4096.0, 4.0, 12).expect("buckets")),
        )
        .expect("valid metric");
        r.register(Box::new(peak.clone())).expect("unique metric");
        let quarantined = IntGaugeVec::new(
            Opts::new(
                "opreg_plugin_quarantined",
                "1 while a plugin is quarantined after repeated kernel faults",
            ),
            &["plugin"],
        )
        .expect("valid metric");
        r.register(Box::new(quarantined.clone()))
            .expect("unique metric");
        Metrics {
            request_success: counter(
                &r,
                "nv_inference_request_success",
                "Number of successful inference requests, all batch sizes",
                MODEL,
            ),
            request_failure: counter(
                &r,
                "nv_inference_request_failure",
                "Number of failed inference requests, all batch sizes",
                &["model", "version", "reason"],
            ),
            inference_count: counter(
                &r,
                "nv_inference_count",
                "Number of inferences performed (a batch of n counts n)",
                MODEL,
            ),
            exec_count: counter(
                &r,
                "nv_inference_exec_count",
                "Number of model executions performed",
                MODEL,
            ),
            request_duration_us: counter(
                &r,
                "nv_inference_request_duration_us",
                "Cumulative inference request duration in microseconds (queue and compute)",
                MODEL,
            ),
            queue_duration_us: counter(
                &r,
                "nv_inference_queue_duration_us",
                "Cumulative time requests waited for the compute pool, in microseconds",
                MODEL,
            ),
            compute_input_duration_us: counter(
                &r,
                "nv_inference_compute_input_duration_us",
                "Cumulative time decoding and checking inputs, in microseconds",
                MODEL,
            ),
            compute_infer_duration_us: counter(
                &r,
                "nv_inference_compute_infer_duration_us",
                "Cumulative time running the model, in microseconds",
                MODEL,
            ),
            compute_output_duration_us: counter(
                &r,
                "nv_inference_compute_output_duration_us",
                "Cumulative time encoding outputs, in microseconds",
                MODEL,
            ),
            cancelled: counter(
                &r,
                "opreg_requests_cancelled_total",
                "Requests stopped because the client went away or their deadline passed",
                MODEL,
            ),
            device_copies: counter(
                &r,
                "opreg_device_copies_total",
                "Copy steps between host and device memory executed",
                MODEL,
            ),
            device_copy_bytes: counter(
                &r,
                "opreg_device_copy_bytes_total",
                "Bytes moved by copy steps between host and device memory",
                MODEL,
            ),
            request_peak_bytes: peak,
            swaps: counter(
                &r,
                "opreg_plugin_swaps_total",
                "Plugin builds swapped in after verification",
                &["plugin"],
            ),
            swaps_refused: {
                let c = IntCounter::new(
                    "opreg_plugin_swaps_refused_total",
                    "Plugin builds refused by swap verification",
                )
                .expect("valid metric");
                r.register(Box::new(c.clone())).expect("unique metric");
                c
            },
            rollbacks: counter(
                &r,
                "opreg_plugin_rollbacks_total",
                "Plugins returned to the build they replaced",
                &["plugin"],
            ),
            generation: gauge(
                &r,
                "opreg_registry_generation",
                "The plugin registry generation serving new requests",
            ),
            plugins: gauge(&r, "opreg_plugins_loaded", "Plugins loaded"),
            quarantined,
            models_ready: gauge(
                &r,
                "opreg_model_versions_ready",
                "Model versions ready to serve",
            ),
            registry: r,
        }
    }

    /// The text exposition of every metric, states refreshed from `app` first.
    pub fn render(&self, app: &App) -> String {
        let snapshot = app.registry.snapshot();
        self.generation
            .set(i64::try_from(snapshot.generation).unwrap_or(i64::MAX));
        self.plugins.set(snapshot.plugins.len() as i64);
        self.quarantined.reset();
        for name in snapshot.plugins.keys() {
            let on = snapshot.quarantined.contains(name.as_str());
            self.quarantined
                .with_label_values(&[name.as_str()])
                .set(i64::from(on));
        }
        drop(snapshot);
        self.models_ready.set(app.repo.ready().len() as i64);
        let mut out = Vec::new();
        if let Err(e) = TextEncoder::new().encode(&self.registry.gather(), &mut out) {
            tracing::error!("metrics: cannot encode: {e}");
        }
        String::from_utf8(out).unwrap_or_default()
    }
}

/// Serves `GET /metrics` on `listener`. It holds the app weakly, like all background work:
/// once the daemon shuts down, scrapes get 503.
pub async fn serve(app: Weak<App>, listener: tokio::net::TcpListener) -> std::io::Result<()> {
    use axum::{
        http::{header, StatusCode},
        response::IntoResponse,
        routing::get,
        Router,
    };
    let route = Router::new().route(
        "/metrics",
        get(move || {
            let app = app.clone();
            async move {
                match app.upgrade() {
                    Some(app) => (
                        [(header::CONTENT_TYPE, prometheus::TEXT_FORMAT)],
                        app.metrics.render(&app),
                    )
                        .into_response(),
                    None => StatusCode::SERVICE_UNAVAILABLE.into_response(),
                }
            }
        }),
    );
    axum::serve(listener, route).await
}

/// Binds the metrics listener, logging where it is.
pub async fn bind(addr: SocketAddr) -> anyhow::Result<tokio::net::TcpListener> {
    use anyhow::Context;
    let l = tokio::net::TcpListener::bind(addr)
        .await
        .with_context(|| format!("binding the metrics listener {addr} (--metrics-listen)"))?;
    tracing::info!(addr = %l.local_addr()?, "metrics on http://{}/metrics", l.local_addr()?);
    Ok(l)
}

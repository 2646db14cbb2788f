//! The Prometheus endpoint: after a few requests a scrape shows Triton's counters with the
//! model's labels (successes, failures by reason, inference and execution counts, durations)
//! and opreg's own state (registry generation, plugins, ready versions, swaps); `off`
//! disables the listener. With `--log-format json` the log lines are JSON objects carrying the
//! request id a client sent.

use opreg_proto::inference as pb;
use opreg_tests::{onnx::*, *};
use std::io::{Read, Write};

const F32: i32 = 1;

fn mlp() -> Vec<u8> {
    model(
        vec![
            node("MatMul", &["x", "w"], &["h"]),
            node("Relu", &["h"], &["y"]),
        ],
        vec![value("x", F32, &[1, 3])],
        vec![value("y", F32, &[1, 2])],
        vec![f32_initializer("w", &[3, 2], &[1.0; 6])],
        17,
    )
}

fn request(values: &[f32]) -> pb::ModelInferRequest {
    pb::ModelInferRequest {
        model_name: "mlp".into(),
        inputs: vec![pb::model_infer_request::InferInputTensor {
            name: "x".into(),
            datatype: "FP32".into(),
            shape: vec![1, values.len() as i64],
            ..Default::default()
        }],
        raw_input_contents: vec![f32_bytes(values).into()],
        ..Default::default()
    }
}

/// The metrics address the daemon logged.
fn metrics_addr(d: &Daemon) -> String {
    let log = d.wait_log("metrics on http://");
    let start = log.find("metrics on http://").expect("line") + "metrics on http://".len();
    let rest = &log[start..];
    rest[..rest.find("/metrics").expect("path")].to_string()
}

/// `GET /metrics` over plain HTTP/1.0.
fn scrape(addr: &str) -> String {
    let mut s = std::net::TcpStream::connect(addr).expect("connect to metrics");
    write!(s, "GET /metrics HTTP/1.0\r\nHost: {addr}\r\n\r\n").unwrap();
    let mut body = String::new();
    s.read_to_string(&mut body).unwrap();
    assert!(
        body.starts_with("HTTP/1.0 200") || body.starts_with("HTTP/1.1 200"),
        "{body}"
    );
    assert!(body.contains("text/plain; version=0.0.4"), "{body}");
    body
}

/// The value of `name` on the line whose labels include every one of `labels`.
fn sample(text: &str, name: &str, labels: &[&str]) -> Option<f64> {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .find(|l| {
            let (metric, rest) = l.split_once(['{', ' ']).unwrap_or((l, ""));
            metric == name && labels.iter().all(|lab| rest.contains(lab))
        })
        .and_then(|l| l.rsplit(' ').next()?.parse().ok())
}

#[tokio::test]
async fn scrape_after_requests_shows_tritons_counters() {
    let repo = tempfile::tempdir().unwrap();
    let (d, _plugins) = start_serving(repo.path(), &[]);
    let addr = metrics_addr(&d);
    let mut c = d.inference().await;
    c.repository_model_load(load_request("mlp", mlp()))
        .await
        .expect("load");
    for _ in 0..3 {
        c.model_infer(request(&[1.0, 2.0, 3.0]))
            .await
            .expect("infer");
    }
    // A wrong shape fails before the model runs.
    c.model_infer(request(&[1.0, 2.0]))
        .await
        .expect_err("bad shape");

    let text = scrape(&addr);
    let m = ["model=\"mlp\"", "version=\"1\""];
    assert_eq!(
        sample(&text, "nv_inference_request_success", &m),
        Some(3.0),
        "{text}"
    );
    assert_eq!(sample(&text, "nv_inference_count", &m), Some(3.0), "{text}");
    assert_eq!(
        sample(&text, "nv_inference_exec_count", &m),
        Some(3.0),
        "{text}"
    );
    assert_eq!(
        sample(
            &text,
            "nv_inference_request_failure",
            &["model=\"mlp\"", "reason=\"OTHER\""]
        ),
        Some(1.0),
        "{text}"
    );
    for name in [
        "nv_inference_request_duration_us",
        "nv_inference_queue_duration_us",
        "nv_inference_compute_input_duration_us",
        "nv_inference_compute_infer_duration_us",
        "nv_inference_compute_output_duration_us",
    ] {
        assert!(sample(&text, name, &m).is_some(), "{name} missing:\n{text}");
    }
    assert_eq!(
        sample(&text, "opreg_plugins_loaded", &[]),
        Some(2.0),
        "{text}"
    );
    assert_eq!(
        sample(&text, "opreg_model_versions_ready", &[]),
        Some(1.0),
        "{text}"
    );
    assert!(sample(&text, "opreg_registry_generation", &[]).is_some_and(|g| g >= 1.0));
    assert_eq!(
        sample(&text, "opreg_plugin_swaps_refused_total", &[]),
        Some(0.0)
    );
    assert_eq!(
        sample(&text, "opreg_request_peak_bytes_count", &[]),
        Some(3.0),
        "{text}"
    );
    assert_eq!(
        sample(&text, "opreg_plugin_quarantined", &["plugin=\"onnx-ops\""]),
        Some(0.0),
        "{text}"
    );

    // Counters only grow: one more request is one more success.
    c.model_infer(request(&[0.0, 0.0, 1.0]))
        .await
        .expect("infer");
    let text = scrape(&addr);
    assert_eq!(sample(&text, "nv_inference_request_success", &m), Some(4.0));
}

#[tokio::test]
async fn metrics_can_be_turned_off() {
    let repo = tempfile::tempdir().unwrap();
    let (d, _plugins) = start_serving(repo.path(), &["--metrics-listen", "off"]);
    d.inference()
        .await
        .server_live(pb::ServerLiveRequest {})
        .await
        .expect("live");
    assert!(!d.log().contains("metrics on http://"), "{}", d.log());
}

#[tokio::test]
async fn json_logs_carry_the_request_id() {
    let repo = tempfile::tempdir().unwrap();
    let (d, _plugins) = start_serving(repo.path(), &["--log-format", "json"]);
    let mut c = d.inference().await;
    c.repository_model_load(load_request("mlp", mlp()))
        .await
        .expect("load");
    let mut req = tonic::Request::new(request(&[1.0, 2.0]));
    req.metadata_mut()
        .insert("triton-request-id", "req-42".parse().unwrap());
    c.model_infer(req).await.expect_err("bad shape");
    let log = d.wait_log("req-42");
    let line = log
        .lines()
        .find(|l| l.contains("req-42"))
        .expect("a line with the id");
    let v: serde_json::Value = serde_json::from_str(line).expect("a JSON log line");
    assert_eq!(v["span"]["request_id"], "req-42", "{line}");
    assert_eq!(v["span"]["model"], "mlp", "{line}");
    assert!(
        v["fields"]["message"]
            .as_str()
            .is_some_and(|m| m.contains("request failed") && m.contains("input 'x'")),
        "{line}"
    );
}

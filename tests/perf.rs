//! `opreg perf`: a concurrency sweep against a real daemon prints one JSON object per step with
//! ordered latency percentiles and no errors; a model the server does not have fails with a
//! non-zero exit that names it.

use opreg_tests::{onnx::*, *};
use std::process::{Command, Output};

const F32: i32 = 1;

/// `y = relu(x · w)`, `x` of shape `[N, 3]` (a variable batch dimension).
fn mlp() -> Vec<u8> {
    model(
        vec![
            node("MatMul", &["x", "w"], &["h"]),
            node("Relu", &["h"], &["y"]),
        ],
        vec![value("x", F32, &[-1, 3])],
        vec![value("y", F32, &[-1, 2])],
        vec![f32_initializer("w", &[3, 2], &[1.0; 6])],
        17,
    )
}

/// Runs the built `opreg` binary with `args`.
fn opreg(args: &[&str]) -> Output {
    let bin = artifacts().join(format!("opreg{}", std::env::consts::EXE_SUFFIX));
    assert!(
        bin.exists(),
        "{} is missing: run `cargo build --workspace` first (the README's test command does)",
        bin.display()
    );
    Command::new(bin)
        .args(args)
        .env_remove("OPREG_ADDR")
        .env_remove("OPREG_ADMIN_TOKEN")
        .env_remove("OPREG_CA_CERT")
        .output()
        .expect("run opreg")
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

#[tokio::test]
async fn concurrency_sweep_prints_a_json_line_per_step() {
    let repo = tempfile::tempdir().unwrap();
    let (d, _plugins) = start_serving(repo.path(), &["--metrics-listen", "off"]);
    d.inference()
        .await
        .repository_model_load(load_request("mlp", mlp()))
        .await
        .expect("load");
    let url = d.url();
    let out = tokio::task::spawn_blocking(move || {
        opreg(&[
            "perf",
            "mlp",
            "--addr",
            &url,
            "--concurrency-range",
            "1:2",
            "--measurement-interval-ms",
            "300",
            "--warmup-ms",
            "100",
            "--json",
        ])
    })
    .await
    .unwrap();
    let stdout = text(&out.stdout);
    assert!(
        out.status.success(),
        "opreg perf failed: {}\n{stdout}",
        text(&out.stderr)
    );
    let steps: Vec<serde_json::Value> = stdout
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l:?}")))
        .collect();
    assert_eq!(steps.len(), 2, "{stdout}");
    for (i, s) in steps.iter().enumerate() {
        assert_eq!(s["model"], "mlp", "{s}");
        assert_eq!(s["concurrency"], i as u64 + 1, "{s}");
        assert!(s["throughput"].as_f64().unwrap() > 0.0, "{s}");
        assert!(s["requests"].as_u64().unwrap() > 0, "{s}");
        assert_eq!(s["errors"], 0, "{s}");
        let p = |k: &str| s[k].as_u64().unwrap_or_else(|| panic!("{k} in {s}"));
        assert!(p("p50_us") <= p("p90_us"), "{s}");
        assert!(p("p90_us") <= p("p99_us"), "{s}");
        assert!(
            p("min_us") <= p("p50_us") && p("p99_us") <= p("max_us"),
            "{s}"
        );
    }
}

#[tokio::test]
async fn request_rate_and_table_output() {
    let repo = tempfile::tempdir().unwrap();
    let (d, _plugins) = start_serving(repo.path(), &["--metrics-listen", "off"]);
    d.inference()
        .await
        .repository_model_load(load_request("mlp", mlp()))
        .await
        .expect("load");
    let url = d.url();
    let out = tokio::task::spawn_blocking(move || {
        opreg(&[
            "--addr",
            &url,
            "perf",
            "mlp",
            "--request-rate-range",
            "50:100:50",
            "--request-distribution",
            "constant",
            "--measurement-interval-ms",
            "300",
            "--warmup-ms",
            "50",
            "--shape",
            "x:2x3",
        ])
    })
    .await
    .unwrap();
    let stdout = text(&out.stdout);
    assert!(
        out.status.success(),
        "opreg perf failed: {}\n{stdout}",
        text(&out.stderr)
    );
    // A heading (model and inputs), the column names, one row per rate.
    let lines: Vec<&str> = stdout.lines().collect();
    assert_eq!(lines.len(), 4, "{stdout}");
    assert!(lines[0].contains("x FP32 [2x3]"), "{stdout}");
    assert!(lines[1].contains("p99 ms"), "{stdout}");
    assert!(lines[2].trim_start().starts_with("50.0"), "{stdout}");
    assert!(lines[3].trim_start().starts_with("100.0"), "{stdout}");
}

#[tokio::test]
async fn a_missing_model_or_server_fails_with_a_clear_message() {
    let repo = tempfile::tempdir().unwrap();
    let (d, _plugins) = start_serving(repo.path(), &["--metrics-listen", "off"]);
    let url = d.url();
    let out = tokio::task::spawn_blocking(move || {
        opreg(&[
            "perf",
            "no_such_model",
            "--addr",
            &url,
            "--measurement-interval-ms",
            "100",
            "--json",
        ])
    })
    .await
    .unwrap();
    let stderr = text(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    assert!(stderr.contains("no_such_model"), "{stderr}");
    assert!(out.stdout.is_empty(), "{}", text(&out.stdout));

    // Nothing listens on the daemon's port once it is gone.
    let url = d.url();
    drop(d);
    let out = tokio::task::spawn_blocking(move || {
        opreg(&[
            "perf",
            "mlp",
            "--addr",
            &url,
            "--measurement-interval-ms",
            "100",
        ])
    })
    .await
    .unwrap();
    let stderr = text(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    assert!(stderr.contains("connecting to"), "{stderr}");
}

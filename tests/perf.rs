//! `opreg perf`: a concurrency sweep against a real daemon prints one JSON object per step with
//! ordered latency percentiles and no errors; a model the server does not have fails with a
//! non-zero exit that names it. `opreg bench` runs a model file in-process: ordered latency
//! figures, a per-operator profile, clear errors for shapes it cannot make up.

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

/// A plugin folder with the two plugins the MLP needs.
fn plugin_dir() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    for p in ["onnx_ops", "blas_cpu"] {
        let src = plugin(p);
        std::fs::copy(&src, dir.path().join(src.file_name().unwrap())).unwrap();
    }
    dir
}

#[test]
fn bench_runs_a_model_file_in_process() {
    let plugins = plugin_dir();
    let work = tempfile::tempdir().unwrap();
    let file = work.path().join("mlp.onnx");
    std::fs::write(&file, mlp()).unwrap();
    let (file, plugins) = (file.to_str().unwrap(), plugins.path().to_str().unwrap());
    let out = opreg(&[
        "bench",
        file,
        "--plugin-dir",
        plugins,
        "--batch",
        "8",
        "--runs",
        "40",
        "--min-seconds",
        "0",
        "--warmup",
        "2",
        "--profile",
        "--json",
    ]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("one JSON object");
    assert_eq!(v["runs"], 40);
    assert_eq!(v["batch"], 8);
    assert_eq!(v["inputs"]["x"], serde_json::json!([8, 3]));
    let (min, median, p90) = (
        v["min_ms"].as_f64().unwrap(),
        v["median_ms"].as_f64().unwrap(),
        v["p90_ms"].as_f64().unwrap(),
    );
    assert!(0.0 < min && min <= median && median <= p90, "{v}");
    assert!(v["peak_rss_bytes"].as_u64().unwrap() > 1 << 20, "{v}");
    let steps: Vec<&str> = v["profile"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["step"].as_str().unwrap())
        .collect();
    assert!(steps.iter().any(|s| s.contains("MatMul")), "{steps:?}");
    // The table form names the operators it timed.
    let out = opreg(&[
        "bench",
        file,
        "--plugin-dir",
        plugins,
        "--runs",
        "3",
        "--min-seconds",
        "0",
        "--profile",
    ]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let table = text(&out.stdout);
    assert!(table.contains("median") && table.contains("p90"), "{table}");
    assert!(
        table.contains("per operator") && table.contains("Relu"),
        "{table}"
    );
}

#[test]
fn bench_says_what_it_cannot_run() {
    let plugins = plugin_dir();
    let work = tempfile::tempdir().unwrap();
    // A sequence length past the batch dimension: bench cannot guess it.
    let seq = model(
        vec![node("Relu", &["x"], &["y"])],
        vec![value("x", F32, &[-1, -1])],
        vec![value("y", F32, &[-1, -1])],
        vec![],
        17,
    );
    let file = work.path().join("seq.onnx");
    std::fs::write(&file, seq).unwrap();
    let (file, plugins) = (file.to_str().unwrap(), plugins.path().to_str().unwrap());
    let out = opreg(&["bench", file, "--plugin-dir", plugins, "--runs", "1"]);
    assert!(!out.status.success());
    let err = text(&out.stderr);
    assert!(
        err.contains("'x'") && err.contains("give its shape"),
        "{err}"
    );
    // With the shape given, it runs.
    let out = opreg(&[
        "bench",
        file,
        "--plugin-dir",
        plugins,
        "--runs",
        "2",
        "--min-seconds",
        "0",
        "--shape",
        "x:2x5",
        "--json",
    ]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["inputs"]["x"], serde_json::json!([2, 5]));
    // A model file that is not ONNX, and an input the model does not have.
    let junk = work.path().join("junk.onnx");
    std::fs::write(&junk, b"not a model").unwrap();
    let out = opreg(&["bench", junk.to_str().unwrap(), "--plugin-dir", plugins]);
    assert!(!out.status.success());
    assert!(
        text(&out.stderr).contains("junk.onnx"),
        "{}",
        text(&out.stderr)
    );
    let out = opreg(&[
        "bench",
        file,
        "--plugin-dir",
        plugins,
        "--input",
        "nope=/x.npy",
    ]);
    assert!(!out.status.success());
    assert!(
        text(&out.stderr).contains("no input 'nope'"),
        "{}",
        text(&out.stderr)
    );
}

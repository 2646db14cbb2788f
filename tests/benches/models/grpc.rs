//! The gRPC side of the model benchmarks: a release `opregd` (the workspace's operator and CPU
//! BLAS plugins) serving one model, driven by `opreg perf` with one client sending the same
//! request back to back, as a user of the KServe v2 API would call it.

use opreg_proto::inference as pb;
use opreg_tests::{start_serving, Daemon};
use std::{
    path::Path,
    time::{Duration, Instant},
};

/// A daemon serving one model file as `name` (version 1), ready to infer.
pub struct Served {
    pub daemon: Daemon,
    pub name: String,
    _repo: tempfile::TempDir,
    _plugins: tempfile::TempDir,
}

/// Serves `model` (ONNX bytes) as `name` and waits until it is ready (at most two minutes:
/// ResNet-50 loads in well under a second).
pub async fn serve(name: &str, model: &[u8]) -> Result<Served, String> {
    let repo = tempfile::tempdir().map_err(|e| e.to_string())?;
    let dir = repo.path().join(name).join("1");
    std::fs::create_dir_all(&dir).map_err(|e| e.to_string())?;
    std::fs::write(dir.join("model.onnx"), model).map_err(|e| e.to_string())?;
    let (daemon, plugins) = start_serving(repo.path(), &[]);
    let mut c = daemon.inference().await;
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let ready = c
            .model_ready(pb::ModelReadyRequest {
                name: name.into(),
                version: String::new(),
            })
            .await
            .is_ok_and(|r| r.into_inner().ready);
        if ready {
            break;
        }
        if Instant::now() > deadline {
            return Err(format!("{name} did not become ready:\n{}", daemon.log()));
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Ok(Served {
        daemon,
        name: name.into(),
        _repo: repo,
        _plugins: plugins,
    })
}

/// Serves the model file at `path` (see [`serve`]).
pub async fn serve_file(name: &str, path: &Path) -> Result<Served, String> {
    let bytes = std::fs::read(path).map_err(|e| format!("{}: {e}", path.display()))?;
    serve(name, &bytes).await
}

/// Median and p90 (ms) of `s`'s model over gRPC, measured by `opreg perf` (the CLI's KServe v2
/// load generator, which builds the request from the model's metadata): one client sending its
/// next request as soon as the previous answers, `batch` for a symbolic first dimension, `given`
/// whole shapes as `NAME:D1xD2...`, for a window of `window_ms` after a 500 ms warm-up.
pub fn latency(
    opreg: &Path,
    s: &Served,
    batch: usize,
    given: &[String],
    window_ms: u64,
) -> Result<(f64, f64), String> {
    let out = std::process::Command::new(opreg)
        .args(["--addr", &s.daemon.url(), "perf", &s.name])
        .args(["--concurrency-range", "1:1", "--warmup-ms", "500"])
        .args(["--measurement-interval-ms", &window_ms.to_string()])
        .args(["--batch-size", &batch.to_string(), "--json"])
        .args(given.iter().flat_map(|g| ["--shape", g.as_str()]))
        .output()
        .map_err(|e| format!("opreg perf: {e}"))?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() {
        return Err(format!(
            "opreg perf failed: {}{stdout}",
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    let step: serde_json::Value = serde_json::from_str(stdout.lines().last().unwrap_or_default())
        .map_err(|e| format!("opreg perf's JSON: {e}: {stdout}"))?;
    let ms = |k: &str| step[k].as_f64().map(|us| us / 1e3);
    match (ms("p50_us"), ms("p90_us"), step["errors"].as_u64()) {
        (Some(p50), Some(p90), Some(0)) => Ok((p50, p90)),
        _ => Err(format!("opreg perf: no clean measurement: {step}")),
    }
}

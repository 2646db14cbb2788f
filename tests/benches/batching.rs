//! Dynamic batching under load, side by side in one run: ResNet-18 (seeded random weights,
//! `target/models/resnet18.onnx`, written by `scripts/bench`) served with batching off and on
//! to CLIENTS concurrent gRPC clients sending batch-1 requests back-to-back, and ONNX Runtime
//! driven the same way (CLIENTS threads on one session, the same compute threads). Reported:
//! throughput, p50 and p99 latency, and the ratios batched / unbatched and opreg / ORT.

use opreg_proto::inference as pb;
use opreg_tests::*;
use std::time::{Duration, Instant};

/// The target: 8 concurrent clients on ResNet-18 reach >= 0.9x ORT's requests/s.
const CLIENTS: usize = 8;
const SECONDS: f64 = 8.0;

fn request(model: &str) -> pb::ModelInferRequest {
    let n = 3 * 224 * 224;
    let x: Vec<f32> = (0..n).map(|i| ((i % 97) as f32 - 48.0) / 48.0).collect();
    pb::ModelInferRequest {
        model_name: model.into(),
        inputs: vec![pb::model_infer_request::InferInputTensor {
            name: "x".into(),
            datatype: "FP32".into(),
            shape: vec![1, 3, 224, 224],
            ..Default::default()
        }],
        raw_input_contents: vec![f32_bytes(&x).into()],
        ..Default::default()
    }
}

struct Run {
    throughput: f64,
    p50_ms: f64,
    p99_ms: f64,
}

async fn drive(d: &Daemon, model: &str) -> Run {
    // Warm-up: the first requests learn memory patterns.
    let mut c = d.inference().await;
    for _ in 0..2 {
        c.model_infer(request(model)).await.expect("warm-up");
    }
    let stop = Instant::now() + Duration::from_secs_f64(SECONDS);
    let started = Instant::now();
    let mut joins = Vec::new();
    for _ in 0..CLIENTS {
        let mut c = d.inference().await;
        let req = request(model);
        joins.push(tokio::spawn(async move {
            let mut lat = Vec::new();
            while Instant::now() < stop {
                let t = Instant::now();
                c.model_infer(req.clone()).await.expect("infer");
                lat.push(t.elapsed().as_secs_f64());
            }
            lat
        }));
    }
    let mut lat: Vec<f64> = Vec::new();
    for j in joins {
        lat.extend(j.await.expect("client"));
    }
    let elapsed = started.elapsed().as_secs_f64();
    lat.sort_by(|a, b| a.total_cmp(b));
    let pct = |p: f64| lat[((lat.len() - 1) as f64 * p) as usize] * 1e3;
    Run {
        throughput: lat.len() as f64 / elapsed,
        p50_ms: pct(0.5),
        p99_ms: pct(0.99),
    }
}

fn main() {
    let model = workspace().join("target/models/resnet18.onnx");
    if !model.is_file() {
        eprintln!(
            "SKIPPED: {} missing (scripts/bench writes it)",
            model.display()
        );
        return;
    }
    let threads = std::thread::available_parallelism().map_or(2, |n| n.get());
    let repo = tempfile::tempdir().expect("repo");
    for (name, config) in [
        ("r18", "max_batch_size = 16\n".to_string()),
        (
            "r18_batched",
            "max_batch_size = 16\n[dynamic_batching]\nmax_queue_delay_us = 2000\npreferred_batch_sizes = [8]\n".to_string(),
        ),
    ] {
        let dir = repo.path().join(name).join("1");
        std::fs::create_dir_all(&dir).expect("dir");
        std::fs::copy(&model, dir.join("model.onnx")).expect("copy");
        std::fs::write(repo.path().join(name).join("config.toml"), config).expect("config");
    }
    let (d, _plugins) = start_serving(repo.path(), &[]);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let off = rt.block_on(drive(&d, "r18"));
    let on = rt.block_on(drive(&d, "r18_batched"));
    drop(d);
    let ort = run_python(
        "bench_ort_concurrent.py",
        &[
            &model,
            &CLIENTS.to_string(),
            &SECONDS.to_string(),
            &threads.to_string(),
        ],
    )
    .and_then(|l| serde_json::from_str::<serde_json::Value>(&l).ok());
    println!(
        "ResNet-18, batch-1 requests from {CLIENTS} concurrent clients, {SECONDS} s each, {threads} compute threads"
    );
    println!(
        "{:<26} {:>10} {:>10} {:>10}",
        "", "infer/s", "p50 ms", "p99 ms"
    );
    for (what, r) in [("opreg, batching off", &off), ("opreg, batching on", &on)] {
        println!(
            "{what:<26} {:>10.1} {:>10.1} {:>10.1}",
            r.throughput, r.p50_ms, r.p99_ms
        );
    }
    if let Some(o) = &ort {
        println!(
            "{:<26} {:>10.1} {:>10.1} {:>10.1}",
            format!("onnxruntime ({CLIENTS} clients)"),
            o["throughput"].as_f64().unwrap_or(0.0),
            o["p50_ms"].as_f64().unwrap_or(0.0),
            o["p99_ms"].as_f64().unwrap_or(0.0)
        );
    }
    println!(
        "throughput ratio batched / unbatched: {:.2}",
        on.throughput / off.throughput
    );
    if let Some(t) = ort.as_ref().and_then(|o| o["throughput"].as_f64()) {
        println!(
            "throughput ratio opreg batched / ORT:  {:.2}",
            on.throughput / t
        );
        println!(
            "throughput ratio opreg unbatched / ORT: {:.2}",
            off.throughput / t
        );
    }
}

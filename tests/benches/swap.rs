//! Hot swap under load, side by side in one run: request latency (p50, p99) with no swaps and
//! during back-to-back verified swaps of the real `onnx-ops` plugin (the same build again, so
//! outputs agree exactly), and the swap latency: the `SwapPlugin` call (load, self-tests,
//! compile every model, compare on recorded inputs, publish) and the client-observed time from
//! the call to the first answer computed by the new generation.
//!
//! Models: an MLP (256-512-512-10, built here) and, when `target/models` has it
//! (`scripts/bench` writes it), ResNet-50. Run with `scripts/bench`.

use opreg_proto::{inference as ipb, opreg::v1 as pb};
use opreg_tests::*;
use std::{
    path::Path,
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc,
    },
    time::{Duration, Instant},
};

const CLIENTS: usize = 2;
const SWAPS: usize = 10;

fn mlp() -> Vec<u8> {
    use opreg_tests::onnx as o;
    let mut state = 7u64;
    let mut weights = |n: usize| -> Vec<f32> {
        (0..n)
            .map(|_| {
                state = state.wrapping_mul(6364136223846793005).wrapping_add(1);
                ((state >> 40) as f32 / (1u64 << 24) as f32 - 0.5) * 0.1
            })
            .collect()
    };
    let dims = [256i64, 512, 512, 10];
    let mut nodes = Vec::new();
    let mut inits = Vec::new();
    let mut x = "X".to_string();
    for l in 0..3 {
        let (k, n) = (dims[l], dims[l + 1]);
        let (w, b, y) = (format!("W{l}"), format!("B{l}"), format!("H{l}"));
        inits.push(o::f32_initializer(&w, &[k, n], &weights((k * n) as usize)));
        inits.push(o::f32_initializer(&b, &[n], &weights(n as usize)));
        let mm = format!("M{l}");
        nodes.push(o::node("MatMul", &[&x, &w], &[&mm]));
        if l < 2 {
            let a = format!("A{l}");
            nodes.push(o::node("Add", &[&mm, &b], &[&a]));
            nodes.push(o::node("Relu", &[&a], &[&y]));
        } else {
            nodes.push(o::node("Add", &[&mm, &b], &[&y]));
        }
        x = y;
    }
    o::model(
        nodes,
        vec![o::value("X", 1, &[1, 256])],
        vec![o::value(&x, 1, &[1, 10])],
        inits,
        17,
    )
}

fn request(model: &str, input: &str, shape: &[i64]) -> ipb::ModelInferRequest {
    let n: i64 = shape.iter().product();
    let x: Vec<f32> = (0..n).map(|i| ((i % 97) as f32 - 48.0) / 48.0).collect();
    ipb::ModelInferRequest {
        model_name: model.into(),
        inputs: vec![ipb::model_infer_request::InferInputTensor {
            name: input.into(),
            datatype: "FP32".into(),
            shape: shape.to_vec(),
            ..Default::default()
        }],
        raw_input_contents: vec![f32_bytes(&x).into()],
        ..Default::default()
    }
}

/// (finished at, latency, generation) per answer.
type Answers = Vec<(Instant, Duration, u64)>;

async fn load(url: String, stop: Arc<AtomicBool>, req: ipb::ModelInferRequest) -> Answers {
    let handles: Vec<_> = (0..CLIENTS)
        .map(|_| {
            let (url, stop, req) = (url.clone(), stop.clone(), req.clone());
            tokio::spawn(async move {
                let mut c =
                    ipb::grpc_inference_service_client::GrpcInferenceServiceClient::connect(url)
                        .await
                        .expect("connect");
                let mut out = Answers::new();
                while !stop.load(Ordering::Relaxed) {
                    let t = Instant::now();
                    let r = c
                        .model_infer(req.clone())
                        .await
                        .expect("no request may fail");
                    out.push((
                        Instant::now(),
                        t.elapsed(),
                        generation_of(&r.into_inner()).unwrap_or(0),
                    ));
                }
                out
            })
        })
        .collect();
    let mut all = Answers::new();
    for h in handles {
        all.extend(h.await.expect("client"));
    }
    all
}

fn pct(v: &mut [Duration], p: f64) -> f64 {
    v.sort_unstable();
    v[((v.len() - 1) as f64 * p).round() as usize].as_secs_f64() * 1e3
}

async fn bench(d: &Daemon, model: &str, input: &str, shape: &[i64], quiet_for: Duration) {
    let req = request(model, input, shape);
    // Warm-up, and recorded inputs for the swaps' verification.
    let mut c = d.inference().await;
    for _ in 0..3 {
        c.model_infer(req.clone()).await.expect("warm-up");
    }
    let stop = Arc::new(AtomicBool::new(false));
    let quiet = tokio::spawn(load(d.url(), stop.clone(), req.clone()));
    tokio::time::sleep(quiet_for).await;
    stop.store(true, Ordering::Relaxed);
    let quiet = quiet.await.expect("quiet phase");

    let stop = Arc::new(AtomicBool::new(false));
    let during = tokio::spawn(load(d.url(), stop.clone(), req.clone()));
    let mut reg = d.registry().await;
    let mut calls = Vec::new();
    let mut swaps = Vec::new();
    for _ in 0..SWAPS {
        let t = Instant::now();
        let r = reg
            .swap_plugin(pb::SwapPluginRequest {
                path: plugin("onnx_ops").display().to_string(),
                name: "onnx-ops".into(),
                ..Default::default()
            })
            .await
            .expect("swap")
            .into_inner();
        calls.push(t.elapsed());
        swaps.push((t, r.generation));
        // Let requests run on the new generation before the next swap.
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    stop.store(true, Ordering::Relaxed);
    let during = during.await.expect("swap phase");
    // Request -> new generation serving: from the swap call to the first answer it computed.
    let mut to_serving: Vec<Duration> = swaps
        .iter()
        .filter_map(|(t, g)| {
            during
                .iter()
                .filter(|(_, _, gen)| gen >= g)
                .map(|(done, _, _)| done.saturating_duration_since(*t))
                .min()
        })
        .collect();
    let mut q: Vec<Duration> = quiet.iter().map(|a| a.1).collect();
    let mut w: Vec<Duration> = during.iter().map(|a| a.1).collect();
    let (q50, q99, w50, w99) = (
        pct(&mut q, 0.5),
        pct(&mut q, 0.99),
        pct(&mut w, 0.5),
        pct(&mut w, 0.99),
    );
    println!(
        "{model:>10}  requests {:>5} / {:>5}  p50 {q50:>8.2} / {w50:>8.2} ms ({:.2}x)  p99 {q99:>8.2} / {w99:>8.2} ms ({:.2}x)  SwapPlugin p50 {:>7.1} ms  to new generation p50 {:>7.1} ms max {:>7.1} ms",
        q.len(),
        w.len(),
        w50 / q50,
        w99 / q99,
        pct(&mut calls, 0.5),
        pct(&mut to_serving, 0.5),
        pct(&mut to_serving, 1.0),
    );
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let repo = tempfile::tempdir().expect("repo");
    let put = |name: &str, bytes: &[u8]| {
        let dir = repo.path().join(name).join("1");
        std::fs::create_dir_all(&dir).expect("mkdir");
        std::fs::write(dir.join("model.onnx"), bytes).expect("write");
    };
    put("mlp", &mlp());
    let resnet = workspace().join("target/models/resnet50.onnx");
    if resnet.exists() {
        put("resnet50", &std::fs::read(&resnet).expect("read resnet50"));
    }
    let (d, _plugins) = start_serving(repo.path(), &[]);
    println!(
        "hot swap of onnx-ops under load ({CLIENTS} clients, {SWAPS} swaps): without swaps / during swaps"
    );
    bench(&d, "mlp", "X", &[1, 256], Duration::from_secs(3)).await;
    if resnet.exists() {
        bench(
            &d,
            "resnet50",
            "x",
            &[1, 3, 224, 224],
            Duration::from_secs(10),
        )
        .await;
    } else {
        println!(
            "  resnet50: {} missing (scripts/bench writes it)",
            Path::new(&resnet).display()
        );
    }
}

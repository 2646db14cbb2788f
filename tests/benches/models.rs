//! Whole models: opreg's graph runtime (in-process, the workspace's release plugins) side by
//! side with ONNX Runtime (Python, same machine, same thread count) in one run. Reports the
//! median-latency ratio opreg / ONNX Runtime per model, after checking both agree: a small MLP
//! and CNN, and ResNet-50 and MobileNetV2 at batch 1 (float, and quantized to QDQ by ONNX Runtime)
//! when `target/models` has them (`scripts/bench` writes them).
//!
//! Run with `scripts/bench`.

use opreg_sdk::{host::HostTensor, DType, Device};
use opregd::{exec::ComputePool, graph, registry::Registry};
use std::{collections::HashMap, sync::Arc, time::Instant};

fn f32s(bytes: &[u8]) -> Vec<f32> {
    bytes
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect()
}

fn main() {
    let threads = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1);
    let dir = tempfile::tempdir().expect("tempdir");
    let python = std::env::var("OPREG_TEST_PYTHON").unwrap_or_else(|_| "python3".into());
    let out = std::process::Command::new(python)
        .arg(opreg_tests::workspace().join("tests/python/bench_ort.py"))
        .arg(dir.path())
        .arg(threads.to_string())
        .arg(opreg_tests::workspace().join("target/models"))
        .output()
        .expect("run onnxruntime side");
    assert!(
        out.status.success(),
        "onnxruntime side failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let results: serde_json::Map<String, serde_json::Value> =
        serde_json::from_slice(&out.stdout).expect("onnxruntime side's JSON");
    let registry = Registry::new(dir.path().join("stage"), Default::default());
    let loaded = registry.load_all(&[
        opreg_tests::plugin("onnx_ops"),
        opreg_tests::plugin("blas_cpu"),
    ]);
    for (p, r) in &loaded {
        if let Err(e) = r {
            panic!("{}: {e}", p.display());
        }
    }
    let pool = ComputePool::new(threads).expect("pool");
    println!("threads: {threads}");
    println!(
        "{:>16} {:>12} {:>12} {:>14}",
        "model", "opreg ms", "ORT ms", "opreg/ORT"
    );
    for (name, r) in &results {
        let ort_ms = r["ort_ms"].as_f64().expect("ort_ms");
        let shape: Vec<usize> = r["shape"]
            .as_array()
            .expect("shape")
            .iter()
            .map(|d| d.as_u64().expect("dim") as usize)
            .collect();
        let bytes = std::fs::read(r["path"].as_str().expect("path")).expect("model");
        let input = std::fs::read(dir.path().join(format!("{name}.input"))).expect("input");
        let want = f32s(&std::fs::read(dir.path().join(format!("{name}.output"))).expect("output"));
        // As the daemon serves a model: the standard passes once, then compile (fusions).
        let mut model = graph::import(&bytes, None).expect("import");
        graph::optimize(&mut model).expect("passes");
        let snapshot = registry.snapshot();
        let plan = pool
            .install(|| graph::compile(&model, snapshot, &[Device::CPU], usize::MAX))
            .expect("compile");
        let x = Arc::new(HostTensor::from_bytes(DType::F32, &shape, &input).expect("input tensor"));
        let run = || {
            let feeds: HashMap<String, Arc<HostTensor>> = [("x".to_string(), x.clone())].into();
            pool.install(|| graph::run(&plan, feeds)).expect("run")
        };
        let got = f32s(run()[0].1.bytes());
        // Float models: the worst per-element relative error. Quantized ones (against
        // onnxruntime evaluating the QDQ graph as written, see bench_ort.py): the worst
        // difference against the largest logit, since each requantization may round a value
        // one step the other way and the steps add up over 53 layers (onnxruntime's own float
        // and fused integer paths differ by ~1.5 % of the largest logit here).
        let (error, limit) = if name.ends_with("_qdq") {
            let scale = want.iter().fold(0f32, |m, v| m.max(v.abs()));
            let diff = got
                .iter()
                .zip(&want)
                .fold(0f32, |m, (a, b)| m.max((a - b).abs()));
            (diff / scale, 5e-2)
        } else {
            let worst = got
                .iter()
                .zip(&want)
                .map(|(a, b)| (a - b).abs() / (1e-3 + b.abs()))
                .fold(0f32, f32::max);
            (worst, 1e-2)
        };
        assert!(
            error < limit,
            "{name}: opreg and onnxruntime disagree (error {error}, limit {limit})"
        );
        let mut times = Vec::new();
        let start = Instant::now();
        while times.len() < 20 || (start.elapsed().as_secs_f64() < 2.0 && times.len() < 2000) {
            let t = Instant::now();
            run();
            times.push(t.elapsed().as_secs_f64() * 1e3);
        }
        times.sort_by(f64::total_cmp);
        let ours = times[times.len() / 2];
        println!(
            "{name:>16} {ours:>12.3} {ort_ms:>12.3} {:>14.2}",
            ours / ort_ms
        );
        if std::env::var_os("OPREG_BENCH_PROFILE").is_some() {
            let feeds: HashMap<String, Arc<HostTensor>> = [("x".to_string(), x.clone())].into();
            let (_, steps) = pool
                .install(|| graph::run_profiled(&plan, feeds, &graph::RunControl::unbounded()))
                .expect("profile");
            let info = plan.steps();
            for t in steps {
                let label = info.get(t.step).map_or("?", |s| s.label.as_str());
                println!("        {:>9.3} ms  {label}", t.seconds * 1e3);
            }
        }
    }
}

//! Whole models: opreg's graph runtime (in-process, the workspace's release plugins) side by
//! side with ONNX Runtime (Python, same machine, same thread count) in one run. Reports the
//! median-latency ratio opreg / ONNX Runtime per model, after checking both agree: a small MLP
//! and CNN, and ResNet-50, MobileNetV2 and EfficientNet-B0 at batch 1 (the first two also
//! quantized to QDQ by ONNX Runtime) when `target/models` has them (`scripts/bench` writes them).
//!
//! Then the real-model table: each model of `target/models` at batch 1 and 8, `opreg bench`
//! (the release binary, its own process) against `bench_ort_model.py` (onnxruntime, its own
//! process), the same thread count and input shapes: median and p90 over at least 30 runs after
//! warm-up, and each process's peak RSS, as ratios opreg / ONNX Runtime. The two sides run
//! alternately, `OPREG_BENCH_ROUNDS` rounds (3 by default) of one process each, and a ratio is
//! the median of the rounds' ratios, each from two processes run back to back: on a shared
//! machine whose speed drifts by tens of percent from one minute to the next, one process per
//! side put each in a different state (the same ORT process measured 1.54 and 1.95 ms on
//! SqueezeNet minutes apart); the range of the rounds' ratios is printed beside it.
//!
//! Each model is also served by a release `opregd` and called over gRPC (KServe v2, one client,
//! back to back): its p50 against ONNX Runtime's in-process p50, and the serving overhead (gRPC
//! p50 - `opreg bench` p50). Last, that overhead alone, on models that do next to nothing with a
//! 600 KB input (a 1x3x224x224 f32 image): ReduceMean to a scalar, and Relu (600 KB back).
//!
//! Run with `scripts/bench`. `OPREG_BENCH_MODELS=resnet50,crnn` limits the real-model table.

use opreg_sdk::{host::HostTensor, DType, Device};
use opregd::{exec::ComputePool, graph, registry::Registry};
use std::{collections::HashMap, path::Path, process::Command, sync::Arc, time::Instant};

#[path = "models/grpc.rs"]
mod grpc;

/// The real models (file stem in `target/models`; those missing are skipped) and the whole
/// shapes their symbolic dimensions past the batch need (`{b}`: the batch).
const REAL_MODELS: &[(&str, &[&str])] = &[
    ("resnet50", &[]),
    ("resnet18", &[]),
    ("mobilenetv2", &[]),
    ("efficientnet_b0", &[]),
    ("squeezenet", &[]),
    ("crnn", &[]),
    ("bert6", &["input_ids:{b}x128", "attention_mask:{b}x128"]),
    ("resnet50_qdq", &[]),
    ("mobilenetv2_qdq", &[]),
];

/// Runs `cmd` and parses the JSON object it prints last.
fn json_of(cmd: &mut Command, what: &str) -> serde_json::Value {
    let out = cmd.output().unwrap_or_else(|e| panic!("{what}: {e}"));
    assert!(
        out.status.success(),
        "{what} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8_lossy(&out.stdout);
    let last = text.lines().last().unwrap_or_default();
    serde_json::from_str(last).unwrap_or_else(|e| panic!("{what}: {e}: {text}"))
}

/// The real-model table (see the module docs).
fn real_models(threads: usize, python: &str) {
    let root = opreg_tests::workspace();
    let models = root.join("target/models");
    let opreg = root.join("target/release/opreg");
    let plugins = tempfile::tempdir().expect("tempdir");
    for p in ["onnx_ops", "blas_cpu"] {
        let src = opreg_tests::plugin(p);
        std::fs::copy(&src, plugins.path().join(src.file_name().expect("name"))).expect("copy");
    }
    let only: Option<Vec<String>> = std::env::var("OPREG_BENCH_MODELS")
        .ok()
        .map(|v| v.split(',').map(str::to_string).collect());
    let rounds: usize = std::env::var("OPREG_BENCH_ROUNDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(3)
        .max(1);
    println!(
        "\nreal models, {threads} threads, each side in its own process (median and p90 of >= 30 runs), {rounds} alternating rounds"
    );
    println!(
        "(p50, p90: medians over the rounds; p50 x, p90 x: medians of the rounds' ratios, p50 x range: their lowest and highest)"
    );
    println!(
        "(gRPC: a release opregd serving the model, one client calling back to back; +gRPC: its p50 - opreg p50)"
    );
    println!(
        "{:>16} {:>5} {:>10} {:>10} {:>10} {:>10} {:>8} {:>11} {:>8} {:>9} {:>9} {:>8} {:>9} {:>8} {:>8}",
        "model",
        "batch",
        "opreg p50",
        "ORT p50",
        "opreg p90",
        "ORT p90",
        "p50 x",
        "p50 x range",
        "p90 x",
        "opreg MiB",
        "ORT MiB",
        "RSS x",
        "gRPC p50",
        "gRPC x",
        "+gRPC ms"
    );
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    for (name, shapes) in REAL_MODELS {
        let path = models.join(format!("{name}.onnx"));
        if !path.exists() || only.as_ref().is_some_and(|o| !o.iter().any(|m| m == name)) {
            continue;
        }
        let served = rt
            .block_on(grpc::serve_file(name, &path))
            .unwrap_or_else(|e| panic!("serving {name}: {e}"));
        for batch in [1usize, 8] {
            let shapes: Vec<String> = shapes
                .iter()
                .map(|s| s.replace("{b}", &batch.to_string()))
                .collect();
            let mut runs = Vec::with_capacity(rounds);
            for _ in 0..rounds {
                let ours = json_of(
                    Command::new(&opreg)
                        .arg("bench")
                        .arg(&path)
                        .arg("--plugin-dir")
                        .arg(plugins.path())
                        .args([
                            "--threads",
                            &threads.to_string(),
                            "--batch",
                            &batch.to_string(),
                        ])
                        .args(shapes.iter().flat_map(|s| ["--shape", s.as_str()]))
                        .arg("--json"),
                    &format!("opreg bench {name}"),
                );
                let peer = json_of(
                    Command::new(python)
                        .arg(root.join("tests/python/bench_ort_model.py"))
                        .arg(&path)
                        .arg(batch.to_string())
                        .arg(threads.to_string())
                        .args(&shapes),
                    &format!("onnxruntime {name}"),
                );
                runs.push((ours, peer));
            }
            let f = |v: &serde_json::Value, k: &str| v[k].as_f64().unwrap_or(f64::NAN);
            // Per side and key, over the rounds: the median, and the median of the ratios.
            let med = |side: usize, k: &str| {
                median(
                    runs.iter()
                        .map(|r| f(if side == 0 { &r.0 } else { &r.1 }, k)),
                )
            };
            let ratios =
                |k: &str| -> Vec<f64> { runs.iter().map(|(o, p)| f(o, k) / f(p, k)).collect() };
            let p50x = ratios("median_ms");
            let (lo, hi) = p50x
                .iter()
                .fold((f64::INFINITY, f64::NEG_INFINITY), |(l, h), &v| {
                    (l.min(v), h.max(v))
                });
            let ours_p50 = med(0, "median_ms");
            // A window of at least 30 requests at opreg's in-process pace, as the other sides.
            let window = (30.0 * 1.2 * ours_p50).max(2000.0) as u64;
            let (remote, _) = grpc::latency(&opreg, &served, batch, &shapes, window)
                .unwrap_or_else(|e| panic!("{name} over gRPC: {e}"));
            // Peak RSS: the largest of the rounds' processes, each side.
            let mib = |side: usize| {
                runs.iter()
                    .map(|r| f(if side == 0 { &r.0 } else { &r.1 }, "peak_rss_bytes"))
                    .fold(f64::NAN, f64::max)
                    / f64::from(1 << 20)
            };
            println!(
                "{name:>16} {batch:>5} {:>10.2} {:>10.2} {:>10.2} {:>10.2} {:>8.2} {:>11} {:>8.2} {:>9.0} {:>9.0} {:>8.2} {:>9.2} {:>8.2} {:>8.2}",
                ours_p50,
                med(1, "median_ms"),
                med(0, "p90_ms"),
                med(1, "p90_ms"),
                median(p50x.iter().copied()),
                format!("{lo:.2}-{hi:.2}"),
                median(ratios("p90_ms").into_iter()),
                mib(0),
                mib(1),
                mib(0) / mib(1),
                remote,
                remote / med(1, "median_ms"),
                remote - ours_p50,
            );
        }
    }
    serving_overhead(&rt, &opreg, plugins.path());
}

/// The median of `v` (NaN when empty; the mean of the middle two when even).
fn median(v: impl Iterator<Item = f64>) -> f64 {
    let mut v: Vec<f64> = v.collect();
    v.sort_by(f64::total_cmp);
    match v.len() {
        0 => f64::NAN,
        n if n % 2 == 1 => v[n / 2],
        n => (v[n / 2 - 1] + v[n / 2]) / 2.0,
    }
}

/// The serving overhead alone (see the module docs): `opreg bench` and the daemon over gRPC on
/// models whose compute is negligible next to moving a 600 KB input.
fn serving_overhead(rt: &tokio::runtime::Runtime, opreg: &Path, plugins: &Path) {
    use opreg_tests::onnx::{attr_int, model, node, node_with, value};
    let dims = [1i64, 3, 224, 224];
    let cases = [
        (
            "reducemean",
            model(
                vec![node_with(
                    "ReduceMean",
                    &["x"],
                    &["y"],
                    vec![attr_int("keepdims", 0)],
                )],
                vec![value("x", 1, &dims)],
                vec![value("y", 1, &[])],
                vec![],
                13,
            ),
        ),
        (
            "relu",
            model(
                vec![node("Relu", &["x"], &["y"])],
                vec![value("x", 1, &dims)],
                vec![value("y", 1, &dims)],
                vec![],
                13,
            ),
        ),
    ];
    let dir = tempfile::tempdir().expect("tempdir");
    println!("\nserving overhead, 1x3x224x224 f32 input (588 KiB), one client back to back");
    println!(
        "{:>12} {:>12} {:>12} {:>12} {:>12} {:>12}",
        "model", "in-proc p50", "gRPC p50", "+gRPC p50", "gRPC p90", "x in-proc"
    );
    for (name, bytes) in cases {
        let path = dir.path().join(format!("{name}.onnx"));
        std::fs::write(&path, &bytes).expect("write model");
        let local = json_of(
            Command::new(opreg)
                .arg("bench")
                .arg(&path)
                .arg("--plugin-dir")
                .arg(plugins)
                .arg("--json"),
            &format!("opreg bench {name}"),
        );
        let (p50, p90) = rt
            .block_on(grpc::serve(name, &bytes))
            .and_then(|served| grpc::latency(opreg, &served, 1, &[], 2000))
            .unwrap_or_else(|e| panic!("{name} over gRPC: {e}"));
        let here = local["median_ms"].as_f64().unwrap_or(f64::NAN);
        println!(
            "{name:>12} {here:>12.3} {p50:>12.3} {:>12.3} {p90:>12.3} {:>12.1}",
            p50 - here,
            p50 / here
        );
    }
}

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
    let out = std::process::Command::new(&python)
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
    // This thread computes, as onnxruntime's caller does (see `ComputePool::on_this_thread`).
    let pool = ComputePool::on_this_thread(threads).expect("pool");
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
    real_models(threads, &python);
}

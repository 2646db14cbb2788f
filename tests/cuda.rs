//! The CUDA plugin through the real daemon: every case of `tests/python/make_cuda_cases.py`
//! (one model per kernel and attribute variant, a mini CNN, a mini transformer layer) served
//! preferring `["cuda", "cpu"]` and on `["cpu"]` alone, with the same inputs.
//!
//! - Without a GPU (CI): the plugin registers nothing, every node is placed on the CPU, no copy
//!   is made, and both models answer alike — a model asking for CUDA still serves.
//! - With `OPREG_GPU_TESTS=1` (a GPU machine): every node of every case is placed on `cuda`
//!   except the declined ones (a `decline_*` case's first node is on the CPU), and each output
//!   equals the CPU plugin's within 1e-4 relative (f32, different summation orders).

use opreg_proto::{inference as pb, opreg::v1 as reg};
use opreg_tests::*;
use std::path::PathBuf;

fn gpu_tests() -> bool {
    std::env::var("OPREG_GPU_TESTS").as_deref() == Ok("1")
}

/// The generated cases (`None`, skipped, without the Python interpreter outside CI).
fn cases() -> Option<(tempfile::TempDir, Vec<PathBuf>)> {
    let dir = tempfile::tempdir().expect("tmp");
    run_python("make_cuda_cases.py", &[&dir.path()])?;
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir.path())
        .expect("cases")
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|e| e == "onnx"))
        .collect();
    files.sort();
    assert!(files.len() > 60, "only {} cases", files.len());
    Some((dir, files))
}

/// A repository with each case twice: `<case>` preferring CUDA, `<case>-cpu` on the CPU.
fn repository(cases: &[PathBuf]) -> tempfile::TempDir {
    let repo = tempfile::tempdir().expect("repo");
    for case in cases {
        let name = case.file_stem().and_then(|s| s.to_str()).expect("name");
        for (model, backends) in [
            (name.to_string(), "[\"cuda\", \"cpu\"]"),
            (format!("{name}-cpu"), "[\"cpu\"]"),
        ] {
            let dir = repo.path().join(&model);
            std::fs::create_dir_all(dir.join("1")).expect("mkdir");
            std::fs::copy(case, dir.join("1/model.onnx")).expect("copy");
            std::fs::write(dir.join("config.toml"), format!("backends = {backends}\n"))
                .expect("config");
        }
    }
    repo
}

/// Deterministic inputs in [-2, 2) for every input the model declares.
async fn request(d: &Daemon, model: &str) -> pb::ModelInferRequest {
    let meta = d
        .inference()
        .await
        .model_metadata(pb::ModelMetadataRequest {
            name: model.into(),
            version: String::new(),
        })
        .await
        .unwrap_or_else(|e| panic!("{model}: metadata: {e}"))
        .into_inner();
    let mut req = pb::ModelInferRequest {
        model_name: model.into(),
        ..Default::default()
    };
    for (k, input) in meta.inputs.iter().enumerate() {
        assert_eq!(input.datatype, "FP32", "{model}: input {}", input.name);
        let shape: Vec<i64> = input.shape.iter().map(|&d| d.max(1)).collect();
        let n: i64 = shape.iter().product();
        let mut state = 0x9E37_79B9u32.wrapping_add(k as u32 * 7919);
        let values: Vec<f32> = (0..n)
            .map(|_| {
                state ^= state << 13;
                state ^= state >> 17;
                state ^= state << 5;
                (state % 4000) as f32 / 1000.0 - 2.0
            })
            .collect();
        req.inputs.push(pb::model_infer_request::InferInputTensor {
            name: input.name.clone(),
            datatype: "FP32".into(),
            shape,
            ..Default::default()
        });
        req.raw_input_contents.push(f32_bytes(&values).into());
    }
    req
}

async fn infer(
    d: &Daemon,
    req: pb::ModelInferRequest,
) -> Result<Vec<(Vec<i64>, Vec<f32>)>, String> {
    let r = d
        .inference()
        .await
        .model_infer(req)
        .await
        .map_err(|e| format!("{:?}: {}", e.code(), e.message()))?
        .into_inner();
    Ok(r.outputs
        .iter()
        .zip(&r.raw_output_contents)
        .map(|(o, raw)| (o.shape.clone(), f32_values(raw)))
        .collect())
}

async fn placement(d: &Daemon, model: &str) -> reg::ModelPlacementResponse {
    d.registry()
        .await
        .model_placement(reg::ModelPlacementRequest {
            name: model.into(),
            version: String::new(),
        })
        .await
        .unwrap_or_else(|e| panic!("{model}: placement: {e}"))
        .into_inner()
}

/// Largest error relative to max(1, |want|), NaNs equal to NaNs.
fn max_error(got: &[f32], want: &[f32]) -> f32 {
    got.iter()
        .zip(want)
        .map(|(&g, &w)| {
            if g.is_nan() && w.is_nan() || g == w {
                0.0
            } else {
                (g - w).abs() / w.abs().max(1.0)
            }
        })
        .fold(0.0, f32::max)
}

/// Runs every case; returns the failures, one line each.
async fn check_all(d: &Daemon, cases: &[PathBuf], gpu: bool) -> Vec<String> {
    let mut failures = Vec::new();
    let mut on_cuda = 0;
    for case in cases {
        let name = case
            .file_stem()
            .and_then(|s| s.to_str())
            .expect("name")
            .to_string();
        let p = placement(d, &name).await;
        let declined = name.starts_with("decline_");
        for (i, n) in p.nodes.iter().enumerate() {
            on_cuda += (n.device == "cuda") as usize;
            // A declined case's first node is the one the plugin must decline: it is on the
            // CPU; the nodes after it may run on either.
            let want = match (declined, i) {
                (true, 0) => "cpu",
                (true, _) => continue,
                (false, _) if gpu => "cuda",
                (false, _) => "cpu",
            };
            if n.device != want {
                failures.push(format!(
                    "{name}: node {} ({}) placed on {}, not {want}",
                    n.node, n.op_type, n.device
                ));
            }
        }
        if !gpu && !p.copies.is_empty() {
            failures.push(format!("{name}: {} copies without a GPU", p.copies.len()));
        }
        let req = request(d, &name).await;
        let mut cpu_req = req.clone();
        cpu_req.model_name = format!("{name}-cpu");
        let (got, want) = match (infer(d, req).await, infer(d, cpu_req).await) {
            (Ok(g), Ok(w)) => (g, w),
            (g, w) => {
                failures.push(format!("{name}: cuda {:?} / cpu {:?}", g.err(), w.err()));
                continue;
            }
        };
        for (k, ((gs, g), (ws, w))) in got.iter().zip(&want).enumerate() {
            if gs != ws {
                failures.push(format!("{name}: output {k} shape {gs:?}, cpu {ws:?}"));
                continue;
            }
            let e = max_error(g, w);
            if e > 1e-4 {
                failures.push(format!("{name}: output {k} differs by {e:e} (relative)"));
            }
        }
        println!("{name}: {} nodes, {} copies", p.nodes.len(), p.copies.len());
    }
    if gpu {
        assert!(on_cuda > cases.len(), "only {on_cuda} nodes on cuda");
    }
    failures
}

#[tokio::test]
async fn every_case_serves_on_cuda_or_falls_back_to_the_cpu() {
    let Some((_dir, cases)) = cases() else { return };
    let repo = repository(&cases);
    let plugins = plugin_dir(&[plugin("onnx_ops"), plugin("blas_cpu"), plugin("cuda")]);
    let d = Daemon::start_with(Options {
        args: vec![
            "--plugin-dir".into(),
            plugins.path().display().to_string(),
            "--model-repo".into(),
            repo.path().display().to_string(),
        ],
        env: vec![("RUST_LOG".into(), "warn".into())],
        ..Options::default()
    });
    let gpu = gpu_tests();
    if !gpu && !d.log().contains("cuda: no GPU") {
        eprintln!("skipped: this machine has a GPU; OPREG_GPU_TESTS=1 runs the GPU checks");
        return;
    }
    let failures = check_all(&d, &cases, gpu).await;
    assert!(
        failures.is_empty(),
        "{} failures:\n{}",
        failures.len(),
        failures.join("\n")
    );
}

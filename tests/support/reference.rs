//! Reference cases written by a Python generator (`tests/python/make_*_models.py`): one
//! folder per model with `model.onnx`, inputs `input_<k>_<name>.npy` and expected outputs
//! `output_<k>.npy` (the ONNX reference evaluator's). [`check`] serves them all from one daemon
//! and compares every output over gRPC.

use crate::{f32_values, python, start_serving, workspace};
use opreg_proto::inference as pb;
use opreg_sdk::{host::HostTensor, DType};
use std::path::{Path, PathBuf};

/// Runs `tests/python/<script>` into `out` and returns the case names it printed; `None`
/// without Python outside CI.
pub fn generate(script: &str, out: &Path) -> Option<Vec<String>> {
    let python = python()?;
    let status = std::process::Command::new(python)
        .arg(workspace().join("tests/python").join(script))
        .arg(out)
        .output()
        .expect("run python");
    assert!(
        status.status.success(),
        "{script}: {}",
        String::from_utf8_lossy(&status.stderr)
    );
    Some(
        String::from_utf8_lossy(&status.stdout)
            .lines()
            .map(str::to_string)
            .collect(),
    )
}

fn npy(path: &Path) -> HostTensor {
    opregd::quant::data::read_npy(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// `case`'s files starting with `prefix`, sorted.
fn files(case: &Path, prefix: &str) -> Vec<PathBuf> {
    let mut v: Vec<_> = std::fs::read_dir(case)
        .expect("case dir")
        .filter_map(|e| Some(e.ok()?.path()))
        .filter(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with(prefix) && n.ends_with(".npy"))
        })
        .collect();
    v.sort();
    v
}

/// Elements as f64, whatever the numeric type (bool as 0/1).
fn as_f64(dtype: DType, b: &[u8]) -> Vec<f64> {
    match dtype {
        DType::F32 => f32_values(b).into_iter().map(f64::from).collect(),
        DType::F64 => b
            .chunks_exact(8)
            .map(|c| f64::from_le_bytes(c.try_into().unwrap()))
            .collect(),
        DType::I64 => b
            .chunks_exact(8)
            .map(|c| i64::from_le_bytes(c.try_into().unwrap()) as f64)
            .collect(),
        DType::I32 => b
            .chunks_exact(4)
            .map(|c| i32::from_le_bytes(c.try_into().unwrap()) as f64)
            .collect(),
        DType::Bool | DType::U8 => b.iter().map(|&v| v as f64).collect(),
        other => panic!("unexpected output type {other}"),
    }
}

/// Serves every case in `dir` and checks each output's type, shape and values
/// (`|got − want| ≤ 1e-5 + 1e-4·|want|`).
pub async fn check(dir: &Path, cases: &[String]) {
    let repo = tempfile::tempdir().unwrap();
    for c in cases {
        let v = repo.path().join(c).join("1");
        std::fs::create_dir_all(&v).unwrap();
        std::fs::copy(dir.join(c).join("model.onnx"), v.join("model.onnx")).unwrap();
    }
    let (d, _plugins) = start_serving(repo.path(), &[]);
    let log = d.wait_log("serving");
    assert!(!log.contains("model load failed"), "{log}");
    for c in cases {
        let case = dir.join(c);
        let mut req = pb::ModelInferRequest {
            model_name: c.clone(),
            ..Default::default()
        };
        for f in files(&case, "input_") {
            let t = npy(&f);
            let stem = f.file_stem().unwrap().to_str().unwrap();
            // input_<k>_<name>
            let name = stem.splitn(3, '_').nth(2).unwrap().to_string();
            req.inputs.push(pb::model_infer_request::InferInputTensor {
                name,
                datatype: t.dtype().kserve_name().into(),
                shape: t.shape().iter().map(|&d| d as i64).collect(),
                ..Default::default()
            });
            req.raw_input_contents.push(t.bytes().to_vec().into());
        }
        let r = d
            .inference()
            .await
            .model_infer(req)
            .await
            .unwrap_or_else(|e| panic!("{c}: {e}"))
            .into_inner();
        let expected = files(&case, "output_");
        assert_eq!(r.outputs.len(), expected.len(), "{c}");
        for ((out, raw), f) in r.outputs.iter().zip(&r.raw_output_contents).zip(&expected) {
            let want = npy(f);
            assert_eq!(
                out.shape,
                want.shape().iter().map(|&d| d as i64).collect::<Vec<_>>(),
                "{c}: output {}",
                out.name
            );
            assert_eq!(
                out.datatype,
                want.dtype().kserve_name(),
                "{c}: output {}",
                out.name
            );
            let got = as_f64(want.dtype(), raw);
            let want = as_f64(want.dtype(), want.bytes());
            assert_eq!(got.len(), want.len(), "{c}: output {}", out.name);
            for (i, (g, w)) in got.iter().zip(&want).enumerate() {
                assert!(
                    (g - w).abs() <= 1e-5 + 1e-4 * w.abs(),
                    "{c}: output {} element {i}: {g} vs {w}",
                    out.name
                );
            }
        }
    }
}

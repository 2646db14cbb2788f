//! Models written at legacy opsets (1–6) are upgraded at import and served: each model of
//! `tests/python/make_legacy_models.py` (Conv + legacy broadcast bias + BatchNormalization with
//! `is_test` + Gemm with `broadcast` + Dropout; opset-1 Reshape/Concat/Cast/consumed_inputs; a
//! legacy broadcast of a computed operand) runs over gRPC and matches the ONNX reference
//! evaluator on its hand-written opset-13 twin. A legacy model whose conversion the model does
//! not pin down is refused with the node named, and the daemon keeps serving.

use opreg_proto::inference as pb;
use opreg_tests::{onnx::*, *};
use std::path::Path;

/// Runs the generator into `out`; `None` without Python outside CI.
fn generate(out: &Path) -> Option<Vec<String>> {
    let python = python()?;
    let status = std::process::Command::new(python)
        .arg(workspace().join("tests/python/make_legacy_models.py"))
        .arg(out)
        .output()
        .expect("run python");
    assert!(
        status.status.success(),
        "make_legacy_models.py: {}",
        String::from_utf8_lossy(&status.stderr)
    );
    Some(
        String::from_utf8_lossy(&status.stdout)
            .lines()
            .map(str::to_string)
            .collect(),
    )
}

fn npy(path: &Path) -> opreg_sdk::host::HostTensor {
    opregd::quant::data::read_npy(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// `case`'s inputs (`input_<k>_<name>.npy`, in order) and expected outputs (`output_<k>.npy`).
fn files(case: &Path, prefix: &str) -> Vec<std::path::PathBuf> {
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

fn values_f64(t: &opreg_sdk::host::HostTensor) -> Vec<f64> {
    match t.dtype() {
        opreg_sdk::DType::F32 => t
            .to_vec::<f32>()
            .unwrap()
            .into_iter()
            .map(f64::from)
            .collect(),
        opreg_sdk::DType::F64 => t.to_vec::<f64>().unwrap(),
        other => panic!("unexpected output type {other}"),
    }
}

fn bytes_f64(datatype: &str, b: &[u8]) -> Vec<f64> {
    match datatype {
        "FP32" => f32_values(b).into_iter().map(f64::from).collect(),
        "FP64" => b
            .chunks_exact(8)
            .map(|c| f64::from_le_bytes(c.try_into().unwrap()))
            .collect(),
        other => panic!("unexpected output datatype {other}"),
    }
}

#[tokio::test]
async fn legacy_opset_models_are_upgraded_and_match_the_reference() {
    let gen = tempfile::tempdir().unwrap();
    let Some(cases) = generate(gen.path()) else {
        return;
    };
    assert_eq!(cases.len(), 3, "{cases:?}");
    let repo = tempfile::tempdir().unwrap();
    for c in &cases {
        let dir = repo.path().join(c).join("1");
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::copy(
            gen.path().join(c).join("model.onnx"),
            dir.join("model.onnx"),
        )
        .unwrap();
    }
    let (d, _plugins) = start_serving(repo.path(), &[]);
    let log = d.wait_log("serving");
    assert!(!log.contains("model load failed"), "{log}");
    for c in &cases {
        let case = gen.path().join(c);
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
            req.raw_input_contents.push(t.bytes().to_vec());
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
            let got = bytes_f64(&out.datatype, raw);
            let want = values_f64(&want);
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

/// A legacy broadcast along an axis whose operand ranks the model does not declare cannot be
/// converted without guessing: the load fails naming the node, and the daemon keeps serving.
/// A float input of unknown rank.
fn unranked(name: &str) -> opreg_proto::onnx::ValueInfoProto {
    let mut v = value(name, 1, &[]);
    if let Some(opreg_proto::onnx::type_proto::Value::TensorType(t)) =
        v.r#type.as_mut().and_then(|t| t.value.as_mut())
    {
        t.shape = None;
    }
    v
}

#[tokio::test]
async fn ambiguous_legacy_broadcast_is_refused_with_the_node_named() {
    const F32: i32 = 1;
    let ambiguous = model(
        vec![
            node("Relu", &["x"], &["r"]),
            node("Relu", &["b"], &["rb"]),
            node_with(
                "Add",
                &["r", "rb"],
                &["y"],
                vec![attr_int("broadcast", 1), attr_int("axis", 1)],
            ),
        ],
        // Neither operand's rank is declared.
        vec![unranked("x"), unranked("b")],
        vec![value("y", F32, &[-1])],
        vec![],
        6,
    );
    let repo = tempfile::tempdir().unwrap();
    let (d, _plugins) = start_serving(repo.path(), &[]);
    let mut client = d.inference().await;
    let err = client
        .repository_model_load(load_request("ambiguous", ambiguous))
        .await
        .expect_err("refused");
    assert!(
        err.message().contains("legacy broadcast") && err.message().contains("(Add)"),
        "{}",
        err.message()
    );
    // Still serving: the live check answers.
    client
        .server_live(pb::ServerLiveRequest {})
        .await
        .expect("live");
}

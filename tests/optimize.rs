//! `opreg optimize`: the standard graph passes written back as ONNX, which onnxruntime loads
//! and runs to the same outputs (external data included).

use opreg_proto::onnx;
use opreg_tests::{onnx::*, *};
use prost::Message;

fn f32s(n: usize, seed: u32) -> Vec<f32> {
    (0..n)
        .map(|i| {
            (((i as u32).wrapping_mul(2654435761).wrapping_add(seed) >> 8) % 1000) as f32 / 500.0
                - 1.0
        })
        .collect()
}

fn positive(n: usize, seed: u32) -> Vec<f32> {
    f32s(n, seed).iter().map(|v| v.abs() + 0.5).collect()
}

/// `Conv -> BatchNormalization -> Relu -> Identity -> Conv(bias) -> BatchNormalization`.
fn conv_bn_model() -> Vec<u8> {
    let pads = attr_ints("pads", &[1, 1, 1, 1]);
    model(
        vec![
            node_with("Conv", &["x", "w1"], &["c1"], vec![pads]),
            node(
                "BatchNormalization",
                &["c1", "s1", "b1", "m1", "v1"],
                &["n1"],
            ),
            node("Relu", &["n1"], &["r1"]),
            node("Identity", &["r1"], &["i1"]),
            node("Conv", &["i1", "w2", "cb2"], &["c2"]),
            node(
                "BatchNormalization",
                &["c2", "s2", "b2", "m2", "v2"],
                &["y"],
            ),
        ],
        vec![value("x", 1, &[1, 3, 8, 8])],
        vec![value("y", 1, &[1, 2, 8, 8])],
        vec![
            f32_initializer("w1", &[4, 3, 3, 3], &f32s(108, 1)),
            f32_initializer("s1", &[4], &positive(4, 2)),
            f32_initializer("b1", &[4], &f32s(4, 3)),
            f32_initializer("m1", &[4], &f32s(4, 4)),
            f32_initializer("v1", &[4], &positive(4, 5)),
            f32_initializer("w2", &[2, 4, 1, 1], &f32s(8, 6)),
            f32_initializer("cb2", &[2], &f32s(2, 7)),
            f32_initializer("s2", &[2], &positive(2, 8)),
            f32_initializer("b2", &[2], &f32s(2, 9)),
            f32_initializer("m2", &[2], &f32s(2, 10)),
            f32_initializer("v2", &[2], &positive(2, 11)),
        ],
        17,
    )
}

#[test]
fn optimize_folds_batch_norms_drops_identities_and_onnxruntime_agrees() {
    let dir = tempfile::tempdir().expect("tempdir");
    let original = dir.path().join("model.onnx");
    std::fs::write(&original, conv_bn_model()).expect("write");
    let out = dir.path().join("optimized.onnx");
    let cli = std::process::Command::new(artifacts().join("opreg"))
        .arg("optimize")
        .arg(&original)
        .arg(&out)
        // w1 (432 bytes) goes to the external data file, the small tensors stay inline.
        .args(["--external-data-threshold", "400"])
        .output()
        .expect("run opreg optimize");
    let report = String::from_utf8_lossy(&cli.stdout).into_owned();
    assert!(
        cli.status.success(),
        "{report}{}",
        String::from_utf8_lossy(&cli.stderr)
    );
    assert!(report.contains("identities\t6 -> 5 nodes"), "{report}");
    assert!(report.contains("conv-batchnorm\t5 -> 3 nodes"), "{report}");

    let m =
        onnx::ModelProto::decode(std::fs::read(&out).expect("read").as_slice()).expect("decode");
    let g = m.graph.expect("graph");
    let ops: Vec<&str> = g.node.iter().map(|n| n.op_type.as_str()).collect();
    assert_eq!(ops, ["Conv", "Relu", "Conv"]);
    let external: Vec<&str> = g
        .initializer
        .iter()
        .filter(|t| !t.external_data.is_empty())
        .map(|t| t.name.as_str())
        .collect();
    assert_eq!(external, ["w1_bnfold"], "only the large weight goes out");
    assert!(dir.path().join("optimized.onnx.data").is_file());

    let Some(line) = run_python("compare_ort.py", &[&original, &out]) else {
        eprintln!("skipped the onnxruntime comparison: OPREG_TEST_PYTHON is not set");
        return;
    };
    let get = |k: &str| -> f64 {
        line.split(&format!("\"{k}\": "))
            .nth(1)
            .and_then(|s| s.split([',', '}']).next())
            .and_then(|s| s.trim().parse().ok())
            .unwrap_or_else(|| panic!("{k} in {line}"))
    };
    assert_eq!((get("nodes_a"), get("nodes_b")), (6.0, 3.0));
    assert!(
        get("max_abs_diff") <= 1e-4 * get("scale").max(1.0),
        "optimized model differs in onnxruntime: {line}"
    );
}

//! `opreg optimize`: the standard graph passes written back as ONNX, which onnxruntime loads
//! and runs to the same outputs (external data included).

use opreg_proto::onnx;
use opreg_tests::{onnx::*, *};
use prost::Message;
use std::path::Path;

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

/// Runs `opreg optimize ORIGINAL OUT ARGS`, which must succeed; its report.
fn optimize(original: &Path, out: &Path, args: &[&str]) -> String {
    let cli = std::process::Command::new(artifacts().join("opreg"))
        .arg("optimize")
        .arg(original)
        .arg(out)
        .args(args)
        .output()
        .expect("run opreg optimize");
    let report = String::from_utf8_lossy(&cli.stdout).into_owned();
    assert!(
        cli.status.success(),
        "{report}{}",
        String::from_utf8_lossy(&cli.stderr)
    );
    report
}

#[test]
fn optimize_folds_batch_norms_drops_identities_and_onnxruntime_agrees() {
    let dir = tempfile::tempdir().expect("tempdir");
    let original = dir.path().join("model.onnx");
    std::fs::write(&original, conv_bn_model()).expect("write");
    let out = dir.path().join("optimized.onnx");
    // w1 (432 bytes) goes to the external data file, the small tensors stay inline.
    let report = optimize(&original, &out, &["--external-data-threshold", "400"]);
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

/// A constant of ONNX type `code` from its little-endian bytes.
fn raw_tensor(name: &str, code: i32, dims: &[i64], raw: Vec<u8>) -> onnx::TensorProto {
    onnx::TensorProto {
        name: name.into(),
        dims: dims.to_vec(),
        data_type: code,
        raw_data: raw.into(),
        ..Default::default()
    }
}

/// Pseudo-random i8 weights.
fn i8s(n: usize, seed: u32) -> Vec<u8> {
    f32s(n, seed)
        .iter()
        .map(|v| ((v * 100.0) as i8) as u8)
        .collect()
}

/// A QDQ model as quantizers write it: `x -> Q -> DQ -> Conv(DQ(w_i8 per channel), DQ(b_i32))
/// -> Q -> DQ -> y` and `x2 -> Q -> DQ -> MatMul(DQ(m_i8 per column)) -> Q -> DQ -> y2`. With
/// `float_outputs`, the float Conv and MatMul outputs are graph outputs too, which keeps them
/// (and so the float path) in the plan. A residual-style join adds the dequantized Conv output
/// and a dequantized per-channel constant (broadcast) and quantizes the sum: `y3`. A classifier
/// head, `x2 -> Q -> DQ -> Gemm(DQ(g_i8 per column, transposed), DQ(gb_i32)) -> Q -> DQ`:
/// `y4`.
fn qdq_model(float_outputs: bool) -> Vec<u8> {
    let (xs, ws, ms, ys) = (0.02f32, [0.01f32, 0.02, 0.015, 0.03], [0.01f32; 5], 0.05f32);
    let scalar = |name: &str, v: f32| f32_initializer(name, &[], &[v]);
    let u8_scalar = |name: &str, v: u8| raw_tensor(name, 2, &[], vec![v]);
    let bias: Vec<u8> = [100i32, -250, 0, 4000]
        .iter()
        .flat_map(|v| v.to_le_bytes())
        .collect();
    let bs: Vec<f32> = ws.iter().map(|w| w * xs).collect();
    // 200 columns: two of QGemm's packed column blocks (192 + 8).
    let gs: Vec<f32> = (0..200).map(|j| 0.005 + 0.0001 * j as f32).collect();
    let gbias: Vec<u8> = (0..200i32)
        .flat_map(|j| (j * 37 - 3000).to_le_bytes())
        .collect();
    let gbs: Vec<f32> = gs.iter().map(|g| g * xs).collect();
    let inits = vec![
        scalar("xs", xs),
        u8_scalar("xz", 128),
        scalar("ys", ys),
        u8_scalar("yz", 100),
        raw_tensor("wq", 3, &[4, 3, 3, 3], i8s(4 * 27, 7)),
        f32_initializer("ws", &[4], &ws),
        raw_tensor("bq", 6, &[4], bias),
        f32_initializer("bs", &[4], &bs),
        raw_tensor("mq", 3, &[8, 5], i8s(40, 11)),
        f32_initializer("ms", &[5], &ms),
        raw_tensor("rq", 2, &[4, 1, 1], vec![3, 250, 128, 77]),
        scalar("rs", 0.03),
        u8_scalar("rz", 120),
        scalar("ss", 0.05),
        u8_scalar("sz", 90),
        raw_tensor("gq", 3, &[200, 8], i8s(1600, 13)),
        // An explicit zero point: onnxruntime's own QDQ -> QGemm fusion rejects a per-column
        // weight scale without one (opreg's supplies zeros of the scale's shape).
        raw_tensor("gz", 3, &[200], vec![0; 200]),
        f32_initializer("gs", &[200], &gs),
        raw_tensor("gbq", 6, &[200], gbias),
        f32_initializer("gbs", &[200], &gbs),
    ];
    let nodes = vec![
        node("QuantizeLinear", &["x", "xs", "xz"], &["xq"]),
        node("DequantizeLinear", &["xq", "xs", "xz"], &["xf"]),
        node_with(
            "DequantizeLinear",
            &["wq", "ws"],
            &["wf"],
            vec![attr_int("axis", 0)],
        ),
        node_with(
            "DequantizeLinear",
            &["bq", "bs"],
            &["bf"],
            vec![attr_int("axis", 0)],
        ),
        node_with(
            "Conv",
            &["xf", "wf", "bf"],
            &["c"],
            vec![attr_ints("pads", &[1, 1, 1, 1])],
        ),
        node("QuantizeLinear", &["c", "ys", "yz"], &["cq"]),
        node("DequantizeLinear", &["cq", "ys", "yz"], &["y"]),
        node("QuantizeLinear", &["x2", "xs", "xz"], &["x2q"]),
        node("DequantizeLinear", &["x2q", "xs", "xz"], &["x2f"]),
        node_with(
            "DequantizeLinear",
            &["mq", "ms"],
            &["mf"],
            vec![attr_int("axis", 1)],
        ),
        node("MatMul", &["x2f", "mf"], &["p"]),
        node("QuantizeLinear", &["p", "ys", "yz"], &["pq"]),
        node("DequantizeLinear", &["pq", "ys", "yz"], &["y2"]),
        node("DequantizeLinear", &["rq", "rs", "rz"], &["rf"]),
        node("Add", &["y", "rf"], &["sum"]),
        node("QuantizeLinear", &["sum", "ss", "sz"], &["sq"]),
        node("DequantizeLinear", &["sq", "ss", "sz"], &["y3"]),
        node_with(
            "DequantizeLinear",
            &["gq", "gs", "gz"],
            &["gf"],
            vec![attr_int("axis", 0)],
        ),
        node_with(
            "DequantizeLinear",
            &["gbq", "gbs"],
            &["gbf"],
            vec![attr_int("axis", 0)],
        ),
        node_with(
            "Gemm",
            &["x2f", "gf", "gbf"],
            &["g"],
            vec![attr_int("transB", 1)],
        ),
        node("QuantizeLinear", &["g", "ys", "yz"], &["gq_out"]),
        node("DequantizeLinear", &["gq_out", "ys", "yz"], &["y4"]),
    ];
    let mut outputs = vec![
        value("y", 1, &[1, 4, 6, 6]),
        value("y2", 1, &[2, 5]),
        value("y3", 1, &[1, 4, 6, 6]),
        value("y4", 1, &[2, 200]),
    ];
    if float_outputs {
        outputs.push(value("c", 1, &[1, 4, 6, 6]));
        outputs.push(value("p", 1, &[2, 5]));
        outputs.push(value("sum", 1, &[1, 4, 6, 6]));
        outputs.push(value("g", 1, &[2, 200]));
    }
    model(
        nodes,
        vec![value("x", 1, &[1, 3, 6, 6]), value("x2", 1, &[2, 8])],
        outputs,
        inits,
        19,
    )
}

#[tokio::test]
async fn qdq_models_run_on_integer_operators_and_agree_with_the_float_path() {
    use opreg_proto::{inference as pb, opreg::v1 as reg};
    let plugins = plugin_dir(&[plugin("onnx_ops"), plugin("blas_cpu")]);
    let d = Daemon::start(&["--plugin-dir", plugins.path().to_str().expect("utf8")]);
    let mut c = d.inference().await;
    for (name, float_outputs) in [("fused", false), ("float", true)] {
        c.repository_model_load(load_request(name, qdq_model(float_outputs)))
            .await
            .expect("load");
    }
    let ops = |name: &'static str| {
        let d = &d;
        async move {
            let p = d
                .registry()
                .await
                .model_placement(reg::ModelPlacementRequest {
                    name: name.into(),
                    version: String::new(),
                })
                .await
                .expect("placement")
                .into_inner();
            p.nodes
                .iter()
                .filter(|n| !n.folded)
                .map(|n| n.op_type.clone())
                .collect::<Vec<_>>()
        }
    };
    let fused = ops("fused").await;
    assert!(
        ["QLinearConv", "QLinearMatMul", "QLinearAdd", "QGemm"]
            .iter()
            .all(|op| fused.iter().any(|o| o == op)),
        "{fused:?}"
    );
    assert!(
        !fused
            .iter()
            .any(|o| o == "Conv" || o == "MatMul" || o == "Add" || o == "Gemm"),
        "{fused:?}"
    );
    let float = ops("float").await;
    assert!(
        ["Conv", "MatMul", "Add", "Gemm"]
            .iter()
            .all(|op| float.iter().any(|o| o == op)),
        "{float:?}"
    );

    let x = f32s(108, 3);
    let x2 = f32s(16, 5);
    let mut outs = Vec::new();
    for name in ["fused", "float"] {
        let r = c
            .model_infer(pb::ModelInferRequest {
                model_name: name.into(),
                inputs: vec![
                    pb::model_infer_request::InferInputTensor {
                        name: "x".into(),
                        datatype: "FP32".into(),
                        shape: vec![1, 3, 6, 6],
                        ..Default::default()
                    },
                    pb::model_infer_request::InferInputTensor {
                        name: "x2".into(),
                        datatype: "FP32".into(),
                        shape: vec![2, 8],
                        ..Default::default()
                    },
                ],
                outputs: ["y", "y2", "y3", "y4"]
                    .iter()
                    .map(|o| pb::model_infer_request::InferRequestedOutputTensor {
                        name: o.to_string(),
                        ..Default::default()
                    })
                    .collect(),
                raw_input_contents: vec![f32_bytes(&x).into(), f32_bytes(&x2).into()],
                ..Default::default()
            })
            .await
            .expect("infer")
            .into_inner();
        outs.push(
            r.raw_output_contents
                .iter()
                .map(|b| f32_values(b))
                .collect::<Vec<_>>(),
        );
    }
    // The integer path requantizes the exact int32 sum; the float path rounds the f32 sum: they
    // may differ by one quantization step (0.05) where a value sits on a rounding boundary.
    for (k, (a, b)) in outs[0].iter().zip(&outs[1]).enumerate() {
        assert_eq!(a.len(), b.len());
        let worst = a
            .iter()
            .zip(b)
            .map(|(p, q)| (p - q).abs())
            .fold(0.0, f32::max);
        let differ = a.iter().zip(b).filter(|(p, q)| p != q).count();
        assert!(worst <= 0.05 + 1e-6, "output {k}: {worst}");
        assert!(
            differ * 20 <= a.len(),
            "output {k}: {differ} of {} differ",
            a.len()
        );
    }
}

/// `opreg optimize --level all` writes the integer operators the compiler runs — the QDQ
/// convolution as ONNX Runtime's channels-last `com.microsoft::QLinearConv`, transposed only
/// at the integer region's edges — and onnxruntime loads that file and computes what it
/// computes for the QDQ original, to within one output quantization step (0.05: the two
/// runtimes may round a tie differently).
#[test]
fn optimize_all_writes_channels_last_integer_operators_that_onnxruntime_runs() {
    let dir = tempfile::tempdir().expect("tempdir");
    let original = dir.path().join("model.onnx");
    std::fs::write(&original, qdq_model(false)).expect("write");
    let out = dir.path().join("optimized.onnx");
    let report = optimize(&original, &out, &["--level", "all"]);
    let m =
        onnx::ModelProto::decode(std::fs::read(&out).expect("read").as_slice()).expect("decode");
    let g = m.graph.expect("graph");
    let conv = g
        .node
        .iter()
        .find(|n| n.op_type == "QLinearConv")
        .unwrap_or_else(|| panic!("no QLinearConv: {report}"));
    assert_eq!(conv.domain, "com.microsoft");
    assert!(
        conv.attribute
            .iter()
            .any(|a| a.name == "channels_last" && a.i == 1),
        "{conv:?}"
    );
    let transposes = g.node.iter().filter(|n| n.op_type == "Transpose").count();
    assert_eq!(transposes, 2, "into and out of the convolution only");

    let Some(line) = run_python("compare_ort.py", &[&original, &out]) else {
        eprintln!("skipped the onnxruntime comparison: OPREG_TEST_PYTHON is not set");
        return;
    };
    let diff: f64 = line
        .split("\"max_abs_diff\": ")
        .nth(1)
        .and_then(|s| s.split([',', '}']).next())
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or_else(|| panic!("max_abs_diff in {line}"));
    assert!(diff <= 0.0501, "onnxruntime differs by {diff}: {line}");
}

#![allow(clippy::indexing_slicing)] // tests index what they just built
use super::*;
use crate::graph::import::{IoSpec, Node};
use opreg_sdk::{host::HostTensor, DType};
use std::sync::Arc;

fn node(op: &str, inputs: &[&str], outputs: &[&str]) -> Node {
    Node {
        name: format!("{op}_{}", outputs.first().copied().unwrap_or("")),
        domain: String::new(),
        op_type: op.into(),
        inputs: inputs.iter().map(|s| s.to_string()).collect(),
        outputs: outputs.iter().map(|s| s.to_string()).collect(),
        attributes: Vec::new(),
        subgraphs: Vec::new(),
    }
}

fn io(name: &str) -> IoSpec {
    IoSpec {
        name: name.into(),
        dtype: DType::F32,
        shape: None,
    }
}

fn model(nodes: Vec<Node>, outputs: &[&str], inits: &[(&str, &[usize], Vec<f32>)]) -> Model {
    Model {
        opsets: [(String::new(), 17)].into(),
        inputs: vec![io("x")],
        outputs: outputs.iter().map(|o| io(o)).collect(),
        initializers: inits
            .iter()
            .map(|(n, s, v)| (n.to_string(), Arc::new(HostTensor::from_vec(s, v).unwrap())))
            .collect(),
        nodes,
    }
}

#[test]
fn dead_nodes_and_unread_initializers_go() {
    let mut m = model(
        vec![
            node("Relu", &["x"], &["a"]),
            node("Neg", &["x"], &["unused"]),
            node("Add", &["a", "k"], &["y"]),
        ],
        &["y"],
        &[("k", &[1], vec![1.0]), ("stale", &[1], vec![2.0])],
    );
    assert_eq!(dead::DeadNodes.run(&mut m).unwrap(), 1);
    let ops: Vec<&str> = m.nodes.iter().map(|n| n.op_type.as_str()).collect();
    assert_eq!(ops, ["Relu", "Add"]);
    assert!(m.initializers.contains_key("k") && !m.initializers.contains_key("stale"));
}

#[test]
fn identities_forward_their_input_but_graph_outputs_keep_their_names() {
    let mut m = model(
        vec![
            node("Identity", &["x"], &["a"]),
            node("Identity", &["a"], &["b"]),
            node("Relu", &["b"], &["r"]),
            node("Identity", &["r"], &["y"]),
        ],
        &["y"],
        &[],
    );
    assert_eq!(identity::Identities.run(&mut m).unwrap(), 2);
    assert_eq!(m.nodes[0].op_type, "Relu");
    assert_eq!(m.nodes[0].inputs, ["x"], "chains of identities collapse");
    assert_eq!(m.nodes[1].outputs, ["y"], "the output's Identity stays");
}

#[test]
fn batch_norm_folds_into_its_conv_only_when_nothing_else_reads_the_conv() {
    let inits: &[(&str, &[usize], Vec<f32>)] = &[
        ("w", &[2, 1, 1, 1], vec![1.0, 2.0]),
        ("s", &[2], vec![2.0, 0.5]),
        ("b", &[2], vec![1.0, -1.0]),
        ("m", &[2], vec![0.5, 0.0]),
        ("v", &[2], vec![3.0, 0.0]),
    ];
    let bn = || node("BatchNormalization", &["c", "s", "b", "m", "v"], &["y"]);
    let mut m = model(vec![node("Conv", &["x", "w"], &["c"]), bn()], &["y"], inits);
    assert_eq!(bn_fold::ConvBatchNorm.run(&mut m).unwrap(), 1);
    assert_eq!(m.nodes.len(), 1);
    let conv = &m.nodes[0];
    assert_eq!(conv.outputs, ["y"]);
    let w = m.initializers[&conv.inputs[1]].to_vec::<f32>().unwrap();
    let bias = m.initializers[&conv.inputs[2]].to_vec::<f32>().unwrap();
    // s = scale / sqrt(var + 1e-5)
    let s0 = 2.0 / (3.0f64 + 1e-5).sqrt();
    let s1 = 0.5 / (1e-5f64).sqrt();
    assert!((w[0] as f64 - s0).abs() < 1e-6 && (w[1] as f64 - 2.0 * s1).abs() < 1e-3);
    assert!((bias[0] as f64 - (1.0 - 0.5 * s0)).abs() < 1e-6);
    assert!((bias[1] as f64 - -1.0).abs() < 1e-6);
    // The original weights are untouched (another node may share them).
    assert_eq!(m.initializers["w"].to_vec::<f32>().unwrap(), vec![1.0, 2.0]);

    // The Conv's output read twice: no fold.
    let mut m = model(
        vec![
            node("Conv", &["x", "w"], &["c"]),
            bn(),
            node("Relu", &["c"], &["z"]),
        ],
        &["y", "z"],
        inits,
    );
    assert_eq!(bn_fold::ConvBatchNorm.run(&mut m).unwrap(), 0);
    assert_eq!(m.nodes.len(), 3);
}

#[test]
fn malformed_nodes_pass_through_every_pass_without_a_panic() {
    // Nodes with missing inputs and outputs, as a hostile model has them: the passes leave
    // them for the compiler to refuse with a message.
    let inits: &[(&str, &[usize], Vec<f32>)] = &[
        ("w", &[1, 1, 1, 1], vec![1.0]),
        // A zero-size weight under a complete BatchNormalization.
        ("w0", &[2, 0, 1, 1], vec![]),
        ("s", &[2], vec![1.0, 1.0]),
        ("v", &[2], vec![1.0, 1.0]),
    ];
    let mut m = model(
        vec![
            node("Conv", &["x", "w0"], &["z"]),
            node("BatchNormalization", &["z", "s", "s", "s", "v"], &["zn"]),
            node("Conv", &["x", "w"], &["c"]),
            node("BatchNormalization", &["c"], &[]),
            node("Identity", &[], &["i"]),
            node("Identity", &["x"], &[]),
            node("Conv", &["x"], &["d"]),
            node("Relu", &["d"], &[]),
            node("Clip", &["c", "nope"], &["y"]),
        ],
        &["y", "i", "zn"],
        inits,
    );
    run(&mut m, STANDARD).expect("standard passes");
    run(&mut m, FUSIONS).expect("fusions");
}

/// A node with integer attributes.
fn node_with(op: &str, inputs: &[&str], outputs: &[&str], attrs: &[(&str, i64)]) -> Node {
    let mut n = node(op, inputs, outputs);
    n.attributes = attrs
        .iter()
        .map(|(k, v)| opreg_sdk::kernel::Attribute {
            name: (*k).into(),
            value: opreg_sdk::AttrValue::Int(*v),
        })
        .collect();
    n
}

/// Adds integer constants to `m`.
fn with_ints(mut m: Model) -> Model {
    let u8s = |s: &[usize], v: &[u8]| Arc::new(HostTensor::from_vec(s, v).unwrap());
    let i8s = |s: &[usize], v: &[i8]| Arc::new(HostTensor::from_vec(s, v).unwrap());
    m.initializers.insert("xz".into(), u8s(&[], &[128]));
    m.initializers.insert("yz".into(), u8s(&[], &[10]));
    m.initializers
        .insert("wq".into(), i8s(&[2, 1, 1, 1], &[3, -4]));
    m.initializers
        .insert("mq".into(), i8s(&[3, 2], &[1, 2, 3, 4, 5, 6]));
    m.initializers.insert(
        "bq".into(),
        Arc::new(HostTensor::from_vec(&[2], &[8i32, -16]).unwrap()),
    );
    m
}

fn qdq_conv(w_axis: i64, conv_also_read: bool) -> Model {
    let mut nodes = vec![
        node("QuantizeLinear", &["x", "xs", "xz"], &["xq"]),
        node("DequantizeLinear", &["xq", "xs", "xz"], &["xf"]),
        node_with(
            "DequantizeLinear",
            &["wq", "ws"],
            &["wf"],
            &[("axis", w_axis)],
        ),
        node_with("DequantizeLinear", &["bq", "bs"], &["bf"], &[("axis", 0)]),
        node("Conv", &["xf", "wf", "bf"], &["c"]),
        node("QuantizeLinear", &["c", "ys", "yz"], &["cq"]),
        node("DequantizeLinear", &["cq", "ys", "yz"], &["y"]),
    ];
    let mut outputs = vec!["y"];
    if conv_also_read {
        nodes.push(node("Relu", &["c"], &["r"]));
        outputs.push("r");
    }
    with_ints(model(
        nodes,
        &outputs,
        &[
            ("xs", &[], vec![0.5]),
            ("ws", &[2], vec![0.25, 0.125]),
            ("bs", &[2], vec![0.125, 0.0625]),
            ("ys", &[], vec![0.2]),
        ],
    ))
}

#[test]
fn qdq_around_a_conv_becomes_qlinearconv_with_an_int32_bias() {
    let mut m = qdq_conv(0, false);
    assert_eq!(qdq::QdqConv.run(&mut m).unwrap(), 1);
    let ops: Vec<&str> = m.nodes.iter().map(|n| n.op_type.as_str()).collect();
    // The DQs of x, w and b had no other reader: gone.
    assert_eq!(ops, ["QuantizeLinear", "QLinearConv", "DequantizeLinear"]);
    let q = &m.nodes[1];
    assert_eq!(&q.inputs[..5], ["xq", "xs", "xz", "wq", "ws"]);
    assert_eq!(&q.inputs[6..8], ["ys", "yz"]);
    assert_eq!(q.outputs, ["cq"]);
    // The weight's zero point defaults to zeros of its type, one per channel.
    let wz = &m.initializers[&q.inputs[5]];
    assert_eq!((wz.dtype(), wz.shape()), (DType::I8, &[2usize][..]));
    assert_eq!(wz.to_vec::<i8>().unwrap(), vec![0, 0]);
    // Bias [8 * 0.125, -16 * 0.0625] = [1, -1] at x_s * w_s = [0.125, 0.0625].
    let b = &m.initializers[&q.inputs[8]];
    assert_eq!(b.to_vec::<i32>().unwrap(), vec![8, -16]);
}

/// `DQ -> Conv -> Relu -> Q` with output zero point `yz`.
fn qdq_conv_relu(yz: u8) -> Model {
    let mut m = qdq_conv(0, false);
    m.nodes.truncate(5);
    m.nodes.push(node("Relu", &["c"], &["r"]));
    m.nodes
        .push(node("QuantizeLinear", &["r", "ys", "yz"], &["rq"]));
    m.outputs = vec![io("rq")];
    m.initializers.insert(
        "yz".into(),
        Arc::new(HostTensor::from_vec(&[], &[yz]).unwrap()),
    );
    m
}

#[test]
fn a_relu_between_conv_and_quantize_is_absorbed_only_at_a_zero_point_of_the_type_minimum() {
    let mut m = qdq_conv_relu(0);
    assert_eq!(qdq::QdqConv.run(&mut m).unwrap(), 1);
    let ops: Vec<&str> = m.nodes.iter().map(|n| n.op_type.as_str()).collect();
    assert_eq!(ops, ["QuantizeLinear", "QLinearConv"]);
    assert_eq!(m.nodes[1].outputs, ["rq"]);
    // At zero point 10, negative values would quantize below 10: the Relu must stay.
    let mut m = qdq_conv_relu(10);
    assert_eq!(qdq::QdqConv.run(&mut m).unwrap(), 0);
    assert!(m.nodes.iter().any(|n| n.op_type == "Relu"));
}

/// `DQ -> Conv -> Clip(lo, hi) -> Q` at output scale `ys` and zero point 0 (u8).
fn qdq_conv_clip(lo: f32, hi: f32, ys: f32) -> Model {
    let mut m = qdq_conv_relu(0);
    m.nodes.retain(|n| n.op_type != "Relu");
    let q = m.nodes.len() - 1;
    m.nodes
        .insert(q, node("Clip", &["c", "clip_lo", "clip_hi"], &["r"]));
    for (name, v) in [("clip_lo", lo), ("clip_hi", hi), ("ys", ys)] {
        m.initializers.insert(
            name.into(),
            Arc::new(HostTensor::from_vec(&[], &[v]).unwrap()),
        );
    }
    m
}

#[test]
fn a_clip_between_conv_and_quantize_is_absorbed_when_quantizing_clamps_as_it_does() {
    // ReLU6 with the range [0, 6] or narrower (what calibration after the Clip gives):
    // quantizing saturates at 0 and 255 exactly where the Clip would clamp.
    for ys in [6.0 / 255.0, 5.0 / 255.0] {
        let mut m = qdq_conv_clip(0.0, 6.0, ys);
        assert_eq!(qdq::QdqConv.run(&mut m).unwrap(), 1, "scale {ys}");
        let ops: Vec<&str> = m.nodes.iter().map(|n| n.op_type.as_str()).collect();
        assert_eq!(ops, ["QuantizeLinear", "QLinearConv"]);
        assert_eq!(m.nodes[1].outputs, ["rq"]);
    }
    // A range wider than the Clip's: 6 quantizes to 219, values above it would reach 255.
    let mut m = qdq_conv_clip(0.0, 6.0, 7.0 / 255.0);
    assert_eq!(qdq::QdqConv.run(&mut m).unwrap(), 0);
    assert!(m.nodes.iter().any(|n| n.op_type == "Clip"));
    // A lower bound above the representable minimum: negatives would not stop at 0.5.
    let mut m = qdq_conv_clip(0.5, 6.0, 6.0 / 255.0);
    assert_eq!(qdq::QdqConv.run(&mut m).unwrap(), 0);
}

#[test]
fn qdq_fusion_leaves_what_it_cannot_express() {
    // A per-channel weight scale along the input channels (axis 1): no QLinearConv form.
    let mut m = qdq_conv(1, false);
    assert_eq!(qdq::QdqConv.run(&mut m).unwrap(), 0);
    assert_eq!(m.nodes.len(), 7);
    // The float Conv output read by something else too.
    let mut m = qdq_conv(0, true);
    assert_eq!(qdq::QdqConv.run(&mut m).unwrap(), 0);
    assert!(m.nodes.iter().any(|n| n.op_type == "Conv"));
}

#[test]
fn qdq_around_a_matmul_becomes_qlinearmatmul_per_column() {
    let nodes = vec![
        node("QuantizeLinear", &["x", "xs", "xz"], &["xq"]),
        node("DequantizeLinear", &["xq", "xs", "xz"], &["xf"]),
        // Also read by the Relu: this DQ stays for it.
        node("Relu", &["xf"], &["r"]),
        node_with("DequantizeLinear", &["mq", "ms"], &["mf"], &[("axis", 1)]),
        node("MatMul", &["xf", "mf"], &["p"]),
        node("QuantizeLinear", &["p", "ys", "yz"], &["pq"]),
    ];
    let mut m = with_ints(model(
        nodes,
        &["pq", "r"],
        &[
            ("xs", &[], vec![0.5]),
            ("ms", &[2], vec![0.25, 0.5]),
            ("ys", &[], vec![0.2]),
        ],
    ));
    assert_eq!(qdq::QdqMatMul.run(&mut m).unwrap(), 1);
    let ops: Vec<&str> = m.nodes.iter().map(|n| n.op_type.as_str()).collect();
    assert_eq!(
        ops,
        [
            "QuantizeLinear",
            "DequantizeLinear",
            "Relu",
            "QLinearMatMul"
        ]
    );
    let q = &m.nodes[3];
    assert_eq!(q.inputs.len(), 8);
    assert_eq!(&q.inputs[..5], ["xq", "xs", "xz", "mq", "ms"]);
    assert_eq!(q.outputs, ["pq"]);
}

/// `Q -> DQ -> MaxPool -> Q -> DQ` with the pool's output quantized at `(ys, yz)`.
fn qdq_maxpool(ys: f32, yz: u8, opset: i64) -> Model {
    let mut m = with_ints(model(
        vec![
            node("QuantizeLinear", &["x", "xs", "xz"], &["xq"]),
            node("DequantizeLinear", &["xq", "xs", "xz"], &["xf"]),
            node_with("MaxPool", &["xf"], &["p"], &[]),
            node("QuantizeLinear", &["p", "ys", "yz"], &["pq"]),
            node("DequantizeLinear", &["pq", "ys", "yz"], &["y"]),
        ],
        &["y"],
        &[("xs", &[], vec![0.5]), ("ys", &[], vec![ys])],
    ));
    m.initializers.insert(
        "yz".into(),
        Arc::new(HostTensor::from_vec(&[], &[yz]).unwrap()),
    );
    m.opsets.insert(String::new(), opset);
    m
}

#[test]
fn a_maxpool_between_equal_qdq_parameters_pools_the_integers() {
    let mut m = qdq_maxpool(0.5, 128, 13);
    assert_eq!(qdq::QdqMaxPool.run(&mut m).unwrap(), 1);
    let ops: Vec<&str> = m.nodes.iter().map(|n| n.op_type.as_str()).collect();
    assert_eq!(ops, ["QuantizeLinear", "MaxPool", "DequantizeLinear"]);
    assert_eq!(m.nodes[1].inputs, ["xq"]);
    assert_eq!(m.nodes[1].outputs, ["pq"]);
    // Other parameters on the two sides, or an opset without integer MaxPool: left alone.
    for mut other in [
        qdq_maxpool(0.25, 128, 13),
        qdq_maxpool(0.5, 10, 13),
        qdq_maxpool(0.5, 128, 11),
    ] {
        assert_eq!(qdq::QdqMaxPool.run(&mut other).unwrap(), 0);
        assert_eq!(other.nodes.len(), 5);
    }
}

/// `Q -> DQ` on two inputs, `Add`, `Q -> DQ`: the join of a quantized residual block. With
/// `sum_read`, the float sum is a graph output too.
fn qdq_add(sum_read: bool) -> Model {
    let mut outputs = vec!["y"];
    if sum_read {
        outputs.push("s");
    }
    with_ints(model(
        vec![
            node("QuantizeLinear", &["a", "xs", "xz"], &["aq"]),
            node("DequantizeLinear", &["aq", "xs", "xz"], &["af"]),
            node("QuantizeLinear", &["b", "ys", "yz"], &["bq"]),
            node("DequantizeLinear", &["bq", "ys", "yz"], &["bf"]),
            node("Add", &["af", "bf"], &["s"]),
            node("QuantizeLinear", &["s", "ys", "yz"], &["sq"]),
            node("DequantizeLinear", &["sq", "ys", "yz"], &["y"]),
        ],
        &outputs,
        &[("xs", &[], vec![0.5]), ("ys", &[], vec![0.2])],
    ))
}

#[test]
fn a_quantized_residual_add_becomes_qlinear_add() {
    let mut m = qdq_add(false);
    assert_eq!(qdq::QdqAdd.run(&mut m).unwrap(), 1);
    let ops: Vec<&str> = m.nodes.iter().map(|n| n.op_type.as_str()).collect();
    assert_eq!(
        ops,
        [
            "QuantizeLinear",
            "QuantizeLinear",
            "QLinearAdd",
            "DequantizeLinear"
        ]
    );
    let add = &m.nodes[2];
    assert_eq!(add.domain, "com.microsoft");
    assert_eq!(add.inputs, ["aq", "xs", "xz", "bq", "ys", "yz", "ys", "yz"]);
    assert_eq!(add.outputs, ["sq"]);
    assert_eq!(m.opset("com.microsoft"), Some(1));
    // The float sum read elsewhere: left alone.
    let mut kept = qdq_add(true);
    assert_eq!(qdq::QdqAdd.run(&mut kept).unwrap(), 0);
    assert_eq!(kept.nodes.len(), 7);
}

/// The channels-last pass: a chain of integer convolutions, a max pool and a residual join
/// stays channels-last between them; values are transposed only where they enter (the graph
/// input, once for its two readers) and leave (the DequantizeLinear, a graph output, a node
/// it does not convert); a MaxPool or QLinearAdd over an NCHW value is left alone.
#[test]
fn integer_convolutions_and_their_joins_run_channels_last() {
    let conv = |x: &str, y: &str| {
        node(
            "QLinearConv",
            &[x, "s", "xz", "wq", "s", "wz", "s", "xz"],
            &[y],
        )
    };
    let mut pool = node_with("MaxPool", &["c2"], &["p"], &[("storage_order", 0)]);
    pool.attributes.push(opreg_sdk::kernel::Attribute {
        name: "kernel_shape".into(),
        value: opreg_sdk::AttrValue::Ints(vec![1, 1]),
    });
    let mut add = node(
        "QLinearAdd",
        &["c1", "s", "xz", "p", "s", "xz", "s", "xz"],
        &["sum"],
    );
    add.domain = "com.microsoft".into();
    let mut nchw_add = add.clone();
    nchw_add.inputs = ["sum", "s", "xz", "r", "s", "xz", "s", "xz"]
        .map(String::from)
        .to_vec();
    nchw_add.outputs = vec!["mixed".into()];
    let mut m = model(
        vec![
            // Out of order on purpose: the pass walks a topological order.
            node("DequantizeLinear", &["sum", "s", "xz"], &["y"]),
            conv("xq", "c1"),
            conv("c1", "c2"),
            pool,
            add,
            conv("xq", "side"),
            node("Relu", &["side"], &["r"]),
            nchw_add,
        ],
        &["y", "c2", "r", "mixed"],
        &[("s", &[], vec![0.5])],
    );
    m.initializers.insert(
        "wq".into(),
        Arc::new(HostTensor::from_vec(&[2, 2, 1, 1], &[1i8, 2, 3, 4]).unwrap()),
    );
    m.initializers.insert(
        "wz".into(),
        Arc::new(HostTensor::from_vec(&[], &[0i8]).unwrap()),
    );
    m.initializers.insert(
        "xz".into(),
        Arc::new(HostTensor::from_vec(&[], &[128u8]).unwrap()),
    );
    m.inputs = vec![io("xq")];
    assert_eq!(layout::Nhwc.run(&mut m).unwrap(), 5);

    let by_output = |v: &str| {
        m.nodes
            .iter()
            .find(|n| n.outputs.iter().any(|o| o == v))
            .unwrap_or_else(|| panic!("nothing writes {v}"))
    };
    let perm = |n: &Node| match &n.attributes[..] {
        [a] if a.name == "perm" => match &a.value {
            opreg_sdk::AttrValue::Ints(p) => p.clone(),
            other => panic!("{other:?}"),
        },
        other => panic!("{other:?}"),
    };
    let transposes: Vec<&Node> = m
        .nodes
        .iter()
        .filter(|n| n.op_type == "Transpose")
        .collect();
    // In: xq once. Out: sum (for the DQ and the NCHW add), c2 (a graph output), side (Relu).
    assert_eq!(transposes.len(), 4, "{:?}", m.nodes);
    let into: Vec<_> = transposes
        .iter()
        .filter(|t| perm(t) == [0, 2, 3, 1])
        .collect();
    assert_eq!(into.len(), 1);
    assert_eq!(into[0].inputs, ["xq"]);
    let mut back: Vec<&str> = transposes
        .iter()
        .filter(|t| perm(t) == [0, 3, 1, 2])
        .map(|t| t.outputs[0].as_str())
        .collect();
    back.sort_unstable();
    assert_eq!(back, ["c2", "side", "sum"]);

    // The converted nodes read each other's channels-last values directly.
    let c1 = m
        .nodes
        .iter()
        .find(|n| n.op_type == "QLinearConv" && n.inputs[0] == into[0].outputs[0])
        .expect("c1");
    assert_eq!(c1.domain, "com.microsoft");
    assert!(c1
        .attributes
        .iter()
        .any(|a| a.name == "channels_last" && matches!(a.value, opreg_sdk::AttrValue::Int(1))));
    let c2 = m
        .nodes
        .iter()
        .find(|n| n.op_type == "QLinearConv" && n.inputs[0] == c1.outputs[0])
        .expect("c2 reads c1's channels-last output");
    let pool = m
        .nodes
        .iter()
        .find(|n| n.op_type == "NhwcMaxPool")
        .expect("NhwcMaxPool");
    assert_eq!(pool.inputs, [c2.outputs[0].clone()]);
    assert!(pool.attributes.iter().all(|a| a.name != "storage_order"));
    let add = m
        .nodes
        .iter()
        .find(|n| n.op_type == "QLinearAdd" && n.inputs[0] != "sum")
        .expect("QLinearAdd");
    assert_eq!(
        (&add.inputs[0], &add.inputs[3]),
        (&c1.outputs[0], &pool.outputs[0])
    );
    // The NCHW add, the DQ and the Relu read NCHW values, written before them.
    assert_eq!(by_output("mixed").inputs[0], "sum");
    assert_eq!(by_output("y").inputs[0], "sum");
    assert_eq!(by_output("r").inputs[0], "side");
    let position = |v: &str| {
        m.nodes
            .iter()
            .position(|n| n.outputs.iter().any(|o| o == v))
    };
    for n in &m.nodes {
        for i in n.inputs.iter().filter(|i| position(i).is_some()) {
            assert!(
                position(i) < position(&n.outputs[0]),
                "{} before its reader",
                i
            );
        }
    }
    assert_eq!(m.opsets.get("com.microsoft"), Some(&1));
}

/// A ResNet join: the main path's last Conv and the shortcut's Conv meet in an Add and a Relu.
fn residual_join(sum_read: bool) -> Model {
    let mut outputs = vec!["y"];
    if sum_read {
        outputs.push("s");
    }
    model(
        vec![
            node("Conv", &["x", "w1", "b1"], &["main"]),
            node("Conv", &["x", "w2"], &["short"]),
            node("Add", &["main", "short"], &["s"]),
            node("Relu", &["s"], &["r"]),
            node("Neg", &["r"], &["y"]),
        ],
        &outputs,
        &[
            ("w1", &[1, 1, 1, 1], vec![2.0]),
            ("b1", &[1], vec![1.0]),
            ("w2", &[1, 1, 1, 1], vec![3.0]),
        ],
    )
}

#[test]
fn a_residual_add_and_its_activation_fuse_into_the_conv_in_the_adds_place() {
    let mut m = residual_join(false);
    assert_eq!(fuse::ConvAdd.run(&mut m).unwrap(), 1);
    let ops: Vec<&str> = m.nodes.iter().map(|n| n.op_type.as_str()).collect();
    // The shortcut (Z) is computed before the fused node that reads it.
    assert_eq!(ops, ["Conv", "FusedConv", "Neg"]);
    let fused = &m.nodes[1];
    assert_eq!(fused.domain, "opreg");
    assert_eq!(fused.inputs, ["x", "w1", "b1", "short"]);
    assert_eq!(fused.outputs, ["r"]);
    let act = fused.attributes.iter().find(|a| a.name == "activation");
    assert_eq!(
        act.map(|a| &a.value),
        Some(&opreg_sdk::AttrValue::String("Relu".into()))
    );
    assert_eq!(m.opset("opreg"), Some(1));
    // A bias-less Conv gets an empty bias slot before Z; the later passes leave it alone.
    let mut m = model(
        vec![
            node("Conv", &["x", "w"], &["c"]),
            node("Add", &["x", "c"], &["y"]),
        ],
        &["y"],
        &[("w", &[1, 1, 1, 1], vec![2.0])],
    );
    assert_eq!(fuse::ConvAdd.run(&mut m).unwrap(), 1);
    assert_eq!(m.nodes.len(), 1);
    assert_eq!(m.nodes[0].inputs, ["x", "w", "", "x"]);
    assert_eq!(m.nodes[0].outputs, ["y"]);
    assert!(m.nodes[0].attributes.iter().all(|a| a.name != "activation"));
    assert_eq!(fuse::ConvActivation.run(&mut m).unwrap(), 0);
    // The sum read by another node too: the Add stays, the Relu is not fused (the Conv may
    // still take the Add alone).
    let mut kept = residual_join(true);
    assert_eq!(fuse::ConvAdd.run(&mut kept).unwrap(), 1);
    let ops: Vec<&str> = kept.nodes.iter().map(|n| n.op_type.as_str()).collect();
    assert_eq!(ops, ["Conv", "FusedConv", "Relu", "Neg"]);
    assert_eq!(kept.nodes[1].outputs, ["s"]);
    // A Conv output read twice, or an Add of a value with itself: nothing to fuse.
    let mut twice = model(
        vec![
            node("Conv", &["x", "w"], &["c"]),
            node("Add", &["c", "x"], &["s"]),
            node("Mul", &["c", "s"], &["y"]),
        ],
        &["y"],
        &[("w", &[1, 1, 1, 1], vec![2.0])],
    );
    assert_eq!(fuse::ConvAdd.run(&mut twice).unwrap(), 0);
    let mut doubled = model(
        vec![
            node("Conv", &["x", "w"], &["c"]),
            node("Add", &["c", "c"], &["y"]),
        ],
        &["y"],
        &[("w", &[1, 1, 1, 1], vec![2.0])],
    );
    assert_eq!(fuse::ConvAdd.run(&mut doubled).unwrap(), 0);
}

#[test]
fn silu_as_exported_fuses_into_the_conv_only_when_nothing_else_reads_its_parts() {
    let silu = |mul: &[&str], outputs: &[&str]| {
        model(
            vec![
                node("Conv", &["x", "w"], &["c"]),
                node("Sigmoid", &["c"], &["s"]),
                node("Mul", mul, &["m"]),
                node("Neg", &["m"], &["y"]),
            ],
            outputs,
            &[("w", &[1, 1, 1, 1], vec![2.0])],
        )
    };
    // Either operand order of the Mul.
    for mul in [["c", "s"], ["s", "c"]] {
        let mut m = silu(&mul, &["y"]);
        assert_eq!(fuse::ConvActivation.run(&mut m).unwrap(), 1);
        let ops: Vec<&str> = m.nodes.iter().map(|n| n.op_type.as_str()).collect();
        assert_eq!(ops, ["FusedConv", "Neg"]);
        assert_eq!(m.nodes[0].outputs, ["m"]);
        let act = m.nodes[0]
            .attributes
            .iter()
            .find(|a| a.name == "activation");
        assert_eq!(
            act.map(|a| &a.value),
            Some(&opreg_sdk::AttrValue::String("SiLU".into()))
        );
    }
    // The sigmoid or the Conv's output also a graph output, a Mul of something else, or the
    // sigmoid squared: left alone.
    for (mul, outputs) in [
        (["c", "s"], &["y", "s"][..]),
        (["c", "s"], &["y", "c"][..]),
        (["x", "s"], &["y"][..]),
        (["s", "s"], &["y"][..]),
    ] {
        let mut m = silu(&mul, outputs);
        let before = m.nodes.len();
        assert_eq!(
            fuse::ConvActivation.run(&mut m).unwrap(),
            0,
            "{mul:?} {outputs:?}"
        );
        assert_eq!(m.nodes.len(), before);
    }
}

/// The erf-GELU chain `x -> y` in torch's form (`div` by √2), with the intermediates named
/// `d e a m`; `extra` nodes follow.
fn gelu_chain(extra: Vec<Node>, outputs: &[&str]) -> Model {
    let mut nodes = vec![
        node("Div", &["x", "sqrt2"], &["d"]),
        node("Erf", &["d"], &["e"]),
        node("Add", &["e", "one"], &["a"]),
        node("Mul", &["x", "a"], &["m"]),
        node("Mul", &["m", "half"], &["y"]),
    ];
    nodes.extend(extra);
    model(
        nodes,
        outputs,
        &[
            ("sqrt2", &[], vec![std::f32::consts::SQRT_2]),
            ("one", &[], vec![1.0]),
            ("half", &[1], vec![0.5]),
        ],
    )
}

#[test]
fn gelu_as_exported_becomes_one_node_in_each_form() {
    let mut m = gelu_chain(vec![node("Neg", &["y"], &["z"])], &["z"]);
    assert_eq!(gelu::Gelu.run(&mut m).unwrap(), 1);
    let ops: Vec<(&str, &str)> = m
        .nodes
        .iter()
        .map(|n| (n.domain.as_str(), n.op_type.as_str()))
        .collect();
    assert_eq!(ops, [("opreg", "Gelu"), ("", "Neg")]);
    assert_eq!(
        (m.nodes[0].inputs.clone(), m.nodes[0].outputs.clone()),
        (vec!["x".to_string()], vec!["y".to_string()])
    );
    assert_eq!(m.opset("opreg"), Some(1));
    // Hugging Face's form, Mul by 1/√2 from a Constant node, operands swapped throughout.
    let mut constant = node("Constant", &[], &["inv"]);
    constant.attributes.push(opreg_sdk::kernel::Attribute {
        name: "value".into(),
        value: opreg_sdk::AttrValue::Tensor(
            opreg_sdk::OwnedTensor::from_vec(vec![], vec![std::f32::consts::FRAC_1_SQRT_2])
                .unwrap(),
        ),
    });
    let mut m = model(
        vec![
            constant,
            node("Mul", &["half", "x"], &["p"]),
            node("Mul", &["inv", "x"], &["d"]),
            node("Erf", &["d"], &["e"]),
            node("Add", &["one", "e"], &["a"]),
            node("Mul", &["a", "p"], &["y"]),
        ],
        &["y"],
        &[("one", &[], vec![1.0]), ("half", &[], vec![0.5])],
    );
    assert_eq!(gelu::Gelu.run(&mut m).unwrap(), 1);
    let ops: Vec<&str> = m.nodes.iter().map(|n| n.op_type.as_str()).collect();
    assert_eq!(ops, ["Constant", "Gelu"]);
    assert_eq!(m.nodes[1].inputs, ["x"]);
    assert_eq!(m.nodes[1].outputs, ["y"]);
    // Mul(Mul(a, 0.5), x).
    let mut m = model(
        vec![
            node("Div", &["x", "sqrt2"], &["d"]),
            node("Erf", &["d"], &["e"]),
            node("Add", &["e", "one"], &["a"]),
            node("Mul", &["a", "half"], &["q"]),
            node("Mul", &["x", "q"], &["y"]),
        ],
        &["y"],
        &[
            ("sqrt2", &[], vec![std::f32::consts::SQRT_2]),
            ("one", &[], vec![1.0]),
            ("half", &[], vec![0.5]),
        ],
    );
    assert_eq!(gelu::Gelu.run(&mut m).unwrap(), 1);
    assert_eq!(m.nodes.len(), 1);
    assert_eq!(
        (m.nodes[0].op_type.as_str(), m.nodes[0].outputs[0].as_str()),
        ("Gelu", "y")
    );
}

#[test]
fn gelu_is_left_alone_when_a_part_is_read_elsewhere_or_a_constant_is_off() {
    // An intermediate also a graph output, or read by another node.
    for (extra, outputs) in [
        (vec![], &["y", "e"][..]),
        (vec![node("Neg", &["a"], &["z"])], &["y", "z"][..]),
        (vec![node("Neg", &["m"], &["z"])], &["y", "z"][..]),
    ] {
        let mut m = gelu_chain(extra, outputs);
        let before = m.nodes.len();
        assert_eq!(gelu::Gelu.run(&mut m).unwrap(), 0, "{outputs:?}");
        assert_eq!(m.nodes.len(), before);
    }
    // x read by the Div but the Mul multiplies something else: not a GELU.
    let mut m = gelu_chain(vec![], &["y"]);
    m.nodes[3].inputs = vec!["one".into(), "a".into()];
    assert_eq!(gelu::Gelu.run(&mut m).unwrap(), 0);
    // Constants that are not √2, 1 and 0.5.
    for (name, v) in [("sqrt2", 1.5f32), ("one", 2.0), ("half", 0.25)] {
        let mut m = gelu_chain(vec![], &["y"]);
        m.initializers.insert(
            name.into(),
            Arc::new(HostTensor::from_vec(&[], &[v]).unwrap()),
        );
        assert_eq!(gelu::Gelu.run(&mut m).unwrap(), 0, "{name} = {v}");
    }
}

#[test]
fn a_gelu_reading_a_dense_layer_goes_into_its_epilogue() {
    let dense = |outputs: &[&str]| {
        let mut m = model(
            vec![
                node("MatMul", &["x", "w"], &["h0"]),
                node("Add", &["h0", "b"], &["h"]),
                node("Gelu", &["h"], &["g"]),
                node("Neg", &["g"], &["y"]),
            ],
            outputs,
            &[
                ("w", &[2, 2], vec![1.0, 2.0, 3.0, 4.0]),
                ("b", &[2], vec![0.5, -0.5]),
            ],
        );
        m.nodes[2].domain = "opreg".into();
        m
    };
    let mut m = dense(&["y"]);
    assert_eq!(fuse::MatMulAdd.run(&mut m).unwrap(), 1);
    let ops: Vec<&str> = m.nodes.iter().map(|n| n.op_type.as_str()).collect();
    assert_eq!(ops, ["FusedMatMul", "Neg"]);
    assert_eq!(m.nodes[0].inputs, ["x", "w", "b"]);
    assert_eq!(m.nodes[0].outputs, ["g"]);
    let act = m.nodes[0]
        .attributes
        .iter()
        .find(|a| a.name == "activation");
    assert_eq!(
        act.map(|a| &a.value),
        Some(&opreg_sdk::AttrValue::String("Gelu".into()))
    );
    // The dense layer's sum is a graph output too: the Gelu stays a node of its own.
    let mut m = dense(&["y", "h"]);
    assert_eq!(fuse::MatMulAdd.run(&mut m).unwrap(), 1);
    let ops: Vec<&str> = m.nodes.iter().map(|n| n.op_type.as_str()).collect();
    assert_eq!(ops, ["FusedMatMul", "Gelu", "Neg"]);
    assert!(m.nodes[0].attributes.iter().all(|a| a.name != "activation"));
}

/// A MobileNet block: 1x1 expand, depthwise 3x3, 1x1 project, then `tail` reading `p`.
fn mobile_block(tail: Vec<Node>, outputs: &[&str], expand_w: &[usize]) -> Model {
    let mut nodes = vec![
        node("Conv", &["x", "we"], &["e"]),
        node_with("Conv", &["e", "wd", "bd"], &["d"], &[("group", 4)]),
        node("Conv", &["d", "wp"], &["p"]),
    ];
    nodes.extend(tail);
    let numel = |s: &[usize]| s.iter().product::<usize>();
    model(
        nodes,
        outputs,
        &[
            ("we", expand_w, vec![0.5; numel(expand_w)]),
            ("wd", &[4, 1, 3, 3], vec![0.25; 36]),
            ("bd", &[4], vec![1.0; 4]),
            ("wp", &[2, 4, 1, 1], vec![2.0; 8]),
        ],
    )
}

#[test]
fn values_between_pointwise_and_depthwise_convolutions_go_channels_last() {
    let mut m = mobile_block(vec![node("Neg", &["p"], &["y"])], &["y"], &[4, 2, 1, 1]);
    assert_eq!(nhwc_conv::NhwcConv.run(&mut m).unwrap(), 3);
    let ops: Vec<(&str, &str)> = m
        .nodes
        .iter()
        .map(|n| (n.domain.as_str(), n.op_type.as_str()))
        .collect();
    let nhwc = ("opreg", "FusedConvNhwc");
    assert_eq!(ops, [nhwc, nhwc, nhwc, ("", "Neg")]);
    let flags = |n: &Node| {
        ["x_nhwc", "y_nhwc"].map(|name| {
            let a = n.attributes.iter().find(|a| a.name == name).expect(name);
            a.value.clone()
        })
    };
    let int = opreg_sdk::AttrValue::Int;
    assert_eq!(flags(&m.nodes[0]), [int(0), int(1)]);
    assert_eq!(flags(&m.nodes[1]), [int(1), int(1)]);
    assert_eq!(flags(&m.nodes[2]), [int(1), int(0)]);
    // The channels-last values are renamed; what leaves the region keeps its name.
    assert_eq!(m.nodes[0].outputs, ["e_nhwc"]);
    assert_eq!(m.nodes[1].inputs, ["e_nhwc", "wd", "bd"]);
    assert_eq!(m.nodes[1].outputs, ["d_nhwc"]);
    assert_eq!(m.nodes[2].inputs[0], "d_nhwc");
    assert_eq!(m.nodes[2].outputs, ["p"]);
    // The group attribute stays for the kernel.
    assert!(m.nodes[1].attributes.iter().any(|a| a.name == "group"));
    assert_eq!(m.opset("opreg"), Some(1));
    // Run again: nothing left to convert.
    assert_eq!(nhwc_conv::NhwcConv.run(&mut m).unwrap(), 0);
}

#[test]
fn channels_last_stops_where_a_value_is_read_otherwise() {
    // The depthwise output read by a Relu too, and a graph output: `d` and `e` stay NCHW
    // respectively where they are read otherwise.
    let mut m = mobile_block(
        vec![node("Relu", &["d"], &["r"])],
        &["p", "r"],
        &[4, 2, 1, 1],
    );
    assert_eq!(nhwc_conv::NhwcConv.run(&mut m).unwrap(), 2);
    assert_eq!(m.nodes[0].outputs, ["e_nhwc"]);
    assert_eq!(m.nodes[1].outputs, ["d"]);
    assert_eq!(m.nodes[2].inputs[0], "d");
    assert_eq!(m.nodes[2].op_type, "Conv");
    let mut out = mobile_block(vec![], &["p", "e"], &[4, 2, 1, 1]);
    assert_eq!(nhwc_conv::NhwcConv.run(&mut out).unwrap(), 2);
    assert_eq!(out.nodes[0].op_type, "Conv");
    assert_eq!(out.nodes[1].inputs[0], "e");
    assert_eq!(out.nodes[1].outputs, ["d_nhwc"]);
    // A 3x3 layer (a network's first) writes channels-last for a depthwise reader only,
    // and reads NCHW; read by a 1x1 layer, its output stays NCHW.
    let mut wide = mobile_block(vec![], &["p"], &[4, 2, 3, 3]);
    assert_eq!(nhwc_conv::NhwcConv.run(&mut wide).unwrap(), 3);
    assert_eq!(wide.nodes[0].op_type, "FusedConvNhwc");
    assert_eq!(wide.nodes[0].outputs, ["e_nhwc"]);
    let x_nhwc = |n: &Node| n.attributes.iter().find(|a| a.name == "x_nhwc").cloned();
    assert_eq!(
        x_nhwc(&wide.nodes[0]).map(|a| a.value),
        Some(opreg_sdk::AttrValue::Int(0))
    );
    let mut into_1x1 = model(
        vec![
            node("Conv", &["x", "w3"], &["a"]),
            node("Conv", &["a", "wp"], &["p"]),
        ],
        &["p"],
        &[
            ("w3", &[4, 2, 3, 3], vec![0.5; 72]),
            ("wp", &[2, 4, 1, 1], vec![2.0; 8]),
        ],
    );
    assert_eq!(nhwc_conv::NhwcConv.run(&mut into_1x1).unwrap(), 0);
    // A padded 1x1 keeps its X NCHW; a strided one (a downsampling shortcut) reads either.
    for (attr, converted) in [("pads", vec![1, 1, 1, 1]), ("strides", vec![2, 2])] {
        let mut m = mobile_block(vec![], &["p"], &[4, 2, 1, 1]);
        m.nodes[2].attributes.push(opreg_sdk::kernel::Attribute {
            name: attr.into(),
            value: opreg_sdk::AttrValue::Ints(converted.clone()),
        });
        let strided = attr == "strides";
        let count = nhwc_conv::NhwcConv.run(&mut m).unwrap();
        assert_eq!(count, if strided { 3 } else { 2 }, "{attr}");
        assert_eq!(m.nodes[2].op_type == "FusedConvNhwc", strided, "{attr}");
        assert_eq!(m.nodes[1].outputs, [if strided { "d_nhwc" } else { "d" }]);
    }
    // A fused sum (Z) has Y's layout: that output stays NCHW; read as Z, a value too.
    let mut z = mobile_block(vec![], &["p"], &[4, 2, 1, 1]);
    z.nodes[1].inputs.push("x".into());
    assert_eq!(nhwc_conv::NhwcConv.run(&mut z).unwrap(), 2);
    assert_eq!(z.nodes[1].outputs, ["d"]);
    let mut read_as_z = mobile_block(vec![], &["p"], &[4, 2, 1, 1]);
    read_as_z.nodes[2].inputs.extend(["".into(), "e".into()]);
    assert_eq!(nhwc_conv::NhwcConv.run(&mut read_as_z).unwrap(), 2);
    assert_eq!(read_as_z.nodes[0].outputs, ["e"]);
    assert_eq!(read_as_z.nodes[2].inputs, ["d_nhwc", "wp", "", "e"]);
    // Weights that are not f32 constants: nothing.
    let mut fed = mobile_block(vec![], &["p"], &[4, 2, 1, 1]);
    fed.initializers.remove("wd");
    fed.initializers.remove("we");
    assert_eq!(nhwc_conv::NhwcConv.run(&mut fed).unwrap(), 0);
}

/// A residual chain (MobileNetV2's bottleneck values): `a`, read by the next block's
/// expansion as X and by its projection as Z, goes channels-last with the projection's
/// output; where the projection's output must stay NCHW (a graph output), or where the
/// block changes the image's size (Z would broadcast), so does `a`.
#[test]
fn a_residual_chain_goes_channels_last_with_its_sums() {
    let chain = |outputs: &[&str]| {
        // The chain's last reader a depthwise layer (a 1x1 one writing NCHW would keep the
        // values from 1x1 layers NCHW: see `a_3x3_chain_goes_channels_last_unless_a_1x1_layer_writes_nchw`).
        let mut m = mobile_block(
            vec![node_with("Conv", &["p", "wq"], &["q"], &[("group", 2)])],
            outputs,
            &[4, 2, 1, 1],
        );
        m.nodes.insert(0, node("Conv", &["x", "wa"], &["a"]));
        m.nodes[1].inputs[0] = "a".into();
        m.nodes[3].inputs.extend(["".into(), "a".into()]);
        // The depthwise layer padded to keep the size: `p` and its Z `a` have one shape.
        m.nodes[2].attributes.push(opreg_sdk::kernel::Attribute {
            name: "pads".into(),
            value: opreg_sdk::AttrValue::Ints(vec![1, 1, 1, 1]),
        });
        for (name, shape) in [("wa", [2, 2, 1, 1]), ("wq", [2, 1, 3, 3])] {
            let len = shape.iter().product();
            let t = HostTensor::from_vec(&shape, &vec![0.5f32; len]).unwrap();
            m.initializers.insert(name.into(), Arc::new(t));
        }
        m
    };
    let mut m = chain(&["q"]);
    assert_eq!(nhwc_conv::NhwcConv.run(&mut m).unwrap(), 5);
    assert_eq!(m.nodes[0].outputs, ["a_nhwc"]);
    assert_eq!(m.nodes[1].inputs[0], "a_nhwc");
    assert_eq!(m.nodes[3].inputs, ["d_nhwc", "wp", "", "a_nhwc"]);
    assert_eq!(m.nodes[3].outputs, ["p_nhwc"]);
    assert_eq!(m.nodes[4].inputs[0], "p_nhwc");
    let flag = |n: &Node, name: &str| {
        n.attributes
            .iter()
            .find(|a| a.name == name)
            .map(|a| a.value.clone())
    };
    let int = |v| Some(opreg_sdk::AttrValue::Int(v));
    assert_eq!(flag(&m.nodes[3], "x_nhwc"), int(1));
    assert_eq!(flag(&m.nodes[3], "y_nhwc"), int(1));
    assert_eq!(flag(&m.nodes[4], "y_nhwc"), int(0));
    // `p` a graph output: the projection writes NCHW, so its Z `a` stays NCHW too (and
    // with it the expansion's X); the block's inner values still go channels-last.
    let mut pinned = chain(&["q", "p"]);
    assert_eq!(nhwc_conv::NhwcConv.run(&mut pinned).unwrap(), 3);
    assert_eq!(pinned.nodes[0].outputs, ["a"]);
    assert_eq!(pinned.nodes[3].inputs, ["d_nhwc", "wp", "", "a"]);
    assert_eq!(pinned.nodes[3].outputs, ["p"]);
    // Unpadded, the 3x3 layer shrinks the image: `a` would broadcast against `p`, which
    // the channels-last kernel does not do, so the sum and its Z stay NCHW.
    let mut shrinking = chain(&["q"]);
    shrinking.nodes[2].attributes.retain(|a| a.name != "pads");
    assert_eq!(nhwc_conv::NhwcConv.run(&mut shrinking).unwrap(), 3);
    assert_eq!(shrinking.nodes[0].outputs, ["a"]);
    assert_eq!(shrinking.nodes[3].inputs, ["d_nhwc", "wp", "", "a"]);
    assert_eq!(shrinking.nodes[3].outputs, ["p"]);
}

/// A `FusedConvNhwc`'s `x_nhwc` and `y_nhwc` attributes, `None` where absent.
fn flags(n: &Node) -> [Option<opreg_sdk::AttrValue>; 2] {
    ["x_nhwc", "y_nhwc"].map(|name| {
        n.attributes
            .iter()
            .find(|a| a.name == name)
            .map(|a| a.value.clone())
    })
}

/// What [`flags`] gives for `x_nhwc = x`, `y_nhwc = y`.
fn on(x: i64, y: i64) -> [Option<opreg_sdk::AttrValue>; 2] {
    [Some(x), Some(y)].map(|v| v.map(opreg_sdk::AttrValue::Int))
}

/// `node` with integer-list attributes (pads, strides).
fn node_ints(op: &str, inputs: &[&str], outputs: &[&str], attrs: &[(&str, &[i64])]) -> Node {
    let mut n = node(op, inputs, outputs);
    n.attributes = attrs
        .iter()
        .map(|(k, v)| opreg_sdk::kernel::Attribute {
            name: (*k).into(),
            value: opreg_sdk::AttrValue::Ints(v.to_vec()),
        })
        .collect();
    n
}

/// A ResNet bottleneck that downsamples (1x1 reduce, 3x3 stride 2, 1x1 projection whose Z is
/// the 1x1 stride-2 shortcut) after a 1x1 layer, read by a 3x3 layer: every value between
/// the convolutions goes channels-last, the shortcut's sum included, since both of the sum's
/// paths halve the image alike; with a shortcut of stride 1 (the sum would broadcast), the
/// sum and the shortcut's output stay NCHW. A 1x1 layer that must write NCHW (SqueezeNet's
/// expand layers, read by a Concat) keeps the values from 1x1 and 3x3 layers before it NCHW.
#[test]
fn a_3x3_chain_goes_channels_last_unless_a_1x1_layer_writes_nchw() {
    let bottleneck = |shortcut_stride: i64| {
        model(
            vec![
                node("Conv", &["x", "ws"], &["a"]),
                node("Conv", &["a", "wr"], &["b"]),
                node_ints(
                    "Conv",
                    &["b", "wt"],
                    &["c"],
                    &[("strides", &[2, 2]), ("pads", &[1, 1, 1, 1])],
                ),
                node_ints(
                    "Conv",
                    &["a", "wd"],
                    &["ds"],
                    &[("strides", &[shortcut_stride, shortcut_stride])],
                ),
                node("Conv", &["c", "wp", "", "ds"], &["o"]),
                node_ints("Conv", &["o", "wg"], &["y"], &[("pads", &[1, 1, 1, 1])]),
            ],
            &["y"],
            &[
                ("ws", &[4, 2, 1, 1], vec![0.5; 8]),
                ("wr", &[2, 4, 1, 1], vec![0.5; 8]),
                ("wt", &[2, 2, 3, 3], vec![0.5; 36]),
                ("wd", &[4, 4, 1, 1], vec![0.5; 16]),
                ("wp", &[4, 2, 1, 1], vec![0.5; 8]),
                ("wg", &[2, 4, 3, 3], vec![0.5; 72]),
            ],
        )
    };
    let mut m = bottleneck(2);
    assert_eq!(nhwc_conv::NhwcConv.run(&mut m).unwrap(), 6);
    assert_eq!(flags(&m.nodes[0]), on(0, 1));
    for i in 1..5 {
        assert_eq!(flags(&m.nodes[i]), on(1, 1), "{}", m.nodes[i].name);
    }
    assert_eq!(flags(&m.nodes[5]), on(1, 0));
    assert_eq!(m.nodes[4].inputs, ["c_nhwc", "wp", "", "ds_nhwc"]);
    assert_eq!(m.nodes[5].inputs[0], "o_nhwc");
    assert_eq!(m.nodes[5].outputs, ["y"]);
    // A shortcut of stride 1: the sum and its Z stay NCHW, the rest goes channels-last.
    let mut m = bottleneck(1);
    assert_eq!(nhwc_conv::NhwcConv.run(&mut m).unwrap(), 5);
    assert_eq!(m.nodes[4].inputs, ["c_nhwc", "wp", "", "ds"]);
    assert_eq!(m.nodes[4].outputs, ["o"]);
    assert_eq!(flags(&m.nodes[3]), on(1, 0));
    assert_eq!(m.nodes[5].op_type, "Conv");
    // Read by the network's pool instead of a 3x3 layer: the pool reads channels-last too.
    let mut m = bottleneck(2);
    m.nodes[5] = node("GlobalAveragePool", &["o"], &["y"]);
    assert_eq!(nhwc_conv::NhwcConv.run(&mut m).unwrap(), 6);
    assert_eq!(m.nodes[4].outputs, ["o_nhwc"]);
    assert_eq!(
        (m.nodes[5].domain.as_str(), m.nodes[5].op_type.as_str()),
        ("opreg", "GlobalAveragePoolNhwc")
    );
    assert_eq!(m.nodes[5].inputs, ["o_nhwc"]);
    assert_eq!(m.nodes[5].outputs, ["y"]);
    // A Fire module: squeeze read by a 1x1 and a 3x3 expand layer, both read by a Concat.
    let fire = |with_1x1: bool| {
        let mut nodes = vec![
            node("Conv", &["x", "wq"], &["s"]),
            node_ints("Conv", &["s", "w3"], &["e3"], &[("pads", &[1, 1, 1, 1])]),
        ];
        if with_1x1 {
            nodes.push(node("Conv", &["s", "w1"], &["e1"]));
            nodes.push(node("Concat", &["e1", "e3"], &["y"]));
        } else {
            nodes.push(node("Relu", &["e3"], &["y"]));
        }
        model(
            nodes,
            &["y"],
            &[
                ("wq", &[2, 4, 1, 1], vec![0.5; 8]),
                ("w3", &[4, 2, 3, 3], vec![0.5; 72]),
                ("w1", &[4, 2, 1, 1], vec![0.5; 8]),
            ],
        )
    };
    let mut m = fire(true);
    assert_eq!(nhwc_conv::NhwcConv.run(&mut m).unwrap(), 0);
    let mut m = fire(false);
    assert_eq!(nhwc_conv::NhwcConv.run(&mut m).unwrap(), 2);
    assert_eq!(m.nodes[1].inputs[0], "s_nhwc");
    assert_eq!(flags(&m.nodes[1]), on(1, 0));
}

/// SqueezeNet's Fire modules: a channel Concat whose inputs are all channels-last and whose
/// readers take channels-last values goes channels-last as axis 3, and so do the expand
/// layers feeding it, their squeeze layer and the next module's squeeze layer reading it (and
/// a ceil-mode MaxPool between). Where the Concat's output is read otherwise (a graph
/// output), or one of its inputs cannot go channels-last, it all stays NCHW.
#[test]
fn a_fire_module_concat_goes_channels_last_along_axis_3() {
    let fire = |axis: i64, outputs: &[&str], e1_input: &str| {
        model(
            vec![
                node("Conv", &["x", "wq"], &["s"]),
                node("Conv", &[e1_input, "w1"], &["e1"]),
                node_ints("Conv", &["s", "w3"], &["e3"], &[("pads", &[1, 1, 1, 1])]),
                node_with("Concat", &["e1", "e3"], &["c"], &[("axis", axis)]),
                node_ints(
                    "MaxPool",
                    &["c"],
                    &["p"],
                    &[("kernel_shape", &[3, 3]), ("strides", &[2, 2])],
                ),
                // 3x3: a 1x1 reader of the pool writing NCHW would keep the pool NCHW.
                node_ints("Conv", &["p", "wn"], &["y"], &[("pads", &[1, 1, 1, 1])]),
            ],
            outputs,
            &[
                ("wq", &[2, 4, 1, 1], vec![0.5; 8]),
                ("w1", &[4, 2, 1, 1], vec![0.5; 8]),
                ("w3", &[4, 2, 3, 3], vec![0.5; 72]),
                ("wn", &[2, 8, 3, 3], vec![0.5; 144]),
            ],
        )
    };
    for axis in [1, -3] {
        let mut m = fire(axis, &["y"], "s");
        // Four convolutions, the Concat and the pool.
        assert_eq!(nhwc_conv::NhwcConv.run(&mut m).unwrap(), 6, "axis {axis}");
        assert_eq!(flags(&m.nodes[0]), on(0, 1));
        assert_eq!(flags(&m.nodes[1]), on(1, 1));
        assert_eq!(flags(&m.nodes[2]), on(1, 1));
        let concat = &m.nodes[3];
        assert_eq!(
            (concat.domain.as_str(), concat.op_type.as_str()),
            ("", "Concat")
        );
        assert_eq!(concat.inputs, ["e1_nhwc", "e3_nhwc"]);
        assert_eq!(concat.outputs, ["c_nhwc"]);
        let axes: Vec<_> = concat
            .attributes
            .iter()
            .filter(|a| a.name == "axis")
            .collect();
        assert_eq!(axes.len(), 1);
        assert_eq!(axes[0].value, opreg_sdk::AttrValue::Int(3));
        assert_eq!(m.nodes[4].op_type, "MaxPoolNhwc");
        assert_eq!(m.nodes[4].inputs, ["c_nhwc"]);
        assert_eq!(flags(&m.nodes[5]), on(1, 0));
        assert_eq!(m.nodes[5].outputs, ["y"]);
    }
    // The Concat's output a graph output; one input from outside the convolutions (the
    // graph's input read by an expand layer is fine, but a Concat of a graph input is not);
    // another axis: the module stays NCHW around the Concat.
    let mut pinned = fire(1, &["y", "c"], "s");
    let mut other_axis = fire(2, &["y"], "s");
    let mut graph_input = fire(1, &["y"], "s");
    graph_input.nodes[3].inputs[0] = "x".into();
    for (what, m) in [
        ("pinned", &mut pinned),
        ("axis 2", &mut other_axis),
        ("graph input", &mut graph_input),
    ] {
        nhwc_conv::NhwcConv.run(m).unwrap();
        let concat = &m.nodes[3];
        assert_eq!(concat.outputs, ["c"], "{what}");
        assert!(
            concat.inputs.iter().all(|x| !x.ends_with("_nhwc")),
            "{what}"
        );
        assert!(
            concat
                .attributes
                .iter()
                .all(|a| a.name != "axis" || a.value != opreg_sdk::AttrValue::Int(3)),
            "{what}"
        );
        assert_eq!(m.nodes[4].op_type, "MaxPool", "{what}");
    }
}

/// A network's first pool (ResNet's stem -> 3x3/2 MaxPool -> the first block, whose sum
/// takes the pool's output as Z) goes channels-last with the convolutions around it, as
/// `opreg::MaxPoolNhwc`; it stays NCHW where its output would have to stay NCHW anyway (a
/// graph output, a ceil-mode pool, whose extents the sum's shape check does not follow), where
/// it gives indices, and where its 1x1 reader writes NCHW (SqueezeNet's squeeze layer).
#[test]
fn a_max_pool_between_convolutions_goes_channels_last() {
    let pool = |outputs: &[&str], ceil: bool| {
        let mut n = node_ints(
            "MaxPool",
            &["s"],
            outputs,
            &[
                ("kernel_shape", &[3, 3]),
                ("strides", &[2, 2]),
                ("pads", &[1, 1, 1, 1]),
            ],
        );
        if ceil {
            n.attributes.push(opreg_sdk::kernel::Attribute {
                name: "ceil_mode".into(),
                value: opreg_sdk::AttrValue::Int(1),
            });
        }
        n
    };
    let resnet = |pool: Node, outputs: &[&str]| {
        model(
            vec![
                node_ints(
                    "Conv",
                    &["x", "ws"],
                    &["s"],
                    &[("strides", &[2, 2]), ("pads", &[3, 3, 3, 3])],
                ),
                pool,
                node_ints("Conv", &["p", "wa"], &["a"], &[("pads", &[1, 1, 1, 1])]),
                node_ints(
                    "Conv",
                    &["a", "wb", "", "p"],
                    &["b"],
                    &[("pads", &[1, 1, 1, 1])],
                ),
                node("GlobalAveragePool", &["b"], &["y"]),
            ],
            outputs,
            &[
                ("ws", &[4, 3, 7, 7], vec![0.5; 588]),
                ("wa", &[4, 4, 3, 3], vec![0.5; 144]),
                ("wb", &[4, 4, 3, 3], vec![0.5; 144]),
            ],
        )
    };
    let op = |n: &Node| (n.domain.clone(), n.op_type.clone());
    let mut m = resnet(pool(&["p"], false), &["y"]);
    assert_eq!(nhwc_conv::NhwcConv.run(&mut m).unwrap(), 5);
    assert_eq!(flags(&m.nodes[0]), on(0, 1));
    assert_eq!(op(&m.nodes[1]), ("opreg".into(), "MaxPoolNhwc".into()));
    assert_eq!(m.nodes[1].inputs, ["s_nhwc"]);
    assert_eq!(m.nodes[1].outputs, ["p_nhwc"]);
    assert_eq!(flags(&m.nodes[2]), on(1, 1));
    assert_eq!(m.nodes[3].inputs, ["a_nhwc", "wb", "", "p_nhwc"]);
    assert_eq!(flags(&m.nodes[3]), on(1, 1));
    assert_eq!(
        op(&m.nodes[4]),
        ("opreg".into(), "GlobalAveragePoolNhwc".into())
    );
    // Where the pool stays NCHW, so does the stem's output.
    let stays = |m: &Model| {
        assert_eq!(op(&m.nodes[1]), (String::new(), "MaxPool".into()));
        assert_eq!(m.nodes[1].inputs, ["s"]);
        assert_eq!(m.nodes[0].outputs, ["s"]);
    };
    for mut m in [
        resnet(pool(&["p"], false), &["y", "p"]),
        resnet(pool(&["p"], true), &["y"]),
        resnet(pool(&["p", "i"], false), &["y", "i"]),
    ] {
        nhwc_conv::NhwcConv.run(&mut m).unwrap();
        stays(&m);
    }
    // SqueezeNet: a ceil-mode pool read by a squeeze layer whose expand layers write NCHW
    // for a Concat.
    let mut m = model(
        vec![
            node_ints("Conv", &["x", "ws"], &["s"], &[("strides", &[2, 2])]),
            pool(&["p"], true),
            node("Conv", &["p", "wq"], &["q"]),
            node("Conv", &["q", "w1"], &["e1"]),
            node_ints("Conv", &["q", "w3"], &["e3"], &[("pads", &[1, 1, 1, 1])]),
            node("Concat", &["e1", "e3"], &["y"]),
        ],
        &["y"],
        &[
            ("ws", &[4, 3, 3, 3], vec![0.5; 108]),
            ("wq", &[2, 4, 1, 1], vec![0.5; 8]),
            ("w1", &[4, 2, 1, 1], vec![0.5; 8]),
            ("w3", &[4, 2, 3, 3], vec![0.5; 72]),
        ],
    );
    nhwc_conv::NhwcConv.run(&mut m).unwrap();
    stays(&m);
}

/// `DQ -> Gemm(transB = 1, bias) -> Q` over the weight `gq` ([n = 2, k = 3]), the Gemm's
/// float attributes and the bias's shape given.
fn qdq_gemm(alpha: f32, beta: f32, bias_shape: &[usize]) -> Model {
    let nodes = vec![
        node("QuantizeLinear", &["x", "xs", "xz"], &["xq"]),
        node("DequantizeLinear", &["xq", "xs", "xz"], &["xf"]),
        node_with("DequantizeLinear", &["gq", "gs"], &["gf"], &[("axis", 0)]),
        {
            let mut g = node_with("Gemm", &["xf", "gf", "gb"], &["g"], &[("transB", 1)]);
            for (name, v) in [("alpha", alpha), ("beta", beta)] {
                g.attributes.push(opreg_sdk::kernel::Attribute {
                    name: name.into(),
                    value: opreg_sdk::AttrValue::Float(v),
                });
            }
            g
        },
        node("QuantizeLinear", &["g", "ys", "yz"], &["gq_out"]),
    ];
    let mut m = with_ints(model(
        nodes,
        &["gq_out"],
        &[
            ("xs", &[], vec![0.5]),
            ("gs", &[2], vec![0.25, 0.125]),
            ("gb", bias_shape, vec![1.0, -1.0]),
            ("ys", &[], vec![0.2]),
        ],
    ));
    m.initializers.insert(
        "gq".into(),
        Arc::new(HostTensor::from_vec(&[2, 3], &[1i8, 2, 3, -4, -5, -6]).unwrap()),
    );
    m
}

#[test]
fn qdq_around_a_gemm_becomes_qgemm_with_an_int32_bias_only_in_its_plain_form() {
    let mut m = qdq_gemm(1.0, 1.0, &[2]);
    assert_eq!(qdq::QdqGemm.run(&mut m).unwrap(), 1);
    let ops: Vec<&str> = m.nodes.iter().map(|n| n.op_type.as_str()).collect();
    assert_eq!(ops, ["QuantizeLinear", "QGemm"]);
    let q = &m.nodes[1];
    assert_eq!(q.domain, "com.microsoft");
    assert_eq!(&q.inputs[..5], ["xq", "xs", "xz", "gq", "gs"]);
    assert_eq!(&q.inputs[7..], ["ys", "yz"]);
    assert_eq!(q.outputs, ["gq_out"]);
    // QGemm has no beta; transB stays.
    let attrs: Vec<&str> = q.attributes.iter().map(|a| a.name.as_str()).collect();
    assert_eq!(attrs, ["transB", "alpha"]);
    // Bias [1, -1] at x_s * g_s = [0.125, 0.0625]: [8, -16].
    let b = &m.initializers[&q.inputs[6]];
    assert_eq!(b.to_vec::<i32>().unwrap(), vec![8, -16]);
    // A [1, n] bias is per column too.
    let mut m = qdq_gemm(1.0, 1.0, &[1, 2]);
    assert_eq!(qdq::QdqGemm.run(&mut m).unwrap(), 1);
    // Scaled products, and a bias per row ([n, 1] with m = n): left as they are.
    for mut m in [
        qdq_gemm(2.0, 1.0, &[2]),
        qdq_gemm(1.0, 0.5, &[2]),
        qdq_gemm(1.0, 1.0, &[2, 1]),
    ] {
        assert_eq!(qdq::QdqGemm.run(&mut m).unwrap(), 0);
        assert!(m.nodes.iter().any(|n| n.op_type == "Gemm"));
    }
}

/// A first layer and the MaxPool that alone reads it become one `opreg::FusedConvMaxPool`
/// carrying the pool's window as `pool_` attributes (and not its `storage_order`); not where
/// the convolution has more input channels, a fused sum, or other readers, where its output
/// is a graph output, or where the pool gives indices.
#[test]
fn a_first_layer_takes_in_its_max_pool() {
    let stem = |w: &str, outputs: &[&str]| {
        let mut conv = node_ints("FusedConv", &["x", w, "b"], &["c"], &[("strides", &[2, 2])]);
        conv.domain = "opreg".into();
        conv.attributes.push(opreg_sdk::kernel::Attribute {
            name: "activation".into(),
            value: opreg_sdk::AttrValue::String("Relu".into()),
        });
        let mut pool = node_ints(
            "MaxPool",
            &["c"],
            outputs,
            &[("kernel_shape", &[3, 3]), ("strides", &[2, 2])],
        );
        pool.attributes.extend([
            opreg_sdk::kernel::Attribute {
                name: "ceil_mode".into(),
                value: opreg_sdk::AttrValue::Int(1),
            },
            opreg_sdk::kernel::Attribute {
                name: "storage_order".into(),
                value: opreg_sdk::AttrValue::Int(0),
            },
        ]);
        model(
            vec![conv, pool, node("Relu", &["p"], &["y"])],
            &["y"],
            &[
                ("w3", &[8, 3, 3, 3], vec![0.5; 216]),
                ("w16", &[8, 16, 3, 3], vec![0.5; 1152]),
                ("b", &[8], vec![0.0; 8]),
            ],
        )
    };
    let mut m = stem("w3", &["p"]);
    assert_eq!(conv_pool::ConvPool.run(&mut m).unwrap(), 1);
    assert_eq!(m.nodes.len(), 2);
    let fused = &m.nodes[0];
    assert_eq!(
        (fused.domain.as_str(), fused.op_type.as_str()),
        ("opreg", "FusedConvMaxPool")
    );
    assert_eq!(fused.inputs, ["x", "w3", "b"]);
    assert_eq!(fused.outputs, ["p"]);
    let names: Vec<&str> = fused.attributes.iter().map(|a| a.name.as_str()).collect();
    assert_eq!(
        names,
        [
            "strides",
            "activation",
            "pool_kernel_shape",
            "pool_strides",
            "pool_ceil_mode"
        ]
    );
    assert_eq!(m.opsets.get("opreg"), Some(&1));
    // Left alone.
    let unchanged = |mut m: Model, why: &str| {
        let before = m.nodes.len();
        assert_eq!(conv_pool::ConvPool.run(&mut m).unwrap(), 0, "{why}");
        assert_eq!(m.nodes.len(), before, "{why}");
        assert_eq!(m.nodes[0].op_type, "FusedConv", "{why}");
    };
    unchanged(stem("w16", &["p"]), "16 input channels");
    unchanged(stem("w3", &["p", "indices"]), "indices");
    let mut read_twice = stem("w3", &["p"]);
    read_twice.nodes.push(node("Neg", &["c"], &["n"]));
    read_twice.outputs.push(io("n"));
    unchanged(read_twice, "another reader");
    let mut output = stem("w3", &["p"]);
    output.outputs.push(io("c"));
    unchanged(output, "a graph output");
    let mut with_z = stem("w3", &["p"]);
    with_z.nodes[0].inputs.push("x".into());
    unchanged(with_z, "a fused sum");
}

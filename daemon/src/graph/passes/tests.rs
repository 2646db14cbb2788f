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

// Tests index what they just built.
#![allow(clippy::indexing_slicing)]

use super::*;
use opreg_proto::onnx::{OperatorSetIdProto, TypeProto};

fn tensor_input(name: &str, rank: usize) -> ValueInfoProto {
    use onnx::tensor_shape_proto::{dimension::Value, Dimension};
    ValueInfoProto {
        name: name.into(),
        r#type: Some(TypeProto {
            value: Some(type_proto::Value::TensorType(type_proto::Tensor {
                elem_type: 1,
                shape: Some(onnx::TensorShapeProto {
                    dim: (0..rank)
                        .map(|_| Dimension {
                            value: Some(Value::DimValue(2)),
                            ..Default::default()
                        })
                        .collect(),
                }),
            })),
            ..Default::default()
        }),
        ..Default::default()
    }
}

fn node(op: &str, inputs: &[&str], outputs: &[&str], attrs: Vec<AttributeProto>) -> NodeProto {
    NodeProto {
        op_type: op.into(),
        input: inputs.iter().map(|s| s.to_string()).collect(),
        output: outputs.iter().map(|s| s.to_string()).collect(),
        attribute: attrs,
        ..Default::default()
    }
}

fn model_at(opset: i64, graph: GraphProto) -> onnx::ModelProto {
    onnx::ModelProto {
        opset_import: vec![OperatorSetIdProto {
            domain: String::new(),
            version: opset,
        }],
        graph: Some(graph),
        ..Default::default()
    }
}

fn attr_names(n: &NodeProto) -> Vec<&str> {
    n.attribute.iter().map(|a| a.name.as_str()).collect()
}

#[test]
fn current_opsets_are_left_alone() {
    let mut m = model_at(
        13,
        GraphProto {
            node: vec![node("Relu", &["x"], &["y"], vec![])],
            ..Default::default()
        },
    );
    let before = m.clone();
    assert_eq!(upgrade(&mut m).unwrap(), None);
    assert_eq!(m, before);
}

#[test]
fn bias_broadcast_along_an_axis_reshapes_the_constant() {
    let mut bias = f32_tensor("b".into(), vec![1.0, 2.0]);
    bias.dims = vec![2];
    let mut m = model_at(
        6,
        GraphProto {
            node: vec![node(
                "Add",
                &["x", "b"],
                &["y"],
                vec![int_attr_proto("broadcast", 1), int_attr_proto("axis", 1)],
            )],
            input: vec![tensor_input("x", 4)],
            initializer: vec![bias],
            ..Default::default()
        },
    );
    assert_eq!(upgrade(&mut m).unwrap(), Some(Upgraded { from: 6, to: 7 }));
    assert_eq!(m.opset_import[0].version, 7);
    let g = m.graph.unwrap();
    let add = &g.node[0];
    assert!(add.attribute.is_empty(), "{:?}", attr_names(add));
    let b2 = g
        .initializer
        .iter()
        .find(|t| t.name == add.input[1])
        .unwrap();
    assert_eq!(b2.dims, vec![2, 1, 1]);
    assert_eq!(b2.float_data, vec![1.0, 2.0]);
}

#[test]
fn computed_operand_broadcast_along_an_axis_gets_an_unsqueeze() {
    let mut m = model_at(
        5,
        GraphProto {
            node: vec![node(
                "Mul",
                &["x", "v"],
                &["y"],
                vec![int_attr_proto("broadcast", 1), int_attr_proto("axis", 0)],
            )],
            input: vec![tensor_input("x", 3), tensor_input("v", 1)],
            ..Default::default()
        },
    );
    upgrade(&mut m).unwrap();
    let g = m.graph.unwrap();
    assert_eq!(g.node.len(), 2);
    assert_eq!(g.node[0].op_type, "Unsqueeze");
    assert_eq!(g.node[0].attribute[0].ints, vec![1, 2]);
    assert_eq!(g.node[1].input[1], g.node[0].output[0]);
}

#[test]
fn unknown_ranks_refuse_naming_the_node() {
    let mut n = node(
        "Add",
        &["x", "v"],
        &["y"],
        vec![int_attr_proto("broadcast", 1), int_attr_proto("axis", 1)],
    );
    n.name = "bias_add".into();
    let mut m = model_at(
        6,
        GraphProto {
            node: vec![n],
            ..Default::default()
        },
    );
    let e = upgrade(&mut m).unwrap_err().to_string();
    assert!(e.contains("'bias_add' (Add)") && e.contains("ranks"), "{e}");
}

#[test]
fn opset1_forms_become_opset7_forms() {
    let cast_to = AttributeProto {
        name: "to".into(),
        r#type: AttributeType::String as i32,
        s: b"FLOAT".to_vec(),
        ..Default::default()
    };
    let mut m = model_at(
        1,
        GraphProto {
            node: vec![
                node(
                    "Relu",
                    &["x"],
                    &["r"],
                    vec![ints_attr_proto("consumed_inputs", vec![0])],
                ),
                node(
                    "Reshape",
                    &["r"],
                    &["s"],
                    vec![ints_attr_proto("shape", vec![4, -1])],
                ),
                node("Concat", &["s", "s"], &["c"], vec![]),
                node("Cast", &["c"], &["y"], vec![cast_to]),
                node("Tile", &["y", "t", "a"], &["z"], vec![]),
            ],
            ..Default::default()
        },
    );
    // Tile-1 cannot be converted: refused by name.
    let e = upgrade(&mut m.clone()).unwrap_err().to_string();
    assert!(e.contains("Tile before opset 6"), "{e}");
    m.graph.as_mut().unwrap().node.pop();
    upgrade(&mut m).unwrap();
    let g = m.graph.unwrap();
    assert!(g.node[0].attribute.is_empty());
    assert_eq!(g.node[1].input.len(), 2);
    let shape = g
        .initializer
        .iter()
        .find(|t| t.name == g.node[1].input[1])
        .unwrap();
    assert_eq!(shape.int64_data, vec![4, -1]);
    assert_eq!(int_attr(&g.node[2], "axis"), Some(1));
    assert_eq!(int_attr(&g.node[3], "to"), Some(1));
}

#[test]
fn batched_scan_becomes_an_outer_scan_over_the_batch() {
    let body = GraphProto {
        name: "body".into(),
        node: vec![node("Add", &["s", "x"], &["s2"], vec![])],
        input: vec![tensor_input("s", 1), tensor_input("x", 1)],
        output: vec![tensor_input("s2", 1)],
        ..Default::default()
    };
    let scan = node(
        "Scan",
        &["", "init", "xs"],
        &["final"],
        vec![
            AttributeProto {
                name: "body".into(),
                r#type: AttributeType::Graph as i32,
                g: Some(body),
                ..Default::default()
            },
            int_attr_proto("num_scan_inputs", 1),
            ints_attr_proto("directions", vec![1]),
        ],
    );
    let mut m = model_at(
        8,
        GraphProto {
            node: vec![scan.clone()],
            ..Default::default()
        },
    );
    assert_eq!(upgrade(&mut m).unwrap(), Some(Upgraded { from: 8, to: 9 }));
    let g = m.graph.unwrap();
    let outer = &g.node[0];
    assert_eq!(outer.input, vec!["init", "xs"]);
    assert_eq!(int_attr(outer, "num_scan_inputs"), Some(2));
    let ob = attr(outer, "body").unwrap().g.as_ref().unwrap();
    let inner = &ob.node[0];
    assert_eq!(inner.op_type, "Scan");
    assert_eq!(int_attr(inner, "num_scan_inputs"), Some(1));
    assert_eq!(ints_attr(inner, "scan_input_directions"), Some(vec![1]));
    assert_eq!(inner.input.len(), 2);
    assert_eq!(ob.output[0].name, inner.output[0]);

    // With per-batch lengths there is no opset-9 form.
    let mut with_lens = scan;
    with_lens.input[0] = "lens".into();
    let mut m = model_at(
        8,
        GraphProto {
            node: vec![with_lens],
            ..Default::default()
        },
    );
    let e = upgrade(&mut m).unwrap_err().to_string();
    assert!(e.contains("sequence_lens"), "{e}");
}

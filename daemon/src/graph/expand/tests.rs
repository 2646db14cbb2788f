use super::*;
use crate::graph::import::import;
use opreg_proto::onnx::{
    self, attribute_proto::AttributeType, tensor_shape_proto::dimension, type_proto,
    AttributeProto, GraphProto, NodeProto, OperatorSetIdProto, TensorProto, TypeProto,
    ValueInfoProto,
};
use prost::Message;

const F32: i32 = 1;
const F16: i32 = 10;
const F64: i32 = 11;

/// A tensor value of element type `elem`; `None` dimensions are symbolic.
fn value(name: &str, elem: i32, dims: &[Option<i64>]) -> ValueInfoProto {
    let dim = dims
        .iter()
        .enumerate()
        .map(|(i, d)| onnx::tensor_shape_proto::Dimension {
            value: Some(match d {
                Some(n) => dimension::Value::DimValue(*n),
                None => dimension::Value::DimParam(format!("d{i}")),
            }),
            ..Default::default()
        })
        .collect();
    ValueInfoProto {
        name: name.into(),
        r#type: Some(TypeProto {
            value: Some(type_proto::Value::TensorType(type_proto::Tensor {
                elem_type: elem,
                shape: Some(onnx::TensorShapeProto { dim }),
            })),
            ..Default::default()
        }),
        ..Default::default()
    }
}

fn fixed(name: &str, elem: i32, dims: &[i64]) -> ValueInfoProto {
    value(
        name,
        elem,
        &dims.iter().map(|&d| Some(d)).collect::<Vec<_>>(),
    )
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

fn flex(attrs: Vec<AttributeProto>) -> NodeProto {
    NodeProto {
        name: "attn".into(),
        domain: PREVIEW.into(),
        ..node("FlexAttention", &["Q", "K", "V"], &["Y"], attrs)
    }
}

fn graph_attr(name: &str, g: GraphProto) -> AttributeProto {
    AttributeProto {
        name: name.into(),
        r#type: AttributeType::Graph as i32,
        g: Some(g),
        ..Default::default()
    }
}

fn float_attr(name: &str, f: f32) -> AttributeProto {
    AttributeProto {
        name: name.into(),
        r#type: AttributeType::Float as i32,
        f,
        ..Default::default()
    }
}

fn int_attr(name: &str, i: i64) -> AttributeProto {
    AttributeProto {
        name: name.into(),
        r#type: AttributeType::Int as i32,
        i,
        ..Default::default()
    }
}

fn scalar_f32(name: &str, v: f32) -> TensorProto {
    TensorProto {
        name: name.into(),
        data_type: F32,
        float_data: vec![v],
        ..Default::default()
    }
}

/// A model at default-domain `opset` running `nodes` from `inputs` to `Y`.
fn model(opset: i64, nodes: Vec<NodeProto>, inputs: Vec<ValueInfoProto>, elem: i32) -> Vec<u8> {
    onnx::ModelProto {
        ir_version: 10,
        opset_import: vec![
            OperatorSetIdProto {
                domain: String::new(),
                version: opset,
            },
            OperatorSetIdProto {
                domain: PREVIEW.into(),
                version: 1,
            },
        ],
        graph: Some(GraphProto {
            name: "g".into(),
            node: nodes,
            input: inputs,
            output: vec![value("Y", elem, &[None, None, None, None])],
            ..Default::default()
        }),
        ..Default::default()
    }
    .encode_to_vec()
}

/// A FlexAttention model over fixed shapes.
fn attention(elem: i32, q: &[i64], k: &[i64], v: &[i64], attrs: Vec<AttributeProto>) -> Vec<u8> {
    model(
        26,
        vec![flex(attrs)],
        vec![
            fixed("Q", elem, q),
            fixed("K", elem, k),
            fixed("V", elem, v),
        ],
        elem,
    )
}

/// Imports `bytes` and expands it (whether or not import already did).
fn expanded(bytes: &[u8]) -> Result<Model, GraphError> {
    let mut m = import(bytes, None)?;
    expand(&mut m)?;
    Ok(m)
}

fn ops(m: &Model) -> Vec<&str> {
    m.nodes.iter().map(|n| n.op_type.as_str()).collect()
}

fn producer<'a>(m: &'a Model, value: &str) -> &'a Node {
    let mut found = m
        .nodes
        .iter()
        .filter(|n| n.outputs.iter().any(|o| o == value));
    let n = found
        .next()
        .unwrap_or_else(|| panic!("nothing writes {value}"));
    assert!(found.next().is_none(), "two nodes write {value}");
    n
}

fn init<'a>(m: &'a Model, name: &str) -> &'a HostTensor {
    m.initializers
        .get(name)
        .unwrap_or_else(|| panic!("{name} is not an initializer"))
}

fn int_of(n: &Node, name: &str) -> Option<i64> {
    match attr(n, name)? {
        AttrValue::Int(i) => Some(*i),
        _ => None,
    }
}

fn message(r: Result<Model, GraphError>) -> String {
    match r {
        Ok(m) => panic!("expanded without an error: {:?}", ops(&m)),
        Err(e) => e.to_string(),
    }
}

#[test]
fn models_without_flex_attention_are_untouched() {
    let bytes = model(
        26,
        vec![node("Relu", &["Q"], &["Y"], vec![])],
        vec![fixed("Q", F32, &[2])],
        F32,
    );
    let mut m = import(&bytes, None).unwrap();
    let before = m.nodes.clone();
    let inits = m.initializers.len();
    expand(&mut m).unwrap();
    assert_eq!(ops(&m), ["Relu"]);
    assert_eq!(m.nodes.len(), before.len());
    assert_eq!(m.initializers.len(), inits);
}

#[test]
fn float_attention_is_scaled_matmuls_around_a_softmax() {
    let m = expanded(&attention(
        F32,
        &[2, 4, 8, 16],
        &[2, 4, 6, 16],
        &[2, 4, 6, 16],
        vec![],
    ))
    .unwrap();
    assert_eq!(
        ops(&m),
        ["Mul", "Mul", "Transpose", "MatMul", "Softmax", "MatMul"]
    );
    assert!(m.nodes.iter().all(|n| n.domain.is_empty()));
    // sqrt(1/sqrt(16)) scales Q and K both.
    let q_scaled = m.nodes.first().unwrap();
    assert_eq!(q_scaled.inputs.first().unwrap(), "Q");
    let root = init(&m, q_scaled.inputs.get(1).unwrap());
    assert_eq!(root.dtype(), DType::F32);
    assert_eq!(root.to_vec::<f32>().unwrap(), [0.5]);
    let softmax = m.nodes.iter().find(|n| n.op_type == "Softmax").unwrap();
    assert_eq!(int_of(softmax, "axis"), Some(-1));
    let y = producer(&m, "Y");
    assert_eq!(y.op_type, "MatMul");
    assert_eq!(y.inputs.first(), softmax.outputs.first());
    assert_eq!(y.inputs.get(1).unwrap(), "V");
    let t = m.nodes.iter().find(|n| n.op_type == "Transpose").unwrap();
    assert_eq!(attr(t, "perm"), Some(&AttrValue::Ints(vec![0, 1, 3, 2])));
}

#[test]
fn half_inputs_take_the_softmax_in_float() {
    let m = expanded(&attention(
        F16,
        &[1, 2, 3, 4],
        &[1, 2, 3, 4],
        &[1, 2, 3, 4],
        vec![],
    ))
    .unwrap();
    assert_eq!(
        ops(&m),
        [
            "Mul",
            "Mul",
            "Transpose",
            "MatMul",
            "Cast",
            "Softmax",
            "Cast",
            "MatMul",
            "Cast"
        ]
    );
    let root = init(&m, m.nodes.first().unwrap().inputs.get(1).unwrap());
    assert_eq!(root.dtype(), DType::F16);
    let casts: Vec<_> = m
        .nodes
        .iter()
        .filter(|n| n.op_type == "Cast")
        .map(|n| int_of(n, "to").unwrap())
        .collect();
    assert_eq!(casts, [1, 1, 10]);
    assert_eq!(producer(&m, "Y").op_type, "Cast");
}

#[test]
fn explicit_scale_and_precision() {
    let m = expanded(&attention(
        F64,
        &[1, 2, 3, 4],
        &[1, 2, 3, 4],
        &[1, 2, 3, 4],
        vec![float_attr("scale", 0.1), int_attr("softmax_precision", 1)],
    ))
    .unwrap();
    let root = init(&m, m.nodes.first().unwrap().inputs.get(1).unwrap());
    assert_eq!(root.dtype(), DType::F64);
    assert_eq!(root.to_vec::<f64>().unwrap(), [f64::from(0.1f32.sqrt())]);
    let casts: Vec<_> = m
        .nodes
        .iter()
        .filter(|n| n.op_type == "Cast")
        .map(|n| int_of(n, "to").unwrap())
        .collect();
    assert_eq!(casts, [1, 1, 11]);

    // Double inputs keep the softmax in double by default: no casts.
    let m = expanded(&attention(
        F64,
        &[1, 2, 3, 4],
        &[1, 2, 3, 4],
        &[1, 2, 3, 4],
        vec![],
    ))
    .unwrap();
    assert!(!ops(&m).contains(&"Cast"));
}

#[test]
fn grouped_query_attention_repeats_kv_heads() {
    let m = expanded(&attention(
        F32,
        &[2, 8, 4, 16],
        &[2, 2, 6, 16],
        &[2, 2, 6, 16],
        vec![],
    ))
    .unwrap();
    let count = |op: &str| ops(&m).iter().filter(|o| **o == op).count();
    assert_eq!(count("Unsqueeze"), 2);
    assert_eq!(count("Expand"), 2);
    assert_eq!(count("Reshape"), 2);
    let expand = m.nodes.iter().find(|n| n.op_type == "Expand").unwrap();
    let shape = init(&m, expand.inputs.get(1).unwrap());
    assert_eq!(shape.to_vec::<i64>().unwrap(), [1, 1, 4, 1, 1]);
    // Opset 13 on: the axes are an input.
    let unsqueeze = m.nodes.iter().find(|n| n.op_type == "Unsqueeze").unwrap();
    let axes = init(&m, unsqueeze.inputs.get(1).unwrap());
    assert_eq!(axes.to_vec::<i64>().unwrap(), [2]);
    // The product reads the repeated K, the output the repeated V.
    let y = producer(&m, "Y");
    assert_eq!(producer(&m, y.inputs.get(1).unwrap()).op_type, "Reshape");
    let score = m.nodes.iter().find(|n| n.op_type == "MatMul").unwrap();
    assert_eq!(
        producer(&m, score.inputs.get(1).unwrap()).op_type,
        "Reshape"
    );
}

#[test]
fn grouped_query_attention_before_opset_13_uses_the_axes_attribute() {
    let bytes = model(
        11,
        vec![flex(vec![])],
        vec![
            fixed("Q", F32, &[1, 4, 2, 8]),
            fixed("K", F32, &[1, 2, 2, 8]),
            fixed("V", F32, &[1, 2, 2, 8]),
        ],
        F32,
    );
    let m = expanded(&bytes).unwrap();
    let unsqueeze = m.nodes.iter().find(|n| n.op_type == "Unsqueeze").unwrap();
    assert_eq!(unsqueeze.inputs.len(), 1);
    assert_eq!(attr(unsqueeze, "axes"), Some(&AttrValue::Ints(vec![2])));
}

#[test]
fn symbolic_shapes_are_read_at_run_time() {
    let dims = [None, None, None, None];
    let bytes = model(
        26,
        vec![flex(vec![])],
        vec![
            value("Q", F32, &dims),
            value("K", F32, &dims),
            value("V", F32, &dims),
        ],
        F32,
    );
    let m = expanded(&bytes).unwrap();
    let o = ops(&m);
    for op in [
        "Shape",
        "Gather",
        "Reciprocal",
        "Div",
        "Concat",
        "Expand",
        "Reshape",
    ] {
        assert!(o.contains(&op), "{op} missing from {o:?}");
    }
    assert_eq!(producer(&m, "Y").op_type, "MatMul");
}

#[test]
fn modifier_graphs_are_inlined_under_fresh_names() {
    // The modifiers reuse names of the main graph ("Q", "Y", "V") and of each other.
    let score_mod = GraphProto {
        name: "score_mod".into(),
        node: vec![node("Add", &["Q", "bias"], &["Y"], vec![])],
        input: vec![value("Q", F32, &[None, None, None, None])],
        output: vec![value("Y", F32, &[None, None, None, None])],
        initializer: vec![scalar_f32("bias", 0.5)],
        ..Default::default()
    };
    let prob_mod = GraphProto {
        name: "prob_mod".into(),
        node: vec![
            node("Mul", &["V", "bias"], &["t"], vec![]),
            node("Identity", &["t"], &["Y"], vec![]),
        ],
        input: vec![value("V", F32, &[None, None, None, None])],
        output: vec![value("Y", F32, &[None, None, None, None])],
        initializer: vec![scalar_f32("bias", 2.0)],
        ..Default::default()
    };
    let m = expanded(&attention(
        F32,
        &[1, 2, 3, 4],
        &[1, 2, 3, 4],
        &[1, 2, 3, 4],
        vec![
            graph_attr("score_mod", score_mod),
            graph_attr("prob_mod", prob_mod),
        ],
    ))
    .unwrap();
    assert_eq!(
        ops(&m),
        [
            "Mul",
            "Mul",
            "Transpose",
            "MatMul",
            "Add",
            "Softmax",
            "Mul",
            "Identity",
            "MatMul"
        ]
    );
    let node = |op: &str| m.nodes.iter().find(|n| n.op_type == op).unwrap();
    let score = producer(&m, node("Add").inputs.first().unwrap());
    assert_eq!(score.op_type, "MatMul");
    let bias = node("Add").inputs.get(1).unwrap();
    assert_ne!(bias, "bias");
    assert_eq!(init(&m, bias).to_vec::<f32>().unwrap(), [0.5]);
    assert_eq!(node("Softmax").inputs, node("Add").outputs);
    let prob_mul = m.nodes.get(6).unwrap();
    assert_eq!(prob_mul.inputs.first(), node("Softmax").outputs.first());
    let bias2 = prob_mul.inputs.get(1).unwrap();
    assert_ne!(bias2, bias);
    assert_eq!(init(&m, bias2).to_vec::<f32>().unwrap(), [2.0]);
    let y = producer(&m, "Y");
    assert_eq!(y.op_type, "MatMul");
    assert_eq!(y.inputs.first(), node("Identity").outputs.first());
    assert_eq!(y.inputs.get(1).unwrap(), "V");
    // Every value is written once.
    let mut written = HashSet::new();
    for o in m.nodes.iter().flat_map(|n| &n.outputs) {
        assert!(written.insert(o.as_str()), "{o} written twice");
        assert!(!m.initializers.contains_key(o));
    }
    let node_names: HashSet<&str> = m.nodes.iter().map(|n| n.name.as_str()).collect();
    assert_eq!(node_names.len(), m.nodes.len());
    assert!(!node_names.contains(""));
}

#[test]
fn a_modifier_passing_its_input_through_is_no_node() {
    let g = GraphProto {
        node: vec![],
        input: vec![value("s", F32, &[None, None, None, None])],
        output: vec![value("s", F32, &[None, None, None, None])],
        ..Default::default()
    };
    let m = expanded(&attention(
        F32,
        &[1, 2, 3, 4],
        &[1, 2, 3, 4],
        &[1, 2, 3, 4],
        vec![graph_attr("score_mod", g)],
    ))
    .unwrap();
    assert_eq!(
        ops(&m),
        ["Mul", "Mul", "Transpose", "MatMul", "Softmax", "MatMul"]
    );
    let softmax = m.nodes.get(4).unwrap();
    assert_eq!(softmax.inputs, m.nodes.get(3).unwrap().outputs);
}

#[test]
fn bad_nodes_are_refused_by_name() {
    let s = [1, 2, 3, 4];
    let shapes = |q: &[i64], k: &[i64], v: &[i64], attrs| expanded(&attention(F32, q, k, v, attrs));

    let e = message(shapes(&[1, 2, 3], &s, &s, vec![]));
    assert!(e.contains("'attn'") && e.contains("rank 4"), "{e}");

    let e = message(shapes(&[1, 6, 3, 4], &[1, 4, 3, 4], &[1, 4, 3, 4], vec![]));
    assert!(e.contains("'attn'") && e.contains("multiple"), "{e}");

    let e = message(shapes(&s, &[1, 2, 3, 8], &s, vec![]));
    assert!(e.contains("head size"), "{e}");

    let e = message(shapes(&s, &s, &s, vec![int_attr("softmax_precision", 7)]));
    assert!(
        e.contains("'attn'") && e.contains("softmax_precision 7"),
        "{e}"
    );

    let e = message(shapes(&s, &s, &s, vec![int_attr("scale", 2)]));
    assert!(e.contains("'scale'") && e.contains("INT"), "{e}");

    let e = message(shapes(&s, &s, &s, vec![int_attr("window", 2)]));
    assert!(e.contains("no attribute 'window'"), "{e}");

    let two_inputs = GraphProto {
        node: vec![node("Add", &["a", "b"], &["c"], vec![])],
        input: vec![value("a", F32, &[]), value("b", F32, &[])],
        output: vec![value("c", F32, &[])],
        ..Default::default()
    };
    let e = message(shapes(
        &s,
        &s,
        &s,
        vec![graph_attr("score_mod", two_inputs)],
    ));
    assert!(e.contains("'attn'") && e.contains("exactly 1 input"), "{e}");

    let two_outputs = GraphProto {
        node: vec![node("Split", &["a"], &["b", "c"], vec![])],
        input: vec![value("a", F32, &[])],
        output: vec![value("b", F32, &[]), value("c", F32, &[])],
        ..Default::default()
    };
    let e = message(shapes(
        &s,
        &s,
        &s,
        vec![graph_attr("prob_mod", two_outputs)],
    ));
    assert!(
        e.contains("'prob_mod'") && e.contains("exactly 1 output"),
        "{e}"
    );

    let branch = |v: &str| GraphProto {
        node: vec![node("Identity", &["a"], &[v], vec![])],
        output: vec![value(v, F32, &[])],
        ..Default::default()
    };
    let nested = GraphProto {
        node: vec![
            node("Constant", &[], &["c"], vec![]),
            node(
                "If",
                &["c"],
                &["b"],
                vec![
                    graph_attr("then_branch", branch("t")),
                    graph_attr("else_branch", branch("e")),
                ],
            ),
        ],
        input: vec![value("a", F32, &[])],
        output: vec![value("b", F32, &[])],
        ..Default::default()
    };
    let e = message(shapes(&s, &s, &s, vec![graph_attr("score_mod", nested)]));
    assert!(e.contains("'attn'") && e.contains("nested"), "{e}");
}

#[test]
fn an_unknown_input_type_needs_softmax_precision() {
    let graph = |attrs| {
        model(
            26,
            vec![
                NodeProto {
                    domain: "com.example".into(),
                    ..node("Mystery", &["X"], &["Q"], vec![])
                },
                NodeProto {
                    name: "attn".into(),
                    domain: PREVIEW.into(),
                    ..node("FlexAttention", &["Q", "Q", "Q"], &["Y"], attrs)
                },
            ],
            vec![fixed("X", F32, &[1, 2, 3, 4])],
            F32,
        )
    };
    let e = message(expanded(&graph(vec![])));
    assert!(
        e.contains("'attn'") && e.contains("softmax_precision"),
        "{e}"
    );

    // With it, the types are converted at run time.
    let m = expanded(&graph(vec![int_attr("softmax_precision", 1)])).unwrap();
    assert_eq!(producer(&m, "Y").op_type, "CastLike");
    assert!(ops(&m).contains(&"Shape"));
}

#[test]
fn the_input_type_is_followed_through_casts_and_reshapes() {
    let bytes = model(
        26,
        vec![
            node("Cast", &["X"], &["Xh"], vec![int_attr("to", F16.into())]),
            node("Identity", &["Xh"], &["Q"], vec![]),
            NodeProto {
                name: "attn".into(),
                domain: PREVIEW.into(),
                ..node("FlexAttention", &["Q", "Q", "Q"], &["Y"], vec![])
            },
        ],
        vec![fixed("X", F32, &[1, 2, 3, 4])],
        F16,
    );
    let m = expanded(&bytes).unwrap();
    let y = producer(&m, "Y");
    assert_eq!(y.op_type, "Cast");
    assert_eq!(int_of(y, "to"), Some(10));
}

#[test]
fn subgraphs_are_expanded_with_the_types_of_enclosing_graphs() {
    // The branch reads Q, K and V of the main graph: only it knows their type (float16).
    let then_branch = GraphProto {
        name: "then".into(),
        node: vec![flex(vec![])],
        output: vec![value("Y", F16, &[])],
        ..Default::default()
    };
    let else_branch = GraphProto {
        name: "else".into(),
        node: vec![node("Identity", &["Q"], &["Z"], vec![])],
        output: vec![value("Z", F16, &[])],
        ..Default::default()
    };
    let s = [1, 2, 3, 4];
    let bytes = onnx::ModelProto {
        ir_version: 10,
        opset_import: vec![
            OperatorSetIdProto {
                domain: String::new(),
                version: 26,
            },
            OperatorSetIdProto {
                domain: PREVIEW.into(),
                version: 1,
            },
        ],
        graph: Some(GraphProto {
            node: vec![node(
                "If",
                &["c"],
                // A name the expansion would pick, taken by the enclosing graph.
                &["attn_QScaled"],
                vec![
                    graph_attr("then_branch", then_branch),
                    graph_attr("else_branch", else_branch),
                ],
            )],
            input: vec![
                value("c", onnx::tensor_proto::DataType::Bool as i32, &[]),
                fixed("Q", F16, &s),
                fixed("K", F16, &s),
                fixed("V", F16, &s),
            ],
            output: vec![value("attn_QScaled", F16, &[])],
            ..Default::default()
        }),
        ..Default::default()
    }
    .encode_to_vec();
    let m = expanded(&bytes).unwrap();
    assert_eq!(ops(&m), ["If"]);
    let branch = &m.nodes.first().unwrap().subgraphs.first().unwrap().model;
    assert_eq!(branch.nodes.first().unwrap().op_type, "Mul");
    assert!(!has_flex(&m));
    let casts: Vec<_> = branch
        .nodes
        .iter()
        .filter(|n| n.op_type == "Cast")
        .map(|n| int_of(n, "to").unwrap())
        .collect();
    assert_eq!(casts, [1, 1, 10]);
    assert!(branch
        .nodes
        .iter()
        .flat_map(|n| &n.outputs)
        .all(|o| o != "attn_QScaled"));
    // The constants are the branch's own.
    let root = branch.nodes.first().unwrap().inputs.get(1).unwrap();
    assert_eq!(init(branch, root).dtype(), DType::F16);
    assert!(!m.initializers.contains_key(root));
}

#[test]
fn a_negative_scale_scales_q_alone() {
    let s = [1, 2, 3, 4];
    let m = expanded(&attention(
        F32,
        &s,
        &s,
        &s,
        vec![float_attr("scale", -0.25)],
    ))
    .unwrap();
    assert_eq!(ops(&m), ["Mul", "Transpose", "MatMul", "Softmax", "MatMul"]);
    let mul = m.nodes.first().unwrap();
    assert_eq!(
        init(&m, mul.inputs.get(1).unwrap())
            .to_vec::<f32>()
            .unwrap(),
        [-0.25]
    );
    assert_eq!(m.nodes.get(1).unwrap().inputs, ["K"]);
}

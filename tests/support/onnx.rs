//! Building small ONNX models in Rust for tests (prost types of `onnx.proto`).

use opreg_proto::onnx;
use prost::Message;

/// A tensor-typed graph value with a declared shape (`-1`: symbolic).
pub fn value(name: &str, elem_type: i32, dims: &[i64]) -> onnx::ValueInfoProto {
    use onnx::tensor_shape_proto::{dimension::Value, Dimension};
    onnx::ValueInfoProto {
        name: name.into(),
        r#type: Some(onnx::TypeProto {
            value: Some(onnx::type_proto::Value::TensorType(
                onnx::type_proto::Tensor {
                    elem_type,
                    shape: Some(onnx::TensorShapeProto {
                        dim: dims
                            .iter()
                            .map(|&d| Dimension {
                                value: Some(if d < 0 {
                                    Value::DimParam("N".into())
                                } else {
                                    Value::DimValue(d)
                                }),
                                denotation: String::new(),
                            })
                            .collect(),
                    }),
                },
            )),
            denotation: String::new(),
        }),
        doc_string: String::new(),
    }
}

/// An f32 initializer stored in `float_data`.
pub fn f32_initializer(name: &str, dims: &[i64], values: &[f32]) -> onnx::TensorProto {
    onnx::TensorProto {
        name: name.into(),
        dims: dims.to_vec(),
        data_type: 1,
        float_data: values.to_vec(),
        ..Default::default()
    }
}

/// A node.
pub fn node(op: &str, inputs: &[&str], outputs: &[&str]) -> onnx::NodeProto {
    onnx::NodeProto {
        op_type: op.into(),
        name: format!("{op}_{}", outputs.first().copied().unwrap_or("")),
        input: inputs.iter().map(|s| s.to_string()).collect(),
        output: outputs.iter().map(|s| s.to_string()).collect(),
        ..Default::default()
    }
}

/// A model importing the default domain at `opset`.
pub fn model(
    nodes: Vec<onnx::NodeProto>,
    inputs: Vec<onnx::ValueInfoProto>,
    outputs: Vec<onnx::ValueInfoProto>,
    initializers: Vec<onnx::TensorProto>,
    opset: i64,
) -> Vec<u8> {
    onnx::ModelProto {
        ir_version: 8,
        opset_import: vec![onnx::OperatorSetIdProto {
            domain: String::new(),
            version: opset,
        }],
        producer_name: "opreg-tests".into(),
        graph: Some(onnx::GraphProto {
            node: nodes,
            name: "g".into(),
            initializer: initializers,
            input: inputs,
            output: outputs,
            ..Default::default()
        }),
        ..Default::default()
    }
    .encode_to_vec()
}

/// An int64 initializer.
pub fn i64_initializer(name: &str, dims: &[i64], values: &[i64]) -> onnx::TensorProto {
    onnx::TensorProto {
        name: name.into(),
        dims: dims.to_vec(),
        data_type: 7,
        int64_data: values.to_vec(),
        ..Default::default()
    }
}

/// A bool initializer.
pub fn bool_initializer(name: &str, value: bool) -> onnx::TensorProto {
    onnx::TensorProto {
        name: name.into(),
        dims: vec![],
        data_type: 9,
        int32_data: vec![value as i32],
        ..Default::default()
    }
}

/// An integer attribute.
pub fn attr_int(name: &str, v: i64) -> onnx::AttributeProto {
    onnx::AttributeProto {
        name: name.into(),
        r#type: onnx::attribute_proto::AttributeType::Int as i32,
        i: v,
        ..Default::default()
    }
}

/// A string attribute.
pub fn attr_string(name: &str, v: &str) -> onnx::AttributeProto {
    onnx::AttributeProto {
        name: name.into(),
        r#type: onnx::attribute_proto::AttributeType::String as i32,
        s: v.as_bytes().to_vec(),
        ..Default::default()
    }
}

/// A list-of-integers attribute.
pub fn attr_ints(name: &str, v: &[i64]) -> onnx::AttributeProto {
    onnx::AttributeProto {
        name: name.into(),
        r#type: onnx::attribute_proto::AttributeType::Ints as i32,
        ints: v.to_vec(),
        ..Default::default()
    }
}

/// A tensor attribute.
pub fn attr_tensor(name: &str, t: onnx::TensorProto) -> onnx::AttributeProto {
    onnx::AttributeProto {
        name: name.into(),
        r#type: onnx::attribute_proto::AttributeType::Tensor as i32,
        t: Some(t),
        ..Default::default()
    }
}

/// A subgraph attribute (the body of Loop/Scan, the branches of If).
pub fn attr_graph(name: &str, g: onnx::GraphProto) -> onnx::AttributeProto {
    onnx::AttributeProto {
        name: name.into(),
        r#type: onnx::attribute_proto::AttributeType::Graph as i32,
        g: Some(g),
        ..Default::default()
    }
}

/// A node with attributes.
pub fn node_with(
    op: &str,
    inputs: &[&str],
    outputs: &[&str],
    attributes: Vec<onnx::AttributeProto>,
) -> onnx::NodeProto {
    onnx::NodeProto {
        attribute: attributes,
        ..node(op, inputs, outputs)
    }
}

/// A graph (for subgraph attributes).
pub fn graph(
    nodes: Vec<onnx::NodeProto>,
    inputs: Vec<onnx::ValueInfoProto>,
    outputs: Vec<onnx::ValueInfoProto>,
) -> onnx::GraphProto {
    onnx::GraphProto {
        node: nodes,
        name: "body".into(),
        input: inputs,
        output: outputs,
        ..Default::default()
    }
}

/// `y = Loop(M, true, x)` with an identity body: runs M iterations.
pub fn runaway_loop(trips: i64) -> Vec<u8> {
    let body = graph(
        vec![
            node("Identity", &["c"], &["c_out"]),
            node("Identity", &["x_in"], &["x_out"]),
        ],
        vec![
            value("i", 7, &[]),
            value("c", 9, &[]),
            value("x_in", 1, &[-1]),
        ],
        vec![value("c_out", 9, &[]), value("x_out", 1, &[-1])],
    );
    loop_model(body, trips)
}

/// `y = Loop(trips, true, x)` with `body`.
pub fn loop_model(body: onnx::GraphProto, trips: i64) -> Vec<u8> {
    model(
        vec![node_with(
            "Loop",
            &["m", "cond", "x"],
            &["y"],
            vec![attr_graph("body", body)],
        )],
        vec![value("x", 1, &[-1])],
        vec![value("y", 1, &[-1])],
        vec![
            i64_initializer("m", &[], &[trips]),
            bool_initializer("cond", true),
        ],
        17,
    )
}

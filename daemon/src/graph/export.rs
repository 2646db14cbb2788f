//! Writing a model back to ONNX: the graph passes' result as a standard `ModelProto` (opset
//! imports, declared inputs and outputs, initializers, nodes with their attributes and
//! subgraphs), tensors over a size threshold in an external data file beside it (as ONNX's
//! external data format has it, so the 2 GiB protobuf limit does not apply to weights).

use super::{
    import::{Dim, IoSpec, Model},
    GraphError,
};
use opreg_proto::onnx;
use opreg_sdk::{host::HostTensor, AttrValue, DType, OwnedTensor};
use prost::Message;

/// Where large tensors go.
pub struct ExternalData {
    /// The file name written into the model (relative to the model's folder).
    pub location: String,
    /// Tensors with at least this many bytes go there.
    pub threshold: usize,
}

/// The encoded model, and the bytes of its external data file (empty when nothing went there).
pub struct Exported {
    pub model: Vec<u8>,
    pub external: Vec<u8>,
}

/// Encodes `model` as ONNX.
pub fn export(model: &Model, external: Option<&ExternalData>) -> Result<Exported, GraphError> {
    let mut data = Vec::new();
    let mut opsets: Vec<_> = model.opsets.iter().collect();
    opsets.sort();
    let graph = graph(model, external, &mut data)?;
    let proto = onnx::ModelProto {
        ir_version: ir_version(model.opset("").unwrap_or(1)),
        opset_import: opsets
            .into_iter()
            .map(|(domain, &version)| onnx::OperatorSetIdProto {
                domain: domain.clone(),
                version,
            })
            .collect(),
        producer_name: "opreg".into(),
        producer_version: env!("CARGO_PKG_VERSION").into(),
        graph: Some(graph),
        ..Default::default()
    };
    Ok(Exported {
        model: proto.encode_to_vec(),
        external: data,
    })
}

/// The IR version of the ONNX release that introduced `opset` (readers accept older IRs).
fn ir_version(opset: i64) -> i64 {
    match opset {
        ..=12 => 7,
        13..=18 => 8,
        19..=20 => 9,
        _ => 10,
    }
}

fn graph(
    model: &Model,
    external: Option<&ExternalData>,
    data: &mut Vec<u8>,
) -> Result<onnx::GraphProto, GraphError> {
    let mut names: Vec<&String> = model.initializers.keys().collect();
    names.sort();
    let mut initializer = Vec::with_capacity(names.len());
    for name in names {
        let t = &model.initializers[name];
        let mut proto = host_tensor(name, t)?;
        if let Some(ext) = external.filter(|e| proto.raw_data.len() >= e.threshold) {
            move_out(&mut proto, ext, data);
        }
        initializer.push(proto);
    }
    Ok(onnx::GraphProto {
        name: "opreg".into(),
        node: model
            .nodes
            .iter()
            .map(|n| {
                Ok(onnx::NodeProto {
                    name: n.name.clone(),
                    domain: n.domain.clone(),
                    op_type: n.op_type.clone(),
                    input: n.inputs.clone(),
                    output: n.outputs.clone(),
                    attribute: n
                        .attributes
                        .iter()
                        .map(|a| attribute(&a.name, &a.value))
                        .collect::<Result<_, GraphError>>()
                        .map_err(|e| {
                            GraphError::Invalid(format!("exporting node {}: {e}", n.label()))
                        })?,
                    ..Default::default()
                })
            })
            .collect::<Result<_, GraphError>>()?,
        initializer,
        input: model.inputs.iter().map(value_info).collect(),
        output: model.outputs.iter().map(value_info).collect(),
        ..Default::default()
    })
}

fn move_out(t: &mut onnx::TensorProto, ext: &ExternalData, data: &mut Vec<u8>) {
    // Offsets aligned to 4 KiB, as onnx's own writer does (mmap-friendly).
    let offset = data.len().next_multiple_of(4096);
    data.resize(offset, 0);
    let bytes = std::mem::take(&mut t.raw_data);
    let entry = |k: &str, v: String| onnx::StringStringEntryProto {
        key: k.into(),
        value: v,
    };
    t.external_data = vec![
        entry("location", ext.location.clone()),
        entry("offset", offset.to_string()),
        entry("length", bytes.len().to_string()),
    ];
    t.data_location = onnx::tensor_proto::DataLocation::External as i32;
    data.extend_from_slice(&bytes);
}

fn value_info(io: &IoSpec) -> onnx::ValueInfoProto {
    use onnx::tensor_shape_proto::{dimension::Value, Dimension};
    onnx::ValueInfoProto {
        name: io.name.clone(),
        r#type: Some(onnx::TypeProto {
            value: Some(onnx::type_proto::Value::TensorType(
                onnx::type_proto::Tensor {
                    elem_type: io.dtype.0,
                    shape: io.shape.as_ref().map(|s| onnx::TensorShapeProto {
                        dim: s
                            .iter()
                            .map(|d| Dimension {
                                value: match d {
                                    Dim::Fixed(n) => Some(Value::DimValue(*n as i64)),
                                    Dim::Symbolic(p) if p.is_empty() => None,
                                    Dim::Symbolic(p) => Some(Value::DimParam(p.clone())),
                                },
                                ..Default::default()
                            })
                            .collect(),
                    }),
                },
            )),
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// Packs one-element-per-byte sub-byte values (the SDK's form) into ONNX's packed storage.
fn pack(bytes: &[u8], bits: u32) -> Vec<u8> {
    let per = (8 / bits) as usize;
    let mask = (1u8 << bits) - 1;
    bytes
        .chunks(per)
        .map(|c| {
            c.iter()
                .enumerate()
                .fold(0u8, |acc, (i, &v)| acc | ((v & mask) << (i as u32 * bits)))
        })
        .collect()
}

fn raw(dtype: DType, bytes: &[u8]) -> Vec<u8> {
    match dtype {
        DType::U4 | DType::I4 | DType::F4E2M1 => pack(bytes, 4),
        DType::U2 | DType::I2 => pack(bytes, 2),
        _ => bytes.to_vec(),
    }
}

fn tensor_proto(
    name: &str,
    dtype: DType,
    shape: &[usize],
    bytes: &[u8],
    strings: Vec<Vec<u8>>,
) -> onnx::TensorProto {
    onnx::TensorProto {
        name: name.into(),
        dims: shape.iter().map(|&d| d as i64).collect(),
        data_type: dtype.0,
        raw_data: if dtype == DType::String {
            Default::default()
        } else {
            raw(dtype, bytes).into()
        },
        string_data: strings,
        ..Default::default()
    }
}

fn host_tensor(name: &str, t: &HostTensor) -> Result<onnx::TensorProto, GraphError> {
    if !t.on_host() {
        return Err(GraphError::Invalid(format!(
            "tensor '{name}' is in device memory"
        )));
    }
    Ok(tensor_proto(
        name,
        t.dtype(),
        t.shape(),
        t.bytes(),
        t.strings().iter().map(|s| s.as_bytes().to_vec()).collect(),
    ))
}

fn owned_tensor(t: &OwnedTensor) -> onnx::TensorProto {
    tensor_proto(
        "",
        t.dtype,
        &t.shape,
        &t.data,
        t.strings.iter().map(|s| s.as_bytes().to_vec()).collect(),
    )
}

fn attribute(name: &str, v: &AttrValue) -> Result<onnx::AttributeProto, GraphError> {
    use onnx::attribute_proto::AttributeType as T;
    let mut a = onnx::AttributeProto {
        name: name.into(),
        ..Default::default()
    };
    let ty = match v {
        AttrValue::Int(i) => {
            a.i = *i;
            T::Int
        }
        AttrValue::Float(f) => {
            a.f = *f;
            T::Float
        }
        AttrValue::String(s) => {
            a.s = s.as_bytes().to_vec();
            T::String
        }
        AttrValue::Ints(v) => {
            a.ints = v.clone();
            T::Ints
        }
        AttrValue::Floats(v) => {
            a.floats = v.clone();
            T::Floats
        }
        AttrValue::Strings(v) => {
            a.strings = v.iter().map(|s| s.as_bytes().to_vec()).collect();
            T::Strings
        }
        AttrValue::Tensor(t) => {
            a.t = Some(owned_tensor(t));
            T::Tensor
        }
        AttrValue::Graph(bytes) => {
            a.g = Some(
                onnx::GraphProto::decode(bytes.as_slice())
                    .map_err(|e| GraphError::Invalid(format!("attribute '{name}': {e}")))?,
            );
            T::Graph
        }
        other => {
            return Err(GraphError::Unsupported(format!(
                "attribute '{name}' of kind {} cannot be exported",
                other.kind().0
            )))
        }
    };
    a.r#type = ty as i32;
    Ok(a)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sub_byte_values_pack_low_bits_first() {
        assert_eq!(pack(&[0x1, 0xF, 0x3], 4), vec![0xF1, 0x03]);
        assert_eq!(pack(&[1, 2, 3, 0, 1], 2), vec![0b00_11_10_01, 0b01]);
        // The import's unpacking is the inverse (sign-extended for signed types).
        let packed = pack(&[0xFF, 0x07], 4);
        assert_eq!(
            super::super::import::unpack(&packed, 2, 4, true),
            Some(vec![0xFF, 0x07])
        );
    }

    #[test]
    fn ir_versions_follow_the_opset() {
        assert_eq!(ir_version(11), 7);
        assert_eq!(ir_version(17), 8);
        assert_eq!(ir_version(21), 10);
    }
}

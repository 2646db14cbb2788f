//! ONNX import: `ModelProto` bytes into a [`Model`] the planner compiles.
//!
//! Initializers are read in every storage form ONNX allows: typed fields, `raw_data`, and
//! external data files next to the model (paths confined to the model's folder).

// Request and model data reach this module: no unchecked index or slice.
#![deny(clippy::indexing_slicing)]

use super::{
    model_file::{ModelBytes, Owned},
    GraphError,
};
use abi_stable::std_types::{RString, RVec};
use opreg_proto::onnx;
use opreg_sdk::{host::HostTensor, kernel::Attribute, AttrValue, DType, OwnedTensor};
use prost::Message;
use std::{
    collections::HashMap,
    path::{Component, Path},
    sync::Arc,
};

/// A subgraph's formal inputs in order, with the types it declares (subgraphs may leave them
/// out: the control node binds them).
pub type FormalInputs = Vec<(String, Option<DType>)>;

/// One dimension of a declared input or output shape.
#[derive(Clone, Debug, PartialEq)]
pub enum Dim {
    Fixed(usize),
    /// A named or unnamed run-time dimension (`dim_param`, or no value).
    Symbolic(String),
}

/// A shape, or `None` when not even the rank is known.
pub type Shape = Option<Vec<Dim>>;

/// A graph input or output as the model declares it.
#[derive(Clone, Debug)]
pub struct IoSpec {
    pub name: String,
    pub dtype: DType,
    /// `None` when the model declares no shape (any rank).
    pub shape: Option<Vec<Dim>>,
}

impl IoSpec {
    /// The KServe shape: -1 for dimensions known only at run time.
    pub fn kserve_shape(&self) -> Vec<i64> {
        self.shape
            .as_ref()
            .map(|s| {
                s.iter()
                    .map(|d| match d {
                        Dim::Fixed(n) => *n as i64,
                        Dim::Symbolic(_) => -1,
                    })
                    .collect()
            })
            .unwrap_or_default()
    }
}

/// A node of the graph.
#[derive(Clone, Debug)]
pub struct Node {
    pub name: String,
    pub domain: String,
    pub op_type: String,
    /// Input value names by position; `""` is an absent optional input.
    pub inputs: Vec<String>,
    pub outputs: Vec<String>,
    pub attributes: Vec<Attribute>,
    /// The subgraphs of a control-flow node (`If`, `Loop`, `Scan`), parsed once at import,
    /// in the order of [`CONTROL`]'s attribute list; empty for other nodes. The GRAPH
    /// attributes keep their bytes too (export writes them back unchanged).
    pub subgraphs: Vec<Arc<Subgraph>>,
}

/// A subgraph of a control-flow node.
pub struct Subgraph {
    /// The attribute holding it (`then_branch`, `body`, …).
    pub attr: String,
    pub model: Model,
    /// Its formal inputs in order, with the types it declares.
    pub formal: FormalInputs,
}

impl std::fmt::Debug for Subgraph {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Subgraph")
            .field("attr", &self.attr)
            .field("nodes", &self.model.nodes.len())
            .finish()
    }
}

/// The control-flow operators the runtime runs itself (and `SequenceMap`, which runs a body
/// per sequence element), with their subgraph attributes.
pub const CONTROL: &[(&str, &[&str])] = &[
    ("If", &["then_branch", "else_branch"]),
    ("Loop", &["body"]),
    ("Scan", &["body"]),
    ("SequenceMap", &["body"]),
];

impl Node {
    /// `name (op_type)` for messages.
    pub fn label(&self) -> String {
        if self.name.is_empty() {
            format!("<unnamed> ({})", self.op_type)
        } else {
            format!("'{}' ({})", self.name, self.op_type)
        }
    }
}

/// An imported model. Cloning shares the initializers.
#[derive(Clone)]
pub struct Model {
    /// Imported opset per domain (`""` is the default ONNX domain).
    pub opsets: HashMap<String, i64>,
    pub inputs: Vec<IoSpec>,
    pub outputs: Vec<IoSpec>,
    pub initializers: HashMap<String, Arc<HostTensor>>,
    pub nodes: Vec<Node>,
}

impl Model {
    /// The node producing each named value, by position.
    pub fn producers(&self) -> HashMap<&str, usize> {
        self.nodes
            .iter()
            .enumerate()
            .flat_map(|(i, n)| {
                n.outputs
                    .iter()
                    .filter(|o| !o.is_empty())
                    .map(move |o| (o.as_str(), i))
            })
            .collect()
    }

    /// The opset version `domain` is imported at.
    /// A value name no initializer, graph input or node uses, from `base` (`base`, else
    /// `base_1`, `base_2`, …): for values a rewrite adds.
    pub fn fresh_name(&self, base: &str) -> String {
        let taken = |n: &str| {
            self.initializers.contains_key(n)
                || self.inputs.iter().any(|i| i.name == n)
                || self
                    .nodes
                    .iter()
                    .any(|x| x.outputs.iter().chain(&x.inputs).any(|o| o == n))
        };
        let mut name = base.to_string();
        let mut k = 1;
        while taken(&name) {
            name = format!("{base}_{k}");
            k += 1;
        }
        name
    }

    pub fn opset(&self, domain: &str) -> Option<i64> {
        let d = if domain == "ai.onnx" { "" } else { domain };
        self.opsets.get(d).copied()
    }
}

/// Decodes and checks an ONNX model. `dir` is the folder external data is read from.
pub fn import(bytes: &[u8], dir: Option<&Path>) -> Result<Model, GraphError> {
    from_proto(onnx::ModelProto::decode(bytes), dir, None)
}

/// [`import`] from an owned buffer (a model file as read): initializer bytes are decoded as
/// slices of it rather than copied, so the weights are copied once, into their tensors. A
/// file [`ModelBytes::read`] filled gives each initializer's pages back as it is copied (see
/// [`super::model_file`]).
pub fn import_owned(bytes: impl Into<ModelBytes>, dir: Option<&Path>) -> Result<Model, GraphError> {
    let (bytes, owned) = bytes.into().into_parts();
    from_proto(onnx::ModelProto::decode(bytes), dir, owned)
}

fn from_proto(
    proto: Result<onnx::ModelProto, prost::DecodeError>,
    dir: Option<&Path>,
    owned: Option<Owned>,
) -> Result<Model, GraphError> {
    let mut proto = proto.map_err(|e| GraphError::Decode(e.to_string()))?;
    let mut owned = owned;
    if let Some(u) = super::legacy::upgrade(&mut proto)? {
        tracing::info!(
            from = u.from,
            to = u.to,
            "legacy model upgraded to a newer opset at import"
        );
        // The upgrade may have copied initializers' handles elsewhere in the model.
        owned = None;
    }
    let mut graph = proto
        .graph
        .ok_or_else(|| GraphError::Invalid("the model has no graph".into()))?;
    if proto.opset_import.is_empty() {
        return Err(GraphError::Invalid("the model imports no opset".into()));
    }
    let opsets = proto
        .opset_import
        .iter()
        .map(|o| (normalise_domain(&o.domain), o.version))
        .collect();
    let (mut model, _) = graph_model(&mut graph, opsets, dir, true, owned)?;
    // Operators the runtime expands into standard ones (FlexAttention), once, from the top:
    // an expansion inside a branch may need the outer graph's types.
    super::expand::expand(&mut model)?;
    Ok(model)
}

/// A subgraph (`If` branch, `Loop` or `Scan` body), serialized in a GRAPH attribute. Returns
/// the graph and its formal inputs in order, whose types subgraphs may leave out.
pub fn import_subgraph(
    bytes: &[u8],
    opsets: &HashMap<String, i64>,
) -> Result<(Model, FormalInputs), GraphError> {
    let mut graph = onnx::GraphProto::decode(bytes)
        .map_err(|e| GraphError::Decode(format!("subgraph: {e}")))?;
    graph_model(&mut graph, opsets.clone(), None, false, None)
}

/// Parses the subgraphs of a control-flow node (none for other nodes). Nesting is bounded by
/// the protobuf decoder's recursion limit on the model as a whole.
fn subgraphs(node: &Node, opsets: &HashMap<String, i64>) -> Result<Vec<Arc<Subgraph>>, GraphError> {
    let Some(attrs) = CONTROL
        .iter()
        .find(|(op, _)| node.domain.is_empty() && *op == node.op_type)
        .map(|(_, a)| *a)
    else {
        return Ok(Vec::new());
    };
    attrs
        .iter()
        .map(|a| {
            let bytes = match node.attributes.iter().find(|x| x.name.as_str() == *a) {
                Some(Attribute {
                    value: AttrValue::Graph(b),
                    ..
                }) => b,
                _ => {
                    return Err(GraphError::Invalid(format!(
                        "node {}: missing subgraph attribute '{a}'",
                        node.label()
                    )))
                }
            };
            let (model, formal) = import_subgraph(bytes, opsets)
                .map_err(|e| GraphError::Invalid(format!("node {} '{a}': {e}", node.label())))?;
            Ok(Arc::new(Subgraph {
                attr: a.to_string(),
                model,
                formal,
            }))
        })
        .collect()
}

fn normalise_domain(d: &str) -> String {
    if d == "ai.onnx" {
        String::new()
    } else {
        d.to_string()
    }
}

/// `owned`: the buffer `graph`'s initializer bytes are slices of, when import may give their
/// pages back once copied (taken out of `graph` first: nothing can read them after).
fn graph_model(
    graph: &mut onnx::GraphProto,
    opsets: HashMap<String, i64>,
    dir: Option<&Path>,
    top: bool,
    owned: Option<Owned>,
) -> Result<(Model, FormalInputs), GraphError> {
    let mut initializers = HashMap::new();
    for t in &mut graph.initializer {
        if t.name.is_empty() {
            return Err(GraphError::Invalid("an initializer has no name".into()));
        }
        let value = match &owned {
            Some(owned) => {
                let raw = t.raw_data.clone();
                let value = tensor_copied(t, dir, &mut |r| {
                    if let Some(part) = raw.get(r.clone()).map(|_| raw.slice(r)) {
                        owned.give_back(part);
                    }
                })?;
                drop(raw);
                owned.give_back(std::mem::take(&mut t.raw_data));
                value
            }
            None => tensor(t, dir)?,
        };
        let value = Arc::new(value);
        initializers.insert(t.name.clone(), value);
    }
    let graph = &*graph;
    let formal: Vec<&onnx::ValueInfoProto> = graph
        .input
        .iter()
        .filter(|v| !initializers.contains_key(&v.name))
        .collect();
    // A subgraph's inputs are bound by its control node, so they need no declared type.
    let loose: FormalInputs = formal
        .iter()
        .map(|v| (v.name.clone(), io_spec(v).ok().map(|s| s.dtype)))
        .collect();
    let inputs = if top {
        formal
            .iter()
            .map(|v| io_spec(v))
            .collect::<Result<Vec<_>, _>>()?
    } else {
        Vec::new()
    };
    let outputs = graph
        .output
        .iter()
        .map(|v| {
            if top {
                io_spec(v)
            } else {
                Ok(io_spec(v).unwrap_or(IoSpec {
                    name: v.name.clone(),
                    dtype: DType::F32,
                    shape: None,
                }))
            }
        })
        .collect::<Result<Vec<_>, _>>()?;
    if outputs.is_empty() {
        return Err(GraphError::Invalid("the graph has no outputs".into()));
    }
    let nodes = graph
        .node
        .iter()
        .map(|n| {
            let mut node = Node {
                name: n.name.clone(),
                domain: normalise_domain(&n.domain),
                op_type: n.op_type.clone(),
                inputs: n.input.clone(),
                outputs: n.output.clone(),
                attributes: n
                    .attribute
                    .iter()
                    .map(|a| attribute(a, dir))
                    .collect::<Result<_, GraphError>>()
                    .map_err(|e| {
                        GraphError::Invalid(format!("node '{}' ({}): {e}", n.name, n.op_type))
                    })?,
                subgraphs: Vec::new(),
            };
            node.subgraphs = subgraphs(&node, &opsets)?;
            Ok(node)
        })
        .collect::<Result<Vec<_>, GraphError>>()?;
    Ok((
        Model {
            opsets,
            inputs,
            outputs,
            initializers,
            nodes,
        },
        loose,
    ))
}

fn io_spec(v: &onnx::ValueInfoProto) -> Result<IoSpec, GraphError> {
    let kind = match v.r#type.as_ref().and_then(|t| t.value.as_ref()) {
        Some(onnx::type_proto::Value::TensorType(t)) => Ok(t),
        Some(onnx::type_proto::Value::SequenceType(_)) => Err("a sequence"),
        Some(onnx::type_proto::Value::MapType(_)) => Err("a map"),
        Some(onnx::type_proto::Value::OptionalType(_)) => Err("an optional"),
        _ => Err("not a tensor"),
    };
    let t = kind.map_err(|what| {
        // Only a served graph's inputs and outputs get here (a subgraph's are bound by its
        // control node): inside a graph, sequences are values like tensors.
        GraphError::Unsupported(format!(
            "graph input or output '{}' is {what}: KServe v2 carries tensors only, so a served model's inputs and outputs must be tensors (inside the graph, sequences are supported)",
            v.name
        ))
    })?;
    let dtype = DType::from_onnx_code(t.elem_type).ok_or_else(|| {
        GraphError::Unsupported(format!(
            "graph value '{}' has element type {}, which opreg does not support",
            v.name, t.elem_type
        ))
    })?;
    let shape = t.shape.as_ref().map(|s| {
        s.dim
            .iter()
            .map(|d| match &d.value {
                Some(onnx::tensor_shape_proto::dimension::Value::DimValue(n)) if *n >= 0 => {
                    Dim::Fixed(*n as usize)
                }
                Some(onnx::tensor_shape_proto::dimension::Value::DimParam(p)) => {
                    Dim::Symbolic(p.clone())
                }
                _ => Dim::Symbolic(String::new()),
            })
            .collect()
    });
    Ok(IoSpec {
        name: v.name.clone(),
        dtype,
        shape,
    })
}

/// Reads a `TensorProto` in any of its storage forms.
pub fn tensor(t: &onnx::TensorProto, dir: Option<&Path>) -> Result<HostTensor, GraphError> {
    tensor_copied(t, dir, &mut |_| {})
}

/// Bytes of `raw_data` copied at a time by [`tensor_copied`].
const COPY_CHUNK: usize = 8 << 20;

/// [`tensor`], calling `copied(range)` as each range of `raw_data` has been copied into the
/// tensor (in chunks of [`COPY_CHUNK`]): import gives those pages back as it goes, so that a
/// 94 MB embedding table does not exist twice at the load's peak.
fn tensor_copied(
    t: &onnx::TensorProto,
    dir: Option<&Path>,
    copied: &mut dyn FnMut(std::ops::Range<usize>),
) -> Result<HostTensor, GraphError> {
    let what = || format!("tensor '{}'", t.name);
    let dtype = DType::from_onnx_code(t.data_type).ok_or_else(|| {
        GraphError::Unsupported(format!(
            "{}: element type {} is not supported",
            what(),
            t.data_type
        ))
    })?;
    let shape = t
        .dims
        .iter()
        .map(|&d| {
            usize::try_from(d)
                .map_err(|_| GraphError::Invalid(format!("{}: negative dimension {d}", what())))
        })
        .collect::<Result<Vec<_>, _>>()?;
    let numel = opreg_sdk::alloc::checked_numel(&shape)
        .map_err(|e| GraphError::Invalid(format!("{}: {}", what(), e.message)))?;
    let bad = |e: opreg_sdk::PluginError| GraphError::Invalid(format!("{}: {}", what(), e.message));
    if t.data_location == onnx::tensor_proto::DataLocation::External as i32 {
        let mut bytes = external(t, dir)?;
        if let Some(bits) = dtype.packed_bits() {
            bytes = unpack(&bytes, numel, bits, matches!(dtype, DType::I4 | DType::I2))
                .ok_or_else(|| {
                    GraphError::Invalid(format!(
                        "{}: external data too short for {numel} {dtype} elements",
                        what()
                    ))
                })?;
        }
        return HostTensor::from_bytes(dtype, &shape, &bytes).map_err(bad);
    }
    if dtype == DType::String {
        let items: Vec<&[u8]> = t.string_data.iter().map(|s| s.as_slice()).collect();
        return HostTensor::from_strings(&shape, &items).map_err(bad);
    }
    if let Some(bits) = dtype.packed_bits() {
        // ONNX packs sub-byte types (low bits first); opreg holds one element per byte.
        let packed: Vec<u8> = if !t.raw_data.is_empty() || numel == 0 {
            t.raw_data.to_vec()
        } else {
            t.int32_data.iter().map(|&v| v as u8).collect()
        };
        let bytes = unpack(&packed, numel, bits, matches!(dtype, DType::I4 | DType::I2))
            .ok_or_else(|| {
                GraphError::Invalid(format!(
                    "{}: {} packed bytes hold fewer than {numel} {dtype} elements",
                    what(),
                    packed.len()
                ))
            })?;
        return HostTensor::from_bytes(dtype, &shape, &bytes).map_err(bad);
    }
    if !t.raw_data.is_empty() || numel == 0 {
        return HostTensor::from_bytes_in_chunks(dtype, &shape, &t.raw_data, COPY_CHUNK, copied)
            .map_err(bad);
    }
    let count = |n: usize| -> Result<(), GraphError> {
        if n == numel {
            Ok(())
        } else {
            Err(GraphError::Invalid(format!(
                "{}: shape {shape:?} needs {numel} values, the typed field holds {n}",
                what()
            )))
        }
    };
    let bytes: Vec<u8> = match dtype {
        DType::F32 => {
            count(t.float_data.len())?;
            t.float_data.iter().flat_map(|v| v.to_le_bytes()).collect()
        }
        DType::F64 => {
            count(t.double_data.len())?;
            t.double_data.iter().flat_map(|v| v.to_le_bytes()).collect()
        }
        DType::I64 => {
            count(t.int64_data.len())?;
            t.int64_data.iter().flat_map(|v| v.to_le_bytes()).collect()
        }
        DType::U32 | DType::U64 => {
            count(t.uint64_data.len())?;
            if dtype == DType::U32 {
                t.uint64_data
                    .iter()
                    .flat_map(|&v| (v as u32).to_le_bytes())
                    .collect()
            } else {
                t.uint64_data.iter().flat_map(|v| v.to_le_bytes()).collect()
            }
        }
        DType::F8E4M3FN | DType::F8E4M3FNUZ | DType::F8E5M2 | DType::F8E5M2FNUZ | DType::F8E8M0 => {
            count(t.int32_data.len())?;
            t.int32_data.iter().map(|&v| v as u8).collect()
        }
        // ONNX stores a complex number as two consecutive reals.
        DType::C64 => {
            count(t.float_data.len() / 2)?;
            t.float_data.iter().flat_map(|v| v.to_le_bytes()).collect()
        }
        DType::C128 => {
            count(t.double_data.len() / 2)?;
            t.double_data.iter().flat_map(|v| v.to_le_bytes()).collect()
        }
        DType::I32
        | DType::I16
        | DType::I8
        | DType::U16
        | DType::U8
        | DType::Bool
        | DType::F16
        | DType::BF16 => {
            count(t.int32_data.len())?;
            let size = dtype.size();
            t.int32_data
                .iter()
                .flat_map(|&v| v.to_le_bytes().into_iter().take(size))
                .collect()
        }
        // Strings and sub-byte types returned above; a code this daemon does not know cannot
        // be read.
        other => {
            return Err(GraphError::Unsupported(format!(
                "{}: element type {other} has no typed storage opreg reads",
                what()
            )))
        }
    };
    HostTensor::from_bytes(dtype, &shape, &bytes).map_err(bad)
}

/// `numel` elements of `bits` bits each, low bits first, one per output byte (sign-extended
/// when `signed`). `None` when `packed` is too short.
pub fn unpack(packed: &[u8], numel: usize, bits: u32, signed: bool) -> Option<Vec<u8>> {
    let per_byte = (8 / bits) as usize;
    if packed.len() < numel.div_ceil(per_byte) {
        return None;
    }
    let mask = (1u8 << bits) - 1;
    Some(
        (0..numel)
            .map(|i| {
                // In range: the length was checked above.
                let byte = packed.get(i / per_byte).copied().unwrap_or(0);
                let v = (byte >> ((i % per_byte) as u32 * bits)) & mask;
                if signed && v & (1 << (bits - 1)) != 0 {
                    v | !mask
                } else {
                    v
                }
            })
            .collect(),
    )
}

fn external(t: &onnx::TensorProto, dir: Option<&Path>) -> Result<Vec<u8>, GraphError> {
    let what = || format!("tensor '{}'", t.name);
    let get = |k: &str| {
        t.external_data
            .iter()
            .find(|e| e.key == k)
            .map(|e| e.value.as_str())
    };
    let location = get("location").ok_or_else(|| {
        GraphError::Invalid(format!("{}: external data without a location", what()))
    })?;
    let rel = Path::new(location);
    // A model must not read files outside its own folder.
    if rel.is_absolute() || rel.components().any(|c| matches!(c, Component::ParentDir)) {
        return Err(GraphError::Invalid(format!(
            "{}: external data location '{location}' leaves the model folder",
            what()
        )));
    }
    let dir = dir.ok_or_else(|| {
        GraphError::Invalid(format!(
            "{}: external data '{location}' but the model has no folder",
            what()
        ))
    })?;
    let parse = |k: &str| -> Result<Option<usize>, GraphError> {
        get(k)
            .map(|v| {
                v.parse::<usize>().map_err(|_| {
                    GraphError::Invalid(format!("{}: bad external data {k} '{v}'", what()))
                })
            })
            .transpose()
    };
    let offset = parse("offset")?.unwrap_or(0);
    let length = parse("length")?;
    let read_err = |e: std::io::Error| {
        GraphError::Invalid(format!(
            "{}: reading external data '{location}': {e}",
            what()
        ))
    };
    // The lexical check above is not enough: a symbolic link inside the folder may point
    // anywhere. Resolve both and compare.
    let root = dir.canonicalize().map_err(read_err)?;
    let path = dir.join(rel).canonicalize().map_err(read_err)?;
    if !path.starts_with(&root) {
        return Err(GraphError::Invalid(format!(
            "{}: external data location '{location}' leads outside the model folder",
            what()
        )));
    }
    let mut file = std::fs::File::open(&path).map_err(read_err)?;
    let meta = file.metadata().map_err(read_err)?;
    if !meta.is_file() {
        return Err(GraphError::Invalid(format!(
            "{}: external data '{location}' is not a regular file",
            what()
        )));
    }
    let size = usize::try_from(meta.len()).unwrap_or(usize::MAX);
    let end = match length {
        Some(l) => offset.checked_add(l),
        None => Some(size),
    };
    let Some(end) = end.filter(|&e| offset <= e && e <= size) else {
        return Err(GraphError::Invalid(format!(
            "{}: external data range is outside '{location}'",
            what()
        )));
    };
    // Only the range is read, into a buffer reserved fallibly.
    use std::io::{Read, Seek, SeekFrom};
    file.seek(SeekFrom::Start(offset as u64))
        .map_err(read_err)?;
    let mut data = opreg_sdk::alloc::try_with_capacity::<u8>(end - offset)
        .map_err(|e| GraphError::Invalid(format!("{}: {}", what(), e.message)))?;
    file.take((end - offset) as u64)
        .read_to_end(&mut data)
        .map_err(read_err)?;
    if data.len() != end - offset {
        return Err(GraphError::Invalid(format!(
            "{}: external data '{location}' changed while it was read",
            what()
        )));
    }
    Ok(data)
}

fn owned(t: &HostTensor) -> OwnedTensor {
    OwnedTensor {
        dtype: t.dtype(),
        shape: t.shape().to_vec().into(),
        data: if t.dtype() == DType::String {
            RVec::new()
        } else {
            t.bytes().to_vec().into()
        },
        strings: t
            .strings()
            .iter()
            .map(|s| RString::from(s.as_str()))
            .collect(),
    }
}

fn attribute(a: &onnx::AttributeProto, dir: Option<&Path>) -> Result<Attribute, GraphError> {
    use onnx::attribute_proto::AttributeType as T;
    let ty = T::try_from(a.r#type).unwrap_or(T::Undefined);
    // Models from before IR 3 leave `type` unset: infer it from the field that holds a value.
    let ty = if ty != T::Undefined {
        ty
    } else if a.t.is_some() {
        T::Tensor
    } else if a.g.is_some() {
        T::Graph
    } else if !a.floats.is_empty() {
        T::Floats
    } else if !a.ints.is_empty() {
        T::Ints
    } else if !a.strings.is_empty() {
        T::Strings
    } else if !a.s.is_empty() {
        T::String
    } else if a.f != 0.0 {
        T::Float
    } else {
        T::Int
    };
    let value = match ty {
        T::Float => AttrValue::Float(a.f),
        T::Int => AttrValue::Int(a.i),
        T::String => AttrValue::String(String::from_utf8_lossy(&a.s).into_owned()),
        T::Floats => AttrValue::Floats(a.floats.clone()),
        T::Ints => AttrValue::Ints(a.ints.clone()),
        T::Strings => AttrValue::Strings(
            a.strings
                .iter()
                .map(|s| String::from_utf8_lossy(s).into_owned())
                .collect(),
        ),
        T::Tensor => {
            let t = a.t.as_ref().ok_or_else(|| {
                GraphError::Invalid(format!(
                    "attribute '{}' is a TENSOR without a value",
                    a.name
                ))
            })?;
            AttrValue::Tensor(owned(&tensor(t, dir)?))
        }
        T::Graph => AttrValue::Graph(a.g.as_ref().map(|g| g.encode_to_vec()).unwrap_or_default()),
        // A declared type (`Optional`'s, `SequenceEmpty`-like ops'): informational for the
        // host's optional and sequence operators, so carried as a kind no kernel reads.
        T::TypeProto | T::TypeProtos => {
            AttrValue::Unsupported(opreg_sdk::kernel::AttrKind(ty as i32 as u32))
        }
        other => {
            return Err(GraphError::Unsupported(format!(
                "attribute '{}' of type {other:?} is not supported",
                a.name
            )));
        }
    };
    Ok(Attribute {
        name: a.name.as_str().into(),
        value,
    })
}

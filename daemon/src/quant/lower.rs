//! Nodes computed in a narrower float type (`NodeKind::FLOAT`, precision F16 or BF16).
//!
//! A lowered node reads its float constants as converted copies (the f32 originals go when
//! nothing else reads them: the model shrinks) and its computed inputs through one shared
//! `Cast(to=f16)` per value; its output is cast back to f32 only for readers that are not
//! lowered to the same type (and graph outputs). Between two lowered nodes no cast pair is
//! written at all, and the elementwise and pooling nodes that sit between lowered nodes only
//! (a ReLU between two convolutions) are lowered with them: a chain of lowered layers costs
//! one cast in and one cast out.

// Model and request data reach this module: no unchecked index or slice.
#![deny(clippy::indexing_slicing)]

use super::QuantError;
use crate::graph::{Model, Node};
use opreg_sdk::{
    half::{bf16, f16},
    host::HostTensor,
    kernel::Attribute,
    AttrValue, DType,
};
use std::{
    collections::{HashMap, HashSet},
    sync::Arc,
};

/// The input positions of type `T` (the float operands) of the operators that may be lowered;
/// the others are not.
fn float_inputs(op: &str) -> Option<&'static [usize]> {
    Some(match op {
        "Conv" | "Gemm" | "Clip" => &[0, 1, 2],
        "MatMul" | "Add" | "Sub" | "Mul" => &[0, 1],
        "Relu" | "LeakyRelu" | "Sigmoid" | "Tanh" | "MaxPool" | "AveragePool"
        | "GlobalAveragePool" | "GlobalMaxPool" | "Flatten" | "Reshape" | "Transpose" => &[0],
        _ => return None,
    })
}

/// The operators lowered only when their neighbours are (they gain nothing alone).
fn follows_neighbours(op: &str) -> bool {
    !matches!(op, "Conv" | "Gemm" | "MatMul")
}

/// ONNX's `TensorProto.DataType` code of a float type.
fn onnx_type(t: DType) -> i64 {
    match t {
        DType::F16 => 10,
        DType::BF16 => 16,
        _ => 1,
    }
}

pub fn type_name(t: DType) -> &'static str {
    match t {
        DType::F16 => "float16",
        DType::BF16 => "bfloat16",
        _ => "float",
    }
}

/// Checks the strategy's lowered nodes and adds the neighbours that go with them. `asked`:
/// node name → precision.
pub fn choose(
    model: &Model,
    asked: HashMap<String, DType>,
    strategy: &str,
) -> Result<HashMap<String, DType>, QuantError> {
    let bad = |reason: String| QuantError::BadPlan {
        strategy: strategy.into(),
        reason,
    };
    let opset = model.opset("").unwrap_or(1);
    if let Some(name) = asked
        .keys()
        .find(|a| !model.nodes.iter().any(|n| &&n.name == a))
    {
        return Err(bad(format!("node plan: the model has no node '{name}'")));
    }
    // In the model's order, so that the first refusal is the same every time.
    for n in model.nodes.iter().filter(|n| asked.contains_key(&n.name)) {
        let (name, Some(p)) = (&n.name, asked.get(&n.name)) else {
            continue;
        };
        if !matches!(*p, DType::F16 | DType::BF16) {
            return Err(bad(format!(
                "node '{name}': a lowered node computes in float16 or bfloat16, not {p:?}"
            )));
        }
        if !n.domain.is_empty() || float_inputs(&n.op_type).is_none() || n.outputs.len() != 1 {
            return Err(QuantError::Unimplemented {
                strategy: strategy.into(),
                what: format!(
                    "computing node '{name}' ({}) in {}",
                    n.op_type,
                    type_name(*p)
                ),
            });
        }
        // ONNX gave these operators bfloat16 at opset 22 (MatMul and Gemm at 13).
        let needs = match n.op_type.as_str() {
            "Conv" | "MaxPool" | "AveragePool" | "GlobalAveragePool" | "GlobalMaxPool" => 22,
            _ => 13,
        };
        if *p == DType::BF16 && opset < needs {
            return Err(QuantError::Model {
                model: String::new(),
                reason: format!(
                    "node '{name}': ONNX {} takes bfloat16 from opset {needs}; the model imports {opset}",
                    n.op_type
                ),
            });
        }
    }
    let producer: HashMap<&str, &str> = model
        .nodes
        .iter()
        .flat_map(|n| n.outputs.iter().map(move |o| (o.as_str(), n.name.as_str())))
        .collect();
    let outputs: HashSet<&str> = model.outputs.iter().map(|o| o.name.as_str()).collect();
    // Each value's readers, once (the set below is narrowed over several rounds).
    let mut readers: HashMap<&str, Vec<&str>> = HashMap::new();
    for n in &model.nodes {
        for x in n.inputs.iter().filter(|x| !x.is_empty()) {
            readers.entry(x.as_str()).or_default().push(n.name.as_str());
        }
    }
    let mut lowered = asked.clone();
    let mut precisions: Vec<DType> = asked.values().copied().collect();
    precisions.sort_by_key(|p| format!("{p:?}"));
    precisions.dedup();
    for p in precisions {
        // The largest set of neighbours that can go with the nodes asked in `p`: start from
        // every candidate and drop, until nothing changes, each one with a computed input
        // from outside the set or a reader outside it.
        let mut set: HashSet<&str> = model
            .nodes
            .iter()
            .filter(|n| {
                n.domain.is_empty()
                    && follows_neighbours(&n.op_type)
                    && float_inputs(&n.op_type).is_some()
                    && n.outputs.len() == 1
                    && !lowered.contains_key(&n.name)
            })
            .map(|n| n.name.as_str())
            .collect();
        let inside =
            |set: &HashSet<&str>, name: &str| set.contains(name) || asked.get(name) == Some(&p);
        loop {
            let before = set.len();
            let keep: HashSet<&str> = model
                .nodes
                .iter()
                .filter(|n| set.contains(n.name.as_str()))
                .filter(|n| {
                    let positions = float_inputs(&n.op_type).unwrap_or(&[]);
                    let inputs_inside = positions
                        .iter()
                        .filter_map(|&i| n.inputs.get(i))
                        .filter(|x| !x.is_empty() && !model.initializers.contains_key(*x))
                        .all(|x| producer.get(x.as_str()).is_some_and(|m| inside(&set, m)));
                    let readers_inside = n.outputs.iter().all(|y| {
                        !outputs.contains(y.as_str())
                            && readers
                                .get(y.as_str())
                                .is_none_or(|rs| rs.iter().all(|r| inside(&set, r)))
                    });
                    inputs_inside && readers_inside
                })
                .map(|n| n.name.as_str())
                .collect();
            set = keep;
            if set.len() == before {
                break;
            }
        }
        for name in set {
            lowered.insert(name.to_string(), p);
        }
    }
    Ok(lowered)
}

/// Writes lowered nodes into `out` (the model being built), sharing converted constants and
/// casts between them.
pub struct Lowerer<'m> {
    source: &'m Model,
    lowered: &'m HashMap<String, DType>,
    /// (value, type) → its name in that type.
    values: HashMap<(String, DType), String>,
}

impl<'m> Lowerer<'m> {
    pub fn new(source: &'m Model, lowered: &'m HashMap<String, DType>) -> Self {
        Lowerer {
            source,
            lowered,
            values: HashMap::new(),
        }
    }

    /// The precision `node` is lowered to, if it is.
    pub fn precision(&self, node: &Node) -> Option<DType> {
        self.lowered.get(&node.name).copied()
    }

    fn cast(out: &mut Model, name: &str, from: &str, to_value: &str, to: DType) {
        out.nodes.push(Node {
            name: name.into(),
            domain: String::new(),
            op_type: "Cast".into(),
            inputs: vec![from.into()],
            outputs: vec![to_value.into()],
            attributes: vec![Attribute {
                name: "to".into(),
                value: AttrValue::Int(onnx_type(to)),
            }],
            subgraphs: Vec::new(),
        });
    }

    /// `x` in type `p`: a converted constant, a lowered producer's own output, or a cast.
    fn input(&mut self, out: &mut Model, x: &str, p: DType) -> Result<String, QuantError> {
        if let Some(v) = self.values.get(&(x.to_string(), p)) {
            return Ok(v.clone());
        }
        let name = out.fresh_name(&format!("{x}_{}", type_name(p)));
        match self.source.initializers.get(x) {
            Some(t) if t.dtype() == DType::F32 && t.on_host() => {
                let values = t
                    .to_vec::<f32>()
                    .map_err(|e| QuantError::Data(format!("constant '{x}': {e}")))?;
                let converted = match p {
                    DType::F16 => HostTensor::from_vec(
                        t.shape(),
                        &values.iter().map(|&v| f16::from_f32(v)).collect::<Vec<_>>(),
                    ),
                    _ => HostTensor::from_vec(
                        t.shape(),
                        &values
                            .iter()
                            .map(|&v| bf16::from_f32(v))
                            .collect::<Vec<_>>(),
                    ),
                }
                .map_err(|e| QuantError::Data(format!("constant '{x}': {e}")))?;
                out.initializers.insert(name.clone(), Arc::new(converted));
            }
            Some(_) => return Ok(x.to_string()),
            None => Self::cast(out, &format!("{x}_to_{}", type_name(p)), x, &name, p),
        }
        self.values.insert((x.to_string(), p), name.clone());
        Ok(name)
    }

    /// Writes `n` computed in `p`, and the cast of its output back to f32 where a reader or a
    /// graph output needs it.
    pub fn lower(&mut self, out: &mut Model, n: &Node, p: DType) -> Result<(), QuantError> {
        let mut node = n.clone();
        let positions = float_inputs(&n.op_type).unwrap_or(&[]);
        for (i, x) in node.inputs.iter_mut().enumerate() {
            if positions.contains(&i) && !x.is_empty() {
                *x = self.input(out, x, p)?;
            }
        }
        let Some(y) = n.outputs.first() else {
            out.nodes.push(node);
            return Ok(());
        };
        let narrow = out.fresh_name(&format!("{y}_{}", type_name(p)));
        if let Some(slot) = node.outputs.first_mut() {
            slot.clone_from(&narrow);
        }
        out.nodes.push(node);
        self.values.insert((y.clone(), p), narrow.clone());
        let wide_needed = self.source.outputs.iter().any(|o| &o.name == y)
            || self
                .source
                .nodes
                .iter()
                .filter(|r| r.inputs.contains(y))
                .any(|r| self.lowered.get(&r.name) != Some(&p));
        if wide_needed {
            Self::cast(out, &format!("{}_to_float", n.name), &narrow, y, DType::F32);
        }
        Ok(())
    }
}

//! Legacy opsets, upgraded at import.
//!
//! Older converters wrote models at default-domain opsets 1–6, whose operators differ from
//! today's: `broadcast`/`axis` attributes on arithmetic, `consumed_inputs`, `is_test`,
//! Reshape's shape as an attribute, Cast's `to` as a string, Upsample's per-axis scales.
//! ONNX Runtime refuses them; opreg rewrites such a model to opset 7 before anything else
//! sees it, op by op, following the rules of the ONNX version converter's adapters — so the
//! kernels, the passes and export all deal with one form. A Scan written at opset 8 (batched,
//! with `sequence_lens`) is rewritten into the opset-9 form and the model moved to opset 9.
//!
//! The rewrite works on the protobuf, not on the imported IR, so subgraphs (`If`/`Loop`
//! bodies) are upgraded the same way and a quantized or optimized model exported later is a
//! consistent opset-7/9 model. A conversion that the model does not pin down (a legacy
//! broadcast whose operand ranks are unknown, a batched Scan with `sequence_lens`) is refused
//! with the node named, never guessed.

// Models reach this module: no unchecked index or slice.
#![deny(clippy::indexing_slicing)]

use super::GraphError;
use opreg_proto::onnx::{
    self, attribute_proto::AttributeType, type_proto, AttributeProto, GraphProto, NodeProto,
    TensorProto, ValueInfoProto,
};
use std::collections::{HashMap, HashSet};

/// The opset legacy models are raised to.
const TARGET: i64 = 7;
/// The opset a model with a batched (opset-8) Scan is raised to.
const SCAN_TARGET: i64 = 9;

/// What [`upgrade`] did: the default-domain opset before and after.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Upgraded {
    pub from: i64,
    pub to: i64,
}

/// Upgrades `model` in place when its default-domain opset is below 7, or it is 8 and holds a
/// Scan; `None` when nothing needed changing.
pub fn upgrade(model: &mut onnx::ModelProto) -> Result<Option<Upgraded>, GraphError> {
    let Some(from) = model
        .opset_import
        .iter()
        .find(|o| o.domain.is_empty() || o.domain == "ai.onnx")
        .map(|o| o.version)
    else {
        return Ok(None);
    };
    let Some(graph) = model.graph.as_mut() else {
        return Ok(None);
    };
    let has_scan = from == 8 && any_node(graph, &|n| is_default(n) && n.op_type == "Scan");
    if from >= TARGET && !has_scan {
        return Ok(None);
    }
    let mut names = Names::of(graph);
    let to = if has_scan { SCAN_TARGET } else { TARGET };
    upgrade_graph(graph, from, to, &mut names)?;
    for o in &mut model.opset_import {
        if o.domain.is_empty() || o.domain == "ai.onnx" {
            o.version = to;
        }
    }
    Ok(Some(Upgraded { from, to }))
}

fn is_default(n: &NodeProto) -> bool {
    n.domain.is_empty() || n.domain == "ai.onnx"
}

/// Whether `pred` holds for a node of `g` or of any of its subgraphs.
fn any_node(g: &GraphProto, pred: &dyn Fn(&NodeProto) -> bool) -> bool {
    g.node.iter().any(|n| {
        pred(n)
            || n.attribute
                .iter()
                .flat_map(|a| a.g.iter().chain(&a.graphs))
                .any(|s| any_node(s, pred))
    })
}

/// Every value name of a model (subgraphs included), and fresh ones on demand.
struct Names {
    used: HashSet<String>,
}

impl Names {
    fn of(g: &GraphProto) -> Names {
        fn collect(g: &GraphProto, used: &mut HashSet<String>) {
            let vi = g.input.iter().chain(&g.output).chain(&g.value_info);
            used.extend(vi.map(|v| v.name.clone()));
            used.extend(g.initializer.iter().map(|t| t.name.clone()));
            for n in &g.node {
                used.extend(n.input.iter().chain(&n.output).cloned());
                for s in n.attribute.iter().flat_map(|a| a.g.iter().chain(&a.graphs)) {
                    collect(s, used);
                }
            }
        }
        let mut used = HashSet::new();
        collect(g, &mut used);
        Names { used }
    }

    fn fresh(&mut self, base: &str) -> String {
        let mut k = 0usize;
        loop {
            let name = format!("{base}__legacy{k}");
            if self.used.insert(name.clone()) {
                return name;
            }
            k += 1;
        }
    }
}

/// Ranks known statically in one graph: declared inputs, outputs and value infos,
/// initializers, and what rank-preserving operators carry forward.
fn known_ranks(g: &GraphProto) -> HashMap<String, usize> {
    let mut ranks: HashMap<String, usize> = HashMap::new();
    for v in g.input.iter().chain(&g.output).chain(&g.value_info) {
        if let Some(type_proto::Value::TensorType(t)) =
            v.r#type.as_ref().and_then(|t| t.value.as_ref())
        {
            if let Some(s) = &t.shape {
                ranks.insert(v.name.clone(), s.dim.len());
            }
        }
    }
    for t in &g.initializer {
        ranks.insert(t.name.clone(), t.dims.len());
    }
    // Operators whose first output has the rank of their first input.
    const SAME_RANK: &[&str] = &[
        "Abs",
        "BatchNormalization",
        "Cast",
        "Ceil",
        "Clip",
        "Conv",
        "ConvTranspose",
        "Dropout",
        "Elu",
        "Exp",
        "Floor",
        "HardSigmoid",
        "Identity",
        "InstanceNormalization",
        "LRN",
        "LeakyRelu",
        "Log",
        "LogSoftmax",
        "MaxPool",
        "AveragePool",
        "Neg",
        "PRelu",
        "Reciprocal",
        "Relu",
        "Selu",
        "Sigmoid",
        "Softmax",
        "Softplus",
        "Softsign",
        "Sqrt",
        "Tanh",
        "ThresholdedRelu",
        "Upsample",
        "Pad",
        "LpPool",
        "GlobalAveragePool",
        "GlobalMaxPool",
        "GlobalLpPool",
        "Not",
    ];
    const BROADCASTING: &[&str] = &[
        "Add", "Sub", "Mul", "Div", "Pow", "And", "Or", "Xor", "Equal", "Greater", "Less", "Sum",
        "Max", "Min", "Mean",
    ];
    for n in &g.node {
        if !is_default(n) {
            continue;
        }
        let rank_of = |i: usize| n.input.get(i).and_then(|v| ranks.get(v)).copied();
        let out = if SAME_RANK.contains(&n.op_type.as_str()) {
            rank_of(0)
        } else if BROADCASTING.contains(&n.op_type.as_str()) {
            // Legacy broadcasting keeps the first operand's rank.
            if int_attr(n, "broadcast") == Some(1) {
                rank_of(0)
            } else {
                (0..n.input.len())
                    .map(rank_of)
                    .collect::<Option<Vec<_>>>()
                    .and_then(|r| r.into_iter().max())
            }
        } else {
            match n.op_type.as_str() {
                "Gemm" | "Flatten" => Some(2),
                "Reshape" => ints_attr(n, "shape").map(|s| s.len()),
                "Concat" => rank_of(0),
                "Transpose" => rank_of(0),
                _ => None,
            }
        };
        if let (Some(r), Some(o)) = (out, n.output.first()) {
            ranks.entry(o.clone()).or_insert(r);
        }
    }
    ranks
}

fn attr<'a>(n: &'a NodeProto, name: &str) -> Option<&'a AttributeProto> {
    n.attribute.iter().find(|a| a.name == name)
}

fn int_attr(n: &NodeProto, name: &str) -> Option<i64> {
    attr(n, name).map(|a| a.i)
}

fn ints_attr(n: &NodeProto, name: &str) -> Option<Vec<i64>> {
    attr(n, name).map(|a| a.ints.clone())
}

fn drop_attrs(n: &mut NodeProto, names: &[&str]) {
    n.attribute.retain(|a| !names.contains(&a.name.as_str()));
}

fn set_attr(n: &mut NodeProto, a: AttributeProto) {
    n.attribute.retain(|x| x.name != a.name);
    n.attribute.push(a);
}

fn int_attr_proto(name: &str, v: i64) -> AttributeProto {
    AttributeProto {
        name: name.into(),
        r#type: AttributeType::Int as i32,
        i: v,
        ..Default::default()
    }
}

fn ints_attr_proto(name: &str, v: Vec<i64>) -> AttributeProto {
    AttributeProto {
        name: name.into(),
        r#type: AttributeType::Ints as i32,
        ints: v,
        ..Default::default()
    }
}

fn floats_attr_proto(name: &str, v: Vec<f32>) -> AttributeProto {
    AttributeProto {
        name: name.into(),
        r#type: AttributeType::Floats as i32,
        floats: v,
        ..Default::default()
    }
}

fn i64_tensor(name: String, values: Vec<i64>) -> TensorProto {
    TensorProto {
        name,
        dims: vec![values.len() as i64],
        data_type: onnx::tensor_proto::DataType::Int64 as i32,
        int64_data: values,
        ..Default::default()
    }
}

fn f32_tensor(name: String, values: Vec<f32>) -> TensorProto {
    TensorProto {
        name,
        dims: vec![values.len() as i64],
        data_type: onnx::tensor_proto::DataType::Float as i32,
        float_data: values,
        ..Default::default()
    }
}

fn label(n: &NodeProto) -> String {
    if n.name.is_empty() {
        format!("<unnamed> ({})", n.op_type)
    } else {
        format!("'{}' ({})", n.name, n.op_type)
    }
}

/// Upgrades the nodes of `g` (and of its subgraphs) written at opset `from` to opset `to`.
fn upgrade_graph(
    g: &mut GraphProto,
    from: i64,
    to: i64,
    names: &mut Names,
) -> Result<(), GraphError> {
    // Subgraphs first: they see the same opset imports.
    for n in &mut g.node {
        for a in &mut n.attribute {
            for s in a.g.iter_mut().chain(a.graphs.iter_mut()) {
                upgrade_graph(s, from, to, names)?;
            }
        }
    }
    let ranks = known_ranks(g);
    let initializers: HashMap<String, usize> = g
        .initializer
        .iter()
        .enumerate()
        .map(|(i, t)| (t.name.clone(), i))
        .collect();
    let mut new_inits: Vec<TensorProto> = Vec::new();
    let mut out: Vec<NodeProto> = Vec::with_capacity(g.node.len());
    for mut n in std::mem::take(&mut g.node) {
        if !is_default(&n) {
            out.push(n);
            continue;
        }
        if from < TARGET {
            // Opsets 1–5: in-place hints, meaningless to any runtime since opset 6.
            drop_attrs(&mut n, &["consumed_inputs"]);
            let mut ctx = Ctx {
                ranks: &ranks,
                initializers: &initializers,
                all_inits: &g.initializer,
                new_inits: &mut new_inits,
                names,
                before: &mut out,
            };
            to_opset7(&mut n, from, &mut ctx)?;
        }
        if to >= SCAN_TARGET {
            to_opset9(&mut n, &mut new_inits, names)?;
        }
        out.push(n);
    }
    g.node = out;
    g.initializer.extend(new_inits);
    Ok(())
}

/// What a node's rewrite may read and add.
struct Ctx<'a> {
    ranks: &'a HashMap<String, usize>,
    initializers: &'a HashMap<String, usize>,
    all_inits: &'a [TensorProto],
    new_inits: &'a mut Vec<TensorProto>,
    names: &'a mut Names,
    /// Nodes before the one being rewritten (helpers are inserted here).
    before: &'a mut Vec<NodeProto>,
}

/// The opset-1…6 → 7 rules for one node.
fn to_opset7(n: &mut NodeProto, from: i64, ctx: &mut Ctx<'_>) -> Result<(), GraphError> {
    let op = n.op_type.clone();
    match op.as_str() {
        // Limited broadcasting with `broadcast`/`axis` (arithmetic ≤ 6, logic and Pow 1)
        // became numpy-style multidirectional broadcasting in opset 7.
        "Add" | "Sub" | "Mul" | "Div" | "Pow" | "And" | "Or" | "Xor" | "Equal" | "Greater"
        | "Less" => legacy_broadcast(n, ctx),
        // Gemm's C broadcasts unidirectionally from opset 7 on, whatever the flag said.
        "Gemm" => {
            drop_attrs(n, &["broadcast"]);
            Ok(())
        }
        "BatchNormalization" | "Dropout" => {
            // Inference is the only mode a served model runs in.
            drop_attrs(n, &["is_test"]);
            Ok(())
        }
        "Concat" if from < 4 && attr(n, "axis").is_none() => {
            // Concat-1's axis defaulted to 1; from opset 4 on it is required.
            set_attr(n, int_attr_proto("axis", 1));
            Ok(())
        }
        "Reshape" if from < 5 => {
            let shape = ints_attr(n, "shape").ok_or_else(|| {
                GraphError::Invalid(format!(
                    "node {}: Reshape (opset {from}) needs its shape attribute",
                    label(n)
                ))
            })?;
            let name = ctx.names.fresh(&format!("{}_shape", n.output.first().map_or("reshape", |s| s.as_str())));
            ctx.new_inits.push(i64_tensor(name.clone(), shape));
            drop_attrs(n, &["shape"]);
            n.input.truncate(1);
            n.input.push(name);
            Ok(())
        }
        "Cast" if from < 6 => {
            // Cast-1 names the target type as a string ("FLOAT"); from opset 6 on, a code.
            if let Some(a) = attr(n, "to").filter(|a| !a.s.is_empty()) {
                let name = String::from_utf8_lossy(&a.s).to_uppercase();
                let code = onnx::tensor_proto::DataType::from_str_name(&name)
                    .ok_or_else(|| {
                        GraphError::Invalid(format!(
                            "node {}: Cast to '{name}' is not an ONNX type",
                            label(n)
                        ))
                    })?;
                set_attr(n, int_attr_proto("to", code as i32 as i64));
            }
            Ok(())
        }
        "Upsample" if from < 7 => {
            // Upsample-1: per-axis float attributes and upper-case modes.
            let scale = |name: &str| attr(n, name).map_or(1.0, |a| a.f);
            let (h, w) = (scale("height_scale"), scale("width_scale"));
            let mode = attr(n, "mode")
                .map(|a| String::from_utf8_lossy(&a.s).to_lowercase())
                .unwrap_or_else(|| "nearest".into());
            let mode = if mode == "bilinear" { "linear".to_string() } else { mode };
            drop_attrs(n, &["height_scale", "width_scale", "mode"]);
            set_attr(n, floats_attr_proto("scales", vec![1.0, 1.0, h, w]));
            set_attr(
                n,
                AttributeProto {
                    name: "mode".into(),
                    r#type: AttributeType::String as i32,
                    s: mode.into_bytes(),
                    ..Default::default()
                },
            );
            Ok(())
        }
        "Split" if from < 2 && n.input.len() > 1 => {
            // Split-1 could take the split sizes as a second input; from opset 2, an attribute.
            let src = n.input.get(1).cloned().unwrap_or_default();
            if !src.is_empty() {
                let values = ctx
                    .initializers
                    .get(&src)
                    .and_then(|&i| ctx.all_inits.get(i))
                    .map(|t| t.int64_data.clone())
                    .filter(|v| !v.is_empty())
                    .ok_or_else(|| {
                        GraphError::Unsupported(format!(
                            "node {}: Split (opset 1) with split sizes computed at run time cannot be upgraded",
                            label(n)
                        ))
                    })?;
                set_attr(n, ints_attr_proto("split", values));
            }
            n.input.truncate(1);
            Ok(())
        }
        "Pad" if from < 2 => {
            if let Some(p) = ints_attr(n, "paddings") {
                drop_attrs(n, &["paddings"]);
                set_attr(n, ints_attr_proto("pads", p));
            }
            Ok(())
        }
        "Tile" if from < 6 => Err(GraphError::Unsupported(format!(
            "node {}: Tile before opset 6 (tiles and axis inputs) is not upgraded; re-export the model at opset 6 or later",
            label(n)
        ))),
        "RNN" | "GRU" | "LSTM" => {
            // Removed in opset 7: the Y output being present says the same.
            drop_attrs(n, &["output_sequence"]);
            Ok(())
        }
        "PRelu" => legacy_prelu(n, ctx),
        _ => Ok(()),
    }
}

/// `broadcast=1` with `axis`: B's dimensions line up with A's starting at `axis`; numpy
/// broadcasting lines them up at the end, so B gets trailing 1-dimensions.
fn legacy_broadcast(n: &mut NodeProto, ctx: &mut Ctx<'_>) -> Result<(), GraphError> {
    let flagged = int_attr(n, "broadcast") == Some(1);
    let axis = int_attr(n, "axis");
    drop_attrs(n, &["broadcast", "axis"]);
    let (Some(axis), true) = (axis, flagged) else {
        // No axis: B is a suffix of A, which numpy broadcasting reads the same way.
        return Ok(());
    };
    let (a, b) = match (n.input.first(), n.input.get(1)) {
        (Some(a), Some(b)) => (a.clone(), b.clone()),
        _ => return Ok(()),
    };
    let (Some(&ra), Some(&rb)) = (ctx.ranks.get(&a), ctx.ranks.get(&b)) else {
        return Err(GraphError::Unsupported(format!(
            "node {}: legacy broadcast with axis={axis} needs the ranks of both inputs, which the model does not declare (add value_info for '{a}' and '{b}', or re-export at opset 7 or later)",
            label(n)
        )));
    };
    let axis = if axis < 0 { axis + ra as i64 } else { axis };
    let trailing = (ra as i64) - axis - (rb as i64);
    if axis < 0 || trailing < 0 {
        return Err(GraphError::Invalid(format!(
            "node {}: legacy broadcast axis {axis} does not fit a rank-{rb} operand into rank {ra}",
            label(n)
        )));
    }
    if trailing == 0 {
        return Ok(());
    }
    let trailing = trailing as usize;
    let out = ctx.names.fresh(&b);
    if let Some(t) = ctx.initializers.get(&b).and_then(|&i| ctx.all_inits.get(i)) {
        // A constant operand (a bias): reshaped once, here.
        let mut t = t.clone();
        t.name = out.clone();
        t.dims.extend(std::iter::repeat_n(1, trailing));
        ctx.new_inits.push(t);
    } else {
        ctx.before.push(NodeProto {
            name: out.clone(),
            op_type: "Unsqueeze".into(),
            input: vec![b],
            output: vec![out.clone()],
            attribute: vec![ints_attr_proto(
                "axes",
                (rb..rb + trailing).map(|d| d as i64).collect(),
            )],
            ..Default::default()
        });
    }
    if let Some(slot) = n.input.get_mut(1) {
        *slot = out;
    }
    Ok(())
}

/// PRelu before opset 7 took a slope of X's shape, one element, or — as converters wrote it
/// for NCHW — one per channel; opset 7 broadcasts the slope numpy-style (aligned at the end),
/// so a per-channel slope gets trailing 1-dimensions.
fn legacy_prelu(n: &mut NodeProto, ctx: &mut Ctx<'_>) -> Result<(), GraphError> {
    let (Some(x), Some(s)) = (n.input.first(), n.input.get(1)) else {
        return Ok(());
    };
    let (Some(&rx), Some(t)) = (
        ctx.ranks.get(x),
        ctx.initializers.get(s).and_then(|&i| ctx.all_inits.get(i)),
    ) else {
        return Ok(());
    };
    if t.dims.len() == 1 && rx > 2 && t.dims.first().is_some_and(|&c| c > 1) {
        let mut t = t.clone();
        let out = ctx.names.fresh(s);
        t.name = out.clone();
        t.dims.extend(std::iter::repeat_n(1, rx - 2));
        ctx.new_inits.push(t);
        if let Some(slot) = n.input.get_mut(1) {
            *slot = out;
        }
    }
    Ok(())
}

/// The opset-7/8 → 9 rules for one node (applied when a batched Scan moves a model to 9).
fn to_opset9(
    n: &mut NodeProto,
    new_inits: &mut Vec<TensorProto>,
    names: &mut Names,
) -> Result<(), GraphError> {
    match n.op_type.as_str() {
        "Scan" => scan_8_to_9(n, names),
        "BatchNormalization" => {
            if int_attr(n, "spatial").is_some_and(|s| s != 1) {
                return Err(GraphError::Unsupported(format!(
                    "node {}: BatchNormalization with spatial=0 has no opset-9 form",
                    label(n)
                )));
            }
            drop_attrs(n, &["spatial"]);
            Ok(())
        }
        "Upsample" => {
            // Upsample-9 takes its scales as an input.
            if let Some(scales) = attr(n, "scales").map(|a| a.floats.clone()) {
                let name = names.fresh(&format!(
                    "{}_scales",
                    n.output.first().map_or("upsample", |s| s.as_str())
                ));
                new_inits.push(f32_tensor(name.clone(), scales));
                drop_attrs(n, &["scales"]);
                n.input.truncate(1);
                n.input.push(name);
            }
            Ok(())
        }
        _ => Ok(()),
    }
}

/// Scan-8 runs its body over a batch: every input has a leading batch axis, states are per
/// batch element and scanning runs along axis 1. Scan-9 has no batch, so the batch becomes an
/// outer Scan along axis 0 whose body is the inner Scan over the sequence: states and scanned
/// inputs are sliced per batch element, and every result is stacked back along axis 0.
fn scan_8_to_9(n: &mut NodeProto, names: &mut Names) -> Result<(), GraphError> {
    if n.input.first().is_some_and(|s| !s.is_empty()) {
        return Err(GraphError::Unsupported(format!(
            "node {}: Scan (opset 8) with sequence_lens (per-batch lengths) has no opset-9 form; re-export without it",
            label(n)
        )));
    }
    let scanned = int_attr(n, "num_scan_inputs").unwrap_or(0);
    let inputs: Vec<String> = n.input.iter().skip(1).cloned().collect();
    if scanned < 1 || scanned as usize > inputs.len() {
        return Err(GraphError::Invalid(format!(
            "node {}: Scan needs num_scan_inputs in 1..={}",
            label(n),
            inputs.len()
        )));
    }
    let body = attr(n, "body").and_then(|a| a.g.clone()).ok_or_else(|| {
        GraphError::Invalid(format!(
            "node {}: missing subgraph attribute 'body'",
            label(n)
        ))
    })?;
    let untyped = |name: String| ValueInfoProto {
        name,
        ..Default::default()
    };
    let slice_ins: Vec<String> = inputs
        .iter()
        .map(|i| names.fresh(&format!("{i}_b")))
        .collect();
    let slice_outs: Vec<String> = n
        .output
        .iter()
        .map(|o| names.fresh(&format!("{o}_b")))
        .collect();
    let mut inner = NodeProto {
        name: names.fresh("scan_inner"),
        op_type: "Scan".into(),
        input: slice_ins.clone(),
        output: slice_outs.clone(),
        attribute: vec![
            AttributeProto {
                name: "body".into(),
                r#type: AttributeType::Graph as i32,
                g: Some(body.clone()),
                ..Default::default()
            },
            int_attr_proto("num_scan_inputs", scanned),
        ],
        ..Default::default()
    };
    if let Some(d) = ints_attr(n, "directions") {
        inner
            .attribute
            .push(ints_attr_proto("scan_input_directions", d));
    }
    // The outer body's outputs keep the element types the inner body declares.
    let outer_outputs = slice_outs
        .iter()
        .zip(&body.output)
        .map(|(name, declared)| ValueInfoProto {
            name: name.clone(),
            r#type: declared.r#type.as_ref().and_then(|t| match &t.value {
                Some(type_proto::Value::TensorType(tt)) => Some(onnx::TypeProto {
                    value: Some(type_proto::Value::TensorType(type_proto::Tensor {
                        elem_type: tt.elem_type,
                        shape: None,
                    })),
                    ..Default::default()
                }),
                _ => None,
            }),
            ..Default::default()
        })
        .collect();
    let outer_body = GraphProto {
        name: format!("{}_batch", body.name),
        node: vec![inner],
        input: slice_ins.into_iter().map(untyped).collect(),
        output: outer_outputs,
        ..Default::default()
    };
    n.input = inputs.clone();
    n.attribute = vec![
        AttributeProto {
            name: "body".into(),
            r#type: AttributeType::Graph as i32,
            g: Some(outer_body),
            ..Default::default()
        },
        int_attr_proto("num_scan_inputs", inputs.len() as i64),
    ];
    Ok(())
}

#[cfg(test)]
mod tests;

//! A strategy's plan applied to the prepared float model as standard ONNX.
//!
//! - An activation with a per-tensor directive gets `QuantizeLinear -> DequantizeLinear`
//!   right after its producer; every reader that is not excluded reads the dequantized value
//!   (the QDQ form: any ONNX runtime runs it, and opreg's QDQ fusion turns
//!   `DQ -> Conv/MatMul -> Q` into `QLinearConv`/`QLinearMatMul`).
//! - A weight with a per-tensor or per-channel directive is stored as integers with a
//!   `DequantizeLinear` (axis for per-channel) in front of its readers.
//! - A `Conv` bias whose input and weight are quantized is stored as int32 at scale
//!   `x_scale * w_scale[c]` with zero point 0 (what `QLinearConv` adds to its accumulators).
//! - A `MatMul` whose input is `DYNAMIC` and whose weight is quantized symmetrically becomes
//!   `DynamicQuantizeLinear -> MatMulInteger -> Cast -> Mul(x_scale * w_scale)`: the input's
//!   scale is taken from its live range on every run (one `DynamicQuantizeLinear` per input,
//!   shared by its readers, as the Q/K/V projections of an attention block are).
//!
//! Every directive is checked first (the tensor exists and is of the right kind; scales finite
//! and positive; zero points in the type's range; one per channel); a malformed plan is
//! refused naming the strategy and the tensor or node, and nothing is applied.

// Model and request data reach this module: no unchecked index or slice.
#![deny(clippy::indexing_slicing)]

use super::{reconstruct::Grams, QuantError};
use crate::graph::{Model, Node};
use opreg_sdk::{
    host::HostTensor, kernel::Attribute, AttrValue, DType, Directive, DirectiveKind, GraphPlan,
    NodeKind,
};
use std::{
    collections::{HashMap, HashSet},
    sync::Arc,
};

/// What was quantized, for the report.
#[derive(Clone, Debug, serde::Serialize)]
pub struct QuantizedTensor {
    pub name: String,
    /// `activation`, `weight`, `bias` or `dynamic`.
    pub role: &'static str,
    pub dtype: String,
    pub axis: Option<usize>,
    pub scales: Vec<f32>,
    pub zero_points: Vec<i32>,
}

/// The quantized model and what was done.
pub struct Applied {
    pub model: Model,
    pub tensors: Vec<QuantizedTensor>,
    /// Nodes that read quantized inputs and weights (integer execution candidates).
    pub quantized_nodes: Vec<String>,
    pub excluded_nodes: Vec<String>,
    /// What pruning did, per weight.
    pub pruning: Vec<super::prune::Layer>,
    /// Nodes computed in a narrower float type, with the type (`float16`, `bfloat16`).
    pub lowered_nodes: Vec<(String, String)>,
    pub notes: Vec<String>,
}

fn dtype_range(t: DType) -> Option<(i32, i32)> {
    match t {
        DType::U8 => Some((0, 255)),
        DType::I8 => Some((-128, 127)),
        _ => None,
    }
}

fn dtype_name(t: DType) -> String {
    match t {
        DType::U8 => "uint8".into(),
        DType::I8 => "int8".into(),
        DType::I32 => "int32".into(),
        other => format!("{other:?}"),
    }
}

/// One checked directive.
#[derive(Clone)]
struct Q {
    dtype: DType,
    axis: Option<usize>,
    scales: Vec<f32>,
    zero_points: Vec<i32>,
}

/// Applies `plan` (from `strategy`) to the prepared float `model`.
pub fn apply(model: &Model, plan: &GraphPlan, strategy: &str) -> Result<Applied, QuantError> {
    apply_with(model, plan, strategy, &Grams::new())
}

/// [`apply`], with the input Gram matrices calibration observed (for pruned weights the plan
/// asks to reconstruct).
pub fn apply_with(
    model: &Model,
    plan: &GraphPlan,
    strategy: &str,
    grams: &Grams<'_>,
) -> Result<Applied, QuantError> {
    let bad = |reason: String| QuantError::BadPlan {
        strategy: strategy.into(),
        reason,
    };
    // Pruning first: the quantization below sees the smaller layers.
    let pruned = super::prune::apply(model, plan, strategy, grams)?;
    let model = &pruned.model;
    let opset = model.opset("").unwrap_or(1);
    let mut notes = Vec::new();

    // Nodes.
    let names: HashSet<&str> = model.nodes.iter().map(|n| n.name.as_str()).collect();
    let mut excluded: HashSet<String> = HashSet::new();
    let mut asked_lower: HashMap<String, DType> = HashMap::new();
    for np in plan.nodes.iter() {
        let node = np.node.as_str();
        if !names.contains(node) {
            return Err(bad(format!("node plan: the model has no node '{node}'")));
        }
        match np.kind {
            NodeKind::AUTO => {}
            NodeKind::EXCLUDE => {
                excluded.insert(node.to_string());
            }
            NodeKind::FLOAT => {
                asked_lower.insert(node.to_string(), np.precision);
            }
            NodeKind(other) => {
                return Err(QuantError::Unimplemented {
                    strategy: strategy.into(),
                    what: format!("node plan kind {other} for node '{node}'"),
                })
            }
        }
    }

    // Lowered nodes compute in float16/bfloat16 and take no part in the integer plan.
    let lowered = super::lower::choose(model, asked_lower, strategy)?;
    excluded.extend(lowered.keys().cloned());
    let mut lowerer = super::lower::Lowerer::new(model, &lowered);

    // Tensors.
    let produced: HashSet<&str> = model
        .nodes
        .iter()
        .flat_map(|n| n.outputs.iter().map(String::as_str))
        .collect();
    let is_input = |t: &str| model.inputs.iter().any(|i| i.name == t);
    let mut activations: HashMap<String, Q> = HashMap::new();
    let mut dynamic: HashMap<String, DType> = HashMap::new();
    let mut weights: HashMap<String, Q> = HashMap::new();
    for tp in plan.tensors.iter() {
        let name = tp.name.as_str();
        let weight = model.initializers.get(name);
        // Per-channel parameters given for a weight's original slices, some of which pruning
        // removed: those of the kept slices.
        let remapped;
        let d = match (pruned.kept.get(name), weight) {
            (Some((axis, kept)), Some(w))
                if tp.directive.kind == DirectiveKind::PER_CHANNEL
                    && usize::try_from(tp.directive.axis).ok() == Some(*axis)
                    && w.shape().get(*axis) == Some(&kept.len())
                    && tp.directive.scales.len() != kept.len() =>
            {
                let pick = |v: &[f32]| kept.iter().filter_map(|&k| v.get(k).copied()).collect();
                let pick_i = |v: &[i32]| kept.iter().filter_map(|&k| v.get(k).copied()).collect();
                let mut d = tp.directive.clone();
                d.scales = pick(&tp.directive.scales);
                d.zero_points = pick_i(&tp.directive.zero_points);
                remapped = d;
                &remapped
            }
            _ => &tp.directive,
        };
        if weight.is_none() && !produced.contains(name) && !is_input(name) {
            return Err(bad(format!("the model has no tensor '{name}'")));
        }
        match d.kind {
            DirectiveKind::KEEP => {}
            DirectiveKind::PER_TENSOR | DirectiveKind::PER_CHANNEL => {
                let q = check_directive(d, name, weight.map(|w| w.shape()), &bad)?;
                match weight {
                    Some(w) if w.dtype() == DType::F32 && w.on_host() => {
                        weights.insert(name.to_string(), q);
                    }
                    Some(w) => {
                        return Err(bad(format!(
                            "'{name}' is a {:?} weight: only f32 weights are quantized",
                            w.dtype()
                        )))
                    }
                    None if q.axis.is_some() => {
                        return Err(bad(format!(
                            "'{name}' is an activation: activations are quantized per tensor"
                        )))
                    }
                    None => {
                        activations.insert(name.to_string(), q);
                    }
                }
            }
            DirectiveKind::DYNAMIC => {
                if weight.is_some() {
                    return Err(bad(format!(
                        "'{name}' is a weight: only activations are quantized at run time"
                    )));
                }
                if d.dtype != DType::U8 {
                    return Err(bad(format!(
                        "'{name}': DynamicQuantizeLinear quantizes to uint8 only, not {:?}",
                        d.dtype
                    )));
                }
                dynamic.insert(name.to_string(), d.dtype);
            }
            // Applied above.
            DirectiveKind::PRUNE | DirectiveKind::KEEP_INDICES => {}
            DirectiveKind(other) => {
                let what = match d.kind {
                    DirectiveKind::CAST => "storing in another float type",
                    _ => "",
                };
                return Err(QuantError::Unimplemented {
                    strategy: strategy.into(),
                    what: format!("directive kind {other} {what} for tensor '{name}'"),
                });
            }
        }
    }
    // A reconstructed weight moved: its symmetric scales are taken again from its new values
    // (the strategy computed them on the original ones, and a grown entry would saturate).
    for (name, q) in weights.iter_mut() {
        if !pruned.reconstructed.contains(name) || q.zero_points.iter().any(|&z| z != 0) {
            continue;
        }
        if let Some(w) = model.initializers.get(name) {
            if refit_scales(w, q) {
                notes.push(format!(
                    "'{name}': scales taken from its reconstructed values"
                ));
            }
        }
    }
    if opset < 10 && !(activations.is_empty() && weights.is_empty()) {
        return Err(QuantError::Model {
            model: String::new(),
            reason: format!(
                "the model imports ONNX opset {opset}; QuantizeLinear needs 10 or later"
            ),
        });
    }
    if opset < 11 && !dynamic.is_empty() {
        return Err(QuantError::Model {
            model: String::new(),
            reason: format!(
                "the model imports ONNX opset {opset}; DynamicQuantizeLinear needs 11 or later"
            ),
        });
    }
    if opset < 13 {
        // DequantizeLinear's axis (per-channel) came with opset 13. A symmetric per-channel
        // weight becomes per tensor at its largest scale: coarser, but every runtime loads it
        // (onnxruntime's quantizer writes the per-channel form and then refuses to load it).
        for (name, q) in weights.iter_mut().filter(|(_, q)| q.axis.is_some()) {
            if q.zero_points.iter().any(|&z| z != 0) {
                return Err(bad(format!(
                    "'{name}': a per-channel weight with non-zero zero points needs opset 13 (the model has {opset})"
                )));
            }
            let s = q.scales.iter().copied().fold(f32::MIN_POSITIVE, f32::max);
            *q = Q {
                dtype: q.dtype,
                axis: None,
                scales: vec![s],
                zero_points: vec![0],
            };
            notes.push(format!(
                "'{name}': per tensor instead of per channel (opset {opset} < 13)"
            ));
        }
    }

    let mut b = Builder {
        model: model.clone(),
        tensors: Vec::new(),
    };
    b.model.nodes.clear();
    let reads_excluded =
        |n: &Node| excluded.contains(&n.name) || !n.domain.is_empty() && n.domain != "ai.onnx";

    // Dynamic MatMuls: the input is dynamic and the weight quantized symmetrically.
    let mut dynamic_nodes: HashSet<usize> = HashSet::new();
    for (i, n) in model.nodes.iter().enumerate() {
        if reads_excluded(n) || n.op_type != "MatMul" {
            continue;
        }
        let (Some(x), Some(w)) = (n.inputs.first(), n.inputs.get(1)) else {
            continue;
        };
        let symmetric = weights
            .get(w)
            .is_some_and(|q| q.zero_points.iter().all(|&z| z == 0));
        if dynamic.contains_key(x) && symmetric {
            dynamic_nodes.insert(i);
        }
    }

    // Weights: integers, and a DequantizeLinear for readers that compute in float.
    let mut weight_dq: HashMap<String, String> = HashMap::new();
    let mut weight_q: HashMap<String, String> = HashMap::new();
    let mut names: Vec<&String> = weights.keys().collect();
    names.sort();
    for name in names {
        let Some(q) = weights.get(name) else {
            continue;
        };
        let readers: Vec<(usize, &Node)> = model
            .nodes
            .iter()
            .enumerate()
            .filter(|(_, n)| n.inputs.iter().any(|x| x == name) && !reads_excluded(n))
            .collect();
        if readers.is_empty() {
            continue;
        }
        let Some(w) = model.initializers.get(name) else {
            continue;
        };
        let ints = quantize(w, q).map_err(|e| bad(format!("'{name}': {e}")))?;
        let (q_name, scale, zp) = b.params(name, q, Some(ints))?;
        weight_q.insert(name.clone(), q_name.clone());
        b.record(name, "weight", q);
        if readers.iter().any(|(i, _)| !dynamic_nodes.contains(i)) {
            let out = b.fresh(&format!("{name}_dequantized"));
            b.model.nodes.push(dq_node(
                &format!("{name}_DequantizeLinear"),
                [q_name, scale, zp],
                &out,
                q.axis,
            ));
            weight_dq.insert(name.clone(), out);
        }
    }

    // Nodes in order, each followed by the QDQ of its quantized outputs.
    let mut act_dq: HashMap<String, String> = HashMap::new();
    let mut dql: HashMap<String, [String; 3]> = HashMap::new();
    let mut quantized_nodes = Vec::new();
    let mut inputs_first: Vec<&String> = model
        .inputs
        .iter()
        .map(|i| &i.name)
        .filter(|n| activations.contains_key(*n))
        .collect();
    inputs_first.sort();
    for name in inputs_first {
        if let Some(q) = activations.get(name) {
            let dq = b.qdq(name, q)?;
            act_dq.insert(name.clone(), dq);
        }
    }
    for (i, n) in model.nodes.iter().enumerate() {
        let mut node = n.clone();
        if let Some(p) = lowerer.precision(n) {
            lowerer.lower(&mut b.model, n, p)?;
            let quantized: Vec<&String> = n
                .outputs
                .iter()
                .filter(|y| activations.contains_key(*y))
                .collect();
            if !quantized.is_empty() {
                notes.push(format!(
                    "node '{}' computes in {p:?}: its output is not quantized",
                    n.name
                ));
            }
            continue;
        } else if reads_excluded(n) {
            b.model.nodes.push(node);
        } else if let (true, Some(x), Some(w), Some(y), Some(wq)) = (
            dynamic_nodes.contains(&i),
            n.inputs.first(),
            n.inputs.get(1),
            n.outputs.first(),
            n.inputs.get(1).and_then(|w| weight_q.get(w)).cloned(),
        ) {
            let Some(q) = weights.get(w) else {
                continue;
            };
            let [xq, xs, xz] = match dql.get(x) {
                Some(d) => d.clone(),
                None => {
                    let d = [
                        b.fresh(&format!("{x}_quantized")),
                        b.fresh(&format!("{x}_scale")),
                        b.fresh(&format!("{x}_zero_point")),
                    ];
                    b.model.nodes.push(plain(
                        &format!("{x}_DynamicQuantizeLinear"),
                        "DynamicQuantizeLinear",
                        vec![x.clone()],
                        d.to_vec(),
                    ));
                    b.tensors.push(QuantizedTensor {
                        name: x.clone(),
                        role: "dynamic",
                        dtype: "uint8".into(),
                        axis: None,
                        scales: Vec::new(),
                        zero_points: Vec::new(),
                    });
                    dql.insert(x.clone(), d.clone());
                    d
                }
            };
            let product = b.fresh(&format!("{y}_int32"));
            let product_f = b.fresh(&format!("{y}_int32_float"));
            let scale = b.fresh(&format!("{y}_scale"));
            let w_scale = b.constant(
                &format!("{w}_scale_for_{}", n.name),
                if q.scales.len() == 1 {
                    HostTensor::from_vec(&[], &q.scales)
                } else {
                    HostTensor::from_vec(&[q.scales.len()], &q.scales)
                }
                .map_err(|e| bad(e.to_string()))?,
            );
            b.model.nodes.push(plain(
                &format!("{}_MatMulInteger", n.name),
                "MatMulInteger",
                vec![xq, wq, xz],
                vec![product.clone()],
            ));
            let mut cast = plain(
                &format!("{}_Cast", n.name),
                "Cast",
                vec![product],
                vec![product_f.clone()],
            );
            cast.attributes.push(Attribute {
                name: "to".into(),
                value: AttrValue::Int(1),
            });
            b.model.nodes.push(cast);
            b.model.nodes.push(plain(
                &format!("{}_scale", n.name),
                "Mul",
                vec![xs, w_scale],
                vec![scale.clone()],
            ));
            b.model.nodes.push(plain(
                &n.name,
                "Mul",
                vec![product_f, scale],
                vec![y.clone()],
            ));
            quantized_nodes.push(n.name.clone());
        } else {
            let mut all_quantized = true;
            for x in node.inputs.iter_mut().filter(|x| !x.is_empty()) {
                if let Some(dq) = weight_dq.get(x).or_else(|| act_dq.get(x)) {
                    x.clone_from(dq);
                } else {
                    all_quantized = false;
                }
            }
            // A Conv's float bias, when its input and weight are quantized.
            if is_product(n) && n.op_type == "Conv" {
                if let (Some(xq), Some(wq), Some(bias)) = (
                    n.inputs.first().and_then(|x| activations.get(x)),
                    n.inputs.get(1).and_then(|w| weights.get(w)),
                    n.inputs.get(2).filter(|b| !b.is_empty()),
                ) {
                    if let Some(dq) = b.bias(bias, xq, wq, &mut notes)? {
                        if let Some(slot) = node.inputs.get_mut(2) {
                            *slot = dq;
                        }
                    }
                }
            }
            if is_product(n) && (all_quantized || n.inputs.get(2).is_some_and(|b| !b.is_empty())) {
                let xw_quantized = n
                    .inputs
                    .iter()
                    .take(2)
                    .all(|x| weight_dq.contains_key(x) || act_dq.contains_key(x));
                if xw_quantized {
                    quantized_nodes.push(n.name.clone());
                }
            }
            b.model.nodes.push(node);
        }
        for y in &n.outputs {
            if let Some(q) = activations.get(y) {
                let dq = b.qdq(y, q)?;
                act_dq.insert(y.clone(), dq);
            }
        }
    }
    // Readers placed before a producer's QDQ (none in a topologically ordered model) would
    // read the float value; graph outputs keep the float value by design.
    let used: HashSet<&String> = b.model.nodes.iter().flat_map(|n| &n.inputs).collect();
    let unread: Vec<String> = model
        .initializers
        .iter()
        .filter(|(k, t)| {
            (weights.contains_key(*k) || !lowered.is_empty() && t.dtype() == DType::F32)
                && !used.contains(k)
        })
        .map(|(k, _)| k)
        .filter(|k| !model.outputs.iter().any(|o| &&o.name == k))
        .cloned()
        .collect();
    for k in unread {
        b.model.initializers.remove(&k);
    }
    for (x, _) in dynamic.iter().filter(|(x, _)| !dql.contains_key(*x)) {
        notes.push(format!(
            "'{x}' is marked dynamic but no MatMul with a symmetric quantized weight reads it: left in float"
        ));
    }
    Ok(Applied {
        model: b.model,
        tensors: b.tensors,
        quantized_nodes,
        excluded_nodes: {
            let mut e: Vec<String> = excluded
                .into_iter()
                .filter(|n| !lowered.contains_key(n))
                .collect();
            e.sort();
            e
        },
        pruning: pruned.layers,
        lowered_nodes: {
            let mut l: Vec<(String, String)> = lowered
                .iter()
                .map(|(n, p)| (n.clone(), super::lower::type_name(*p).to_string()))
                .collect();
            l.sort();
            l
        },
        notes,
    })
}

fn is_product(n: &Node) -> bool {
    n.domain.is_empty() && matches!(n.op_type.as_str(), "Conv" | "MatMul")
}

fn check_directive(
    d: &Directive,
    name: &str,
    weight_shape: Option<&[usize]>,
    bad: &dyn Fn(String) -> QuantError,
) -> Result<Q, QuantError> {
    let (lo, hi) = dtype_range(d.dtype).ok_or_else(|| {
        bad(format!(
            "'{name}': quantization to {:?} (uint8 and int8 are supported)",
            d.dtype
        ))
    })?;
    let axis = if d.kind == DirectiveKind::PER_CHANNEL {
        let shape = weight_shape
            .ok_or_else(|| bad(format!("'{name}': per-channel directive on an activation")))?;
        let axis = usize::try_from(d.axis)
            .ok()
            .filter(|&a| a < shape.len())
            .ok_or_else(|| {
                bad(format!(
                    "'{name}': axis {} is outside the weight's rank {}",
                    d.axis,
                    shape.len()
                ))
            })?;
        let channels = shape.get(axis).copied().unwrap_or(0);
        if d.scales.len() != channels {
            return Err(bad(format!(
                "'{name}': {} scales for {channels} channels along axis {axis}",
                d.scales.len(),
            )));
        }
        Some(axis)
    } else {
        if d.scales.len() != 1 {
            return Err(bad(format!(
                "'{name}': a per-tensor directive with {} scales",
                d.scales.len()
            )));
        }
        None
    };
    if d.zero_points.len() != d.scales.len() {
        return Err(bad(format!(
            "'{name}': {} zero points for {} scales",
            d.zero_points.len(),
            d.scales.len()
        )));
    }
    if let Some(s) = d.scales.iter().find(|s| !(s.is_finite() && **s > 0.0)) {
        return Err(bad(format!(
            "'{name}': scale {s} (scales must be finite and positive)"
        )));
    }
    if let Some(z) = d.zero_points.iter().find(|z| !(lo..=hi).contains(*z)) {
        return Err(bad(format!(
            "'{name}': zero point {z} outside {:?}'s range {lo}..={hi}",
            d.dtype
        )));
    }
    Ok(Q {
        dtype: d.dtype,
        axis,
        scales: d.scales.to_vec(),
        zero_points: d.zero_points.to_vec(),
    })
}

/// `w` quantized with `q` (round half to even, as QuantizeLinear does; saturating).
fn quantize(w: &HostTensor, q: &Q) -> Result<HostTensor, String> {
    let v = w.to_vec::<f32>().map_err(|e| e.to_string())?;
    let shape = w.shape();
    let (channels, inner) = match q.axis {
        Some(a) => (
            shape.get(a).copied().ok_or("axis outside the rank")?,
            shape.get(a + 1..).unwrap_or(&[]).iter().product::<usize>(),
        ),
        None => (1, v.len().max(1)),
    };
    let (lo, hi) = dtype_range(q.dtype).ok_or("not an integer type")?;
    let ints = v.iter().enumerate().map(|(i, &x)| {
        let c = (i / inner.max(1)) % channels.max(1);
        let s = q.scales.get(c).copied().unwrap_or(1.0);
        let z = q.zero_points.get(c).copied().unwrap_or(0);
        ((x / s).round_ties_even() + z as f32).clamp(lo as f32, hi as f32) as i32
    });
    match q.dtype {
        DType::U8 => {
            let b: Vec<u8> = ints.map(|x| x as u8).collect();
            HostTensor::from_vec(shape, &b)
        }
        _ => {
            let b: Vec<i8> = ints.map(|x| x as i8).collect();
            HostTensor::from_vec(shape, &b)
        }
    }
    .map_err(|e| e.to_string())
}

/// Symmetric scales of `w` per channel of `q`'s axis (or per tensor): `max |w| / qmax`.
/// False (unchanged) when `w` cannot be read or a channel is all zeros.
fn refit_scales(w: &HostTensor, q: &mut Q) -> bool {
    let Ok(values) = w.to_vec::<f32>() else {
        return false;
    };
    let qmax = match q.dtype {
        DType::U8 => 255.0,
        _ => 127.0,
    };
    let channels = q.axis.and_then(|a| w.shape().get(a).copied()).unwrap_or(1);
    if channels != q.scales.len() || channels == 0 {
        return false;
    }
    let inner: usize = q.axis.map_or(1, |a| {
        w.shape().iter().skip(a + 1).product::<usize>().max(1)
    });
    let mut absmax = vec![0f32; channels];
    for (i, v) in values.iter().enumerate() {
        if let Some(m) = absmax.get_mut((i / inner) % channels) {
            *m = m.max(v.abs());
        }
    }
    if absmax.iter().any(|&m| m == 0.0 || !m.is_finite()) {
        return false;
    }
    q.scales = absmax.iter().map(|m| m / qmax).collect();
    true
}

fn plain(name: &str, op: &str, inputs: Vec<String>, outputs: Vec<String>) -> Node {
    Node {
        name: name.into(),
        domain: String::new(),
        op_type: op.into(),
        inputs,
        outputs,
        attributes: Vec::new(),
        subgraphs: Vec::new(),
    }
}

fn dq_node(name: &str, inputs: [String; 3], out: &str, axis: Option<usize>) -> Node {
    let mut n = plain(name, "DequantizeLinear", inputs.to_vec(), vec![out.into()]);
    if let Some(a) = axis {
        n.attributes.push(Attribute {
            name: "axis".into(),
            value: AttrValue::Int(a as i64),
        });
    }
    n
}

struct Builder {
    model: Model,
    tensors: Vec<QuantizedTensor>,
}

impl Builder {
    fn fresh(&self, base: &str) -> String {
        self.model.fresh_name(base)
    }

    fn constant(&mut self, base: &str, t: HostTensor) -> String {
        let name = self.fresh(base);
        self.model.initializers.insert(name.clone(), Arc::new(t));
        name
    }

    fn record(&mut self, name: &str, role: &'static str, q: &Q) {
        self.tensors.push(QuantizedTensor {
            name: name.into(),
            role,
            dtype: dtype_name(q.dtype),
            axis: q.axis,
            scales: q.scales.clone(),
            zero_points: q.zero_points.clone(),
        });
    }

    /// The scale and zero point constants of `q` (and `data` as `{base}_quantized`).
    fn params(
        &mut self,
        base: &str,
        q: &Q,
        data: Option<HostTensor>,
    ) -> Result<(String, String, String), QuantError> {
        let internal = |e: opreg_sdk::PluginError| QuantError::Data(e.to_string());
        let per_channel: Vec<usize> = match q.axis {
            Some(_) => vec![q.scales.len()],
            None => vec![],
        };
        let scale = HostTensor::from_vec(&per_channel, &q.scales).map_err(internal)?;
        let zp = match q.dtype {
            DType::U8 => {
                let z: Vec<u8> = q.zero_points.iter().map(|&z| z as u8).collect();
                HostTensor::from_vec(&per_channel, &z)
            }
            _ => {
                let z: Vec<i8> = q.zero_points.iter().map(|&z| z as i8).collect();
                HostTensor::from_vec(&per_channel, &z)
            }
        }
        .map_err(internal)?;
        let q_name = match data {
            Some(t) => self.constant(&format!("{base}_quantized"), t),
            None => self.fresh(&format!("{base}_quantized")),
        };
        let s = self.constant(&format!("{base}_scale"), scale);
        let z = self.constant(&format!("{base}_zero_point"), zp);
        Ok((q_name, s, z))
    }

    /// `QuantizeLinear -> DequantizeLinear` of activation `name`; the dequantized name.
    fn qdq(&mut self, name: &str, q: &Q) -> Result<String, QuantError> {
        let (q_name, s, z) = self.params(name, q, None)?;
        self.record(name, "activation", q);
        self.model.nodes.push(plain(
            &format!("{name}_QuantizeLinear"),
            "QuantizeLinear",
            vec![name.into(), s.clone(), z.clone()],
            vec![q_name.clone()],
        ));
        let out = self.fresh(&format!("{name}_dequantized"));
        self.model.nodes.push(dq_node(
            &format!("{name}_DequantizeLinear"),
            [q_name, s, z],
            &out,
            None,
        ));
        Ok(out)
    }

    /// The Conv bias `bias` as int32 at `x_s * w_s[c]`; the dequantized name.
    fn bias(
        &mut self,
        bias: &str,
        x: &Q,
        w: &Q,
        notes: &mut Vec<String>,
    ) -> Result<Option<String>, QuantError> {
        let Some(t) = self.model.initializers.get(bias).cloned() else {
            return Ok(None);
        };
        if t.dtype() != DType::F32 || t.shape().len() != 1 {
            return Ok(None);
        }
        let b = t
            .to_vec::<f32>()
            .map_err(|e| QuantError::Data(e.to_string()))?;
        let xs = x.scales.first().copied().unwrap_or(1.0);
        let scales: Vec<f32> = (0..b.len())
            .map(|c| xs * w.scales.get(c).or(w.scales.first()).copied().unwrap_or(1.0))
            .collect();
        let mut clipped = 0;
        let ints: Vec<i32> = b
            .iter()
            .zip(&scales)
            .map(|(&v, &s)| {
                let q = (f64::from(v) / f64::from(s)).round_ties_even();
                if q.abs() > f64::from(i32::MAX) {
                    clipped += 1;
                }
                q.clamp(f64::from(i32::MIN), f64::from(i32::MAX)) as i32
            })
            .collect();
        if clipped > 0 {
            notes.push(format!(
                "bias '{bias}': {clipped} values outside int32 at scale x_s*w_s were clipped"
            ));
        }
        let internal = |e: opreg_sdk::PluginError| QuantError::Data(e.to_string());
        // Per-channel when the weight is, else one scale (DequantizeLinear before opset 13
        // has no axis).
        let (q_data, s_tensor, axis) = if w.axis.is_some() {
            (
                HostTensor::from_vec(&[ints.len()], &ints).map_err(internal)?,
                HostTensor::from_vec(&[scales.len()], &scales).map_err(internal)?,
                Some(0usize),
            )
        } else {
            (
                HostTensor::from_vec(&[ints.len()], &ints).map_err(internal)?,
                HostTensor::from_vec(&[], scales.get(..1).unwrap_or(&[1.0])).map_err(internal)?,
                None,
            )
        };
        let q_name = self.constant(&format!("{bias}_quantized"), q_data);
        let s_name = self.constant(&format!("{bias}_scale"), s_tensor);
        let out = self.fresh(&format!("{bias}_dequantized"));
        let mut n = plain(
            &format!("{bias}_DequantizeLinear"),
            "DequantizeLinear",
            vec![q_name, s_name],
            vec![out.clone()],
        );
        if let Some(a) = axis {
            n.attributes.push(Attribute {
                name: "axis".into(),
                value: AttrValue::Int(a as i64),
            });
        }
        self.model.nodes.push(n);
        self.tensors.push(QuantizedTensor {
            name: bias.into(),
            role: "bias",
            dtype: "int32".into(),
            axis,
            scales,
            zero_points: vec![0],
        });
        Ok(Some(out))
    }
}

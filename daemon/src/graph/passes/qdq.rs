//! QDQ fusions: a float `Conv` / `MatMul` between `DequantizeLinear` nodes and one
//! `QuantizeLinear` — the QDQ form quantizers write (ONNX Runtime's, `opreg quantize`) —
//! becomes the integer operator ONNX has for it, `QLinearConv` / `QLinearMatMul`, when the
//! registry has that kernel. The product then runs on integers (u8/i8 gemm with a requantizing
//! epilogue) instead of dequantizing, computing in f32 and quantizing again.
//!
//! ```text
//! x_q -> DQ(x_s, x_zp) -\
//! w_q -> DQ(w_s, w_zp) ---> Conv -> Q(y_s, y_zp) -> y_q   ==>   QLinearConv(x_q, x_s, x_zp,
//! [b  -> DQ(b_s)      -/]                                          w_q, w_s, w_zp, y_s, y_zp, b_q)
//! ```
//!
//! Conditions (anything else is left as it is): the scales are f32 constants, per tensor for the
//! activations (`x`, `y`) and per tensor or per output channel (Conv: axis 0; MatMul: the last
//! axis, per column) for the weights; every zero point but the weight's is a constant the graph
//! gives (the weight's defaults to zero); the weight is a constant; the product's output is read
//! by the `QuantizeLinear` only. A Conv bias (a float constant, or a `DequantizeLinear` of one)
//! is requantized to int32 at `x_s * w_s`, as `QLinearConv` wants it. A `DequantizeLinear` whose
//! output no one reads any more is removed; one that others still read stays for them.
//!
//! `qdq-maxpool` and `qdq-add` (below) take the integers through a pooling and a residual join
//! the same way.

use super::{super::import::Model, readers, reads, Fusion, Pass};
use crate::graph::{import::Node, GraphError};
use opreg_sdk::{host::HostTensor, AttrValue, DType};
use std::{collections::HashMap, sync::Arc};

/// `DQ -> Conv -> Q` into `QLinearConv`.
pub struct QdqConv;
/// `DQ -> MatMul -> Q` into `QLinearMatMul`.
pub struct QdqMatMul;

impl Pass for QdqConv {
    fn name(&self) -> &'static str {
        "qdq-conv"
    }

    fn fuses(&self) -> Option<Fusion> {
        Some(Fusion {
            original: "Conv",
            domain: "",
            fused: "QLinearConv",
            also: &[],
        })
    }

    fn run(&self, model: &mut Model) -> Result<usize, GraphError> {
        fuse(model, "Conv", "QLinearConv")
    }
}

impl Pass for QdqMatMul {
    fn name(&self) -> &'static str {
        "qdq-matmul"
    }

    fn fuses(&self) -> Option<Fusion> {
        Some(Fusion {
            original: "MatMul",
            domain: "",
            fused: "QLinearMatMul",
            also: &[],
        })
    }

    fn run(&self, model: &mut Model) -> Result<usize, GraphError> {
        fuse(model, "MatMul", "QLinearMatMul")
    }
}

/// `DQ -> Gemm -> Q` into ONNX Runtime's contrib `QGemm` (`com.microsoft`; ONNX has no
/// integer Gemm with a bias): a quantized classifier's fully connected head then multiplies
/// the bytes with its weights packed at load instead of 4-byte dequantized ones (ResNet-50-QDQ's
/// 2048x1000 head read 8 MB of f32 per run). Only the plain form: `transA = 0`, `alpha = beta =
/// 1`, a bias of one value per output column.
pub struct QdqGemm;

impl Pass for QdqGemm {
    fn name(&self) -> &'static str {
        "qdq-gemm"
    }

    fn fuses(&self) -> Option<Fusion> {
        Some(Fusion {
            original: "Gemm",
            domain: "com.microsoft",
            fused: "QGemm",
            also: &[],
        })
    }

    fn run(&self, model: &mut Model) -> Result<usize, GraphError> {
        fuse(model, "Gemm", "QGemm")
    }
}

/// `DQ -> MaxPool -> Q` with the same scale and zero point on both sides into `MaxPool` on
/// the integers (ONNX gives it u8/i8 from opset 12): the maximum commutes with the
/// (increasing) dequantization and `Q(DQ(v)) = v`, so the result is exact. The stem of a
/// quantized ResNet spends a few percent of its time in the float form.
pub struct QdqMaxPool;

impl Pass for QdqMaxPool {
    fn name(&self) -> &'static str {
        "qdq-maxpool"
    }

    fn fuses(&self) -> Option<Fusion> {
        Some(Fusion {
            original: "MaxPool",
            domain: "",
            fused: "MaxPool",
            also: &[],
        })
    }

    fn run(&self, model: &mut Model) -> Result<usize, GraphError> {
        if model.opset("").unwrap_or(1) < 12 {
            return Ok(0);
        }
        let read = reads(model)?;
        let outputs: Vec<&str> = model.outputs.iter().map(|o| o.name.as_str()).collect();
        let producer = model.producers();
        let reader = readers(model);
        // (MaxPool, QuantizeLinear, the integer input, the integer output)
        let mut rewrites: Vec<(usize, usize, String, String)> = Vec::new();
        for (i, n) in model.nodes.iter().enumerate() {
            if !is(n, "MaxPool") || n.outputs.iter().skip(1).any(|o| !o.is_empty()) {
                continue;
            }
            let (Some(x), Some(y)) = (n.inputs.first(), n.outputs.first()) else {
                continue;
            };
            let Some(dq) = dq_of(model, &producer, x) else {
                continue;
            };
            let Some(SoleQuantize {
                node: qi,
                scale: q_scale,
                zero_point: q_zp,
                output: q_out,
            }) = sole_quantize(model, &read, &outputs, &reader, y)
            else {
                continue;
            };
            let Some(dq_zp) = &dq.zero_point else {
                continue;
            };
            let same_scale = matches!(
                (scale(model, &dq.scale, None), scale(model, q_scale, None)),
                (Some(a), Some(b)) if a.len() == 1 && a == b
            );
            let same_zp = match (constant(model, dq_zp), constant(model, q_zp)) {
                (Some(a), Some(b)) => {
                    matches!(a.dtype(), DType::U8 | DType::I8)
                        && a.dtype() == b.dtype()
                        && a.len() == 1
                        && b.len() == 1
                        && a.bytes() == b.bytes()
                }
                _ => false,
            };
            if same_scale && same_zp {
                rewrites.push((i, qi, dq.input.clone(), q_out.clone()));
            }
        }
        let count = rewrites.len();
        let mut remove = vec![false; model.nodes.len()];
        for (pool, q, input, output) in rewrites {
            if let Some(n) = model.nodes.get_mut(pool) {
                if let Some(x) = n.inputs.first_mut() {
                    *x = input;
                }
                n.outputs = vec![output];
            }
            if let Some(r) = remove.get_mut(q) {
                *r = true;
            }
        }
        if count > 0 {
            super::remove_nodes(model, &remove);
            remove_unread_dequantize(model)?;
        }
        Ok(count)
    }
}

/// `DQ(a), DQ(b) -> Add -> Q` with per-tensor parameters, all of one 8-bit type, into ONNX
/// Runtime's `com.microsoft::QLinearAdd` (the residual joins of a quantized ResNet). The
/// kernel computes as ONNX Runtime's does (scale ratios, fused multiply-adds): the unfused
/// graph's result but for rare ties, one step apart; the two f32 tensors, the float sum and the
/// separate quantization pass are gone.
pub struct QdqAdd;

impl Pass for QdqAdd {
    fn name(&self) -> &'static str {
        "qdq-add"
    }

    fn fuses(&self) -> Option<Fusion> {
        Some(Fusion {
            original: "Add",
            domain: "com.microsoft",
            fused: "QLinearAdd",
            also: &[],
        })
    }

    fn run(&self, model: &mut Model) -> Result<usize, GraphError> {
        let read = reads(model)?;
        let outputs: Vec<&str> = model.outputs.iter().map(|o| o.name.as_str()).collect();
        let producer = model.producers();
        let reader = readers(model);
        // A per-tensor scale and zero point of an 8-bit type: the zero point's type.
        let per_tensor = |s: &str, z: &str| -> Option<DType> {
            scale(model, s, None)?;
            zero_point(model, z, 1)
        };
        // (Add, QuantizeLinear, QLinearAdd's inputs, its output)
        let mut rewrites: Vec<(usize, usize, Vec<String>, String)> = Vec::new();
        for (i, n) in model.nodes.iter().enumerate() {
            let (true, [a, b], [y]) = (is(n, "Add"), &n.inputs[..], &n.outputs[..]) else {
                continue;
            };
            let Some(SoleQuantize {
                node: qi,
                scale: qs,
                zero_point: qz,
                output: q_out,
            }) = sole_quantize(model, &read, &outputs, &reader, y)
            else {
                continue;
            };
            let Some(t) = per_tensor(qs, qz) else {
                continue;
            };
            let operand = |v: &str| -> Option<[String; 3]> {
                let dq = dq_of(model, &producer, v)?;
                let z = dq.zero_point?;
                (per_tensor(&dq.scale, &z)? == t).then_some([dq.input, dq.scale, z])
            };
            let (Some([aq, as_, az]), Some([bq, bs, bz])) = (operand(a), operand(b)) else {
                continue;
            };
            let inputs = vec![aq, as_, az, bq, bs, bz, qs.clone(), qz.clone()];
            rewrites.push((i, qi, inputs, q_out.clone()));
        }
        let count = rewrites.len();
        let mut remove = vec![false; model.nodes.len()];
        for (add, q, inputs, output) in rewrites {
            if let Some(n) = model.nodes.get_mut(add) {
                n.domain = "com.microsoft".into();
                n.op_type = "QLinearAdd".into();
                n.inputs = inputs;
                n.outputs = vec![output];
                n.attributes.clear();
            }
            if let Some(r) = remove.get_mut(q) {
                *r = true;
            }
        }
        if count > 0 {
            model.opsets.entry("com.microsoft".into()).or_insert(1);
            super::remove_nodes(model, &remove);
            remove_unread_dequantize(model)?;
        }
        Ok(count)
    }
}

/// The `QuantizeLinear` that is the only reader of `y`, and what the QDQ fusions need of it.
struct SoleQuantize<'m> {
    node: usize,
    scale: &'m String,
    zero_point: &'m String,
    output: &'m String,
}

/// The `QuantizeLinear` reading `y` when it is `y`'s only reader (`y` read once, not a graph
/// output), per tensor or per axis (no blocks, the default output type), with a scale and a
/// zero point given.
fn sole_quantize<'m>(
    model: &'m Model,
    read: &HashMap<String, usize>,
    outputs: &[&str],
    reader: &HashMap<&str, usize>,
    y: &str,
) -> Option<SoleQuantize<'m>> {
    if read.get(y) != Some(&1) || outputs.contains(&y) {
        return None;
    }
    let node = *reader.get(y)?;
    let q = model.nodes.get(node).filter(|q| is(q, "QuantizeLinear"))?;
    if q.inputs.first().map(String::as_str) != Some(y)
        || attr_int(q, "block_size", 0) != 0
        || attr_int(q, "output_dtype", 0) != 0
    {
        return None;
    }
    Some(SoleQuantize {
        node,
        scale: q.inputs.get(1).filter(|s| !s.is_empty())?,
        zero_point: q.inputs.get(2).filter(|s| !s.is_empty())?,
        output: q.outputs.first()?,
    })
}

/// A `DequantizeLinear` node's inputs and axis.
struct Dq {
    input: String,
    scale: String,
    zero_point: Option<String>,
    axis: i64,
}

fn attr_int(n: &Node, name: &str, default: i64) -> i64 {
    match n
        .attributes
        .iter()
        .find(|a| a.name == name)
        .map(|a| &a.value)
    {
        Some(AttrValue::Int(v)) => *v,
        _ => default,
    }
}

fn attr_float(n: &Node, name: &str, default: f32) -> f32 {
    match n
        .attributes
        .iter()
        .find(|a| a.name == name)
        .map(|a| &a.value)
    {
        Some(AttrValue::Float(v)) => *v,
        _ => default,
    }
}

/// Whether a Gemm bias (a constant, or a `DequantizeLinear` of one) holds one value per output
/// column: shape `[n]` or `[1, n]` (a `[n, 1]` one would be per row).
fn bias_per_column(
    model: &Model,
    producer: &HashMap<&str, usize>,
    b: &str,
    channels: usize,
) -> bool {
    let t = constant(model, b)
        .or_else(|| dq_of(model, producer, b).and_then(|dq| constant(model, &dq.input)));
    t.is_some_and(|t| matches!(t.shape(), [c] | [1, c] if *c == channels))
}

fn is(n: &Node, op: &str) -> bool {
    n.domain.is_empty() && n.op_type == op
}

/// The `DequantizeLinear` producing `value`, when one does (blocked quantization excluded).
fn dq_of(model: &Model, producer: &HashMap<&str, usize>, value: &str) -> Option<Dq> {
    let n = model.nodes.get(*producer.get(value)?)?;
    if !is(n, "DequantizeLinear") || attr_int(n, "block_size", 0) != 0 {
        return None;
    }
    Some(Dq {
        input: n.inputs.first()?.clone(),
        scale: n.inputs.get(1).filter(|s| !s.is_empty())?.clone(),
        zero_point: n.inputs.get(2).filter(|s| !s.is_empty()).cloned(),
        axis: attr_int(n, "axis", 1),
    })
}

fn constant<'m>(model: &'m Model, name: &str) -> Option<&'m Arc<HostTensor>> {
    model.initializers.get(name).filter(|t| t.on_host())
}

/// An f32 constant's values.
fn f32s(model: &Model, name: &str) -> Option<Vec<f32>> {
    constant(model, name)
        .filter(|t| t.dtype() == DType::F32)
        .and_then(|t| t.to_vec::<f32>().ok())
}

/// A scale of one value, or of one value per `len` channels, as an f32 constant.
fn scale(model: &Model, name: &str, len: Option<usize>) -> Option<Vec<f32>> {
    let s = f32s(model, name)?;
    let shape = constant(model, name)?.shape().len();
    let ok = match (s.len(), len) {
        (1, _) => shape <= 1,
        (n, Some(len)) => shape == 1 && n == len,
        _ => false,
    };
    (ok && s.iter().all(|v| v.is_finite() && *v > 0.0)).then_some(s)
}

/// A zero point matching a scale of `len` values: a u8/i8 constant.
fn zero_point(model: &Model, name: &str, len: usize) -> Option<DType> {
    let t = constant(model, name)?;
    (matches!(t.dtype(), DType::U8 | DType::I8) && t.len() == len && t.shape().len() <= 1)
        .then(|| t.dtype())
}

/// Whether `QuantizeLinear(scale, zero_point)` (per tensor, of `y_type`) saturates values
/// below `lo` and above `hi` as clamping them to `[lo, hi]` first would: the quantized `lo`
/// is the type's minimum (or below it) and the quantized `hi` its maximum (or above), so
/// `Q(clamp(v)) == Q(v)` for every v. Computed as QuantizeLinear does: the f32 quotient
/// rounded half to even, plus the zero point.
fn quantize_clamps_within(
    model: &Model,
    scale_name: &str,
    zero_point: &str,
    y_type: DType,
    lo: f32,
    hi: f32,
) -> Option<bool> {
    let s = *scale(model, scale_name, None)?.first()?;
    let zp = constant(model, zero_point)?;
    let (zp, qmin, qmax) = match y_type {
        DType::U8 => (f32::from(*zp.to_vec::<u8>().ok()?.first()?), 0.0, 255.0),
        DType::I8 => (f32::from(*zp.to_vec::<i8>().ok()?.first()?), -128.0, 127.0),
        _ => return None,
    };
    // Infinite bounds quantize to infinities (always within); a NaN bound compares false.
    let q = |x: f32| (x / s).round_ties_even() + zp;
    Some(q(lo) <= qmin && q(hi) >= qmax)
}

/// What the rewrite of one product node needs.
struct Plan {
    node: usize,
    quantize: usize,
    /// A `Relu` or `Clip` absorbed between the product and the quantize node.
    activation: Option<usize>,
    inputs: Vec<String>,
    output: String,
    /// New initializers (weight zero point, int32 bias).
    constants: Vec<(String, HostTensor)>,
    /// The fused operator's domain, and the original's attributes it does not have.
    domain: &'static str,
    dropped: &'static [&'static str],
}

fn fuse(model: &mut Model, op: &str, fused: &str) -> Result<usize, GraphError> {
    let read = reads(model)?;
    let outputs: Vec<&str> = model.outputs.iter().map(|o| o.name.as_str()).collect();
    let producer = model.producers();
    // Each value's reader, for the QuantizeLinear after a product.
    let reader = readers(model);
    let mut plans = Vec::new();
    for (i, n) in model.nodes.iter().enumerate() {
        if !is(n, op) {
            continue;
        }
        let Some(y) = n.outputs.first().filter(|y| !y.is_empty()) else {
            continue;
        };
        if read.get(y) != Some(&1) || outputs.contains(&y.as_str()) {
            continue;
        }
        let Some(&ri) = reader.get(y.as_str()) else {
            continue;
        };
        let (qi, activation) = match model.nodes.get(ri) {
            Some(r) if is(r, "Relu") || is(r, "Clip") => {
                let Some(ry) = r.outputs.first() else {
                    continue;
                };
                if read.get(ry) != Some(&1) || outputs.contains(&ry.as_str()) {
                    continue;
                }
                let Some(&qi) = reader.get(ry.as_str()) else {
                    continue;
                };
                (qi, Some(ri))
            }
            _ => (ri, None),
        };
        if let Some(p) = plan(model, &producer, i, qi, activation, op) {
            plans.push(p);
        }
    }
    let fused_count = plans.len();
    let mut remove = vec![false; model.nodes.len()];
    let mut names: Vec<String> = Vec::new();
    for mut p in plans {
        for (name, t) in p.constants {
            // Plans were made against the model before any of them: a name an earlier one
            // took is renamed here.
            let unique = model.fresh_name(&name);
            for x in p.inputs.iter_mut().filter(|x| **x == name) {
                x.clone_from(&unique);
            }
            model.initializers.insert(unique, Arc::new(t));
        }
        if let Some(n) = model.nodes.get_mut(p.node) {
            n.domain = p.domain.into();
            n.attributes
                .retain(|a| !p.dropped.contains(&a.name.as_str()));
            n.op_type = fused.into();
            n.inputs = p.inputs;
            n.outputs = vec![p.output];
            names.push(n.name.clone());
        }
        for k in std::iter::once(p.quantize).chain(p.activation) {
            if let Some(r) = remove.get_mut(k) {
                *r = true;
            }
        }
    }
    super::remove_nodes(model, &remove);
    if fused_count > 0 {
        remove_unread_dequantize(model)?;
        tracing::debug!(op, fused, nodes = ?names, "QDQ fusion");
    }
    Ok(fused_count)
}

/// The rewrite of product node `i` whose output quantize node `qi` reads, when it fits.
fn plan(
    model: &Model,
    producer: &HashMap<&str, usize>,
    i: usize,
    qi: usize,
    activation: Option<usize>,
    op: &str,
) -> Option<Plan> {
    let n = model.nodes.get(i)?;
    let q = model.nodes.get(qi)?;
    let quantized = match activation {
        Some(r) => model.nodes.get(r)?.outputs.first(),
        None => n.outputs.first(),
    };
    if !is(q, "QuantizeLinear") || q.inputs.first() != quantized {
        return None;
    }
    let y_q = q.outputs.first().filter(|o| !o.is_empty())?.clone();
    let (y_s, y_zp) = (q.inputs.get(1)?, q.inputs.get(2).filter(|z| !z.is_empty())?);
    scale(model, y_s, None)?;
    let y_type = zero_point(model, y_zp, 1)?;
    if let Some(r) = activation {
        // Absorbing the activation is exact only when quantizing clamps as it does: the
        // representable range lies within the activation's.
        let r = model.nodes.get(r)?;
        let (lo, hi) = match super::fuse::activation(model, r)? {
            ("Clip", b) => (*b.first()?, *b.get(1)?),
            _ => (0.0, f32::INFINITY),
        };
        if !quantize_clamps_within(model, y_s, y_zp, y_type, lo, hi)? {
            return None;
        }
    }

    let x = dq_of(model, producer, n.inputs.first()?)?;
    let x_scale = scale(model, &x.scale, None)?;
    zero_point(model, x.zero_point.as_deref()?, 1)?;

    let w = dq_of(model, producer, n.inputs.get(1)?)?;
    let w_t = constant(model, &w.input)?;
    let rank = w_t.shape().len() as i64;
    let trans_b = attr_int(n, "transB", 0) != 0;
    if op == "Gemm"
        && (rank != 2
            || attr_int(n, "transA", 0) != 0
            || attr_float(n, "alpha", 1.0) != 1.0
            || attr_float(n, "beta", 1.0) != 1.0)
    {
        return None;
    }
    // The weight's channels a per-channel scale runs along: Conv's output channels (axis 0),
    // MatMul's columns (the last axis), Gemm's columns of op(B).
    let (channel_axis, channels) = match op {
        "Conv" => (0, *w_t.shape().first()?),
        "Gemm" if trans_b => (0, *w_t.shape().first()?),
        _ => (rank - 1, *w_t.shape().last()?),
    };
    if !matches!(w_t.dtype(), DType::U8 | DType::I8) || rank < 2 {
        return None;
    }
    let w_scale = scale(model, &w.scale, Some(channels))?;
    if w_scale.len() > 1 && w.axis.rem_euclid(rank) != channel_axis {
        return None;
    }
    let mut constants = Vec::new();
    let w_zp = match &w.zero_point {
        Some(z) => {
            (zero_point(model, z, w_scale.len())? == w_t.dtype()).then_some(())?;
            z.clone()
        }
        None => {
            let name = model.fresh_name(&format!("{}_zero_point", w.input));
            // The scale's own shape (ONNX Runtime's QGemm requires the two to match).
            let shape = constant(model, &w.scale)?.shape().to_vec();
            let zeros = HostTensor::zeroed(w_t.dtype(), &shape).ok()?;
            constants.push((name.clone(), zeros));
            name
        }
    };
    let mut inputs = vec![
        x.input,
        x.scale,
        x.zero_point?,
        w.input,
        w.scale,
        w_zp,
        y_s.clone(),
        y_zp.clone(),
    ];
    // A bias: Conv's per output channel, Gemm's when per column; MatMul has none.
    let bias = match n.inputs.get(2).filter(|b| !b.is_empty()) {
        Some(b)
            if op == "Conv" || (op == "Gemm" && bias_per_column(model, producer, b, channels)) =>
        {
            let bias = requantized_bias(model, producer, b, x_scale.first()?, &w_scale, channels)?;
            let name = model.fresh_name(&format!("{b}_int32"));
            constants.push((name.clone(), bias));
            Some(name)
        }
        Some(_) => return None,
        None => None,
    };
    if op == "Gemm" {
        // QGemm takes its bias (C, possibly absent) before the output's scale and zero point.
        inputs.insert(6, bias.unwrap_or_default());
    } else {
        inputs.extend(bias);
    }
    Some(Plan {
        node: i,
        quantize: qi,
        activation,
        inputs,
        output: y_q,
        constants,
        // QGemm is ONNX Runtime's, without Gemm's `beta` (checked to be 1).
        domain: if op == "Gemm" { "com.microsoft" } else { "" },
        dropped: if op == "Gemm" { &["beta"] } else { &[] },
    })
}

/// A Conv bias (a float constant, or a `DequantizeLinear` of a constant) as int32 at scale
/// `x_s * w_s[c]`: what `QLinearConv` adds to its int32 accumulators.
fn requantized_bias(
    model: &Model,
    producer: &HashMap<&str, usize>,
    b: &str,
    x_s: &f32,
    w_s: &[f32],
    channels: usize,
) -> Option<HostTensor> {
    let floats: Vec<f64> = match f32s(model, b) {
        Some(v) => v.into_iter().map(f64::from).collect(),
        None => {
            let dq = dq_of(model, producer, b)?;
            let q = constant(model, &dq.input)?;
            let s = scale(model, &dq.scale, Some(q.len()))?;
            if q.dtype() != DType::I32 {
                return None;
            }
            // Quantizers write an all-zero int32 zero point, or none.
            let zp = match &dq.zero_point {
                Some(z) => constant(model, z)
                    .filter(|t| t.dtype() == DType::I32)?
                    .to_vec::<i32>()
                    .ok()?,
                None => vec![0],
            };
            let q = q.to_vec::<i32>().ok()?;
            q.iter()
                .enumerate()
                .map(|(c, &v)| {
                    let z = *zp.get(c).or(zp.first())?;
                    Some((f64::from(v) - f64::from(z)) * f64::from(*s.get(c).or(s.first())?))
                })
                .collect::<Option<_>>()?
        }
    };
    if floats.len() != channels {
        return None;
    }
    let ints: Vec<i32> = floats
        .iter()
        .enumerate()
        .map(|(c, &v)| {
            let s = f64::from(*x_s) * f64::from(*w_s.get(c).or(w_s.first())?);
            let r = (v / s).round();
            (r >= f64::from(i32::MIN) && r <= f64::from(i32::MAX)).then_some(r as i32)
        })
        .collect::<Option<_>>()?;
    HostTensor::from_vec(&[channels], &ints).ok()
}

/// Removes `DequantizeLinear` nodes whose output nothing reads any more, then the constants
/// only they read (the float weights' and biases' quantized forms a fused node replaced).
fn remove_unread_dequantize(model: &mut Model) -> Result<(), GraphError> {
    let read = reads(model)?;
    let outputs: Vec<&str> = model.outputs.iter().map(|o| o.name.as_str()).collect();
    let remove: Vec<bool> = model
        .nodes
        .iter()
        .map(|n| {
            is(n, "DequantizeLinear")
                && n.outputs.iter().all(|o| {
                    o.is_empty() || (!read.contains_key(o) && !outputs.contains(&o.as_str()))
                })
        })
        .collect();
    super::remove_nodes(model, &remove);
    let read = reads(model)?;
    let outputs: Vec<String> = model.outputs.iter().map(|o| o.name.clone()).collect();
    model
        .initializers
        .retain(|name, _| read.contains_key(name) || outputs.contains(name));
    Ok(())
}

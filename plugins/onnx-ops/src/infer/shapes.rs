//! Output shapes from input shapes, constant inputs and attributes. A dimension is its extent,
//! or `-1` when known only at run time; a shape is `None` when not even the rank is known.

use crate::nn::WindowAttrs;
use opreg_sdk::{AttrValue, NodeInfo};

type Shape = Option<Vec<i64>>;

/// Unknown dimension.
const RUNTIME: i64 = -1;

/// Operators whose first output has the shape of their first input.
const SAME_AS_INPUT: &[&str] = &[
    "Abs",
    "Acos",
    "Acosh",
    "Asin",
    "Asinh",
    "Atan",
    "Atanh",
    "BatchNormalization",
    "Bernoulli",
    "BitwiseNot",
    "Cast",
    "CastLike",
    // Output [B, C, L] like its input (depthwise, left-padded by the state).
    "CausalConvWithState",
    "Ceil",
    "Celu",
    "Clip",
    "Cos",
    "Cosh",
    "CumSum",
    "Dropout",
    "Elu",
    "Erf",
    "Exp",
    "Floor",
    "Gelu",
    "HardSigmoid",
    "HardSwish",
    "Hardmax",
    "Identity",
    "InstanceNormalization",
    "IsInf",
    "IsNaN",
    "LayerNormalization",
    "LeakyRelu",
    "Log",
    "LogSoftmax",
    "LRN",
    "LpNormalization",
    "MeanVarianceNormalization",
    "Mish",
    "Neg",
    "Not",
    "PRelu",
    "RandomNormalLike",
    "RandomUniformLike",
    "Reciprocal",
    "Relu",
    "Round",
    "Selu",
    "Shrink",
    "Sigmoid",
    "Sign",
    "Sin",
    "Sinh",
    "Softmax",
    "Softplus",
    "Softsign",
    "Sqrt",
    "Swish",
    "Tan",
    "Tanh",
    "ThresholdedRelu",
    "Trilu",
    "RMSNormalization",
    "GroupNormalization",
    "QuantizeLinear",
    "DequantizeLinear",
];

/// Operators whose first output is the multidirectional broadcast of their inputs.
const BROADCAST: &[&str] = &[
    "Add",
    "And",
    "BitShift",
    "BitwiseAnd",
    "BitwiseOr",
    "BitwiseXor",
    "Div",
    "Equal",
    "Greater",
    "GreaterOrEqual",
    "Less",
    "LessOrEqual",
    "Max",
    "Mean",
    "Min",
    "Mod",
    "Mul",
    "Or",
    "Pow",
    "Sub",
    "Sum",
    "Where",
    "Xor",
];

fn attr_int(node: &NodeInfo<'_>, name: &str, default: i64) -> i64 {
    match node.attr(name) {
        Some(AttrValue::Int(v)) => *v,
        _ => default,
    }
}

fn attr_ints(node: &NodeInfo<'_>, name: &str) -> Option<Vec<i64>> {
    match node.attr(name) {
        Some(AttrValue::Ints(v)) => Some(v.to_vec()),
        _ => None,
    }
}

fn axis(a: i64, rank: usize) -> Option<usize> {
    let r = rank as i64;
    (-r..r)
        .contains(&a)
        .then(|| if a < 0 { (a + r) as usize } else { a as usize })
}

/// Every axis of `list` normalised for `rank`; `None` when one is out of range.
fn axes_of(list: &[i64], rank: usize) -> Option<Vec<usize>> {
    list.iter().map(|&a| axis(a, rank)).collect()
}

/// Two dimensions that must broadcast; `None` when they visibly do not.
fn broadcast_dim(a: i64, b: i64) -> Option<i64> {
    Some(match (a, b) {
        (1, d) | (d, 1) => d,
        (x, y) if x == y => x,
        (x, y) if x >= 0 && y >= 0 => return None,
        // A run-time dimension broadcast against a fixed one (other than 1) must equal it.
        (n, _) if n >= 0 => n,
        (_, n) if n >= 0 => n,
        _ => RUNTIME,
    })
}

fn broadcast(shapes: &[&[i64]]) -> Shape {
    let rank = shapes.iter().map(|s| s.len()).max()?;
    let mut out = vec![1; rank];
    for s in shapes {
        // Right-aligned: the last dimensions of every shape line up.
        for (o, &d) in out.iter_mut().rev().zip(s.iter().rev()) {
            *o = broadcast_dim(*o, d)?;
        }
    }
    Some(out)
}

/// The product of `dims`; unknown when a dimension is or the product overflows (a model may
/// declare any dimensions).
fn product(dims: &[i64]) -> i64 {
    let mut n = 1i64;
    for &d in dims {
        match (d >= 0).then(|| n.checked_mul(d)).flatten() {
            Some(p) => n = p,
            None => return RUNTIME,
        }
    }
    n
}

/// The spatial output extents of a convolution or pooling window, through the kernels' own
/// window geometry; unknown when an extent or the kernel is, or the window does not fit.
fn window(node: &NodeInfo<'_>, spatial: &[i64], kernel: Option<Vec<i64>>) -> Vec<i64> {
    window_prefixed(node, "", spatial, kernel)
}

/// [`window`] of the attributes named with `prefix` (`opreg::FusedConvMaxPool`'s `pool_`).
fn window_prefixed(
    node: &NodeInfo<'_>,
    prefix: &str,
    spatial: &[i64],
    kernel: Option<Vec<i64>>,
) -> Vec<i64> {
    let unknown = vec![RUNTIME; spatial.len()];
    let (Some(extents), Ok(attrs)) = (
        spatial
            .iter()
            .map(|&d| usize::try_from(d).ok())
            .collect::<Option<Vec<usize>>>(),
        WindowAttrs::from_node_prefixed(node, prefix),
    ) else {
        return unknown;
    };
    let kernel: Option<Vec<usize>> = match kernel {
        Some(k) => match k.iter().map(|&d| usize::try_from(d).ok()).collect() {
            Some(k) => Some(k),
            None => return unknown,
        },
        None => None,
    };
    match attrs.resolve(node.op_type, &extents, kernel.as_deref()) {
        Ok(g) => g
            .out
            .iter()
            .map(|&o| i64::try_from(o).unwrap_or(RUNTIME))
            .collect(),
        Err(_) => unknown,
    }
}

/// The shapes of `node`'s outputs (one entry per output, `None` where unknown).
pub(super) fn infer(node: &NodeInfo<'_>) -> Vec<Shape> {
    let mut out = vec![None; node.outputs.len()];
    let Some(first) = out.first_mut() else {
        return out;
    };
    let op = match node.domain {
        "" | "ai.onnx" => node.op_type,
        "opreg" if node.op_type == "FusedConvNhwc" => {
            // X and Y each NCHW or channels-last ([N, H, W, C]) per `x_nhwc` / `y_nhwc`.
            let shape = |i: usize| node.inputs.get(i).filter(|v| v.present)?.shape;
            *first = (|| {
                let &[n, d1, d2, d3] = shape(0)? else {
                    return None;
                };
                let (h, w) = if attr_int(node, "x_nhwc", 1) != 0 {
                    (d1, d2)
                } else {
                    (d2, d3)
                };
                let wt = shape(1).filter(|w| w.len() == 4)?;
                let m = *wt.first()?;
                let spatial = window(node, &[h, w], wt.get(2..).map(<[i64]>::to_vec));
                let mut s = vec![n];
                if attr_int(node, "y_nhwc", 1) != 0 {
                    s.extend(spatial);
                    s.push(m);
                } else {
                    s.push(m);
                    s.extend(spatial);
                }
                Some(s)
            })();
            return out;
        }
        "opreg" if node.op_type == "FusedConvMaxPool" => {
            // The convolution's extents, then the pool's over them (its attributes named
            // `pool_...`).
            let shape = |i: usize| node.inputs.get(i).filter(|v| v.present)?.shape;
            *first = (|| {
                let &[n, _, h, w] = shape(0)? else {
                    return None;
                };
                let wt = shape(1).filter(|w| w.len() == 4)?;
                let conv = window(node, &[h, w], wt.get(2..).map(<[i64]>::to_vec));
                let mut s = vec![n, *wt.first()?];
                s.extend(window_prefixed(node, "pool_", &conv, None));
                Some(s)
            })();
            return out;
        }
        "opreg" if node.op_type == "GlobalAveragePoolNhwc" => {
            // X channels-last [N, H, W, C]; Y the pool's own [N, C, 1, 1].
            let x = node
                .inputs
                .first()
                .filter(|v| v.present)
                .and_then(|v| v.shape);
            if let Some(&[n, _, _, c]) = x {
                *first = Some(vec![n, c, 1, 1]);
            }
            return out;
        }
        // `MaxPoolNhwc`: with the channels-last operators below.
        "opreg" if node.op_type != "MaxPoolNhwc" => match node.op_type {
            "FusedConv" => "Conv",
            "FusedMatMul" => "MatMul",
            "Gelu" => "Gelu",
            _ => return out,
        },
        "ai.onnx.preview.training" if matches!(node.op_type, "Adagrad" | "Adam" | "Momentum") => {
            // Inputs R, T, then n tensors per role (X..., G..., state...); outputs X_new...,
            // then each state's updates: output k has the shape of X_(k mod n).
            let group = if node.op_type == "Adam" { 4 } else { 3 };
            let n = node.inputs.len().saturating_sub(2) / group;
            if n > 0 && node.inputs.len() == 2 + n * group {
                for (k, o) in out.iter_mut().enumerate() {
                    let x = node.inputs.get(2 + k % n).filter(|v| v.present);
                    *o = x.and_then(|v| v.shape).map(<[i64]>::to_vec);
                }
            }
            return out;
        }
        "com.microsoft" if node.op_type == "QLinearAdd" => {
            // A and B (inputs 0 and 3) broadcast, as Add's inputs do.
            let shape = |i: usize| node.inputs.get(i).filter(|v| v.present)?.shape;
            *first = shape(0).zip(shape(3)).and_then(|(a, b)| broadcast(&[a, b]));
            return out;
        }
        "com.microsoft"
            if node.op_type == "QLinearConv" && attr_int(node, "channels_last", 0) == 0 =>
        {
            "QLinearConv"
        }
        "com.microsoft" | "opreg"
            if matches!(
                (node.domain, node.op_type),
                ("com.microsoft", "QLinearConv" | "NhwcMaxPool") | ("opreg", "MaxPoolNhwc")
            ) =>
        {
            // Channels-last: x is [N, H, W, C], the output [N, OH, OW, M].
            let shape = |i: usize| node.inputs.get(i).filter(|v| v.present)?.shape;
            *first = (|| {
                let &[n, h, w, c] = shape(0)? else {
                    return None;
                };
                let (m, kernel) = if node.op_type == "QLinearConv" {
                    let wt = shape(3).filter(|w| w.len() == 4)?;
                    (*wt.first()?, wt.get(2..).map(<[i64]>::to_vec))
                } else {
                    (c, None)
                };
                let mut s = vec![n];
                s.extend(window(node, &[h, w], kernel));
                s.push(m);
                Some(s)
            })();
            return out;
        }
        _ => return out,
    };
    let input = |i: usize| -> Shape {
        let v = node.inputs.get(i).filter(|v| v.present)?;
        v.shape.map(<[i64]>::to_vec)
    };
    let const_ints = |i: usize| -> Option<Vec<i64>> {
        let v = node.inputs.get(i).filter(|v| v.present)?;
        v.constant.as_ref()?.to_i64s().ok()
    };
    *first = if SAME_AS_INPUT.contains(&op) {
        input(0)
    } else if BROADCAST.contains(&op) {
        let known: Option<Vec<Vec<i64>>> = (0..node.inputs.len()).map(input).collect();
        known.and_then(|k| broadcast(&k.iter().map(Vec::as_slice).collect::<Vec<_>>()))
    } else {
        match op {
            "Shape" => input(0).map(|s| vec![s.len() as i64]),
            // The shape attribute; a negative dimension gives none (the kernel refuses it).
            "RandomNormal" | "RandomUniform" => {
                attr_ints(node, "shape").filter(|s| s.iter().all(|&d| d >= 0))
            }
            // [batch, classes] -> [batch, sample_size].
            "Multinomial" => (|| {
                let x = input(0).filter(|x| x.len() == 2)?;
                let n = attr_int(node, "sample_size", 1);
                (n >= 1).then_some(vec![*x.first()?, n])
            })(),
            "Size" => Some(vec![]),
            "MatMul" => matmul(input(0), input(1)),
            "Gemm" => (|| {
                let (a, b) = (input(0)?, input(1)?);
                let m = if attr_int(node, "transA", 0) != 0 {
                    a.get(1)?
                } else {
                    a.first()?
                };
                let n = if attr_int(node, "transB", 0) != 0 {
                    b.first()?
                } else {
                    b.get(1)?
                };
                Some(vec![*m, *n])
            })(),
            "Conv" | "QLinearConv" | "MaxPool" | "AveragePool" | "LpPool" => (|| {
                let x = input(0)?;
                let (batch, x_channels, spatial) = match x.as_slice() {
                    [n, c, spatial @ ..] if !spatial.is_empty() => (*n, *c, spatial),
                    _ => return None,
                };
                let (channels, kernel) = if matches!(op, "Conv" | "QLinearConv") {
                    // Weights of another rank than the input: the kernel refuses the node.
                    let w =
                        input(if op == "Conv" { 1 } else { 3 }).filter(|w| w.len() == x.len())?;
                    (*w.first()?, w.get(2..).map(<[i64]>::to_vec))
                } else {
                    (x_channels, None)
                };
                let mut s = vec![batch, channels];
                s.extend(window(node, spatial, kernel));
                Some(s)
            })(),
            "GlobalAveragePool" | "GlobalMaxPool" | "GlobalLpPool" => input(0).map(|x| {
                x.iter()
                    .enumerate()
                    .map(|(i, &d)| if i < 2 { d } else { 1 })
                    .collect()
            }),
            "Flatten" => input(0).and_then(|x| {
                let a = axis(attr_int(node, "axis", 1), x.len() + 1)?;
                let (outer, inner) = x.split_at_checked(a)?;
                Some(vec![product(outer), product(inner)])
            }),
            "Transpose" => input(0).map(|x| match attr_ints(node, "perm") {
                Some(p) => p
                    .iter()
                    .filter_map(|&i| usize::try_from(i).ok().and_then(|i| x.get(i)).copied())
                    .collect(),
                None => x.iter().rev().copied().collect(),
            }),
            "Reshape" => reshape(node, input(0), const_ints(1)),
            "Unsqueeze" => (|| {
                let x = input(0)?;
                let axes = attr_ints(node, "axes").or_else(|| const_ints(1))?;
                let rank = x.len() + axes.len();
                let mut axes = axes_of(&axes, rank)?;
                axes.sort_unstable();
                let mut s = x;
                for a in axes {
                    s.insert(a.min(s.len()), 1);
                }
                Some(s)
            })(),
            "Squeeze" => (|| {
                let x = input(0)?;
                match attr_ints(node, "axes").or_else(|| const_ints(1)) {
                    Some(axes) => {
                        let axes = axes_of(&axes, x.len())?;
                        Some(
                            x.into_iter()
                                .enumerate()
                                .filter(|(i, _)| !axes.contains(i))
                                .map(|(_, d)| d)
                                .collect(),
                        )
                    }
                    None if x.iter().all(|&d| d >= 0) => {
                        Some(x.into_iter().filter(|&d| d != 1).collect())
                    }
                    None => None,
                }
            })(),
            "Concat" => (|| {
                let all: Vec<Vec<i64>> =
                    (0..node.inputs.len()).map(input).collect::<Option<_>>()?;
                let mut s = all.first()?.clone();
                let a = axis(attr_int(node, "axis", 0), s.len())?;
                let mut total = Some(0i64);
                for t in &all {
                    let d = *t.get(a)?;
                    total = total.filter(|_| d >= 0).and_then(|n| n.checked_add(d));
                }
                *s.get_mut(a)? = total.unwrap_or(RUNTIME);
                Some(s)
            })(),
            "Gather" => (|| {
                let (x, idx) = (input(0)?, input(1)?);
                let a = axis(attr_int(node, "axis", 0), x.len())?;
                let (before, from) = x.split_at_checked(a)?;
                let mut s = before.to_vec();
                s.extend(idx);
                s.extend_from_slice(from.get(1..)?);
                Some(s)
            })(),
            r if r.starts_with("Reduce") || r == "ArgMax" || r == "ArgMin" => {
                reduce(node, input(0), const_ints(1))
            }
            _ => None,
        }
    };
    if op == "BatchNormalization" {
        // The running statistics (and, before opset 14, the saved ones): one value per
        // channel, shaped as the input mean.
        let stats = input(3).or_else(|| Some(vec![*input(0)?.get(1)?]));
        for o in out.iter_mut().skip(1) {
            o.clone_from(&stats);
        }
    }
    out
}

fn matmul(a: Shape, b: Shape) -> Shape {
    let (mut a, mut b) = (a?, b?);
    let (a1, b1) = (a.len() == 1, b.len() == 1);
    if a1 {
        a.insert(0, 1);
    }
    if b1 {
        b.push(1);
    }
    // A declared rank 0 (or any rank the op cannot take) gives no shape; the kernel refuses
    // the node.
    let (a_batch, a_mat) = a.split_at_checked(a.len().checked_sub(2)?)?;
    let (b_batch, b_mat) = b.split_at_checked(b.len().checked_sub(2)?)?;
    let mut s = broadcast(&[a_batch, b_batch])?;
    if !a1 {
        s.push(*a_mat.first()?);
    }
    if !b1 {
        s.push(*b_mat.get(1)?);
    }
    Some(s)
}

fn reshape(node: &NodeInfo<'_>, x: Shape, target: Option<Vec<i64>>) -> Shape {
    let target = target.or_else(|| attr_ints(node, "shape"))?;
    let allowzero = attr_int(node, "allowzero", 0) != 0;
    let mut dims: Vec<i64> = target
        .iter()
        .enumerate()
        .map(|(i, &t)| match t {
            0 if !allowzero => x
                .as_ref()
                .and_then(|x| x.get(i).copied())
                .unwrap_or(RUNTIME),
            t => t.max(RUNTIME),
        })
        .collect();
    let total = x.as_deref().map(product).filter(|&t| t >= 0);
    if let (Some(pos), Some(total)) = (target.iter().position(|&t| t == -1), total) {
        let rest: Vec<i64> = dims
            .iter()
            .enumerate()
            .filter(|(i, _)| *i != pos)
            .map(|(_, &d)| d)
            .collect();
        let rest = product(&rest);
        if let (true, Some(d)) = (rest > 0, dims.get_mut(pos)) {
            *d = total / rest;
        }
    }
    Some(dims)
}

fn reduce(node: &NodeInfo<'_>, x: Shape, const_axes: Option<Vec<i64>>) -> Shape {
    let x = x?;
    let keep = attr_int(node, "keepdims", 1) != 0;
    let axes = if node.op_type.starts_with("Arg") {
        vec![attr_int(node, "axis", 0)]
    } else {
        match attr_ints(node, "axes").or(const_axes) {
            Some(a) if !a.is_empty() => a,
            _ if attr_int(node, "noop_with_empty_axes", 0) != 0 => return Some(x),
            _ => (0..x.len() as i64).collect(),
        }
    };
    let axes = axes_of(&axes, x.len())?;
    Some(
        x.into_iter()
            .enumerate()
            .filter_map(|(i, d)| match (axes.contains(&i), keep) {
                (true, true) => Some(1),
                (true, false) => None,
                (false, _) => Some(d),
            })
            .collect(),
    )
}

//! Static shape inference with symbolic dimensions.
//!
//! Shapes flow from the declared graph inputs (whose `dim_param` names stay symbolic, e.g.
//! `N`) and constants through the common operators. What is inferred reaches kernels at
//! instantiation (`ValueInfo::shape`, -1 for a symbolic dimension) and fills in output shapes
//! a model leaves undeclared. An operator without a rule yields an unknown shape: execution
//! never depends on inference, kernels compute output shapes at run time.

// Shapes here come from models, which may declare anything: no unchecked index or slice.
#![deny(clippy::indexing_slicing)]

use super::import::{Dim, Node};
use opreg_sdk::{host::HostTensor, AttrValue, DType};

/// A shape, or `None` when not even the rank is known.
pub type Shape = Option<Vec<Dim>>;

const SAME_AS_INPUT: &[&str] = &[
    "Abs",
    "Acos",
    "Acosh",
    "Asin",
    "Asinh",
    "Atan",
    "Atanh",
    "BatchNormalization",
    "BitwiseNot",
    "Cast",
    "CastLike",
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

fn attr<'a>(node: &'a Node, name: &str) -> Option<&'a AttrValue> {
    node.attributes
        .iter()
        .find(|a| a.name.as_str() == name)
        .map(|a| &a.value)
}

fn attr_int(node: &Node, name: &str, default: i64) -> i64 {
    match attr(node, name) {
        Some(AttrValue::Int(v)) => *v,
        _ => default,
    }
}

fn attr_ints(node: &Node, name: &str) -> Option<Vec<i64>> {
    match attr(node, name) {
        Some(AttrValue::Ints(v)) => Some(v.to_vec()),
        _ => None,
    }
}

fn const_ints(t: Option<&HostTensor>) -> Option<Vec<i64>> {
    let t = t?;
    match t.dtype() {
        DType::I64 | DType::I32 => t.view().to_i64s().ok(),
        _ => None,
    }
}

fn axis(a: i64, rank: usize) -> Option<usize> {
    let r = rank as i64;
    (-r..r)
        .contains(&a)
        .then(|| if a < 0 { (a + r) as usize } else { a as usize })
}

/// Two dimensions that must broadcast; `None` when they visibly do not.
fn broadcast_dim(a: &Dim, b: &Dim) -> Option<Dim> {
    Some(match (a, b) {
        (Dim::Fixed(1), d) | (d, Dim::Fixed(1)) => d.clone(),
        (Dim::Fixed(x), Dim::Fixed(y)) if x == y => Dim::Fixed(*x),
        (Dim::Fixed(_), Dim::Fixed(_)) => return None,
        (Dim::Fixed(n), Dim::Symbolic(_)) | (Dim::Symbolic(_), Dim::Fixed(n)) => Dim::Fixed(*n),
        (Dim::Symbolic(x), Dim::Symbolic(y)) if x == y => Dim::Symbolic(x.clone()),
        _ => Dim::Symbolic(String::new()),
    })
}

fn broadcast(shapes: &[&[Dim]]) -> Shape {
    let rank = shapes.iter().map(|s| s.len()).max()?;
    let mut out = vec![Dim::Fixed(1); rank];
    for s in shapes {
        // Right-aligned: the last dimensions of every shape line up.
        for (o, d) in out.iter_mut().rev().zip(s.iter().rev()) {
            *o = broadcast_dim(o, d)?;
        }
    }
    Some(out)
}

/// The product of `dims`; unknown when a dimension is symbolic or the product overflows (a
/// model may declare any dimensions).
fn product(dims: &[Dim]) -> Dim {
    let mut n = 1usize;
    for d in dims {
        match d {
            Dim::Fixed(v) => match n.checked_mul(*v) {
                Some(p) => n = p,
                None => return Dim::Symbolic(String::new()),
            },
            Dim::Symbolic(_) => return Dim::Symbolic(String::new()),
        }
    }
    Dim::Fixed(n)
}

/// Output spatial extent of a sliding window, when the input extent is known.
fn window(node: &Node, spatial: &[Dim], kernel: &[i64]) -> Vec<Dim> {
    let n = spatial.len();
    let strides = attr_ints(node, "strides").unwrap_or_else(|| vec![1; n]);
    let dilations = attr_ints(node, "dilations").unwrap_or_else(|| vec![1; n]);
    let pads = attr_ints(node, "pads").unwrap_or_else(|| vec![0; 2 * n]);
    let ceil = attr_int(node, "ceil_mode", 0) != 0;
    let auto_pad = match attr(node, "auto_pad") {
        Some(AttrValue::String(s)) => s.to_string(),
        _ => "NOTSET".into(),
    };
    let unknown = || Dim::Symbolic(String::new());
    spatial
        .iter()
        .enumerate()
        .map(|(i, x)| {
            let (Dim::Fixed(x), Some(&k), Some(&s), Some(&d)) =
                (x, kernel.get(i), strides.get(i), dilations.get(i))
            else {
                return unknown();
            };
            // Attributes come from the model: any overflow makes the extent unknown here and
            // leaves the kernel to refuse the node.
            let Ok(x) = i64::try_from(*x) else {
                return unknown();
            };
            let s = s.max(1);
            let out = (|| {
                let span = d.checked_mul(k.checked_sub(1)?)?.checked_add(1)?;
                match auto_pad.as_str() {
                    "SAME_UPPER" | "SAME_LOWER" => Some(x.checked_add(s - 1)? / s),
                    "VALID" => Some(x.checked_sub(span)? / s + 1),
                    _ => {
                        let padded = x
                            .checked_add(pads.get(i).copied().unwrap_or(0))?
                            .checked_add(pads.get(i + n).copied().unwrap_or(0))?
                            .checked_sub(span)?;
                        if ceil {
                            Some(padded.checked_add(s - 1)? / s + 1)
                        } else {
                            Some(padded / s + 1)
                        }
                    }
                }
            })();
            match out.and_then(|o| usize::try_from(o).ok()) {
                Some(o) => Dim::Fixed(o),
                None => unknown(),
            }
        })
        .collect()
}

/// The shapes of `node`'s outputs from its input shapes and constant inputs.
pub fn infer(node: &Node, inputs: &[Shape], constants: &[Option<&HostTensor>]) -> Vec<Shape> {
    let n_out = node.outputs.len();
    let mut out = vec![None; n_out];
    let Some(first) = out.first_mut() else {
        return out;
    };
    if !node.domain.is_empty() {
        return out;
    }
    let input = |i: usize| inputs.get(i).cloned().flatten();
    let constant = |i: usize| constants.get(i).copied().flatten();
    let op = node.op_type.as_str();
    *first = if SAME_AS_INPUT.contains(&op) {
        input(0)
    } else if BROADCAST.contains(&op) {
        let known: Option<Vec<Vec<Dim>>> = (0..inputs.len()).map(input).collect();
        known.and_then(|k| broadcast(&k.iter().map(Vec::as_slice).collect::<Vec<_>>()))
    } else {
        match op {
            "PRelu" => input(0),
            "Shape" => input(0).map(|s| vec![Dim::Fixed(s.len())]),
            "Size" => Some(vec![]),
            "MatMul" => (|| {
                let (mut a, mut b) = (input(0)?, input(1)?);
                let (a1, b1) = (a.len() == 1, b.len() == 1);
                if a1 {
                    a.insert(0, Dim::Fixed(1));
                }
                if b1 {
                    b.push(Dim::Fixed(1));
                }
                // A declared rank 0 (or any rank the op cannot take) gives no shape; the
                // kernel refuses the node.
                let (a_batch, a_mat) = a.split_at_checked(a.len().checked_sub(2)?)?;
                let (b_batch, b_mat) = b.split_at_checked(b.len().checked_sub(2)?)?;
                let mut s = broadcast(&[a_batch, b_batch])?;
                if !a1 {
                    s.push(a_mat.first()?.clone());
                }
                if !b1 {
                    s.push(b_mat.get(1)?.clone());
                }
                Some(s)
            })(),
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
                Some(vec![m.clone(), n.clone()])
            })(),
            "Conv" | "MaxPool" | "AveragePool" | "LpPool" => (|| {
                let x = input(0)?;
                let (batch, x_channels, spatial) = match x.as_slice() {
                    [n, c, spatial @ ..] if !spatial.is_empty() => (n, c, spatial),
                    _ => return None,
                };
                let (channels, kernel) = if op == "Conv" {
                    let w = input(1)?;
                    let kernel = attr_ints(node, "kernel_shape").or_else(|| {
                        w.get(2..)?
                            .iter()
                            .map(|d| {
                                if let Dim::Fixed(v) = d {
                                    Some(*v as i64)
                                } else {
                                    None
                                }
                            })
                            .collect()
                    })?;
                    (w.first()?.clone(), kernel)
                } else {
                    (x_channels.clone(), attr_ints(node, "kernel_shape")?)
                };
                let mut s = vec![batch.clone(), channels];
                s.extend(window(node, spatial, &kernel));
                Some(s)
            })(),
            "GlobalAveragePool" | "GlobalMaxPool" | "GlobalLpPool" => input(0).map(|x| {
                x.iter()
                    .enumerate()
                    .map(|(i, d)| if i < 2 { d.clone() } else { Dim::Fixed(1) })
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
                    .filter_map(|&i| x.get(i as usize).cloned())
                    .collect(),
                None => x.iter().rev().cloned().collect(),
            }),
            "Reshape" => (|| {
                let target = const_ints(constant(1)).or_else(|| attr_ints(node, "shape"))?;
                let x = input(0);
                let allowzero = attr_int(node, "allowzero", 0) != 0;
                let mut dims: Vec<Dim> = target
                    .iter()
                    .enumerate()
                    .map(|(i, &t)| match t {
                        0 if !allowzero => x
                            .as_ref()
                            .and_then(|x| x.get(i).cloned())
                            .unwrap_or(Dim::Symbolic(String::new())),
                        -1 => Dim::Symbolic(String::new()),
                        t => Dim::Fixed(t.max(0) as usize),
                    })
                    .collect();
                if let (Some(pos), Some(Dim::Fixed(total))) = (
                    target.iter().position(|&t| t == -1),
                    x.as_ref().map(|x| product(x)),
                ) {
                    let rest = product(
                        &dims
                            .iter()
                            .enumerate()
                            .filter(|(i, _)| *i != pos)
                            .map(|(_, d)| d.clone())
                            .collect::<Vec<_>>(),
                    );
                    if let (Some(v), Some(d)) = (
                        match rest {
                            Dim::Fixed(r) => total.checked_div(r),
                            Dim::Symbolic(_) => None,
                        },
                        dims.get_mut(pos),
                    ) {
                        *d = Dim::Fixed(v);
                    }
                }
                Some(dims)
            })(),
            "Unsqueeze" => (|| {
                let x = input(0)?;
                let axes = attr_ints(node, "axes").or_else(|| const_ints(constant(1)))?;
                let rank = x.len() + axes.len();
                let mut axes: Vec<usize> =
                    axes.iter().map(|&a| axis(a, rank)).collect::<Option<_>>()?;
                axes.sort_unstable();
                let mut s = x;
                for a in axes {
                    s.insert(a.min(s.len()), Dim::Fixed(1));
                }
                Some(s)
            })(),
            "Squeeze" => (|| {
                let x = input(0)?;
                let axes = attr_ints(node, "axes").or_else(|| const_ints(constant(1)));
                match axes {
                    Some(axes) => {
                        let axes: Vec<usize> = axes
                            .iter()
                            .map(|&a| axis(a, x.len()))
                            .collect::<Option<_>>()?;
                        Some(
                            x.into_iter()
                                .enumerate()
                                .filter(|(i, _)| !axes.contains(i))
                                .map(|(_, d)| d)
                                .collect(),
                        )
                    }
                    None if x.iter().all(|d| matches!(d, Dim::Fixed(_))) => {
                        Some(x.into_iter().filter(|d| *d != Dim::Fixed(1)).collect())
                    }
                    None => None,
                }
            })(),
            "Concat" => (|| {
                let all: Vec<Vec<Dim>> = (0..inputs.len()).map(input).collect::<Option<_>>()?;
                let first = all.first()?.clone();
                let a = axis(attr_int(node, "axis", 0), first.len())?;
                let mut s = first;
                let mut total = Some(0usize);
                for t in &all {
                    total = match t.get(a)? {
                        Dim::Fixed(v) => total.and_then(|n| n.checked_add(*v)),
                        Dim::Symbolic(_) => None,
                    };
                }
                *s.get_mut(a)? = total.map_or(Dim::Symbolic(String::new()), Dim::Fixed);
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
            r if r.starts_with("Reduce") || r == "ArgMax" || r == "ArgMin" => (|| {
                let x = input(0)?;
                let keep = attr_int(node, "keepdims", 1) != 0;
                let axes = if r.starts_with("Arg") {
                    vec![attr_int(node, "axis", 0)]
                } else {
                    match attr_ints(node, "axes").or_else(|| const_ints(constant(1))) {
                        Some(a) if !a.is_empty() => a,
                        _ if attr_int(node, "noop_with_empty_axes", 0) != 0 => return Some(x),
                        _ => (0..x.len() as i64).collect(),
                    }
                };
                let axes: Vec<usize> = axes
                    .iter()
                    .map(|&a| axis(a, x.len()))
                    .collect::<Option<_>>()?;
                Some(
                    x.into_iter()
                        .enumerate()
                        .filter_map(|(i, d)| match (axes.contains(&i), keep) {
                            (true, true) => Some(Dim::Fixed(1)),
                            (true, false) => None,
                            (false, _) => Some(d),
                        })
                        .collect(),
                )
            })(),
            _ => None,
        }
    };
    out
}

#[cfg(test)]
#[allow(clippy::indexing_slicing)]
mod tests {
    use super::*;
    use opreg_sdk::kernel::Attribute;

    fn node(op: &str, attrs: Vec<(&str, AttrValue)>, outputs: usize) -> Node {
        Node {
            name: String::new(),
            domain: String::new(),
            op_type: op.into(),
            inputs: vec![],
            outputs: (0..outputs).map(|i| format!("o{i}")).collect(),
            attributes: attrs
                .into_iter()
                .map(|(n, v)| Attribute {
                    name: n.into(),
                    value: v,
                })
                .collect(),
        }
    }

    fn s(dims: &[&str]) -> Shape {
        Some(
            dims.iter()
                .map(|d| {
                    d.parse()
                        .map(Dim::Fixed)
                        .unwrap_or(Dim::Symbolic(d.to_string()))
                })
                .collect(),
        )
    }

    #[test]
    fn symbolic_batch_flows_through_an_mlp() {
        let mm = infer(
            &node("MatMul", vec![], 1),
            &[s(&["N", "784"]), s(&["784", "512"])],
            &[],
        );
        assert_eq!(mm[0], s(&["N", "512"]));
        let add = infer(&node("Add", vec![], 1), &[mm[0].clone(), s(&["512"])], &[]);
        assert_eq!(add[0], s(&["N", "512"]));
        let relu = infer(&node("Relu", vec![], 1), &[add[0].clone()], &[]);
        assert_eq!(relu[0], s(&["N", "512"]));
        // Broadcasting that visibly fails yields no shape (the kernel reports the error).
        assert_eq!(
            infer(
                &node("Add", vec![], 1),
                &[s(&["2", "3"]), s(&["4", "3"])],
                &[]
            )[0],
            None
        );
    }

    #[test]
    fn convolution_and_pooling_windows() {
        let conv = node(
            "Conv",
            vec![
                ("pads", AttrValue::Ints(vec![1, 1, 1, 1])),
                ("strides", AttrValue::Ints(vec![2, 2])),
            ],
            1,
        );
        let y = infer(
            &conv,
            &[s(&["N", "3", "64", "63"]), s(&["16", "3", "3", "3"])],
            &[],
        );
        assert_eq!(y[0], s(&["N", "16", "32", "32"]));
        let pool = node(
            "MaxPool",
            vec![
                ("kernel_shape", AttrValue::Ints(vec![2, 2])),
                ("strides", AttrValue::Ints(vec![2, 2])),
                ("ceil_mode", AttrValue::Int(1)),
            ],
            1,
        );
        assert_eq!(
            infer(&pool, &[s(&["1", "8", "5", "5"])], &[])[0],
            s(&["1", "8", "3", "3"])
        );
        let gap = infer(
            &node("GlobalAveragePool", vec![], 1),
            &[s(&["N", "8", "5", "5"])],
            &[],
        );
        assert_eq!(gap[0], s(&["N", "8", "1", "1"]));
    }

    #[test]
    fn declared_shapes_that_do_not_fit_the_op_give_no_shape() {
        // Each of these panicked the compute pool (and aborted the daemon) at model load.
        let mm = infer(&node("MatMul", vec![], 1), &[s(&[]), s(&["3", "4"])], &[]);
        assert_eq!(mm[0], None);
        let conv = infer(
            &node("Conv", vec![], 1),
            &[s(&["1", "3", "8", "8"]), s(&["3"])],
            &[],
        );
        assert_eq!(conv[0], None);
        let huge = node(
            "Conv",
            vec![
                ("pads", AttrValue::Ints(vec![i64::MAX, 0])),
                ("dilations", AttrValue::Ints(vec![i64::MAX])),
            ],
            1,
        );
        let y = infer(&huge, &[s(&["1", "1", "8"]), s(&["1", "1", "3"])], &[]);
        assert_eq!(y[0], s(&["1", "1", ""]));
        let flat = infer(
            &node("Flatten", vec![], 1),
            &[s(&["4294967296", "4294967296", "4294967296"])],
            &[],
        );
        // 2^64 overflows: unknown, not a panic (debug) or a wrapped size (release).
        assert_eq!(flat[0], s(&["4294967296", ""]));
        assert!(infer(&node("Relu", vec![], 0), &[s(&["1"])], &[]).is_empty());
    }

    #[test]
    fn reshape_reduce_and_unknown_ops() {
        let target = HostTensor::from_vec(&[2], &[0i64, -1]).expect("shape");
        let r = infer(
            &node("Reshape", vec![], 1),
            &[s(&["4", "3", "2"]), s(&["2"])],
            &[None, Some(&target)],
        );
        assert_eq!(r[0], s(&["4", "6"]));
        let red = node(
            "ReduceMean",
            vec![
                ("axes", AttrValue::Ints(vec![-1])),
                ("keepdims", AttrValue::Int(0)),
            ],
            1,
        );
        assert_eq!(infer(&red, &[s(&["N", "7"])], &[])[0], s(&["N"]));
        assert_eq!(
            infer(&node("NoSuchOp", vec![], 1), &[s(&["1"])], &[])[0],
            None
        );
    }
}

//! `gelu`: the exact (erf) GELU as exporters write it before ONNX's `Gelu` (opset 20) becomes
//! one `opreg::Gelu` node, one pass over memory instead of five (a BERT-base FFN activation is
//! 128 × 3072 floats, read and written by each of Div, Erf, Add, Mul and Mul).
//!
//! The forms recognized (ONNX Runtime's `GeluFusion` takes the same), with `x` any value and the
//! constants f32 scalars (initializers or `Constant` nodes):
//!
//! ```text
//! d = Div(x, √2) | Mul(x, 1/√2);  e = Erf(d);  a = Add(e, 1)
//! y = Mul(Mul(x, a), 0.5)     (torch's F.gelu / nn.GELU)
//! y = Mul(Mul(x, 0.5), a)     (x * 0.5 * (1 + erf(x / √2)), Hugging Face's gelu)
//! y = Mul(Mul(a, 0.5), x)
//! ```
//!
//! Operands of Add and Mul may come in either order. Every intermediate must be read by the
//! next node of the chain alone and not be a graph output, so removing it loses nothing.
//! `opreg::Gelu(x) -> y` takes the place of the chain's last node, where `x` is computed.

use super::{super::import::Model, readers, reads, Fusion, Pass};
use crate::graph::import::Node;
use crate::graph::GraphError;
use opreg_sdk::{AttrValue, DType};
use std::collections::HashMap;

pub struct Gelu;

/// The value of an f32 scalar (one element, any rank) that `name` holds: an initializer or
/// the output of a `Constant` node.
fn scalar(model: &Model, producers: &HashMap<&str, usize>, name: &str) -> Option<f32> {
    if let Some(t) = model.initializers.get(name) {
        return (t.dtype() == DType::F32 && t.len() == 1 && t.on_host())
            .then(|| t.to_vec::<f32>().ok()?.first().copied())
            .flatten();
    }
    let n = model.nodes.get(*producers.get(name)?)?;
    if !n.domain.is_empty() || n.op_type != "Constant" {
        return None;
    }
    match &n.attributes.first()?.value {
        AttrValue::Float(v) => Some(*v),
        AttrValue::Tensor(t) if t.dtype == DType::F32 && t.len() == 1 => {
            let b: [u8; 4] = t.data.as_slice().try_into().ok()?;
            Some(f32::from_le_bytes(b))
        }
        _ => None,
    }
}

/// Whether `v` is `want` to within f32 rounding of the constant as exporters print it.
fn near(v: Option<f32>, want: f64) -> bool {
    v.is_some_and(|v| (f64::from(v) - want).abs() <= 1e-6 * want.abs())
}

impl Pass for Gelu {
    fn name(&self) -> &'static str {
        "gelu"
    }

    fn fuses(&self) -> Option<Fusion> {
        Some(Fusion {
            original: "Erf",
            domain: "opreg",
            fused: "Gelu",
            also: &[],
        })
    }

    fn run(&self, model: &mut Model) -> Result<usize, GraphError> {
        let read = reads(model)?;
        let outputs: Vec<&str> = model.outputs.iter().map(|o| o.name.as_str()).collect();
        let producers = model.producers();
        let reader = readers(model);
        // The node reading a value, for values read exactly once and not graph outputs.
        let only_reader = |v: &str| -> Option<usize> {
            (read.get(v) == Some(&1) && !outputs.contains(&v)).then(|| reader.get(v).copied())?
        };
        let plain = |i: usize, op: &str| -> Option<&Node> {
            model
                .nodes
                .get(i)
                .filter(|n| n.domain.is_empty() && n.op_type == op && n.outputs.len() == 1)
        };
        // The other operand of a two-input node, given one.
        let other = |n: &Node, v: &str| -> Option<String> {
            match n.inputs.as_slice() {
                [a, b] if a == v => Some(b.clone()),
                [a, b] if b == v => Some(a.clone()),
                _ => None,
            }
        };
        let is = |name: &str, want: f64| near(scalar(model, &producers, name), want);
        let out =
            |i: usize| -> Option<&str> { model.nodes.get(i)?.outputs.first().map(|s| s.as_str()) };
        let next = |i: usize| -> Option<usize> { only_reader(out(i)?) };

        // (x, the chain's node positions, the last one writing y).
        let mut chains: Vec<(String, Vec<usize>)> = Vec::new();
        for (ei, erf) in model.nodes.iter().enumerate() {
            if !(erf.domain.is_empty() && erf.op_type == "Erf") {
                continue;
            }
            let found = (|| -> Option<(String, Vec<usize>)> {
                let d = erf.inputs.first()?;
                let di = *producers.get(d.as_str())?;
                if only_reader(d) != Some(ei) {
                    return None;
                }
                let dn = model.nodes.get(di)?;
                let x = match (
                    dn.domain.is_empty(),
                    dn.op_type.as_str(),
                    dn.inputs.as_slice(),
                ) {
                    (true, "Div", [x, c]) if is(c, std::f64::consts::SQRT_2) => x.clone(),
                    (true, "Mul", [p, q]) => {
                        if is(q, std::f64::consts::FRAC_1_SQRT_2) {
                            p.clone()
                        } else if is(p, std::f64::consts::FRAC_1_SQRT_2) {
                            q.clone()
                        } else {
                            return None;
                        }
                    }
                    _ => return None,
                };
                let ai = next(ei)?;
                let add = plain(ai, "Add")?;
                if !is(&other(add, out(ei)?)?, 1.0) {
                    return None;
                }
                let m1 = next(ai)?;
                let mul1 = plain(m1, "Mul")?;
                let p = other(mul1, out(ai)?)?;
                if p == x {
                    // Mul(Mul(x, a), 0.5)
                    let m2 = next(m1)?;
                    let mul2 = plain(m2, "Mul")?;
                    is(&other(mul2, out(m1)?)?, 0.5).then(|| (x, vec![di, ei, ai, m1, m2]))
                } else if is(&p, 0.5) {
                    // Mul(Mul(a, 0.5), x)
                    let m2 = next(m1)?;
                    let mul2 = plain(m2, "Mul")?;
                    (other(mul2, out(m1)?)? == x).then(|| (x, vec![di, ei, ai, m1, m2]))
                } else {
                    // Mul(Mul(x, 0.5), a): p is the half of x, read by this Mul alone.
                    let hi = *producers.get(p.as_str())?;
                    let half = plain(hi, "Mul")?;
                    if only_reader(&p) != Some(m1) || !is(&other(half, &x)?, 0.5) {
                        return None;
                    }
                    Some((x, vec![hi, di, ei, ai, m1]))
                }
            })();
            if let Some(chain) = found {
                chains.push(chain);
            }
        }
        let mut taken = vec![false; model.nodes.len()];
        let mut remove = vec![false; model.nodes.len()];
        let mut fused = 0;
        for (x, chain) in chains {
            // A node in two chains cannot happen with private intermediates; checked anyway.
            if chain.iter().any(|&i| taken.get(i) != Some(&false)) {
                continue;
            }
            for &i in &chain {
                if let Some(t) = taken.get_mut(i) {
                    *t = true;
                }
            }
            // The last node of the chain writes y and comes after every other one.
            let Some((&last, rest)) = chain.split_last() else {
                continue;
            };
            let Some(n) = model.nodes.get_mut(last) else {
                continue;
            };
            n.domain = "opreg".into();
            n.op_type = "Gelu".into();
            n.inputs = vec![x];
            n.attributes.clear();
            super::flag(&mut remove, rest.iter().copied());
            fused += 1;
        }
        Ok(super::finish_opreg_fusion(model, &remove, fused))
    }
}

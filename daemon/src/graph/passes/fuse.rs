//! Fusions into opreg's own operators (domain `opreg`): run when a model is compiled, and only
//! when the registry has kernels for the fused operators on every device that could have run
//! the originals (a fused node must not lose its device).
//!
//! `conv-activation`: a `Conv` whose output only a `Relu`, `LeakyRelu` or `Clip` (constant
//! bounds) reads becomes `opreg::FusedConv` with ONNX Runtime's `activation` /
//! `activation_params` attributes: the activation is applied in the pass that adds the bias,
//! instead of a second pass over the output and a second buffer. So does SiLU (Swish) as
//! exporters write it, `Mul(y, Sigmoid(y))` with the Conv's `y` read by those two nodes only
//! (`activation = "SiLU"`, opreg's own name: ONNX Runtime's FusedConv has none): EfficientNet's
//! 65 activations, two passes and two buffers each otherwise.
//!
//! `conv-add`: a `Conv` whose output only an `Add` reads (a residual join), and the activation
//! only reading that sum if there is one, become `opreg::FusedConv(X, W, B, Z)` with Z the
//! Add's other operand: the sum and the activation are applied in the pass that adds the bias
//! (ONNX Runtime's `FusedConv` has the same fourth input). The fused node takes the Add's
//! place in the node order, where Z is already computed. The kernel broadcasts a Z of
//! another shape as Add would, so no shape needs to be known here.
//!
//! `matmul-add`: a `MatMul` with a constant B whose output only an `Add` of a constant 1-D f32
//! bias of B's column count reads becomes `opreg::FusedMatMul(A, B, bias)` (the dense layers of
//! transformer encoders); an `opreg::Gelu` alone reading the sum (the FFN's activation, fused
//! by the pass `gelu` just before) goes into it too, as `activation = "Gelu"`.

use super::{super::import::Model, reads, Fusion, Pass};
use crate::graph::{import::Node, GraphError};
use opreg_sdk::{kernel::Attribute, AttrValue, DType};

pub struct ConvActivation;

/// The activation `n` applies, as (name, params), when it can be fused.
pub(super) fn activation(model: &Model, n: &Node) -> Option<(&'static str, Vec<f32>)> {
    if !n.domain.is_empty() {
        return None;
    }
    let attr_f = |name: &str| {
        n.attributes
            .iter()
            .find(|a| a.name == name)
            .map(|a| match a.value {
                AttrValue::Float(v) => Some(v),
                _ => None,
            })
    };
    match n.op_type.as_str() {
        "Relu" => Some(("Relu", Vec::new())),
        "LeakyRelu" => Some(("LeakyRelu", vec![attr_f("alpha").unwrap_or(Some(0.01))?])),
        "Clip" => {
            // Opset 11 on: bounds are (constant) inputs; before: attributes.
            let bound = |i: usize, attr: &str, default: f32| -> Option<f32> {
                match n.inputs.get(i).filter(|s| !s.is_empty()) {
                    Some(name) => {
                        let t = model.initializers.get(name)?;
                        (t.dtype() == DType::F32 && t.len() == 1)
                            .then(|| t.to_vec::<f32>().ok()?.first().copied())
                            .flatten()
                    }
                    None => attr_f(attr).unwrap_or(Some(default)),
                }
            };
            Some((
                "Clip",
                vec![
                    bound(1, "min", f32::NEG_INFINITY)?,
                    bound(2, "max", f32::INFINITY)?,
                ],
            ))
        }
        _ => None,
    }
}

/// SiLU as exported: for each value `y` that only a default-domain `Sigmoid` and a `Mul` of `y`
/// by that sigmoid read (the sigmoid read by the Mul alone, neither a graph output), the
/// positions of the Sigmoid and the Mul.
fn silu(
    model: &Model,
    read: &std::collections::HashMap<String, usize>,
    outputs: &[String],
) -> std::collections::HashMap<String, (usize, usize)> {
    let private =
        |v: &String, readers: usize| read.get(v) == Some(&readers) && !outputs.contains(v);
    let plain = |n: &Node, op: &str| n.domain.is_empty() && n.op_type == op;
    let mut sigmoid_of = std::collections::HashMap::new();
    for (i, n) in model.nodes.iter().enumerate() {
        if let ([y], [s]) = (n.inputs.as_slice(), n.outputs.as_slice()) {
            if plain(n, "Sigmoid") && private(y, 2) && private(s, 1) {
                sigmoid_of.insert(s.clone(), (i, y.clone()));
            }
        }
    }
    let mut found = std::collections::HashMap::new();
    for (mi, n) in model.nodes.iter().enumerate() {
        let ([a, b], [_]) = (n.inputs.as_slice(), n.outputs.as_slice()) else {
            continue;
        };
        if !plain(n, "Mul") {
            continue;
        }
        for (s, y) in [(a, b), (b, a)] {
            if let Some((si, sy)) = sigmoid_of.get(s) {
                if sy == y {
                    found.insert(y.clone(), (*si, mi));
                    break;
                }
            }
        }
    }
    found
}

impl Pass for ConvActivation {
    fn name(&self) -> &'static str {
        "conv-activation"
    }

    fn fuses(&self) -> Option<Fusion> {
        Some(Fusion {
            original: "Conv",
            domain: "opreg",
            fused: "FusedConv",
            also: &[],
        })
    }

    fn run(&self, model: &mut Model) -> Result<usize, GraphError> {
        let read = reads(model)?;
        let outputs: Vec<String> = model.outputs.iter().map(|o| o.name.clone()).collect();
        // The activation reading each value, when it is the value's only reader.
        let mut act_of = std::collections::HashMap::new();
        for (i, n) in model.nodes.iter().enumerate() {
            if let Some(x) = n.inputs.first() {
                if read.get(x) == Some(&1) && !outputs.contains(x) {
                    if let Some(a) = activation(model, n) {
                        act_of.insert(x.clone(), (i, a));
                    }
                }
            }
        }
        let silu_of = silu(model, &read, &outputs);
        let mut remove = vec![false; model.nodes.len()];
        let mut fused = 0;
        for ci in 0..model.nodes.len() {
            let Some(conv) = model.nodes.get(ci) else {
                continue;
            };
            if !conv.domain.is_empty() || conv.op_type != "Conv" {
                continue;
            }
            let Some(y) = conv.outputs.first() else {
                continue;
            };
            // The nodes the fused one replaces, the last of them writing its output.
            let (gone, (name, params)) = match (act_of.get(y), silu_of.get(y)) {
                (Some(&(ai, ref a)), _) => (vec![ai], a.clone()),
                (None, Some(&(si, mi))) => (vec![si, mi], ("SiLU", Vec::new())),
                (None, None) => continue,
            };
            let Some(out) = gone
                .last()
                .and_then(|&i| model.nodes.get(i))
                .and_then(|a| a.outputs.first())
                .filter(|o| !o.is_empty())
                .cloned()
            else {
                continue;
            };
            let Some(conv) = model.nodes.get_mut(ci) else {
                continue;
            };
            conv.domain = "opreg".into();
            conv.op_type = "FusedConv".into();
            conv.attributes.push(Attribute {
                name: "activation".into(),
                value: AttrValue::String(name.into()),
            });
            if !params.is_empty() {
                conv.attributes.push(Attribute {
                    name: "activation_params".into(),
                    value: AttrValue::Floats(params),
                });
            }
            conv.outputs.truncate(1);
            conv.outputs.splice(0..1, [out]);
            super::flag(&mut remove, gone);
            fused += 1;
        }
        Ok(super::finish_opreg_fusion(model, &remove, fused))
    }
}

pub struct ConvAdd;

impl Pass for ConvAdd {
    fn name(&self) -> &'static str {
        "conv-add"
    }

    fn fuses(&self) -> Option<Fusion> {
        Some(Fusion {
            original: "Conv",
            domain: "opreg",
            fused: "FusedConv",
            also: &[],
        })
    }

    fn run(&self, model: &mut Model) -> Result<usize, GraphError> {
        let read = reads(model)?;
        let outputs: Vec<String> = model.outputs.iter().map(|o| o.name.clone()).collect();
        // Read by one node only, and not a graph output: the value may disappear.
        let private = |v: &String| read.get(v) == Some(&1) && !outputs.contains(v);
        let producer: std::collections::HashMap<&String, usize> = model
            .nodes
            .iter()
            .enumerate()
            .flat_map(|(i, n)| n.outputs.iter().map(move |o| (o, i)))
            .collect();
        // The activation reading each value, when it is the value's only reader.
        let mut act_of = std::collections::HashMap::new();
        for (i, n) in model.nodes.iter().enumerate() {
            if let Some(x) = n.inputs.first().filter(|x| private(x)) {
                if let Some(a) = activation(model, n) {
                    act_of.insert(x.clone(), (i, a));
                }
            }
        }
        let is_conv = |i: usize| {
            model.nodes.get(i).is_some_and(|n| {
                n.domain.is_empty()
                    && n.op_type == "Conv"
                    && n.outputs.len() == 1
                    && n.inputs.len() <= 3
            })
        };
        // (Add position, Conv position, Z, activation position and what it applies).
        let mut joins = Vec::new();
        let mut taken = vec![false; model.nodes.len()];
        for (ai, add) in model.nodes.iter().enumerate() {
            if !add.domain.is_empty() || add.op_type != "Add" || add.outputs.len() != 1 {
                continue;
            }
            let (Some(a), Some(b), None) =
                (add.inputs.first(), add.inputs.get(1), add.inputs.get(2))
            else {
                continue;
            };
            if a == b || a.is_empty() || b.is_empty() {
                continue;
            }
            let conv = [(a, b), (b, a)].into_iter().find_map(|(y, z)| {
                let ci = *producer.get(y)?;
                (private(y) && is_conv(ci) && taken.get(ci) == Some(&false))
                    .then(|| (ci, z.clone()))
            });
            let Some((ci, z)) = conv else {
                continue;
            };
            if let Some(t) = taken.get_mut(ci) {
                *t = true;
            }
            let act = add.outputs.first().and_then(|s| act_of.get(s)).cloned();
            joins.push((ai, ci, z, act));
        }
        let mut remove = vec![false; model.nodes.len()];
        for (ai, ci, z, act) in &joins {
            let Some(mut conv) = model.nodes.get(*ci).cloned() else {
                continue;
            };
            let out = match act {
                Some((i, _)) => model.nodes.get(*i).and_then(|n| n.outputs.first()),
                None => model.nodes.get(*ai).and_then(|n| n.outputs.first()),
            };
            let Some(out) = out.filter(|o| !o.is_empty()).cloned() else {
                continue;
            };
            conv.domain = "opreg".into();
            conv.op_type = "FusedConv".into();
            conv.inputs.resize(3, String::new());
            conv.inputs.push(z.clone());
            if let Some((i, (name, params))) = act {
                conv.attributes.push(Attribute {
                    name: "activation".into(),
                    value: AttrValue::String((*name).into()),
                });
                if !params.is_empty() {
                    conv.attributes.push(Attribute {
                        name: "activation_params".into(),
                        value: AttrValue::Floats(params.clone()),
                    });
                }
                if let Some(r) = remove.get_mut(*i) {
                    *r = true;
                }
            }
            conv.outputs = vec![out];
            // In the Add's place: after Z and after the Conv's own inputs.
            if let Some(slot) = model.nodes.get_mut(*ai) {
                *slot = conv;
            }
            if let Some(r) = remove.get_mut(*ci) {
                *r = true;
            }
        }
        Ok(super::finish_opreg_fusion(model, &remove, joins.len()))
    }
}

pub struct MatMulAdd;

impl Pass for MatMulAdd {
    fn name(&self) -> &'static str {
        "matmul-add"
    }

    fn fuses(&self) -> Option<Fusion> {
        Some(Fusion {
            original: "MatMul",
            domain: "opreg",
            fused: "FusedMatMul",
            also: &[],
        })
    }

    fn run(&self, model: &mut Model) -> Result<usize, GraphError> {
        let read = reads(model)?;
        let outputs: Vec<&str> = model.outputs.iter().map(|o| o.name.as_str()).collect();
        let f32_const = |name: &str| {
            model
                .initializers
                .get(name)
                .filter(|t| t.dtype() == DType::F32 && t.on_host())
        };
        // MatMul output -> (Add position, bias name, Add output).
        let mut adds = std::collections::HashMap::new();
        for (i, n) in model.nodes.iter().enumerate() {
            if !n.domain.is_empty() || n.op_type != "Add" {
                continue;
            }
            let (Some(a), Some(b), Some(out)) =
                (n.inputs.first(), n.inputs.get(1), n.outputs.first())
            else {
                continue;
            };
            for (x, bias) in [(a, b), (b, a)] {
                if f32_const(bias).is_some_and(|t| t.shape().len() == 1)
                    && read.get(x) == Some(&1)
                    && !outputs.contains(&x.as_str())
                    && !out.is_empty()
                {
                    adds.insert(x.clone(), (i, bias.clone(), out.clone()));
                }
            }
        }
        // Value -> (position, output) of the `opreg::Gelu` alone reading it.
        let mut gelu_of = std::collections::HashMap::new();
        for (i, n) in model.nodes.iter().enumerate() {
            if let ([x], [y]) = (n.inputs.as_slice(), n.outputs.as_slice()) {
                if n.domain == "opreg"
                    && n.op_type == "Gelu"
                    && read.get(x) == Some(&1)
                    && !outputs.contains(&x.as_str())
                    && !y.is_empty()
                {
                    gelu_of.insert(x.clone(), (i, y.clone()));
                }
            }
        }
        let mut remove = vec![false; model.nodes.len()];
        let mut fused = 0;
        for mi in 0..model.nodes.len() {
            let Some(mm) = model.nodes.get(mi) else {
                continue;
            };
            if !mm.domain.is_empty() || mm.op_type != "MatMul" {
                continue;
            }
            let (Some(y), Some(w)) = (mm.outputs.first(), mm.inputs.get(1)) else {
                continue;
            };
            let Some((ai, bias, out)) = adds.get(y).cloned() else {
                continue;
            };
            // B constant with at least 2 dims, and a bias of exactly its column count.
            let columns = f32_const(w)
                .filter(|t| t.shape().len() >= 2)
                .and_then(|t| t.shape().last().copied());
            let bias_len = f32_const(&bias).map(|t| t.len());
            if columns.is_none() || columns != bias_len {
                continue;
            }
            // An `opreg::Gelu` (pass `gelu`) alone reading the sum: applied in the epilogue.
            let gelu = gelu_of.get(&out).cloned();
            let Some(mm) = model.nodes.get_mut(mi) else {
                continue;
            };
            mm.domain = "opreg".into();
            mm.op_type = "FusedMatMul".into();
            mm.inputs.truncate(2);
            mm.inputs.push(bias);
            mm.outputs.truncate(1);
            let out = match gelu {
                Some((gi, y)) => {
                    mm.attributes.push(Attribute {
                        name: "activation".into(),
                        value: AttrValue::String("Gelu".into()),
                    });
                    if let Some(r) = remove.get_mut(gi) {
                        *r = true;
                    }
                    y
                }
                None => out,
            };
            mm.outputs.splice(0..1, [out]);
            if let Some(r) = remove.get_mut(ai) {
                *r = true;
            }
            fused += 1;
        }
        Ok(super::finish_opreg_fusion(model, &remove, fused))
    }
}

//! Fusions into opreg's own operators (domain `opreg`): run when a model is compiled, and only
//! when the registry has kernels for the fused operators on every device that could have run
//! the originals (a fused node must not lose its device).
//!
//! `conv-activation`: a `Conv` whose output only a `Relu`, `LeakyRelu` or `Clip` (constant
//! bounds) reads becomes `opreg::FusedConv` with ONNX Runtime's `activation` /
//! `activation_params` attributes: the activation is applied in the pass that adds the bias,
//! instead of a second pass over the output and a second buffer.

use super::{super::import::Model, reads, Pass};
use crate::graph::{import::Node, GraphError};
use opreg_sdk::{kernel::Attribute, AttrValue, DType};

pub struct ConvActivation;

/// The activation `n` applies, as (name, params), when it can be fused.
fn activation(model: &Model, n: &Node) -> Option<(&'static str, Vec<f32>)> {
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

impl Pass for ConvActivation {
    fn name(&self) -> &'static str {
        "conv-activation"
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
            let Some((ai, (name, params))) = act_of.get(y).cloned() else {
                continue;
            };
            let Some(out) = model
                .nodes
                .get(ai)
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
            if let Some(r) = remove.get_mut(ai) {
                *r = true;
            }
            fused += 1;
        }
        if fused > 0 {
            model.opsets.insert("opreg".into(), 1);
        }
        super::remove_nodes(model, &remove);
        Ok(fused)
    }
}

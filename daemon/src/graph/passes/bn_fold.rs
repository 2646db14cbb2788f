//! Conv + BatchNormalization folding: a `BatchNormalization` (inference) whose input is a
//! `Conv` read by nothing else becomes part of the Conv's weights and bias:
//! `W'[m] = W[m] * s[m]`, `B'[m] = (B[m] - mean[m]) * s[m] + beta[m]` with
//! `s = scale / sqrt(var + epsilon)`, computed in f64. Only f32 constants are folded.

use super::{super::import::Model, reads, Pass};
use crate::graph::GraphError;
use opreg_sdk::{host::HostTensor, AttrValue, DType};
use std::{collections::HashMap, sync::Arc};

pub struct ConvBatchNorm;

fn f32s(t: &HostTensor) -> Option<Vec<f32>> {
    (t.dtype() == DType::F32 && t.on_host())
        .then(|| t.to_vec::<f32>().ok())
        .flatten()
}

fn float_attr(n: &crate::graph::import::Node, name: &str, default: f32) -> Option<f32> {
    match n
        .attributes
        .iter()
        .find(|a| a.name == name)
        .map(|a| &a.value)
    {
        None => Some(default),
        Some(AttrValue::Float(v)) => Some(*v),
        Some(_) => None,
    }
}

impl Pass for ConvBatchNorm {
    fn name(&self) -> &'static str {
        "conv-batchnorm"
    }

    fn run(&self, model: &mut Model) -> Result<usize, GraphError> {
        let read = reads(model)?;
        let graph_outputs: Vec<String> = model.outputs.iter().map(|o| o.name.clone()).collect();
        let conv_of: HashMap<String, usize> = model
            .nodes
            .iter()
            .enumerate()
            .filter(|(_, n)| n.domain.is_empty() && n.op_type == "Conv")
            .filter_map(|(i, n)| Some((n.outputs.first()?.clone(), i)))
            .collect();
        let mut folded = Vec::new();
        for (bi, bn) in model.nodes.iter().enumerate() {
            if !bn.domain.is_empty() || bn.op_type != "BatchNormalization" {
                continue;
            }
            let Some(fold) = self.plan(model, bn, &conv_of, &read, &graph_outputs) else {
                continue;
            };
            folded.push((bi, fold));
        }
        let count = folded.len();
        let mut remove = vec![false; model.nodes.len()];
        for (bi, (ci, w, b)) in folded {
            let (Some(bn), Some(conv)) = (model.nodes.get(bi), model.nodes.get(ci)) else {
                continue;
            };
            let (Some(out), Some(weight)) = (bn.outputs.first(), conv.inputs.get(1)) else {
                continue;
            };
            let (out, weight) = (out.clone(), weight.clone());
            let w_name = model.fresh_name(&format!("{weight}_bnfold"));
            model.initializers.insert(w_name.clone(), Arc::new(w));
            let b_name = model.fresh_name(&format!("{weight}_bias_bnfold"));
            model.initializers.insert(b_name.clone(), Arc::new(b));
            if let Some(conv) = model.nodes.get_mut(ci) {
                conv.inputs.resize(3, String::new());
                conv.inputs.splice(1..3, [w_name, b_name]);
                conv.outputs.truncate(1);
                conv.outputs.splice(0..1, [out]);
            }
            if let Some(r) = remove.get_mut(bi) {
                *r = true;
            }
        }
        super::remove_nodes(model, &remove);
        Ok(count)
    }
}

impl ConvBatchNorm {
    /// The Conv to fold `bn` into and its new weights and bias, when it can be folded.
    fn plan(
        &self,
        model: &Model,
        bn: &crate::graph::import::Node,
        conv_of: &HashMap<String, usize>,
        read: &HashMap<String, usize>,
        graph_outputs: &[String],
    ) -> Option<(usize, HostTensor, HostTensor)> {
        // Inference form only: one output, no training mode.
        if bn.outputs.first().is_none_or(|o| o.is_empty())
            || bn.outputs.iter().skip(1).any(|o| !o.is_empty())
            || bn
                .attributes
                .iter()
                .any(|a| a.name == "training_mode" && a.value != AttrValue::Int(0))
        {
            return None;
        }
        let x = bn.inputs.first()?;
        let &ci = conv_of.get(x)?;
        // The Conv's output must feed only this BatchNormalization.
        if read.get(x).copied() != Some(1) || graph_outputs.contains(x) {
            return None;
        }
        let conv = model.nodes.get(ci)?;
        let constant = |i: usize, list: &[String]| -> Option<Vec<f32>> {
            f32s(model.initializers.get(list.get(i)?)?)
        };
        let (scale, beta, mean, var) = (
            constant(1, &bn.inputs)?,
            constant(2, &bn.inputs)?,
            constant(3, &bn.inputs)?,
            constant(4, &bn.inputs)?,
        );
        let eps = float_attr(bn, "epsilon", 1e-5)? as f64;
        let w_t = model.initializers.get(conv.inputs.get(1)?)?;
        // Read in place: the weights are the bulk of a CNN's bytes.
        let w_view = (w_t.dtype() == DType::F32 && w_t.on_host()).then(|| w_t.view())?;
        let w = w_view.as_slice::<f32>().ok()?;
        let m = *w_t.shape().first()?;
        if [&scale, &beta, &mean, &var].iter().any(|v| v.len() != m) || m == 0 {
            return None;
        }
        let bias = match conv.inputs.get(2).filter(|b| !b.is_empty()) {
            Some(b) => f32s(model.initializers.get(b)?)?,
            None => vec![0.0; m],
        };
        // A zero-size weight (`[M, 0, ...]`) has nothing to fold.
        if bias.len() != m || w.is_empty() || w.len() % m != 0 {
            return None;
        }
        let per = w.len() / m;
        let s: Vec<f64> = scale
            .iter()
            .zip(&var)
            .map(|(&sc, &v)| sc as f64 / (v as f64 + eps).sqrt())
            .collect();
        // Written straight into the new tensor, row by row (one pass, no intermediate copy).
        let mut w2 = HostTensor::zeroed(DType::F32, w_t.shape()).ok()?;
        for ((dst, row), &sc) in w2
            .bytes_mut()
            .chunks_exact_mut(per * 4)
            .zip(w.chunks_exact(per))
            .zip(&s)
        {
            for (d, &v) in dst.chunks_exact_mut(4).zip(row) {
                d.copy_from_slice(&((v as f64 * sc) as f32).to_le_bytes());
            }
        }
        let b2: Vec<f32> = bias
            .iter()
            .zip(&mean)
            .zip(&beta)
            .zip(&s)
            .map(|(((&b, &mu), &be), &sc)| ((b as f64 - mu as f64) * sc + be as f64) as f32)
            .collect();
        Some((ci, w2, HostTensor::from_vec(&[m], &b2).ok()?))
    }
}

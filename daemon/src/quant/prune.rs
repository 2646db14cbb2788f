//! Pruning directives applied to the prepared float model, before quantization.
//!
//! - `PRUNE` (a mask, e.g. 2:4 along input channels): the masked weights are zeroed. The CPU
//!   gemm has no sparse kernel, so this saves nothing at run time yet; the report says so.
//! - `KEEP_INDICES` (structured: a Conv's output filters, a MatMul's columns): the other slices
//!   are **removed** when the graph's structure allows — the pruned layer's output feeds, through
//!   channel-wise operators only (activations, pooling, a per-channel bias `Add`), layers that
//!   read it as their input — so the layer and its readers get smaller (fewer output channels
//!   here, fewer input channels there). Anywhere else (a graph output, `Flatten`, `Concat`, a
//!   residual `Add`) they are zeroed instead, which keeps the shapes.

// Model and request data reach this module: no unchecked index or slice.
#![deny(clippy::indexing_slicing)]

use super::{reconstruct::Grams, QuantError};
use crate::graph::{Model, Node};
use opreg_sdk::{host::HostTensor, AttrValue, DType, Directive, DirectiveKind, GraphPlan};
use std::{
    collections::{HashMap, HashSet},
    sync::Arc,
};

/// What pruning did to one weight, for the report.
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
pub struct Layer {
    pub weight: String,
    /// `mask` or `structured`.
    pub method: String,
    /// Fraction of the weight's elements pruned.
    pub sparsity: f64,
    /// `removed` (the layer shrank), `zeroed` (structure kept) or `masked`.
    pub effect: String,
    /// Slices kept of those along the pruned axis (structured).
    pub kept: Option<(usize, usize)>,
}

/// The pruned model and what changed.
pub struct Pruned {
    pub model: Model,
    pub layers: Vec<Layer>,
    /// Weight -> (axis, kept indices), for remapping per-channel quantization scales.
    pub kept: HashMap<String, (usize, Vec<usize>)>,
    /// Weights re-fitted after masking (their values, so their ranges, changed).
    pub reconstructed: HashSet<String>,
}

/// Channel-wise operators a pruned channel passes through unchanged in position.
const CHANNELWISE: &[&str] = &[
    "Relu",
    "LeakyRelu",
    "Sigmoid",
    "Tanh",
    "HardSigmoid",
    "HardSwish",
    "Identity",
    "MaxPool",
    "AveragePool",
    "GlobalAveragePool",
    "GlobalMaxPool",
];

/// One initializer input to slice: node, input position, axis.
type Slice = (usize, usize, usize);

/// Applies the plan's pruning directives to `model`.
pub fn apply(
    model: &Model,
    plan: &GraphPlan,
    strategy: &str,
    grams: &Grams<'_>,
) -> Result<Pruned, QuantError> {
    let bad = |reason: String| QuantError::BadPlan {
        strategy: strategy.into(),
        reason,
    };
    let mut m = model.clone();
    let mut layers = Vec::new();
    let mut kept_map = HashMap::new();
    let mut reconstructed = HashSet::new();
    for tp in plan.tensors.iter() {
        let name = tp.name.as_str();
        let d = &tp.directive;
        if d.kind != DirectiveKind::PRUNE && d.kind != DirectiveKind::KEEP_INDICES {
            continue;
        }
        let w = m
            .initializers
            .get(name)
            .filter(|t| t.dtype() == DType::F32 && t.on_host())
            .cloned()
            .ok_or_else(|| bad(format!("'{name}': only f32 weights are pruned")))?;
        let values = w.to_vec::<f32>().map_err(|e| bad(e.to_string()))?;
        if d.kind == DirectiveKind::PRUNE {
            if d.mask.len() != values.len() {
                return Err(bad(format!(
                    "'{name}': a mask of {} for {} weights",
                    d.mask.len(),
                    values.len()
                )));
            }
            let mut pruned: Vec<f32> = values
                .iter()
                .zip(d.mask.iter())
                .map(|(&v, &k)| if k == 0 { 0.0 } else { v })
                .collect();
            let mut effect = "masked".to_string();
            if d.flags & Directive::RECONSTRUCT != 0 {
                match grams.get(name) {
                    Some((rows, gram)) => {
                        let mut refitted = values.clone();
                        let fit = super::reconstruct::refit(
                            &mut refitted,
                            w.shape(),
                            &d.mask,
                            rows,
                            gram,
                        )?;
                        // Only when it helps (it always should; a degenerate Gram matrix
                        // might not).
                        if fit.refit_error < fit.masked_error {
                            pruned = refitted;
                            reconstructed.insert(name.to_string());
                            effect = format!(
                                "masked, reconstructed: output error on the calibration inputs {:.3e} -> {:.3e}",
                                fit.masked_error, fit.refit_error
                            );
                        }
                    }
                    None => {
                        effect = "masked (not reconstructed: its input was not observed)".into()
                    }
                }
            }
            let zeros = d.mask.iter().filter(|&&k| k == 0).count();
            replace(&mut m, name, HostTensor::from_vec(w.shape(), &pruned))?;
            layers.push(Layer {
                weight: name.into(),
                method: "mask".into(),
                sparsity: zeros as f64 / values.len().max(1) as f64,
                effect,
                kept: None,
            });
            continue;
        }
        // Structured.
        let shape = w.shape().to_vec();
        let axis = usize::try_from(d.axis)
            .ok()
            .filter(|&a| a < shape.len())
            .ok_or_else(|| {
                bad(format!(
                    "'{name}': axis {} outside rank {}",
                    d.axis,
                    shape.len()
                ))
            })?;
        let total = shape.get(axis).copied().unwrap_or(0);
        let kept: Vec<usize> = d
            .indices
            .iter()
            .map(|&i| usize::try_from(i).ok().filter(|&i| i < total))
            .collect::<Option<_>>()
            .ok_or_else(|| bad(format!("'{name}': an index outside 0..{total}")))?;
        if kept.is_empty() || kept.windows(2).any(|p| p.first() >= p.get(1)) {
            return Err(bad(format!(
                "'{name}': kept indices must be non-empty and ascending"
            )));
        }
        let producer = m
            .nodes
            .iter()
            .position(|n| n.inputs.get(1).is_some_and(|i| i == name) && is_product(n))
            .ok_or_else(|| bad(format!("'{name}': not the weight of a Conv or MatMul")))?;
        let (conv, bias, y) = match m.nodes.get(producer) {
            Some(n) => (
                n.op_type == "Conv",
                n.inputs.get(2).filter(|b| !b.is_empty()).cloned(),
                n.outputs.first().cloned(),
            ),
            None => (false, None, None),
        };
        let out_axis = if conv {
            0
        } else {
            shape.len().saturating_sub(1)
        };
        let mut slices: Vec<Slice> = vec![(producer, 1, axis)];
        let structural = axis == out_axis
            && readers(&m, name) == 1
            && bias.as_ref().is_none_or(|b| m.initializers.contains_key(b))
            && y.is_some_and(|y| {
                if bias.is_some() {
                    slices.push((producer, 2, 0));
                }
                let channel_axis = if conv { 1 } else { usize::MAX };
                walk(
                    &m,
                    &y,
                    channel_axis,
                    total,
                    &mut slices,
                    &mut HashSet::new(),
                )
            });
        let sparsity = 1.0 - kept.len() as f64 / total.max(1) as f64;
        if structural {
            for &(node, input, ax) in &slices {
                let Some(t_name) = m.nodes.get(node).and_then(|n| n.inputs.get(input)).cloned()
                else {
                    continue;
                };
                let Some(t) = m.initializers.get(&t_name).cloned() else {
                    continue;
                };
                let sliced = slice(&t, ax, &kept).map_err(|e| bad(format!("'{t_name}': {e}")))?;
                if readers(&m, &t_name) == 1 {
                    m.initializers.insert(t_name.clone(), Arc::new(sliced));
                    if node != producer || input != 1 {
                        kept_map.insert(t_name, (ax, kept.clone()));
                    }
                } else {
                    let fresh = format!("{t_name}_pruned_{node}");
                    m.initializers.insert(fresh.clone(), Arc::new(sliced));
                    if let Some(slot) = m.nodes.get_mut(node).and_then(|n| n.inputs.get_mut(input))
                    {
                        *slot = fresh;
                    }
                }
            }
            layers.push(Layer {
                weight: name.into(),
                method: "structured".into(),
                sparsity,
                effect: "removed".into(),
                kept: Some((kept.len(), total)),
            });
        } else {
            let zeroed = zero_slices(&values, &shape, axis, &kept);
            replace(&mut m, name, HostTensor::from_vec(&shape, &zeroed))?;
            layers.push(Layer {
                weight: name.into(),
                method: "structured".into(),
                sparsity,
                effect: "zeroed".into(),
                kept: Some((kept.len(), total)),
            });
        }
        kept_map.insert(name.to_string(), (axis, kept));
    }
    Ok(Pruned {
        model: m,
        layers,
        kept: kept_map,
        reconstructed,
    })
}

fn is_product(n: &Node) -> bool {
    n.domain.is_empty() && matches!(n.op_type.as_str(), "Conv" | "MatMul")
}

fn readers(m: &Model, name: &str) -> usize {
    m.nodes
        .iter()
        .flat_map(|n| &n.inputs)
        .filter(|i| *i == name)
        .count()
}

fn replace(
    m: &mut Model,
    name: &str,
    t: Result<HostTensor, opreg_sdk::PluginError>,
) -> Result<(), QuantError> {
    let t = t.map_err(|e| QuantError::Data(format!("'{name}': {e}")))?;
    m.initializers.insert(name.to_string(), Arc::new(t));
    Ok(())
}

/// Follows `value` (whose channels run along `channel_axis`; `usize::MAX`: the last axis)
/// through channel-wise operators to the layers that read it, recording what to slice.
/// False when some path cannot be shrunk.
fn walk(
    m: &Model,
    value: &str,
    channel_axis: usize,
    channels: usize,
    slices: &mut Vec<Slice>,
    seen: &mut HashSet<String>,
) -> bool {
    if !seen.insert(value.to_string()) {
        return true;
    }
    if m.outputs.iter().any(|o| o.name == value) {
        return false;
    }
    let mut any = false;
    for (i, n) in m.nodes.iter().enumerate() {
        let Some(pos) = n.inputs.iter().position(|x| x == value) else {
            continue;
        };
        any = true;
        let op = n.op_type.as_str();
        let ok = if !n.domain.is_empty() {
            false
        } else if CHANNELWISE.contains(&op) && pos == 0 {
            n.outputs
                .first()
                .is_some_and(|y| walk(m, y, channel_axis, channels, slices, seen))
        } else if op == "Add" {
            // A per-channel bias: a constant of `channels` values along the channel axis.
            let other = 1 - pos.min(1);
            let bias_ok = n
                .inputs
                .get(other)
                .and_then(|b| m.initializers.get(b))
                .is_some_and(|t| {
                    let s = t.shape();
                    let trailing_ones = if channel_axis == usize::MAX {
                        0
                    } else {
                        s.len().saturating_sub(1)
                    };
                    s.first() == Some(&channels)
                        && s.iter().skip(1).all(|&d| d == 1)
                        && s.len() == 1 + trailing_ones
                });
            bias_ok && {
                slices.push((i, other, 0));
                n.outputs
                    .first()
                    .is_some_and(|y| walk(m, y, channel_axis, channels, slices, seen))
            }
        } else if op == "Conv" && pos == 0 && channel_axis == 1 {
            let group = n
                .attributes
                .iter()
                .find(|a| a.name == "group")
                .map(|a| &a.value);
            let ungrouped = matches!(group, None | Some(AttrValue::Int(1)));
            let weight = n.inputs.get(1).and_then(|w| m.initializers.get(w));
            ungrouped && weight.is_some_and(|w| w.shape().get(1) == Some(&channels)) && {
                slices.push((i, 1, 1));
                true
            }
        } else if op == "MatMul" && pos == 0 && channel_axis == usize::MAX {
            let weight = n.inputs.get(1).and_then(|w| m.initializers.get(w));
            weight.is_some_and(|w| w.shape().len() == 2 && w.shape().first() == Some(&channels))
                && {
                    slices.push((i, 1, 0));
                    true
                }
        } else {
            false
        };
        if !ok {
            return false;
        }
    }
    any
}

/// The extents before, along and after `axis` of `shape`.
fn split(shape: &[usize], axis: usize) -> Option<(usize, usize, usize)> {
    let dim = *shape.get(axis)?;
    let outer = shape.get(..axis)?.iter().product();
    let inner = shape.get(axis + 1..)?.iter().product();
    Some((outer, dim, inner))
}

/// `t` with only the slices `kept` along `axis`.
fn slice(t: &HostTensor, axis: usize, kept: &[usize]) -> Result<HostTensor, String> {
    let v = t.to_vec::<f32>().map_err(|e| e.to_string())?;
    let shape = t.shape();
    let (outer, dim, inner) = split(shape, axis).ok_or("axis outside the rank")?;
    let mut out = Vec::new();
    out.try_reserve_exact(outer * kept.len() * inner)
        .map_err(|e| e.to_string())?;
    for o in 0..outer {
        for &k in kept {
            let start = (o * dim + k) * inner;
            out.extend_from_slice(v.get(start..start + inner).ok_or("slice out of range")?);
        }
    }
    let mut new_shape = shape.to_vec();
    if let Some(d) = new_shape.get_mut(axis) {
        *d = kept.len();
    }
    HostTensor::from_vec(&new_shape, &out).map_err(|e| e.to_string())
}

fn zero_slices(v: &[f32], shape: &[usize], axis: usize, kept: &[usize]) -> Vec<f32> {
    let (_, dim, inner) = split(shape, axis).unwrap_or((1, 1, 1));
    let keep: HashSet<usize> = kept.iter().copied().collect();
    v.iter()
        .enumerate()
        .map(|(i, &x)| {
            if keep.contains(&((i / inner.max(1)) % dim.max(1))) {
                x
            } else {
                0.0
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    #![allow(clippy::indexing_slicing)]
    use super::*;
    use crate::graph::IoSpec;
    use opreg_sdk::{quant::TensorPlan, Directive};

    fn node(op: &str, inputs: &[&str], outputs: &[&str]) -> Node {
        Node {
            name: format!("{op}_{}", outputs[0]),
            domain: String::new(),
            op_type: op.into(),
            inputs: inputs.iter().map(|s| s.to_string()).collect(),
            outputs: outputs.iter().map(|s| s.to_string()).collect(),
            attributes: Vec::new(),
            subgraphs: Vec::new(),
        }
    }

    fn t(shape: &[usize]) -> Arc<HostTensor> {
        let n: usize = shape.iter().product();
        let v: Vec<f32> = (0..n).map(|i| i as f32 + 1.0).collect();
        Arc::new(HostTensor::from_vec(shape, &v).unwrap())
    }

    fn model(last: &str) -> Model {
        let io = |n: &str| IoSpec {
            name: n.into(),
            dtype: DType::F32,
            shape: None,
        };
        Model {
            opsets: [(String::new(), 13)].into(),
            inputs: vec![io("x")],
            outputs: vec![io(if last == "Conv" { "z" } else { "r" })],
            initializers: [
                ("w1".to_string(), t(&[4, 2, 1, 1])),
                ("b1".to_string(), t(&[4])),
                ("w2".to_string(), t(&[3, 4, 1, 1])),
            ]
            .into(),
            nodes: vec![
                node("Conv", &["x", "w1", "b1"], &["c"]),
                node("Relu", &["c"], &["r"]),
                node("Conv", &["r", "w2"], &["z"]),
            ]
            .into_iter()
            .take(if last == "Conv" { 3 } else { 2 })
            .collect(),
        }
    }

    fn keep(name: &str, idx: &[i64]) -> GraphPlan {
        GraphPlan {
            tensors: vec![TensorPlan {
                name: name.into(),
                directive: Directive::keep_indices(0, idx.to_vec()),
            }]
            .into(),
            ..Default::default()
        }
    }

    #[test]
    fn filters_feeding_a_conv_through_relu_are_removed_from_both_layers() {
        let p = apply(&model("Conv"), &keep("w1", &[1, 3]), "s", &Grams::new()).unwrap();
        assert_eq!(p.layers[0].effect, "removed");
        assert_eq!(p.model.initializers["w1"].shape(), &[2, 2, 1, 1]);
        assert_eq!(
            p.model.initializers["w1"].to_vec::<f32>().unwrap(),
            vec![3., 4., 7., 8.]
        );
        assert_eq!(
            p.model.initializers["b1"].to_vec::<f32>().unwrap(),
            vec![2., 4.]
        );
        // The next layer reads two input channels now: 1 and 3 of each filter.
        let w2 = &p.model.initializers["w2"];
        assert_eq!(w2.shape(), &[3, 2, 1, 1]);
        assert_eq!(w2.to_vec::<f32>().unwrap()[..2], [2., 4.]);
    }

    #[test]
    fn filters_feeding_a_graph_output_are_zeroed_in_place() {
        let p = apply(&model("Relu"), &keep("w1", &[0]), "s", &Grams::new()).unwrap();
        assert_eq!(p.layers[0].effect, "zeroed");
        let w1 = p.model.initializers["w1"].to_vec::<f32>().unwrap();
        assert_eq!(w1, vec![1., 2., 0., 0., 0., 0., 0., 0.]);
        assert!(apply(&model("Relu"), &keep("w1", &[2, 1]), "s", &Grams::new()).is_err());
        assert!(apply(&model("Relu"), &keep("w1", &[9]), "s", &Grams::new()).is_err());
    }
}

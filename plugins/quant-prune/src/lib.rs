//! `quant-prune`: structured pruning, then static int8.
//!
//! Two structures (option `method`):
//! - `n:m` (default, `pattern=2:4`): in every group of `m` consecutive input channels of a
//!   weight (per output channel and kernel position), the `n` largest magnitudes are kept and
//!   the rest zeroed. The layer keeps its shape: the CPU gemm has no sparse kernel to skip the
//!   zeros yet (sparse tensor cores would), so this is for size and for hardware that has one.
//! - `filters` (`sparsity=0.5`, `norm=l1|l2`, `group=1`): a Conv's output filters (a MatMul's
//!   columns) ranked by norm, the weakest removed to the target sparsity, kept in multiples of
//!   `group`. The host **removes** them where the graph allows — the layer and the layers that
//!   read it shrink, so the gemms are smaller — and zeroes them elsewhere.
//!
//! With N:M, the host re-fits the weights each mask keeps to the layer's calibration inputs
//! (`reconstruct=true`, the default; optimal-brain-surgeon updates through the input's Gram
//! matrix, which this strategy asks the host to observe), so the pruned layer's output stays
//! close to the original without fine-tuning.
//!
//! The last layer (the classifier or regressor head) is not pruned unless `prune_last=true`:
//! its outputs are the model's. Layers too narrow for the pattern are left whole. Then the
//! static int8 plan of `quant-core` (its options apply: `calibrator`, ...); `quantize=false`
//! prunes only. The sparsity of every weight is in the report.

use opreg_quant_core::Static;
use opreg_sdk::{
    quant::{Annotation, KeyValue, TensorPlan},
    DType, Directive, Evaluator, GraphPlan, GraphView, Observation, Observer, ObserverOutput,
    PluginError, QuantRequest, Quantizer, QuantizerDesc, Registrar, TensorObservation,
};

#[derive(Clone, Copy, Debug, PartialEq)]
enum Method {
    NofM {
        n: usize,
        m: usize,
    },
    Filters {
        sparsity: f64,
        l2: bool,
        group: usize,
    },
}

#[derive(Debug)]
struct Options {
    method: Method,
    prune_last: bool,
    quantize: bool,
    /// N:M masks: the host re-fits the kept weights to the calibration inputs.
    reconstruct: bool,
    rest: Vec<KeyValue>,
}

fn invalid(m: String) -> PluginError {
    PluginError::invalid(m)
}

fn parse(options: &[KeyValue]) -> Result<Options, PluginError> {
    let mut method = "n:m".to_string();
    let (mut n, mut m) = (2usize, 4usize);
    let (mut sparsity, mut l2, mut group) = (0.5f64, false, 1usize);
    let mut o = Options {
        method: Method::NofM { n, m },
        prune_last: false,
        quantize: true,
        reconstruct: true,
        rest: Vec::new(),
    };
    let boolean = opreg_quant_core::parse_bool;
    for kv in options {
        let (k, v) = (kv.key.as_str(), kv.value.as_str());
        match k {
            "method" => method = v.to_ascii_lowercase(),
            "pattern" => {
                let parsed = v
                    .split_once(':')
                    .and_then(|(a, b)| Some((a.parse().ok()?, b.parse().ok()?)))
                    .filter(|&(a, b): &(usize, usize)| a >= 1 && a < b && b <= 64);
                (n, m) = parsed.ok_or_else(|| {
                    invalid(format!(
                        "option pattern={v}: expected N:M with 1 <= N < M <= 64"
                    ))
                })?;
            }
            "sparsity" => {
                sparsity = v
                    .parse()
                    .ok()
                    .filter(|s: &f64| (0.0..1.0).contains(s))
                    .ok_or_else(|| invalid(format!("option sparsity={v}: expected [0, 1)")))?
            }
            "norm" => {
                l2 = match v {
                    "l1" | "L1" => false,
                    "l2" | "L2" => true,
                    _ => return Err(invalid(format!("option norm={v}: expected l1 or l2"))),
                }
            }
            "group" => {
                group = v
                    .parse()
                    .ok()
                    .filter(|g| *g >= 1)
                    .ok_or_else(|| invalid(format!("option group={v}: expected >= 1")))?
            }
            "prune_last" => o.prune_last = boolean(k, v)?,
            "quantize" => o.quantize = boolean(k, v)?,
            "reconstruct" => o.reconstruct = boolean(k, v)?,
            _ => o.rest.push(kv.clone()),
        }
    }
    o.method = match method.as_str() {
        "n:m" | "nm" => Method::NofM { n, m },
        "filters" | "channels" => Method::Filters {
            sparsity,
            l2,
            group,
        },
        other => {
            return Err(invalid(format!(
                "option method={other}: expected n:m or filters"
            )))
        }
    };
    opreg_quant_core::Options::from_kv(&o.rest)?;
    Ok(o)
}

/// The N:M mask of a weight whose input channels run along axis 1 (Conv, `[O, I, ...]`) or
/// axis 0 (MatMul, `[K, N]`): per output position, groups of `m` along the input channels.
/// `None` when the layer has fewer input channels than `m`.
pub fn n_of_m_mask(w: &[f32], shape: &[usize], conv: bool, n: usize, m: usize) -> Option<Vec<u8>> {
    let (outer, channels, inner) = if conv {
        let o = *shape.first()?;
        let i = *shape.get(1)?;
        (o, i, shape.get(2..)?.iter().product::<usize>())
    } else {
        (1, *shape.first()?, *shape.get(1)?)
    };
    if channels < m || w.len() != outer * channels * inner {
        return None;
    }
    let mut mask = vec![1u8; w.len()];
    let at = |o: usize, c: usize, k: usize| (o * channels + c) * inner + k;
    for o in 0..outer {
        for k in 0..inner {
            for start in (0..channels - channels % m).step_by(m) {
                let mut idx: Vec<usize> = (start..start + m).map(|c| at(o, c, k)).collect();
                idx.sort_by(|&a, &b| w[b].abs().total_cmp(&w[a].abs()));
                for &i in &idx[n..] {
                    mask[i] = 0;
                }
            }
        }
    }
    Some(mask)
}

/// The filters (slices along `axis`) to keep: the strongest by L1 or L2 norm, a multiple of
/// `group` (at least one group), ascending.
pub fn strongest(
    w: &[f32],
    shape: &[usize],
    axis: usize,
    sparsity: f64,
    l2: bool,
    group: usize,
) -> Vec<i64> {
    let Some(&dim) = shape.get(axis) else {
        return Vec::new();
    };
    let inner: usize = shape.iter().skip(axis + 1).product();
    let mut norms = vec![0f64; dim];
    for (i, &v) in w.iter().enumerate() {
        let c = (i / inner.max(1)) % dim.max(1);
        let v = f64::from(v);
        norms[c] += if l2 { v * v } else { v.abs() };
    }
    let keep = ((dim as f64 * (1.0 - sparsity)).ceil() as usize)
        .div_ceil(group)
        .max(1)
        * group;
    let keep = keep.min(dim);
    let mut order: Vec<usize> = (0..dim).collect();
    order.sort_by(|&a, &b| norms[b].total_cmp(&norms[a]).then(a.cmp(&b)));
    let mut kept: Vec<i64> = order[..keep].iter().map(|&c| c as i64).collect();
    kept.sort_unstable();
    kept
}

/// The products this strategy prunes: each with its f32 weight, in graph order, the last one
/// left out unless `prune_last`.
fn targets<'g>(graph: &'g GraphView<'g>, o: &Options) -> Vec<(&'g opreg_sdk::NodeView, String)> {
    let products: Vec<_> = graph
        .nodes
        .iter()
        .filter(|n| n.domain.is_empty() && matches!(n.op_type.as_str(), "Conv" | "MatMul"))
        .filter(|n| n.inputs.get(1).is_some_and(|w| graph.is_weight(w)))
        .collect();
    let last = if o.prune_last {
        products.len()
    } else {
        products.len().saturating_sub(1)
    };
    let mut out: Vec<(&opreg_sdk::NodeView, String)> = Vec::new();
    for n in products.into_iter().take(last) {
        let Some(w) = n.inputs.get(1) else { continue };
        let ok = graph
            .weight(w)
            .is_some_and(|v| v.dtype == DType::F32 && (n.op_type == "Conv" || v.rank() == 2));
        if ok && !out.iter().any(|(_, x)| x == w.as_str()) {
            out.push((n, w.to_string()));
        }
    }
    out
}

/// Structured pruning, then static int8.
pub struct Prune;

impl Quantizer for Prune {
    fn observe(
        &self,
        graph: &GraphView<'_>,
        options: &[KeyValue],
    ) -> Result<Vec<TensorObservation>, PluginError> {
        let o = parse(options)?;
        let mut observe = if o.quantize {
            Static.observe(graph, &o.rest)?
        } else {
            Vec::new()
        };
        // The input Gram matrix of each layer a mask will prune, for the host's refit.
        if o.reconstruct && matches!(o.method, Method::NofM { .. }) {
            observe.extend(
                targets(graph, &o)
                    .into_iter()
                    .map(|(_, w)| TensorObservation::new(w, Observation::GRAM)),
            );
        }
        Ok(observe)
    }

    fn observer(
        &self,
        tensor: &str,
        observation: &Observation,
        options: &[KeyValue],
    ) -> Result<Box<dyn Observer>, PluginError> {
        Static.observer(tensor, observation, &parse(options)?.rest)
    }

    fn plan_observed(
        &self,
        graph: &GraphView<'_>,
        request: &QuantRequest,
        observed: &[ObserverOutput],
        evaluator: &Evaluator<'_>,
    ) -> Result<GraphPlan, PluginError> {
        let o = parse(&request.options)?;
        let mut plan = if o.quantize {
            Static.plan_with(graph, request, &o.rest, observed, evaluator)?
        } else {
            GraphPlan::default()
        };
        let total = graph
            .nodes
            .iter()
            .filter(|n| n.domain.is_empty() && matches!(n.op_type.as_str(), "Conv" | "MatMul"))
            .filter(|n| n.inputs.get(1).is_some_and(|w| graph.is_weight(w)))
            .count();
        let mut pruning = Vec::new();
        let mut annotations = plan.annotations.to_vec();
        for (n, w) in targets(graph, &o) {
            let w = &w;
            let Some(view) = graph.weight(w) else {
                continue;
            };
            let data = view.as_slice::<f32>()?;
            let shape = view.shape();
            let conv = n.op_type == "Conv";
            let (directive, sparsity) = match o.method {
                Method::NofM { n: keep, m } => {
                    let Some(mask) = n_of_m_mask(data, shape, conv, keep, m) else {
                        continue;
                    };
                    let zeros = mask.iter().filter(|&&k| k == 0).count();
                    let s = zeros as f64 / mask.len().max(1) as f64;
                    let mut d = Directive::prune(mask);
                    if o.reconstruct {
                        d.flags |= Directive::RECONSTRUCT;
                    }
                    (d, s)
                }
                Method::Filters {
                    sparsity,
                    l2,
                    group,
                } => {
                    let axis = if conv { 0 } else { 1 };
                    let kept = strongest(data, shape, axis, sparsity, l2, group);
                    let s = 1.0 - kept.len() as f64 / shape[axis].max(1) as f64;
                    (Directive::keep_indices(axis as i32, kept), s)
                }
            };
            annotations.push(Annotation::new(w, "sparsity", s_round(sparsity)));
            pruning.push(TensorPlan {
                name: w.as_str().into(),
                directive,
            });
        }
        let count = pruning.len();
        pruning.extend(plan.tensors.iter().cloned());
        plan.tensors = pruning.into();
        plan.annotations = annotations.into();
        plan.notes = format!(
            "prune: {:?} on {count} of {} layers{}; {}",
            o.method,
            total,
            if o.prune_last { "" } else { " (not the last)" },
            if o.quantize {
                plan.notes.as_str()
            } else {
                "no quantization"
            }
        )
        .into();
        Ok(plan)
    }
}

fn s_round(s: f64) -> f64 {
    (s * 1e6).round() / 1e6
}

fn register(r: &mut Registrar) {
    r.quantizer(
        QuantizerDesc {
            name: "quant-prune".into(),
            description: "structured pruning (2:4 along input channels, or filters by L1/L2 norm, removed where the graph allows) then static int8".into(),
        },
        Prune,
    );
}

opreg_sdk::export_plugin! {
    name: "quant-prune",
    version: env!("CARGO_PKG_VERSION"),
    description: "grouped / structured pruning + int8",
    register: register,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn two_of_four_keeps_the_two_largest_of_every_group_of_input_channels() {
        // A MatMul weight [K=4, N=2]: column 0 is 1, -4, 3, 2 -> keeps -4 and 3.
        let w = [1.0, 9.0, -4.0, 8.0, 3.0, 7.0, 2.0, 6.0];
        let mask = n_of_m_mask(&w, &[4, 2], false, 2, 4).unwrap();
        assert_eq!(mask, vec![0, 1, 1, 1, 1, 0, 0, 0]);
        // Fewer input channels than the group: left whole.
        assert!(n_of_m_mask(&[1.0; 6], &[3, 2], false, 2, 4).is_none());
    }

    #[test]
    fn the_weakest_filters_go_in_whole_groups() {
        // Four filters of two weights with L1 norms 3, 1, 7, 5.
        let w = [1.0, 2.0, 0.5, -0.5, 3.0, 4.0, -2.0, 3.0];
        assert_eq!(strongest(&w, &[4, 2], 0, 0.5, false, 1), vec![2, 3]);
        assert_eq!(strongest(&w, &[4, 2], 0, 0.6, false, 1), vec![2, 3]);
        // 75 % sparsity leaves one filter, rounded up to a group of two.
        assert_eq!(strongest(&w, &[4, 2], 0, 0.75, false, 2), vec![2, 3]);
        assert!(parse(&[KeyValue {
            key: "pattern".into(),
            value: "4:2".into()
        }])
        .is_err());
    }
}

//! The error-budget mode: int8, f16 or f32 per layer, so that the model meets an output SQNR
//! target at the lowest **measured** latency.
//!
//! 1. The uniform plans are evaluated and timed on the host (all int8 from the static plan,
//!    all f16, all f32): their latencies relative to f32 are the cost of a multiply-add in
//!    each precision on this machine and runtime, measured rather than assumed (an f16
//!    product on a CPU without native f16 arithmetic costs more than f32, and int8's gain
//!    depends on the kernels present).
//! 2. Each layer's noise in each lowered precision is measured alone (the output SQNR
//!    against the float model when only that layer is lowered), largest layers first, within
//!    `max_evaluations`; a layer left unmeasured stays in f32.
//! 3. A greedy choice, starting from every layer in its cheapest precision, raises the layer
//!    whose next step buys the most noise per unit of added cost until the summed noise fits
//!    the budget (independent errors add in power: the usual first-order model), then takes
//!    the moves that make the whole cheaper within the budget. The result is evaluated; while
//!    the measured SQNR misses the target, the next step is taken.
//! 4. Converting a value between neighbouring layers of different precision costs time the
//!    per-layer model does not see (quantize or dequantize, and the channels-last transposes
//!    of the integer convolutions): on MobileNetV2 a mix of 20 int8 and 33 f32 layers measured
//!    1.4x the all-f32 time. What the first mix's measured latency exceeds its modelled one
//!    by is priced per converted element, and a second mix is searched with that price.
//! 5. The candidates that meet the target (the mixes, and each uniform plan) are compared by
//!    their measured latency; the fastest is the plan. The notes list every candidate.
//!
//! Needs a host with ABI 1.3 (latency measurement); an older host's error names it.

use crate::Static;
use opreg_sdk::{
    quant::{Annotation, KeyValue},
    DType, Evaluation, Evaluator, GraphPlan, GraphView, NodePlan, ObserverOutput, PluginError,
    QuantRequest, TimedEvaluation,
};
use std::collections::HashSet;

/// The budget and how much measuring it may cost.
#[derive(Clone, Debug, PartialEq)]
pub struct Budget {
    /// Output SQNR the plan must reach, in dB.
    pub target_sqnr_db: f64,
    /// Host evaluations for the per-layer sensitivities and the search (two per layer).
    pub max_evaluations: usize,
}

/// A layer's compute precision. Ordered from the cheapest error to the largest.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Precision {
    F32,
    F16,
    Int8,
}

/// One product layer and what is known of it.
#[derive(Debug)]
struct Layer {
    name: String,
    /// Multiply-adds per run (weight elements x output positions), the weight size when the
    /// output shape is unknown: the cost share of the layer.
    macs: f64,
    /// Whether the static plan quantizes its weight (int8 is possible).
    int8: bool,
    /// The layer whose output this one reads (through activations, pools, bias adds), and
    /// the elements of that input: where the two differ in precision, the value is converted
    /// (quantized or dequantized, and for int8 convolutions transposed to channels-last).
    upstream: Option<usize>,
    input_elems: f64,
    /// Noise power relative to the output's, when only this layer is lowered: f16, int8.
    noise_f16: Option<f64>,
    noise_int8: Option<f64>,
}

impl Layer {
    fn noise(&self, p: Precision) -> Option<f64> {
        match p {
            Precision::F32 => Some(0.0),
            Precision::F16 => self.noise_f16,
            Precision::Int8 => self.noise_int8.filter(|_| self.int8),
        }
    }
}

/// Noise power relative to the signal for an SQNR in dB (0 for identical outputs).
fn noise_of(sqnr_db: f64) -> f64 {
    if sqnr_db.is_finite() {
        10f64.powf(-sqnr_db / 10.0)
    } else if sqnr_db > 0.0 {
        0.0
    } else {
        f64::INFINITY
    }
}

/// The products with a constant weight, largest first.
fn layers(graph: &GraphView<'_>, int8: &GraphPlan) -> Vec<Layer> {
    let quantized: HashSet<&str> = int8.tensors.iter().map(|t| t.name.as_str()).collect();
    let mut out: Vec<Layer> = graph
        .nodes
        .iter()
        .filter(|n| n.domain.is_empty() && matches!(n.op_type.as_str(), "Conv" | "MatMul"))
        .filter_map(|n| {
            let w = n.inputs.get(1).filter(|w| graph.is_weight(w))?;
            let weight = graph.weight(w)?;
            let dims = weight.shape();
            let elems = weight.len() as f64;
            // Output positions: output elements over output channels (Conv: dim 0 of the
            // weight; MatMul: its last).
            let channels = if n.op_type.as_str() == "Conv" {
                dims.first()
            } else {
                dims.last()
            }
            .copied()
            .unwrap_or(1)
            .max(1) as f64;
            let positions = n
                .outputs
                .first()
                .and_then(|o| graph.value(o))
                .and_then(|v| v.shape.as_ref().into_option())
                .filter(|s| s.iter().all(|&d| d > 0))
                .map(|s| s.iter().map(|&d| d as f64).product::<f64>() / channels);
            Some(Layer {
                name: n.name.to_string(),
                macs: elems * positions.unwrap_or(1.0).max(1.0),
                int8: quantized.contains(w.as_str()),
                upstream: None,
                input_elems: n
                    .inputs
                    .first()
                    .and_then(|x| graph.value(x))
                    .and_then(|v| v.shape.as_ref().into_option())
                    .filter(|s| s.iter().all(|&d| d > 0))
                    .map_or(0.0, |s| s.iter().map(|&d| d as f64).product()),
                noise_f16: None,
                noise_int8: None,
            })
        })
        .collect();
    out.sort_by(|a, b| b.macs.total_cmp(&a.macs));
    // Upstream layers: back from each layer's first input through the first computed input
    // of the nodes between (a few hops: activations, pools, bias adds, casts).
    let index: std::collections::HashMap<&str, usize> = out
        .iter()
        .enumerate()
        .map(|(i, l)| (l.name.as_str(), i))
        .collect();
    let upstream: Vec<Option<usize>> = out
        .iter()
        .map(|l| {
            let node = graph.nodes.iter().find(|n| n.name.as_str() == l.name)?;
            let mut value = node.inputs.first()?.as_str();
            for _ in 0..8 {
                let p = graph.producer(value)?;
                if let Some(&i) = index.get(p.name.as_str()) {
                    return Some(i);
                }
                value = p.inputs.iter().find(|i| !graph.is_weight(i))?.as_str();
            }
            None
        })
        .collect();
    for (l, u) in out.iter_mut().zip(upstream) {
        l.upstream = u;
    }
    out
}

/// The plan computing each layer in its precision: the static plan's parameters for the int8
/// layers' weights and activations only (an f32 layer is exactly f32, no Q/DQ around it),
/// node entries for the others.
fn compose(
    graph: &GraphView<'_>,
    int8: &GraphPlan,
    layers: &[Layer],
    at: &[Precision],
) -> GraphPlan {
    let int8_layers: HashSet<&str> = layers
        .iter()
        .zip(at)
        .filter(|(_, &p)| p == Precision::Int8)
        .map(|(l, _)| l.name.as_str())
        .collect();
    let other: HashSet<&str> = layers
        .iter()
        .zip(at)
        .filter(|(_, &p)| p != Precision::Int8)
        .map(|(l, _)| l.name.as_str())
        .collect();
    // Values an int8 layer reads or writes, its outputs as the static plan quantizes them
    // (after the bias Add and the Relu/ReLU6: `rectified`), whatever reads them next: the
    // integer kernel needs the quantize node after it.
    let mut near: HashSet<String> = HashSet::new();
    for n in graph
        .nodes
        .iter()
        .filter(|n| int8_layers.contains(n.name.as_str()))
    {
        near.extend(n.inputs.iter().map(|s| s.to_string()));
        for o in n.outputs.iter() {
            near.insert(o.to_string());
            near.insert(graph.rectified(o.as_str()));
        }
    }
    let mut plan = int8.clone();
    plan.tensors = int8
        .tensors
        .iter()
        .filter(|t| near.contains(t.name.as_str()))
        .cloned()
        .collect();
    plan.nodes = int8
        .nodes
        .iter()
        .filter(|n| !other.contains(n.node.as_str()) && !int8_layers.contains(n.node.as_str()))
        .cloned()
        .chain(layers.iter().zip(at).filter_map(|(l, &p)| match p {
            Precision::Int8 => None,
            Precision::F16 => Some(NodePlan::float(l.name.as_str(), DType::F16)),
            Precision::F32 => Some(NodePlan::exclude(l.name.as_str())),
        }))
        .collect();
    plan
}

/// The measured cost of a multiply-add in each precision, relative to f32, and of converting
/// one element where neighbouring layers differ in precision (in f32 multiply-adds).
struct Factors {
    int8: f64,
    f16: f64,
    boundary: f64,
}

impl Factors {
    fn cost(&self, l: &Layer, p: Precision) -> f64 {
        l.macs
            * match p {
                Precision::F32 => 1.0,
                Precision::Int8 => self.int8,
                Precision::F16 => self.f16,
            }
    }

    /// The modelled cost of a whole assignment.
    fn total(&self, layers: &[Layer], at: &[Precision]) -> f64 {
        layers
            .iter()
            .zip(at)
            .map(|(l, &p)| self.cost(l, p) + self.boundary * boundary_elems(l, p, at))
            .sum()
    }
}

/// Elements converted at `l`'s input when it runs in `p` and its upstream layer in `at`'s.
fn boundary_elems(l: &Layer, p: Precision, at: &[Precision]) -> f64 {
    match l.upstream.and_then(|u| at.get(u)) {
        Some(&q) if q != p => l.input_elems,
        _ => 0.0,
    }
}

/// Elements converted between layers in `at`.
fn all_boundary_elems(layers: &[Layer], at: &[Precision]) -> f64 {
    layers
        .iter()
        .zip(at)
        .map(|(l, &p)| boundary_elems(l, p, at))
        .sum()
}

/// Every layer at its cheapest measured precision, then the [`step`]s until the summed noise
/// is within `allowed` (or no step is left).
fn greedy(layers: &[Layer], factors: &Factors, allowed: f64) -> Vec<Precision> {
    let mut at: Vec<Precision> = layers
        .iter()
        .map(|l| {
            [Precision::Int8, Precision::F16, Precision::F32]
                .into_iter()
                .filter(|&p| l.noise(p).is_some())
                .min_by(|&a, &b| factors.cost(l, a).total_cmp(&factors.cost(l, b)))
                .unwrap_or(Precision::F32)
        })
        .collect();
    let modelled = |at: &[Precision]| -> f64 {
        layers
            .iter()
            .zip(at)
            .map(|(l, &p)| l.noise(p).unwrap_or(0.0))
            .sum()
    };
    while modelled(&at) > allowed {
        let Some((i, p)) = step(layers, factors, &at) else {
            break;
        };
        at[i] = p;
    }
    // Then the moves that make the whole cheaper within the budget (a lone int8 layer
    // between f32 ones may cost more in conversions than it saves), cheapest first.
    for _ in 0..layers.len() * 3 {
        let before = factors.total(layers, &at);
        let mut best: Option<(usize, Precision, f64)> = None;
        for i in 0..at.len() {
            let now_at = at[i];
            for p in [Precision::Int8, Precision::F16, Precision::F32] {
                if p == now_at || layers[i].noise(p).is_none() {
                    continue;
                }
                at[i] = p;
                let saved = before - factors.total(layers, &at);
                if saved > 1e-9 * before
                    && modelled(&at) <= allowed
                    && best.is_none_or(|b| saved > b.2)
                {
                    best = Some((i, p, saved));
                }
                at[i] = now_at;
            }
        }
        let Some((i, p, _)) = best else {
            break;
        };
        at[i] = p;
    }
    at
}

/// The move (layer, precision) that removes the most modelled noise per unit of added cost
/// (its own, and the conversions it adds or removes at both ends).
fn step(layers: &[Layer], factors: &Factors, at: &[Precision]) -> Option<(usize, Precision)> {
    let mut best: Option<(usize, Precision, f64)> = None;
    let before = factors.total(layers, at);
    let mut trial = at.to_vec();
    for ((i, l), &now_at) in layers.iter().enumerate().zip(at) {
        let now = l.noise(now_at).unwrap_or(0.0);
        for p in [Precision::F16, Precision::F32] {
            let Some(then) = l.noise(p).filter(|&x| x < now) else {
                continue;
            };
            if let Some(t) = trial.get_mut(i) {
                *t = p;
            }
            let after = factors.total(layers, &trial);
            if let Some(t) = trial.get_mut(i) {
                *t = now_at;
            }
            // A step that costs nothing (or saves) still has a positive divisor: it wins.
            let added = (after - before).max(l.macs * 1e-6);
            let gain = (now - then) / added;
            if best.is_none_or(|b| gain > b.2) {
                best = Some((i, p, gain));
            }
        }
    }
    best.map(|(i, p, _)| (i, p))
}

/// [`greedy`] under `factors`, verified on the held-out samples (the first-order sum may be
/// optimistic): while the measured SQNR misses `target`, the next [`step`] is taken.
fn search(
    meter: &mut Meter<'_, '_>,
    graph: &GraphView<'_>,
    int8: &GraphPlan,
    layers: &[Layer],
    factors: &Factors,
    target: f64,
) -> Result<Vec<Precision>, PluginError> {
    let mut at = greedy(layers, factors, noise_of(target));
    let mut measured = meter.evaluate(&compose(graph, int8, layers, &at))?;
    while measured.is_some_and(|e| e.sqnr_db < target) {
        let Some((i, p)) = step(layers, factors, &at) else {
            break;
        };
        if let Some(a) = at.get_mut(i) {
            *a = p;
        }
        measured = meter.evaluate(&compose(graph, int8, layers, &at))?;
    }
    Ok(at)
}

/// One measured candidate.
struct Candidate {
    label: String,
    at: Vec<Precision>,
    timed: TimedEvaluation,
}

/// Counts host evaluations against the budget.
struct Meter<'e, 'a> {
    evaluator: &'e Evaluator<'a>,
    left: usize,
}

impl Meter<'_, '_> {
    fn evaluate(&mut self, plan: &GraphPlan) -> Result<Option<Evaluation>, PluginError> {
        if self.left == 0 {
            return Ok(None);
        }
        self.left -= 1;
        self.evaluator.evaluate(plan).map(Some)
    }
}

/// The error-budget plan (see the module documentation). `rest` are `quant-static`'s options.
pub fn plan(
    graph: &GraphView<'_>,
    request: &QuantRequest,
    rest: &[KeyValue],
    observed: &[ObserverOutput],
    evaluator: &Evaluator<'_>,
    budget: &Budget,
) -> Result<GraphPlan, PluginError> {
    let int8 = Static.plan_with(graph, request, rest, observed, evaluator)?;
    let mut layers = layers(graph, &int8);
    if layers.is_empty() {
        return Err(PluginError::invalid(
            "error-budget mode: the model has no Conv or MatMul with a constant weight to lower",
        ));
    }
    let n = layers.len();
    let uniform = |p: Precision| -> Vec<Precision> {
        layers
            .iter()
            .map(|l| {
                if p == Precision::Int8 && !l.int8 {
                    Precision::F32
                } else {
                    p
                }
            })
            .collect()
    };
    let timed = |at: &[Precision], layers: &[Layer]| {
        evaluator
            .evaluate_timed(&compose(graph, &int8, layers, at))
            .map_err(|e| PluginError {
                message: format!("error-budget mode times candidate plans: {}", e.message).into(),
                ..e
            })
    };

    // 1. The uniform plans, timed.
    let mut candidates: Vec<Candidate> = Vec::new();
    for (label, p) in [
        ("all f32", Precision::F32),
        ("all int8", Precision::Int8),
        ("all f16", Precision::F16),
    ] {
        let at = uniform(p);
        let t = timed(&at, &layers)?;
        candidates.push(Candidate {
            label: label.into(),
            at,
            timed: t,
        });
    }
    let f32_ms = candidates[0].timed.latency_ms.max(f64::MIN_POSITIVE);
    let (int8_factor, f16_factor) = (
        candidates[1].timed.latency_ms / f32_ms,
        candidates[2].timed.latency_ms / f32_ms,
    );

    // 2. Sensitivities, largest layers first, within the evaluation budget.
    let mut meter = Meter {
        evaluator,
        left: budget.max_evaluations,
    };
    let mut annotations = int8.annotations.to_vec();
    for i in 0..n {
        for p in [Precision::Int8, Precision::F16] {
            if p == Precision::Int8 && !layers[i].int8 {
                continue;
            }
            let mut at = vec![Precision::F32; n];
            at[i] = p;
            let Some(e) = meter.evaluate(&compose(graph, &int8, &layers, &at))? else {
                break;
            };
            let key = match p {
                Precision::Int8 => {
                    layers[i].noise_int8 = Some(noise_of(e.sqnr_db));
                    // The key quant-mixed uses (the report plots it).
                    "sensitivity_db"
                }
                _ => {
                    layers[i].noise_f16 = Some(noise_of(e.sqnr_db));
                    "sensitivity_f16_db"
                }
            };
            annotations.push(Annotation::new(&layers[i].name, key, e.sqnr_db));
        }
    }

    // 3. The greedy mix, then verified on the held-out samples (the first-order sum may be
    // optimistic): while the measured SQNR misses the target, the next step is taken.
    let mut factors = Factors {
        int8: int8_factor,
        f16: f16_factor,
        boundary: 0.0,
    };
    let target = budget.target_sqnr_db;
    let first = search(&mut meter, graph, &int8, &layers, &factors, target)?;
    if !candidates.iter().any(|c| c.at == first) {
        let t = timed(&first, &layers)?;
        candidates.push(Candidate {
            label: "mix".into(),
            at: first.clone(),
            timed: t,
        });
    }
    // The conversions between layers of different precision, priced from that mix: what its
    // measured latency exceeds the per-layer model by, per converted element. A second mix
    // searched with that price has fewer, cheaper boundaries.
    let elems = all_boundary_elems(&layers, &first);
    let macs: f64 = layers.iter().map(|l| l.macs).sum::<f64>().max(1.0);
    let mix_ms = candidates
        .iter()
        .find(|c| c.at == first)
        .map(|c| c.timed.latency_ms);
    if let Some(mix_ms) = mix_ms.filter(|_| elems > 0.0) {
        let modelled_ms = f32_ms * factors.total(&layers, &first) / macs;
        let extra_ms = mix_ms - modelled_ms;
        if extra_ms > 0.0 {
            factors.boundary = extra_ms / f32_ms * macs / elems;
            let second = search(&mut meter, graph, &int8, &layers, &factors, target)?;
            if !candidates.iter().any(|c| c.at == second) {
                let t = timed(&second, &layers)?;
                candidates.push(Candidate {
                    label: "mix with conversions priced".into(),
                    at: second,
                    timed: t,
                });
            }
        }
    }

    // 5. The fastest candidate that meets the target (all f32 always does).
    let meets =
        |c: &Candidate| c.label == "all f32" || c.timed.evaluation.sqnr_db >= budget.target_sqnr_db;
    let chosen = candidates
        .iter()
        .filter(|c| meets(c))
        .min_by(|a, b| a.timed.latency_ms.total_cmp(&b.timed.latency_ms))
        .unwrap_or(&candidates[0]);
    let mut plan = compose(graph, &int8, &layers, &chosen.at);
    for (l, p) in layers.iter().zip(&chosen.at) {
        let bits = match p {
            Precision::F32 => 32.0,
            Precision::F16 => 16.0,
            Precision::Int8 => 8.0,
        };
        annotations.push(Annotation::new(&l.name, "precision_bits", bits));
    }
    plan.annotations = annotations.into();
    let count = |p: Precision| chosen.at.iter().filter(|&&x| x == p).count();
    let listed: Vec<String> = candidates
        .iter()
        .map(|c| {
            format!(
                "{} {:.2} dB {:.3} ms{}",
                c.label,
                c.timed.evaluation.sqnr_db,
                c.timed.latency_ms,
                if meets(c) { "" } else { " (misses)" }
            )
        })
        .collect();
    let unmeasured = layers
        .iter()
        .filter(|l| l.noise_f16.is_none() && (l.noise_int8.is_none() || !l.int8))
        .count();
    plan.notes = format!(
        "error budget {:.1} dB at the lowest measured latency: {} ({} int8, {} f16, {} f32 of {} layers{}) {:.2} dB, {:.3} ms = {:.2}x f32; candidates: {}; {}",
        budget.target_sqnr_db,
        chosen.label,
        count(Precision::Int8),
        count(Precision::F16),
        count(Precision::F32),
        n,
        if unmeasured > 0 {
            format!(", {unmeasured} unmeasured kept in f32")
        } else {
            String::new()
        },
        chosen.timed.evaluation.sqnr_db,
        chosen.timed.latency_ms,
        chosen.timed.latency_ms / f32_ms,
        listed.join("; "),
        int8.notes
    )
    .into();
    Ok(plan)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn layer(name: &str, macs: f64, int8_db: Option<f64>, f16_db: f64) -> Layer {
        Layer {
            name: name.into(),
            macs,
            int8: int8_db.is_some(),
            upstream: None,
            input_elems: 0.0,
            noise_int8: int8_db.map(noise_of),
            noise_f16: Some(noise_of(f16_db)),
        }
    }

    #[test]
    fn the_greedy_mix_raises_the_cheapest_noise_first_until_the_budget_fits() {
        // int8 at 0.3x f32, f16 at 0.8x. Budget 30 dB = 1e-3 of the signal's power.
        let factors = Factors {
            int8: 0.3,
            f16: 0.8,
            boundary: 0.0,
        };
        let layers = [
            // Big and tolerant: int8 costs 1e-4.
            layer("big", 1000.0, Some(40.0), 80.0),
            // Small and sensitive: int8 alone 20 dB (1e-2), f16 fine.
            layer("small", 10.0, Some(20.0), 70.0),
            // Mid-size, int8 at 1e-3.5: with the others at int8, the sum is over budget.
            layer("mid", 100.0, Some(35.0), 75.0),
            // No int8 weight plan: f16 or f32 only.
            layer("head", 5.0, None, 60.0),
        ];
        let at = greedy(&layers, &factors, noise_of(30.0));
        // The small sensitive layer is raised (cheap), to f16 (cheaper than f32 and enough);
        // the big one stays int8; the head takes f16, its cheapest precision.
        assert_eq!(
            at,
            [
                Precision::Int8,
                Precision::F16,
                Precision::Int8,
                Precision::F16
            ]
        );
        // A budget nothing but f32 meets for the sensitive ones: the noisiest go to f32 or
        // f16 until the sum fits; the all-float end is reached at worst.
        let tight = greedy(&layers, &factors, noise_of(90.0));
        assert!(tight.iter().all(|&p| p == Precision::F32), "{tight:?}");
        // When f32 is the cheapest (int8 and f16 slower on this host), everything starts and
        // stays there: no noise at all.
        let slow = Factors {
            int8: 2.0,
            f16: 2.0,
            boundary: 0.0,
        };
        assert!(greedy(&layers, &slow, noise_of(30.0))
            .iter()
            .all(|&p| p == Precision::F32));
    }

    #[test]
    fn priced_conversions_keep_neighbours_of_a_float_layer_in_float() {
        // A chain a -> b -> c: b must leave int8 (20 dB alone against a 30 dB budget).
        let chain = || {
            let mut layers = [
                layer("a", 100.0, Some(45.0), 80.0),
                layer("b", 100.0, Some(20.0), 80.0),
                layer("c", 100.0, Some(45.0), 80.0),
            ];
            for (i, l) in layers.iter_mut().enumerate() {
                l.upstream = i.checked_sub(1);
                l.input_elems = 1000.0;
            }
            layers
        };
        let layers = chain();
        let mut factors = Factors {
            int8: 0.3,
            f16: 2.0,
            boundary: 0.0,
        };
        use Precision::{Int8, F32};
        // Free conversions: only b leaves int8.
        assert_eq!(greedy(&layers, &factors, noise_of(30.0)), [Int8, F32, Int8]);
        assert_eq!(all_boundary_elems(&layers, &[Int8, F32, Int8]), 2000.0);
        // Each conversion (1000 elements at 0.1) costs more than a layer saves in int8 (70):
        // one precision throughout.
        factors.boundary = 0.1;
        assert_eq!(greedy(&layers, &factors, noise_of(30.0)), [F32, F32, F32]);
        // Cheap conversions (1000 at 0.01 = 10 < 70): the mix again.
        factors.boundary = 0.01;
        assert_eq!(greedy(&layers, &factors, noise_of(30.0)), [Int8, F32, Int8]);
    }

    #[test]
    fn noise_power_follows_the_sqnr() {
        assert!((noise_of(30.0) - 1e-3).abs() < 1e-15);
        assert_eq!(noise_of(f64::INFINITY), 0.0);
        assert_eq!(noise_of(f64::NEG_INFINITY), f64::INFINITY);
    }
}

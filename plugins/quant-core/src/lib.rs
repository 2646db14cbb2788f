//! The planning behind the `quant-static` strategy plugin (and `quant-mixed`, which starts
//! from its plan): post-training static quantization. A library, so that each strategy plugin
//! exports its own root module and shares this code.
//!
//! Activations are calibrated on unlabelled data and quantized per tensor; weights per output
//! channel (or per tensor), symmetric int8. The calibrator is selectable:
//!
//! - `auto` (the default): plans with each of the three below from the same histograms, has
//!   the host evaluate each plan on the held-out samples (output SQNR against the float
//!   model) and keeps the best. No single calibrator wins everywhere (`scripts/compare-quant`:
//!   percentile on the LeNet and the encoder, KL on the BatchNorm CNN, min-max on a CRNN text
//!   recognizer, 4.7 dB ahead of percentile there), and three evaluations cost little next
//!   to calibration. The choice and each candidate's SQNR are in the plan's notes. The
//!   held-out samples are the ones the report then measures on: pass a separate test set to
//!   judge the result without that selection.
//! - `percentile`: the threshold below which `percentile` % (default 99.99) of
//!   |x| lies. Measured against the others on a LeNet (real digits), a BatchNorm CNN and a
//!   transformer encoder with an attention mask (`scripts/compare-quant`), it gave the best
//!   sum of output SQNRs (112.4 dB against 111.8 for min-max and 110.2 for KL) and is immune
//!   to the rare extreme values (padding constants, masks) min-max would spend the range on;
//!   `auto` falls back to it when there are no held-out samples to choose with.
//! - `kl` (entropy): the clipping threshold that minimises the KL divergence between the |x|
//!   histogram and its quantized form (TensorRT's method; 2048 bins by default, thresholds
//!   searched from `levels` = 128 bins up, empty bins smoothed, the exact zeros of rectified
//!   tensors left out). Best on the BatchNorm CNN; it clips more than the others elsewhere.
//! - `minmax`: the observed range.
//! - `average`: the mean of each calibration batch's min and max (the range PyTorch's
//!   moving-average observer estimates), gathered by this strategy's own observer
//!   ([`average::AverageRange`]) rather than by the host: a range one batch's outliers cannot
//!   stretch, without a histogram. Not among `auto`'s candidates (it needs its own
//!   calibration pass).
//!
//! Options (`key=value`): `calibrator` (`auto`), `activation_type` (`uint8` | `int8`; default
//! `uint8`), `symmetric` (`false`: asymmetric activations), `per_channel` (`true`), `bins`
//! (2048), `levels` (128), `percentile` (99.99), `quantize_head` (`false`: the last layer's
//! output, which is the model's, stays in float).
//!
//! Why uint8 activations by default: most quantized activations follow a `Relu` and are
//! non-negative, so an asymmetric uint8 range spends all 256 levels on them where int8 spends
//! half on negatives never seen; and the integer kernels of `blas-cpu` (VNNI `vpdpbusd`)
//! multiply u8 × s8 natively. The report compares both on the LeNet test model.

pub mod average;
pub mod budget;

use opreg_sdk::{
    quant::{
        calib::{kl_threshold, per_channel_symmetric, percentile_threshold, qparams, QParams},
        Annotation, KeyValue, TensorPlan,
    },
    DType, Directive, Evaluator, GraphPlan, GraphView, Observation, ObservationKind, Observer,
    ObserverOutput, PluginError, QuantRequest, Quantizer, TensorObservation,
};

/// The options of one run, parsed and checked.
#[derive(Clone, Debug, PartialEq)]
pub struct Options {
    pub calibrator: Calibrator,
    pub activation_type: DType,
    pub symmetric: bool,
    pub per_channel: bool,
    pub bins: u32,
    pub levels: usize,
    pub percentile: f64,
    /// Quantize the head's output too (`quantize_head`, default false).
    pub quantize_head: bool,
}

/// How activation ranges are chosen.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Calibrator {
    /// Each of the others, evaluated; the best kept.
    Auto,
    Kl,
    MinMax,
    Percentile,
    /// The mean of the batches' ranges, from the strategy's own observer.
    Average,
}

impl Calibrator {
    /// The candidates `Auto` evaluates, the fallback first.
    const CANDIDATES: [Calibrator; 3] =
        [Calibrator::Percentile, Calibrator::Kl, Calibrator::MinMax];

    fn name(self) -> &'static str {
        match self {
            Calibrator::Auto => "auto",
            Calibrator::Kl => "kl",
            Calibrator::MinMax => "minmax",
            Calibrator::Percentile => "percentile",
            Calibrator::Average => "average",
        }
    }
}

impl Default for Options {
    fn default() -> Self {
        Options {
            calibrator: Calibrator::Auto,
            activation_type: DType::U8,
            symmetric: false,
            per_channel: true,
            bins: 2048,
            levels: 128,
            percentile: 99.99,
            quantize_head: false,
        }
    }
}

fn invalid(msg: String) -> PluginError {
    PluginError::invalid(msg)
}

impl Options {
    /// Parses `options`; an unknown key or a bad value is refused by name.
    pub fn parse<'a>(
        options: impl IntoIterator<Item = (&'a str, &'a str)>,
    ) -> Result<Self, PluginError> {
        let mut o = Options::default();
        let boolean = parse_bool;
        for (k, v) in options {
            match k {
                "calibrator" | "calibrate_method" => {
                    o.calibrator = match v.to_ascii_lowercase().as_str() {
                        "kl" | "entropy" => Calibrator::Kl,
                        "minmax" | "min-max" => Calibrator::MinMax,
                        "percentile" => Calibrator::Percentile,
                        "auto" => Calibrator::Auto,
                        "average" | "moving_average" => Calibrator::Average,
                        _ => {
                            return Err(invalid(format!(
                                "option calibrator={v}: expected auto, kl, minmax, percentile or average"
                            )))
                        }
                    }
                }
                "activation_type" => {
                    o.activation_type = match v.to_ascii_lowercase().as_str() {
                        "uint8" | "u8" => DType::U8,
                        "int8" | "s8" | "i8" => DType::I8,
                        _ => {
                            return Err(invalid(format!(
                                "option activation_type={v}: expected uint8 or int8"
                            )))
                        }
                    }
                }
                "symmetric" => o.symmetric = boolean(k, v)?,
                "quantize_head" => o.quantize_head = boolean(k, v)?,
                "per_channel" => o.per_channel = boolean(k, v)?,
                "bins" => {
                    o.bins = v
                        .parse()
                        .ok()
                        .filter(|b| (256..=65536).contains(b))
                        .ok_or_else(|| invalid(format!("option bins={v}: expected 256..=65536")))?
                }
                "levels" => {
                    o.levels = v
                        .parse()
                        .ok()
                        .filter(|l| (16..=1024).contains(l))
                        .ok_or_else(|| invalid(format!("option levels={v}: expected 16..=1024")))?
                }
                "percentile" => {
                    o.percentile = v
                        .parse()
                        .ok()
                        .filter(|p: &f64| *p > 0.0 && *p <= 100.0)
                        .ok_or_else(|| {
                            invalid(format!("option percentile={v}: expected (0, 100]"))
                        })?
                }
                other => {
                    return Err(invalid(format!(
                        "unknown option '{other}' (calibrator, activation_type, symmetric, per_channel, bins, levels, percentile, quantize_head)"
                    )))
                }
            }
        }
        if o.bins as usize <= o.levels {
            return Err(invalid(format!(
                "bins ({}) must be more than levels ({})",
                o.bins, o.levels
            )));
        }
        Ok(o)
    }

    /// Parses the `key=value` options a request carries.
    pub fn from_kv(options: &[KeyValue]) -> Result<Self, PluginError> {
        Options::parse(
            options
                .iter()
                .map(|kv| (kv.key.as_str(), kv.value.as_str())),
        )
    }

    fn range(&self) -> (i32, i32) {
        if self.activation_type == DType::I8 {
            (-128, 127)
        } else {
            (0, 255)
        }
    }
}

/// The operators whose inputs and outputs are quantized (their integer forms exist).
const PRODUCTS: &[&str] = &["Conv", "MatMul"];

/// True when `t` is a model output, or reaches one through a bias `Add` only: the head's
/// result. Quantizing it puts the quantization noise straight on the model's output (and
/// its integer kernel saves little: heads are small), so by default it stays in float.
fn is_head_output(graph: &GraphView<'_>, t: &str) -> bool {
    if graph.is_output(t) {
        return true;
    }
    let mut readers = graph.consumers(t);
    match (readers.next(), readers.next()) {
        (Some(r), None) if r.op_type == "Add" && r.domain.is_empty() => {
            r.inputs.iter().any(|i| i != t && graph.is_weight(i))
                && r.outputs.iter().any(|o| graph.is_output(o))
        }
        _ => false,
    }
}

/// A boolean option's value (`true`/`1`/`yes`, `false`/`0`/`no`); anything else is refused
/// naming the option. Shared by the strategies built on this crate.
pub fn parse_bool(key: &str, value: &str) -> Result<bool, PluginError> {
    match value {
        "true" | "1" | "yes" => Ok(true),
        "false" | "0" | "no" => Ok(false),
        _ => Err(invalid(format!(
            "option {key}={value}: expected true or false"
        ))),
    }
}

/// Post-training static quantization.
pub struct Static;

impl Static {
    /// The static plan for `request`'s statistics with `options` instead of the request's:
    /// for a strategy that composes this one and has taken its own options out.
    pub fn plan_with(
        &self,
        graph: &GraphView<'_>,
        request: &QuantRequest,
        options: &[KeyValue],
        observed: &[ObserverOutput],
        evaluator: &Evaluator<'_>,
    ) -> Result<GraphPlan, PluginError> {
        let request = QuantRequest {
            tensors: request.tensors.clone(),
            options: options.to_vec().into(),
        };
        self.plan_observed(graph, &request, observed, evaluator)
    }
}

impl Quantizer for Static {
    fn observe(
        &self,
        graph: &GraphView<'_>,
        options: &[KeyValue],
    ) -> Result<Vec<TensorObservation>, PluginError> {
        let o = Options::from_kv(options)?;
        let how = match o.calibrator {
            Calibrator::MinMax => Observation::MIN_MAX,
            Calibrator::Average => Observation::CUSTOM,
            _ => Observation::histogram(o.bins),
        };
        // Products of two activations (attention's Q·Kᵀ and P·V) have no integer kernel
        // here (QLinearMatMul wants a constant weight): quantizing their operands would only
        // add noise, so they stay in float.
        let weighted = |n: &opreg_sdk::NodeView| {
            n.domain.is_empty()
                && PRODUCTS.contains(&n.op_type.as_str())
                && n.inputs.get(1).is_some_and(|w| graph.is_weight(w))
        };
        Ok(graph
            .activations_where(weighted)
            .into_iter()
            .filter(|t| o.quantize_head || !is_head_output(graph, t))
            .map(|t| TensorObservation::new(t, how))
            .collect())
    }

    fn observer(
        &self,
        tensor: &str,
        observation: &Observation,
        options: &[KeyValue],
    ) -> Result<Box<dyn Observer>, PluginError> {
        let o = Options::from_kv(options)?;
        if o.calibrator != Calibrator::Average || observation.kind != ObservationKind::CUSTOM {
            return Err(invalid(format!(
                "no observer of this strategy for '{tensor}' with calibrator {}",
                o.calibrator.name()
            )));
        }
        Ok(Box::<average::AverageRange>::default())
    }

    fn plan_graph(
        &self,
        graph: &GraphView<'_>,
        request: &QuantRequest,
        evaluator: &Evaluator<'_>,
    ) -> Result<GraphPlan, PluginError> {
        self.plan_observed(graph, request, &[], evaluator)
    }

    fn plan_observed(
        &self,
        graph: &GraphView<'_>,
        request: &QuantRequest,
        observed: &[ObserverOutput],
        evaluator: &Evaluator<'_>,
    ) -> Result<GraphPlan, PluginError> {
        let o = Options::from_kv(&request.options)?;
        let weights = weight_plans(graph, request, &o)?;
        if o.calibrator != Calibrator::Auto {
            return plan_for(request, observed, &o, weights);
        }
        // Each candidate planned and measured; the best SQNR kept (the first on ties, and
        // when nothing could be measured: no held-out samples).
        let mut best: Option<(GraphPlan, f64)> = None;
        let mut measured = Vec::new();
        for c in Calibrator::CANDIDATES {
            let plan = plan_for(
                request,
                observed,
                &Options {
                    calibrator: c,
                    ..o.clone()
                },
                weights.clone(),
            )?;
            let e = evaluator.evaluate(&plan)?;
            let sqnr = if e.samples == 0 || e.sqnr_db.is_nan() {
                f64::NEG_INFINITY
            } else {
                e.sqnr_db
            };
            measured.push(format!("{} {:.2} dB", c.name(), e.sqnr_db));
            if best.as_ref().is_none_or(|(_, b)| sqnr > *b) {
                best = Some((plan, sqnr));
            }
        }
        let (mut plan, sqnr) = best.ok_or_else(|| PluginError::internal("no candidate plan"))?;
        plan.notes = if sqnr == f64::NEG_INFINITY {
            format!(
                "calibrator auto: no held-out samples to choose with, percentile kept; {}",
                plan.notes
            )
        } else {
            format!("calibrator auto ({}): {}", measured.join(", "), plan.notes)
        }
        .into();
        Ok(plan)
    }

    /// A known histogram must give a known threshold and parameters.
    fn self_test(&self) -> Result<(), PluginError> {
        let q = qparams(0.0, 2.55, 0, 255, false);
        if (q.scale - 0.01).abs() > 1e-6 || q.zero_point != 0 {
            return Err(PluginError::internal(format!(
                "qparams [0, 2.55] gave {q:?}, expected scale 0.01, zero point 0"
            )));
        }
        // A narrow bulk with one far outlier: KL must clip the outlier.
        let mut h = vec![0u64; 2048];
        for (i, c) in h.iter_mut().take(200).enumerate() {
            *c = 1000 - i as u64 * 4;
        }
        h[2047] = 1;
        let th = kl_threshold(&h, 1.0, 128, 1);
        if th.threshold >= 1000.0 {
            return Err(PluginError::internal(format!(
                "KL kept the outlier: threshold {}",
                th.threshold
            )));
        }
        Ok(())
    }
}

/// The static plan with calibrator `o.calibrator` (not `Auto`): the activations calibrated,
/// and `weights` ([`weight_plans`], which no calibrator changes).
fn plan_for(
    request: &QuantRequest,
    observed: &[ObserverOutput],
    o: &Options,
    weights: Vec<TensorPlan>,
) -> Result<GraphPlan, PluginError> {
    let (qmin, qmax) = o.range();
    let mut tensors = Vec::new();
    let mut annotations = Vec::new();
    for t in request.tensors.iter().filter(|t| !t.is_weight) {
        let (lo, hi, threshold) = match o.calibrator {
            Calibrator::MinMax => (t.min, t.max, None),
            Calibrator::Average => {
                let found = ObserverOutput::find(observed, &t.name).ok_or_else(|| {
                    invalid(format!(
                        "tensor '{}': its average range was not observed",
                        t.name
                    ))
                })?;
                let &[lo, hi, ..] = found.values.as_slice() else {
                    return Err(invalid(format!(
                        "tensor '{}': no finite value in any calibration batch",
                        t.name
                    )));
                };
                annotations.push(Annotation::new(&t.name, "average_min", lo));
                annotations.push(Annotation::new(&t.name, "average_max", hi));
                (lo as f32, hi as f32, None)
            }
            // `Auto` never reaches here (it plans each candidate); percentile is its fallback.
            Calibrator::Kl | Calibrator::Percentile | Calibrator::Auto => {
                if t.histogram.is_empty() {
                    return Err(invalid(format!(
                        "tensor '{}': no histogram was observed",
                        t.name
                    )));
                }
                let width = t.hist_max / t.histogram.len() as f32;
                let absmax = t.min.abs().max(t.max.abs());
                let threshold = if o.calibrator == Calibrator::Kl {
                    // The first bin holds the exact zeros of a rectified tensor (half of
                    // it, or more): zero is exactly representable at any threshold, and
                    // left in, that spike dominates both distributions and drives the
                    // search to clip far into the real values.
                    let mut h = t.histogram.to_vec();
                    if t.min >= 0.0 {
                        if let Some(first) = h.first_mut() {
                            *first = 0;
                        }
                    }
                    let th = kl_threshold(&h, width, o.levels, 1);
                    annotations.push(Annotation::new(&t.name, "kl", th.kl));
                    th.threshold
                } else {
                    percentile_threshold(&t.histogram, width, o.percentile)
                }
                .min(absmax);
                (t.min.max(-threshold), t.max.min(threshold), Some(threshold))
            }
        };
        let QParams { scale, zero_point } = qparams(lo, hi, qmin, qmax, o.symmetric);
        if let Some(th) = threshold {
            annotations.push(Annotation::new(&t.name, "threshold", f64::from(th)));
        }
        tensors.push(TensorPlan {
            name: t.name.clone(),
            directive: Directive::per_tensor(scale, zero_point, o.activation_type),
        });
    }
    tensors.extend(weights);
    Ok(GraphPlan {
        tensors: tensors.into(),
        nodes: Default::default(),
        annotations: annotations.into(),
        notes: format!(
            "static: {:?} calibration, {} activations ({}), int8 weights {}",
            o.calibrator,
            if o.activation_type == DType::U8 {
                "uint8"
            } else {
                "int8"
            },
            if o.symmetric {
                "symmetric"
            } else {
                "asymmetric"
            },
            if o.per_channel {
                "per channel"
            } else {
                "per tensor"
            }
        )
        .into(),
        flags: 0,
    })
}

/// The int8 weights of the products whose input `request` calibrates (per output channel for
/// Conv, per column for MatMul; or per tensor), the same whichever calibrator sets the
/// activations.
fn weight_plans(
    graph: &GraphView<'_>,
    request: &QuantRequest,
    o: &Options,
) -> Result<Vec<TensorPlan>, PluginError> {
    let calibrated: std::collections::HashSet<&str> = request
        .tensors
        .iter()
        .filter(|t| !t.is_weight)
        .map(|t| t.name.as_str())
        .collect();
    let mut tensors: Vec<TensorPlan> = Vec::new();
    for n in graph.nodes.iter() {
        if !n.domain.is_empty() || !PRODUCTS.contains(&n.op_type.as_str()) {
            continue;
        }
        let (Some(x), Some(w)) = (n.inputs.first(), n.inputs.get(1)) else {
            continue;
        };
        if !calibrated.contains(x.as_str()) || tensors.iter().any(|t| t.name == *w) {
            continue;
        }
        let Some(view) = graph.weight(w) else {
            continue;
        };
        if view.dtype != DType::F32 || view.rank() < 2 {
            continue;
        }
        let data = view.as_slice::<f32>()?;
        let shape = view.shape();
        // Conv: output channels (axis 0); MatMul: columns (the last axis).
        let axis = if n.op_type == "Conv" {
            0
        } else {
            shape.len() - 1
        };
        let directive = if o.per_channel {
            let p = per_channel_symmetric(data, shape, axis)
                .map_err(|e| invalid(format!("weight '{w}': {e}")))?;
            Directive::per_channel(
                axis as i32,
                p.iter().map(|q| q.scale).collect(),
                vec![0; p.len()],
                DType::I8,
            )
        } else {
            let m = data.iter().fold(0f32, |m, v| m.max(v.abs()));
            let q = qparams(-m, m, -127, 127, true);
            Directive::per_tensor(q.scale, 0, DType::I8)
        };
        tensors.push(TensorPlan {
            name: w.clone(),
            directive,
        });
    }
    Ok(tensors)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn options_are_parsed_and_bad_ones_refused_by_name() {
        let o =
            Options::parse([("calibrator", "percentile"), ("activation_type", "int8")]).unwrap();
        assert_eq!(o.calibrator, Calibrator::Percentile);
        assert_eq!(o.activation_type, DType::I8);
        assert_eq!(Options::parse([]).unwrap(), Options::default());
        let e = Options::parse([("calibrator", "magic")]).unwrap_err();
        assert!(e.message.contains("calibrator=magic"), "{}", e.message);
        let e = Options::parse([("colour", "red")]).unwrap_err();
        assert!(e.message.contains("'colour'"), "{}", e.message);
        assert!(Options::parse([("bins", "128")]).is_err());
    }

    #[test]
    fn the_self_test_passes() {
        Static.self_test().unwrap();
    }
}

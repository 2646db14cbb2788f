//! `quant-mixed`: a lower precision where it is harmless, f32 where it is not.
//!
//! `lowered=int8` (the default) starts from the static int8 plan (`quant-static`, with its
//! calibrator options); `lowered=f16` or `bf16` computes every convolution and matrix product
//! in that type instead (weights stored in it: half the size), with the elementwise and
//! pooling nodes between them (the host places the casts: one in and one out per chain).
//! Either way it measures each layer's **sensitivity** — the output SQNR against the float
//! model when only that layer is lowered, on the host's held-out samples, through the host's
//! evaluator — and keeps the most sensitive layers in f32, one at a time, until the whole
//! model meets the error target or the float budget is spent.
//!
//! `lowered=auto` is the **error-budget mode** ([`opreg_quant_core::budget`]): int8, f16 or
//! f32 per layer, chosen so that the model meets `target_sqnr_db` at the lowest latency the
//! host measures (each candidate timed on the held-out samples; needs a 1.3 host).
//!
//! Options: `lowered` (int8, f16, bf16, auto), `target_sqnr_db` (30: about 3 % relative output
//! noise), `max_float_fraction` (0.25 of the lowered layers at most stay in f32),
//! `max_evaluations` (128: sensitivity is measured for the largest layers first when a model
//! has more), and `quant-static`'s options.
//!
//! f16 models load in onnxruntime too; bf16 ones need opset 22 for convolutions (ONNX's rule)
//! and run in opreg (onnxruntime's CPU provider has no bf16 Conv or MatMul).

use opreg_quant_core::{Options, Static};
use opreg_sdk::{
    quant::{Annotation, KeyValue},
    DType, Evaluation, Evaluator, GraphPlan, GraphView, NodePlan, Observation, Observer,
    ObserverOutput, PluginError, QuantRequest, Quantizer, QuantizerDesc, Registrar,
    TensorObservation,
};

/// This strategy's own options, and the rest for the static plan.
#[derive(Debug)]
struct Mixed {
    /// I8 (int8 quantization), F16 or BF16 (computed in that float type).
    lowered: DType,
    /// `lowered=auto`: the error-budget mode (`lowered` is I8 then, for the observations).
    auto: bool,
    target_sqnr_db: f64,
    max_float_fraction: f64,
    max_evaluations: usize,
    rest: Vec<KeyValue>,
}

fn parse(options: &[KeyValue]) -> Result<Mixed, PluginError> {
    let mut m = Mixed {
        lowered: DType::I8,
        auto: false,
        target_sqnr_db: 30.0,
        max_float_fraction: 0.25,
        max_evaluations: 128,
        rest: Vec::new(),
    };
    let number = |k: &str, v: &str| {
        v.parse::<f64>()
            .ok()
            .filter(|x| x.is_finite())
            .ok_or_else(|| PluginError::invalid(format!("option {k}={v}: expected a number")))
    };
    for kv in options {
        let (k, v) = (kv.key.as_str(), kv.value.as_str());
        match k {
            "target_sqnr_db" => m.target_sqnr_db = number(k, v)?,
            "max_float_fraction" => {
                m.max_float_fraction = number(k, v)?;
                if !(0.0..=1.0).contains(&m.max_float_fraction) {
                    return Err(PluginError::invalid(format!(
                        "option {k}={v}: expected 0..=1"
                    )));
                }
            }
            "max_evaluations" => m.max_evaluations = number(k, v)? as usize,
            "lowered" => {
                m.auto = v.eq_ignore_ascii_case("auto");
                m.lowered = match v.to_ascii_lowercase().as_str() {
                    "int8" | "i8" | "auto" => DType::I8,
                    "f16" | "float16" | "fp16" => DType::F16,
                    "bf16" | "bfloat16" => DType::BF16,
                    _ => {
                        return Err(PluginError::invalid(format!(
                            "option lowered={v}: expected int8, f16, bf16 or auto"
                        )))
                    }
                }
            }
            _ => m.rest.push(kv.clone()),
        }
    }
    // The static options are checked now, naming the bad one.
    Options::from_kv(&m.rest)?;
    Ok(m)
}

fn precision_name(t: DType) -> &'static str {
    match t {
        DType::F16 => "f16",
        DType::BF16 => "bf16",
        _ => "int8",
    }
}

/// Mixed int8 (or f16, bf16) / f32 by measured sensitivity.
pub struct MixedPrecision;

/// `plan` with only `keep` lowered: in int8 mode the other layers are excluded, in float
/// mode the other layers' node plans are dropped.
fn only(plan: &GraphPlan, layers: &[String], keep: &str, float_mode: bool) -> GraphPlan {
    let mut p = plan.clone();
    p.nodes = if float_mode {
        plan.nodes
            .iter()
            .filter(|n| n.node.as_str() == keep)
            .cloned()
            .collect()
    } else {
        layers
            .iter()
            .filter(|l| l.as_str() != keep)
            .map(|l| NodePlan::exclude(l.as_str()))
            .collect()
    };
    p
}

/// `plan` with the layers `float` kept in f32.
fn excluding(plan: &GraphPlan, float: &[String], float_mode: bool) -> GraphPlan {
    let mut p = plan.clone();
    p.nodes = if float_mode {
        plan.nodes
            .iter()
            .filter(|n| !float.iter().any(|f| f.as_str() == n.node.as_str()))
            .cloned()
            .collect()
    } else {
        float
            .iter()
            .map(|l| NodePlan::exclude(l.as_str()))
            .collect()
    };
    p
}

impl Quantizer for MixedPrecision {
    fn observe(
        &self,
        graph: &GraphView<'_>,
        options: &[KeyValue],
    ) -> Result<Vec<TensorObservation>, PluginError> {
        let m = parse(options)?;
        if m.lowered == DType::I8 {
            return Static.observe(graph, &m.rest);
        }
        // A float type needs no ranges; the host wants at least one observation (none would
        // mean "the host's defaults"): one f32 tensor's range, nearly free. Only f32 tensors
        // can be observed, so an encoder's token ids cannot serve: its first f32 input, else
        // its first f32 output.
        let f32_value = |name: &str| graph.value(name).is_some_and(|v| v.dtype == DType::F32);
        Ok(graph
            .inputs
            .iter()
            .find(|i| f32_value(i))
            .or_else(|| graph.outputs.iter().find(|o| f32_value(o)))
            .map(|i| TensorObservation::new(i.as_str(), Observation::MIN_MAX))
            .into_iter()
            .collect())
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
        let m = parse(&request.options)?;
        if m.auto {
            let budget = opreg_quant_core::budget::Budget {
                target_sqnr_db: m.target_sqnr_db,
                max_evaluations: m.max_evaluations,
            };
            return opreg_quant_core::budget::plan(
                graph, request, &m.rest, observed, evaluator, &budget,
            );
        }
        let float_mode = m.lowered != DType::I8;
        let products = graph
            .nodes
            .iter()
            .filter(|n| n.domain.is_empty() && matches!(n.op_type.as_str(), "Conv" | "MatMul"))
            .filter(|n| n.inputs.get(1).is_some_and(|w| graph.is_weight(w)));
        let full = if float_mode {
            GraphPlan {
                nodes: products
                    .clone()
                    .map(|n| NodePlan::float(n.name.as_str(), m.lowered))
                    .collect(),
                notes: format!("{} products", precision_name(m.lowered)).into(),
                ..GraphPlan::default()
            }
        } else {
            Static.plan_with(graph, request, &m.rest, observed, evaluator)?
        };
        // The layers the plan lowers (in int8 mode: the products whose weight it quantizes),
        // largest weights first (when not all can be measured, the big ones matter most).
        let mut layers: Vec<(String, usize)> = products
            .filter_map(|n| {
                let w = n.inputs.get(1)?;
                (float_mode || full.tensors.iter().any(|t| t.name == *w)).then(|| {
                    let size = graph.weight(w).map_or(0, |v| v.len());
                    (n.name.to_string(), size)
                })
            })
            .collect();
        layers.sort_by_key(|l| std::cmp::Reverse(l.1));
        let names: Vec<String> = layers.iter().map(|(n, _)| n.clone()).collect();

        let whole = evaluator.evaluate(&full)?;
        let mut annotations = full.annotations.to_vec();
        let mut sensitivity: Vec<(String, f64)> = Vec::new();
        for layer in names.iter().take(m.max_evaluations) {
            let e: Evaluation = evaluator.evaluate(&only(&full, &names, layer, float_mode))?;
            annotations.push(Annotation::new(layer, "sensitivity_db", e.sqnr_db));
            sensitivity.push((layer.clone(), e.sqnr_db));
        }
        // Most sensitive (lowest SQNR when alone) first.
        sensitivity.sort_by(|a, b| a.1.total_cmp(&b.1));
        let budget = (names.len() as f64 * m.max_float_fraction).floor() as usize;
        let mut float: Vec<String> = Vec::new();
        let mut current = whole;
        for (layer, _) in &sensitivity {
            if current.sqnr_db >= m.target_sqnr_db || float.len() >= budget {
                break;
            }
            float.push(layer.clone());
            current = evaluator.evaluate(&excluding(&full, &float, float_mode))?;
        }
        let mut plan = excluding(&full, &float, float_mode);
        plan.annotations = annotations.into();
        plan.notes = format!(
            "mixed {}/f32: all lowered {:.2} dB; {} of {} layers kept in f32 ({}) -> {:.2} dB (target {:.1} dB); {}",
            precision_name(m.lowered),
            whole.sqnr_db,
            float.len(),
            names.len(),
            float.join(", "),
            current.sqnr_db,
            m.target_sqnr_db,
            full.notes
        )
        .into();
        Ok(plan)
    }
}

fn register(r: &mut Registrar) {
    r.quantizer(
        QuantizerDesc {
            name: "quant-mixed".into(),
            description: "mixed precision: int8 (default), f16 or bf16 layers, the most sensitive (measured one by one on held-out data) kept in f32 until an SQNR target is met; lowered=auto picks int8/f16/f32 per layer for the target at the lowest measured latency".into(),
        },
        MixedPrecision,
    );
}

opreg_sdk::export_plugin! {
    name: "quant-mixed",
    version: env!("CARGO_PKG_VERSION"),
    description: "mixed-precision quantization by measured layer sensitivity",
    register: register,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn own_options_are_taken_and_static_ones_passed_on_and_checked() {
        let kv = |k: &str, v: &str| KeyValue {
            key: k.into(),
            value: v.into(),
        };
        let m = parse(&[kv("target_sqnr_db", "40"), kv("calibrator", "minmax")]).unwrap();
        assert_eq!(m.target_sqnr_db, 40.0);
        assert_eq!(m.rest.len(), 1);
        assert!(parse(&[kv("max_float_fraction", "2")]).is_err());
        let e = parse(&[kv("calibrator", "magic")]).unwrap_err();
        assert!(e.message.contains("calibrator=magic"));
        // The error-budget mode observes as int8 does (its int8 candidates need the ranges).
        let auto = parse(&[kv("lowered", "AUTO")]).unwrap();
        assert!(auto.auto && auto.lowered == DType::I8);
        assert!(!parse(&[kv("lowered", "f16")]).unwrap().auto);
        let e = parse(&[kv("lowered", "f8")]).unwrap_err();
        assert!(e.message.contains("auto"), "{}", e.message);
    }
}

//! `quant-adaptive`: a static int8 model whose activation ranges follow the live traffic.
//!
//! The plan is `quant-static`'s (same calibrators and options), marked
//! [`GraphPlan::ADAPTIVE`]: the host keeps the float model beside the int8 one, samples the
//! requests it serves, and calls this strategy again over the recent samples every so often.
//! When the ranges it derives have moved past `drift` and the new parameters verify better
//! against the float model on those samples, the host swaps them in while serving. This
//! strategy sets the host's policy through annotations on the subject `"adaptive"`.
//!
//! Options (besides `quant-static`'s): `drift` (0.5: a range end moved by half the served
//! range), `window` (64 recent samples), `sample_every` (16: one request in 16),
//! `check_every` (64 samples between checks), `min_gain_db` (1.0 dB of output SQNR a new plan
//! must gain), `max_window_mb` (64).
//!
//! For streams whose data drifts slowly or in steps (cameras, sensors, seasonal series).

use opreg_quant_core::{Options, Static};
use opreg_sdk::{
    quant::{Annotation, KeyValue},
    Evaluator, GraphPlan, GraphView, Observation, Observer, ObserverOutput, PluginError,
    QuantRequest, Quantizer, QuantizerDesc, Registrar, TensorObservation,
};

/// The host's policy keys, with the range each accepts (counts are whole numbers).
const POLICY: &[(&str, f64, f64, bool)] = &[
    ("drift", 1e-3, 1e6, false),
    ("window", 1.0, 4096.0, true),
    ("sample_every", 1.0, 1e9, true),
    ("check_every", 1.0, 1e9, true),
    ("min_gain_db", 0.0, 100.0, false),
    ("max_window_mb", 1.0, 65536.0, true),
];

/// This strategy's options as the host's policy, and the rest for the static plan.
fn parse(options: &[KeyValue]) -> Result<(Vec<Annotation>, Vec<KeyValue>), PluginError> {
    let mut policy = Vec::new();
    let mut rest = Vec::new();
    for kv in options {
        let (k, v) = (kv.key.as_str(), kv.value.as_str());
        let Some(&(_, lo, hi, whole)) = POLICY.iter().find(|(name, ..)| *name == k) else {
            rest.push(kv.clone());
            continue;
        };
        let x = v
            .parse::<f64>()
            .ok()
            .filter(|x| (lo..=hi).contains(x) && (!whole || x.fract() == 0.0))
            .ok_or_else(|| {
                PluginError::invalid(format!(
                    "option {k}={v}: expected {}{lo}..={hi}",
                    if whole { "a whole number in " } else { "" }
                ))
            })?;
        policy.push(if k == "max_window_mb" {
            Annotation::new("adaptive", "max_window_bytes", x * 1048576.0)
        } else {
            Annotation::new("adaptive", k, x)
        });
    }
    // The static options are checked now, naming the bad one.
    Options::from_kv(&rest)?;
    Ok((policy, rest))
}

/// Static int8 with ranges that follow the traffic.
pub struct Adaptive;

impl Quantizer for Adaptive {
    fn observe(
        &self,
        graph: &GraphView<'_>,
        options: &[KeyValue],
    ) -> Result<Vec<TensorObservation>, PluginError> {
        let (_, rest) = parse(options)?;
        Static.observe(graph, &rest)
    }

    fn observer(
        &self,
        tensor: &str,
        observation: &Observation,
        options: &[KeyValue],
    ) -> Result<Box<dyn Observer>, PluginError> {
        Static.observer(tensor, observation, &parse(options)?.1)
    }

    fn plan_observed(
        &self,
        graph: &GraphView<'_>,
        request: &QuantRequest,
        observed: &[ObserverOutput],
        evaluator: &Evaluator<'_>,
    ) -> Result<GraphPlan, PluginError> {
        let (policy, rest) = parse(&request.options)?;
        let mut plan = Static.plan_with(graph, request, &rest, observed, evaluator)?;
        plan.flags |= GraphPlan::ADAPTIVE;
        plan.annotations.extend(policy);
        plan.notes = format!("adaptive ({})", plan.notes).into();
        Ok(plan)
    }

    /// The policy options are parsed, bounded and passed on; the static ones are not taken.
    fn self_test(&self) -> Result<(), PluginError> {
        let kv = |k: &str, v: &str| KeyValue {
            key: k.into(),
            value: v.into(),
        };
        let (policy, rest) = parse(&[kv("drift", "0.25"), kv("calibrator", "minmax")])?;
        if policy != [Annotation::new("adaptive", "drift", 0.25)] || rest.len() != 1 {
            return Err(PluginError::internal(format!(
                "options split wrongly: {policy:?} / {rest:?}"
            )));
        }
        if parse(&[kv("window", "2.5")]).is_ok() {
            return Err(PluginError::internal("window=2.5 was accepted".to_string()));
        }
        Ok(())
    }
}

fn register(r: &mut Registrar) {
    r.quantizer(
        QuantizerDesc {
            name: "quant-adaptive".into(),
            description: "static int8 whose activation ranges follow the live traffic: sampled requests, re-derived when they drift, verified against the float model, swapped in while serving".into(),
        },
        Adaptive,
    );
}

opreg_sdk::export_plugin! {
    name: "quant-adaptive",
    version: env!("CARGO_PKG_VERSION"),
    description: "adaptive int8: activation ranges re-derived from live traffic when it drifts",
    register: register,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_self_test_passes() {
        Adaptive.self_test().unwrap();
    }

    #[test]
    fn bad_policy_options_are_refused_by_name() {
        let kv = |k: &str, v: &str| KeyValue {
            key: k.into(),
            value: v.into(),
        };
        let e = parse(&[kv("drift", "-1")]).unwrap_err();
        assert!(e.message.contains("drift=-1"), "{}", e.message);
        let e = parse(&[kv("colour", "red")]).unwrap_err();
        assert!(e.message.contains("'colour'"), "{}", e.message);
        let (p, _) = parse(&[kv("max_window_mb", "2")]).unwrap();
        assert_eq!(
            p,
            [Annotation::new("adaptive", "max_window_bytes", 2097152.0)]
        );
    }
}

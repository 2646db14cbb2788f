//! `quant-dynamic`: post-training dynamic quantization.
//!
//! `MatMul` weights (and `Gemm`'s, which the daemon presents as `MatMul` + `Add`) are stored
//! as symmetric int8 per output column (or per tensor with `per_channel=false`); each
//! `MatMul`'s input is quantized to uint8 at run time from its live range
//! (`DynamicQuantizeLinear -> MatMulInteger`). Nothing is calibrated: the calibration samples
//! serve only the report's comparison with the float model.
//!
//! `Conv` stays in float: ONNX's `ConvInteger` has no per-channel weight scale, and dynamic
//! quantization pays for its run-time range on every call, which pays off for the large
//! `MatMul`s of transformers and recurrent layers rather than for convolutions.

use opreg_sdk::{
    quant::{
        calib::{per_channel_symmetric, qparams},
        KeyValue, TensorPlan,
    },
    DType, Directive, Evaluator, GraphPlan, GraphView, PluginError, QuantRequest, Quantizer,
    QuantizerDesc, Registrar, TensorObservation,
};

fn per_channel(options: &[KeyValue]) -> Result<bool, PluginError> {
    let mut per_channel = true;
    for kv in options {
        match (kv.key.as_str(), kv.value.as_str()) {
            ("per_channel", v) => per_channel = opreg_quant_core::parse_bool("per_channel", v)?,
            (k, v) => {
                return Err(PluginError::invalid(format!(
                    "option {k}={v}: quant-dynamic takes per_channel=true|false only"
                )))
            }
        }
    }
    Ok(per_channel)
}

/// Post-training dynamic quantization.
pub struct Dynamic;

impl Quantizer for Dynamic {
    fn observe(
        &self,
        _graph: &GraphView<'_>,
        options: &[KeyValue],
    ) -> Result<Vec<TensorObservation>, PluginError> {
        per_channel(options)?;
        Ok(Vec::new())
    }

    fn plan_graph(
        &self,
        graph: &GraphView<'_>,
        request: &QuantRequest,
        _evaluator: &Evaluator<'_>,
    ) -> Result<GraphPlan, PluginError> {
        let per_channel = per_channel(&request.options)?;
        let mut tensors: Vec<TensorPlan> = Vec::new();
        for n in graph.nodes.iter() {
            if !n.domain.is_empty() || n.op_type != "MatMul" {
                continue;
            }
            let (Some(x), Some(w)) = (n.inputs.first(), n.inputs.get(1)) else {
                continue;
            };
            let Some(view) = graph.weight(w) else {
                continue;
            };
            if view.dtype != DType::F32 || view.rank() != 2 || graph.is_weight(x) {
                continue;
            }
            if !tensors.iter().any(|t| t.name == *w) {
                let data = view.as_slice::<f32>()?;
                let directive = if per_channel {
                    let p = per_channel_symmetric(data, view.shape(), 1)
                        .map_err(|e| PluginError::invalid(format!("weight '{w}': {e}")))?;
                    Directive::per_channel(
                        1,
                        p.iter().map(|q| q.scale).collect(),
                        vec![0; p.len()],
                        DType::I8,
                    )
                } else {
                    let m = data.iter().fold(0f32, |m, v| m.max(v.abs()));
                    Directive::per_tensor(qparams(-m, m, -127, 127, true).scale, 0, DType::I8)
                };
                tensors.push(TensorPlan {
                    name: w.clone(),
                    directive,
                });
            }
            if !tensors.iter().any(|t| t.name == *x) {
                tensors.push(TensorPlan {
                    name: x.clone(),
                    directive: Directive::dynamic(DType::U8),
                });
            }
        }
        Ok(GraphPlan {
            tensors: tensors.into(),
            notes: format!(
                "dynamic: uint8 activations from their live range, int8 weights {}",
                if per_channel {
                    "per column"
                } else {
                    "per tensor"
                }
            )
            .into(),
            ..Default::default()
        })
    }
}

fn register(r: &mut Registrar) {
    r.quantizer(
        QuantizerDesc {
            name: "quant-dynamic".into(),
            description: "post-training dynamic int8: MatMul/Gemm weights int8 per column offline, inputs uint8 from their live range at run time".into(),
        },
        Dynamic,
    );
}

opreg_sdk::export_plugin! {
    name: "quant-dynamic",
    version: env!("CARGO_PKG_VERSION"),
    description: "post-training dynamic quantization (MatMulInteger)",
    register: register,
}

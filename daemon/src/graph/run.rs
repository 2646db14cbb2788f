//! Running a plan: one value table per request, kernels in order, buffers released after
//! their last reader.

use super::{plan::Step, GraphError, Plan};
use crate::exec::log_from_plugin;
use opreg_sdk::{blas::FfiBlasBox, host::CallFrame, host::HostTensor, LogLevel, TensorView};
use std::{collections::HashMap, sync::Arc};

/// Runs `plan` on `feeds` (one tensor per graph input, checked by the caller) and returns the
/// graph outputs in declaration order. Call it on the compute pool.
pub fn run(
    plan: &Plan,
    mut feeds: HashMap<String, HostTensor>,
) -> Result<Vec<(String, Arc<HostTensor>)>, GraphError> {
    let mut values: Vec<Option<Arc<HostTensor>>> = vec![None; plan.slots];
    for (s, t) in &plan.constants {
        values[*s] = Some(t.clone());
    }
    for (name, s) in &plan.inputs {
        let t = feeds.remove(name).ok_or_else(|| GraphError::Input {
            name: name.clone(),
            reason: "missing".into(),
        })?;
        values[*s] = Some(Arc::new(t));
    }
    for step in &plan.steps {
        let ins: Vec<Option<Arc<HostTensor>>> = step
            .inputs
            .iter()
            .map(|s| s.and_then(|s| values[s].clone()))
            .collect();
        let outs = run_step(step, &ins, plan.snapshot.blas_for(step.device))?;
        drop(ins);
        for (s, t) in step.outputs.iter().zip(outs) {
            if let Some(s) = s {
                values[*s] = Some(Arc::new(t));
            }
        }
        for s in &step.release {
            values[*s] = None;
        }
    }
    plan.outputs
        .iter()
        .map(|(name, s)| {
            values[*s]
                .clone()
                .map(|t| (name.clone(), t))
                .ok_or_else(|| GraphError::Invalid(format!("output '{name}' was not computed")))
        })
        .collect()
}

/// Runs one step on `inputs` (by position; `None` for absent ones).
pub(super) fn run_step(
    step: &Step,
    inputs: &[Option<Arc<HostTensor>>],
    blas: Option<&FfiBlasBox>,
) -> Result<Vec<HostTensor>, GraphError> {
    let views: Vec<TensorView<'_>> = inputs
        .iter()
        .map(|t| t.as_ref().map_or(TensorView::absent(), |t| t.view()))
        .collect();
    let plugin = step.plugin.name.as_str();
    let log = |level: LogLevel, msg: &str| log_from_plugin(plugin, level, msg);
    let frame = CallFrame::new(step.outputs.len(), step.device, blas, &log);
    let failed = |e: opreg_sdk::PluginError| GraphError::Kernel {
        node: step.label.clone(),
        plugin: plugin.to_string(),
        code: e.code,
        message: e.message.to_string(),
    };
    frame
        .with_context(|ctx| {
            step.instance
                .compute(ctx, views.as_slice().into())
                .into_result()
        })
        .map_err(failed)?;
    frame.into_outputs().map_err(failed)
}

//! Running a plan: one value table per request, steps in order, buffers released after
//! their last reader. Control-flow steps run their nested plans.

use super::{
    plan::{ScanSpec, Step, Work},
    GraphError, Plan,
};
use crate::exec::log_from_plugin;
use opreg_sdk::{
    blas::FfiBlasBox,
    host::{CallFrame, HostTensor},
    DType, LogLevel, TensorView,
};
use std::{collections::HashMap, sync::Arc};

/// Longest a `Loop` may run without a trip count before it is stopped as runaway.
const MAX_UNBOUNDED_TRIPS: i64 = 10_000_000;

type Value = Arc<HostTensor>;

/// Named outputs, in declaration order.
pub type Outputs = Vec<(String, Value)>;
/// Each step's label and its time in seconds.
pub type StepTimes = Vec<(String, f64)>;

/// Runs `plan` on `feeds` (one tensor per input, checked by the caller) and returns the
/// outputs in declaration order. Call it on the compute pool.
pub fn run(plan: &Plan, feeds: HashMap<String, Value>) -> Result<Vec<(String, Value)>, GraphError> {
    run_with(plan, feeds, &mut |_, _| {})
}

/// Like [`run`], also returning the time each step took (label, seconds), for profiling.
pub fn run_profiled(
    plan: &Plan,
    feeds: HashMap<String, Value>,
) -> Result<(Outputs, StepTimes), GraphError> {
    let mut times = Vec::new();
    let out = run_with(plan, feeds, &mut |label, secs| {
        times.push((label.to_string(), secs))
    })?;
    Ok((out, times))
}

fn run_with(
    plan: &Plan,
    mut feeds: HashMap<String, Value>,
    observe: &mut dyn FnMut(&str, f64),
) -> Result<Vec<(String, Value)>, GraphError> {
    let mut values: Vec<Option<Value>> = vec![None; plan.slots];
    for (s, t) in &plan.constants {
        values[*s] = Some(t.clone());
    }
    for (name, s) in &plan.inputs {
        let t = feeds.remove(name).ok_or_else(|| GraphError::Input {
            name: name.clone(),
            reason: "missing".into(),
        })?;
        values[*s] = Some(t);
    }
    for step in &plan.steps {
        let started = std::time::Instant::now();
        let ins: Vec<Option<Value>> = step
            .inputs
            .iter()
            .map(|s| s.and_then(|s| values[s].clone()))
            .collect();
        let outs: Vec<Value> = match &step.work {
            Work::Kernel { .. } => {
                run_kernel_step(step, &ins, plan.snapshot.blas_for(step.device))?
                    .into_iter()
                    .map(Arc::new)
                    .collect()
            }
            control => {
                let captured: Vec<Value> = step
                    .captured
                    .iter()
                    .map(|&s| {
                        values[s].clone().ok_or_else(|| {
                            GraphError::Invalid(format!(
                                "node {}: outer value not computed",
                                step.label
                            ))
                        })
                    })
                    .collect::<Result<_, _>>()?;
                run_control(step, control, &ins, &captured)?
            }
        };
        drop(ins);
        for (s, t) in step.outputs.iter().zip(outs) {
            if let Some(s) = s {
                values[*s] = Some(t);
            }
        }
        for s in &step.release {
            values[*s] = None;
        }
        observe(&step.label, started.elapsed().as_secs_f64());
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

/// Runs one kernel step on `inputs` (by position; `None` for absent ones).
pub(super) fn run_kernel_step(
    step: &Step,
    inputs: &[Option<Value>],
    blas: Option<&FfiBlasBox>,
) -> Result<Vec<HostTensor>, GraphError> {
    let Work::Kernel { instance, plugin } = &step.work else {
        return Err(GraphError::Invalid(format!(
            "node {} is not a kernel step",
            step.label
        )));
    };
    let views: Vec<TensorView<'_>> = inputs
        .iter()
        .map(|t| t.as_ref().map_or(TensorView::absent(), |t| t.view()))
        .collect();
    let plugin = plugin.name.as_str();
    let log = |level: LogLevel, msg: &str| log_from_plugin(plugin, level, msg);
    let frame = CallFrame::new(step.outputs.len(), step.device, blas, &log);
    let failed = |e: opreg_sdk::PluginError| GraphError::Kernel {
        node: step.label.clone(),
        plugin: plugin.to_string(),
        code: e.code,
        message: e.message.to_string(),
    };
    frame
        .with_context(|ctx| instance.compute(ctx, views.as_slice().into()).into_result())
        .map_err(failed)?;
    frame.into_outputs().map_err(failed)
}

fn invalid(step: &Step, msg: impl std::fmt::Display) -> GraphError {
    GraphError::Invalid(format!("node {}: {msg}", step.label))
}

/// Feeds a nested plan: its formal inputs from `formal`, then the captured outer values.
fn feeds(
    step: &Step,
    plan: &Plan,
    formal: Vec<Value>,
    captured: &[Value],
) -> Result<HashMap<String, Value>, GraphError> {
    if formal.len() != plan.formal_inputs {
        return Err(invalid(
            step,
            format!(
                "subgraph takes {} inputs, the node binds {}",
                plan.formal_inputs,
                formal.len()
            ),
        ));
    }
    Ok(plan
        .inputs
        .iter()
        .map(|(n, _)| n.clone())
        .zip(formal.into_iter().chain(captured.iter().cloned()))
        .collect())
}

fn scalar_bool(step: &Step, t: &HostTensor, what: &str) -> Result<bool, GraphError> {
    if t.dtype() != DType::Bool || t.len() != 1 {
        return Err(invalid(
            step,
            format!("{what} must be one bool, is {} {:?}", t.dtype(), t.shape()),
        ));
    }
    Ok(t.bytes()[0] != 0)
}

fn bool_value(b: bool) -> Result<Value, GraphError> {
    HostTensor::from_bytes(DType::Bool, &[], &[b as u8])
        .map(Arc::new)
        .map_err(|e| GraphError::Invalid(e.message.to_string()))
}

fn run_control(
    step: &Step,
    work: &Work,
    ins: &[Option<Value>],
    captured: &[Value],
) -> Result<Vec<Value>, GraphError> {
    match work {
        Work::If {
            then_branch,
            else_branch,
        } => {
            let cond = ins
                .first()
                .cloned()
                .flatten()
                .ok_or_else(|| invalid(step, "If needs a condition"))?;
            let branch = if scalar_bool(step, &cond, "the condition")? {
                then_branch
            } else {
                else_branch
            };
            Ok(run(branch, feeds(step, branch, vec![], captured)?)?
                .into_iter()
                .map(|(_, t)| t)
                .collect())
        }
        Work::Loop { body } => run_loop(step, body, ins, captured),
        Work::Scan(spec) => run_scan(step, spec, ins, captured),
        Work::Kernel { .. } => Err(invalid(step, "kernel step run as control flow")),
    }
}

fn run_loop(
    step: &Step,
    body: &Plan,
    ins: &[Option<Value>],
    captured: &[Value],
) -> Result<Vec<Value>, GraphError> {
    let trips = match ins.first().cloned().flatten() {
        Some(m) => Some(
            m.view()
                .to_i64s()
                .map_err(|e| invalid(step, e.message))?
                .first()
                .copied()
                .unwrap_or(0),
        ),
        None => None,
    };
    let mut cond = match ins.get(1).cloned().flatten() {
        Some(c) => scalar_bool(step, &c, "the loop condition")?,
        None => true,
    };
    let mut carried: Vec<Value> = ins
        .iter()
        .skip(2)
        .map(|t| {
            t.clone()
                .ok_or_else(|| invalid(step, "a loop-carried input is absent"))
        })
        .collect::<Result<_, _>>()?;
    let n = carried.len();
    let scans = body.outputs.len().saturating_sub(1 + n);
    let mut scanned: Vec<Vec<Value>> = vec![Vec::new(); scans];
    let mut i: i64 = 0;
    while cond && trips.is_none_or(|m| i < m) {
        if trips.is_none() && i >= MAX_UNBOUNDED_TRIPS {
            return Err(invalid(
                step,
                format!("Loop ran {MAX_UNBOUNDED_TRIPS} iterations without a trip count"),
            ));
        }
        let iter = HostTensor::from_vec::<i64>(&[], &[i])
            .map(Arc::new)
            .map_err(|e| invalid(step, e.message))?;
        let mut formal = vec![iter, bool_value(cond)?];
        formal.extend(carried.iter().cloned());
        let outs: Vec<Value> = run(body, feeds(step, body, formal, captured)?)?
            .into_iter()
            .map(|(_, t)| t)
            .collect();
        cond = scalar_bool(step, &outs[0], "the body's condition output")?;
        carried = outs[1..1 + n].to_vec();
        for (k, t) in outs[1 + n..].iter().enumerate() {
            scanned[k].push(t.clone());
        }
        i += 1;
    }
    let mut out = carried;
    for (k, items) in scanned.into_iter().enumerate() {
        let dtype = body
            .output_types
            .get(1 + n + k)
            .copied()
            .flatten()
            .unwrap_or(DType::F32);
        out.push(Arc::new(stack(step, &items, 0, dtype)?));
    }
    Ok(out)
}

fn run_scan(
    step: &Step,
    spec: &ScanSpec,
    ins: &[Option<Value>],
    captured: &[Value],
) -> Result<Vec<Value>, GraphError> {
    let all: Vec<Value> = ins
        .iter()
        .map(|t| {
            t.clone()
                .ok_or_else(|| invalid(step, "Scan inputs may not be absent"))
        })
        .collect::<Result<_, _>>()?;
    let (states, scanned) = all.split_at(spec.states);
    let axes: Vec<usize> = scanned
        .iter()
        .zip(&spec.input_axes)
        .map(|(t, &a)| normalize_axis(step, a, t.shape().len()))
        .collect::<Result<_, _>>()?;
    let len = scanned.first().map(|t| t.shape()[axes[0]]).unwrap_or(0);
    if scanned.iter().zip(&axes).any(|(t, &a)| t.shape()[a] != len) {
        return Err(invalid(step, "scan inputs differ in sequence length"));
    }
    let mut carried: Vec<Value> = states.to_vec();
    let outs_n = spec.body.outputs.len().saturating_sub(spec.states);
    let mut collected: Vec<Vec<Value>> = vec![Vec::new(); outs_n];
    for t in 0..len {
        let mut formal = carried.clone();
        for ((x, &a), &rev) in scanned.iter().zip(&axes).zip(&spec.input_reverse) {
            let idx = if rev { len - 1 - t } else { t };
            formal.push(Arc::new(slice_axis(step, x, a, idx)?));
        }
        let outs: Vec<Value> = run(&spec.body, feeds(step, &spec.body, formal, captured)?)?
            .into_iter()
            .map(|(_, v)| v)
            .collect();
        carried = outs[..spec.states].to_vec();
        for (k, v) in outs[spec.states..].iter().enumerate() {
            collected[k].push(v.clone());
        }
    }
    let mut out = carried;
    for (k, mut items) in collected.into_iter().enumerate() {
        if spec.output_reverse.get(k).copied().unwrap_or(false) {
            items.reverse();
        }
        let rank = items.first().map(|t| t.shape().len() + 1).unwrap_or(1);
        let axis = normalize_axis(step, spec.output_axes.get(k).copied().unwrap_or(0), rank)?;
        let dtype = spec
            .body
            .output_types
            .get(spec.states + k)
            .copied()
            .flatten()
            .unwrap_or(DType::F32);
        out.push(Arc::new(stack(step, &items, axis, dtype)?));
    }
    Ok(out)
}

fn normalize_axis(step: &Step, axis: i64, rank: usize) -> Result<usize, GraphError> {
    let r = rank as i64;
    if axis < -r || axis >= r {
        return Err(invalid(
            step,
            format!("axis {axis} out of range for rank {rank}"),
        ));
    }
    Ok(if axis < 0 {
        (axis + r) as usize
    } else {
        axis as usize
    })
}

/// The sub-tensor at `index` along `axis`, with that axis removed.
fn slice_axis(
    step: &Step,
    t: &HostTensor,
    axis: usize,
    index: usize,
) -> Result<HostTensor, GraphError> {
    let shape = t.shape();
    let outer: usize = shape[..axis].iter().product();
    let inner: usize = shape[axis + 1..].iter().product();
    let mut out_shape = shape.to_vec();
    out_shape.remove(axis);
    let err = |e: opreg_sdk::PluginError| invalid(step, e.message);
    if t.dtype() == DType::String {
        let s = t.strings();
        let items: Vec<&[u8]> = (0..outer)
            .flat_map(|o| {
                s[(o * shape[axis] + index) * inner..][..inner]
                    .iter()
                    .map(|x| x.as_bytes())
            })
            .collect();
        return HostTensor::from_strings(&out_shape, &items).map_err(err);
    }
    let size = t.dtype().size();
    let bytes = t.bytes();
    let mut out = Vec::with_capacity(outer * inner * size);
    for o in 0..outer {
        let start = (o * shape[axis] + index) * inner * size;
        out.extend_from_slice(&bytes[start..start + inner * size]);
    }
    HostTensor::from_bytes(t.dtype(), &out_shape, &out).map_err(err)
}

/// Stacks equally shaped tensors along a new `axis` (`dtype` for an empty stack).
fn stack(
    step: &Step,
    items: &[Value],
    axis: usize,
    dtype: DType,
) -> Result<HostTensor, GraphError> {
    let err = |e: opreg_sdk::PluginError| invalid(step, e.message);
    let Some(first) = items.first() else {
        return HostTensor::zeroed(dtype, &[0]).map_err(err);
    };
    let inner_shape = first.shape();
    if items
        .iter()
        .any(|t| t.shape() != inner_shape || t.dtype() != first.dtype())
    {
        return Err(invalid(
            step,
            "iterations produced differently shaped outputs",
        ));
    }
    let outer: usize = inner_shape[..axis].iter().product();
    let inner: usize = inner_shape[axis..].iter().product();
    let mut shape = inner_shape.to_vec();
    shape.insert(axis, items.len());
    if first.dtype() == DType::String {
        let mut all: Vec<&[u8]> = Vec::new();
        for o in 0..outer {
            for t in items {
                all.extend(
                    t.strings()[o * inner..(o + 1) * inner]
                        .iter()
                        .map(|s| s.as_bytes()),
                );
            }
        }
        return HostTensor::from_strings(&shape, &all).map_err(err);
    }
    let size = first.dtype().size();
    let mut out = Vec::with_capacity(items.len() * first.bytes().len());
    for o in 0..outer {
        for t in items {
            out.extend_from_slice(&t.bytes()[o * inner * size..(o + 1) * inner * size]);
        }
    }
    HostTensor::from_bytes(first.dtype(), &shape, &out).map_err(err)
}

//! Running a plan: one value table per request, steps in order, buffers released after
//! their last reader. Control-flow steps run their nested plans.

// Request and model data reach this module: no unchecked index or slice.
#![deny(clippy::indexing_slicing)]

use super::{
    axis,
    compiled::{Plan, ScanSpec, Step, Work},
    copy,
    memory::{Concat, RunArena, ShapeKey},
    sequence::{self, Slot},
    GraphError,
};
use crate::{
    exec::{self, BoundKernel, CallLimits, KernelError},
    registry::Snapshot,
};
use opreg_sdk::{
    host::{HostTensor, PlannedBuf},
    DType, TensorView,
};
use std::{
    collections::HashMap,
    sync::{
        atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering},
        Arc,
    },
    time::Instant,
};

/// Longest a `Loop` may run without a trip count before it is stopped as runaway.
const MAX_UNBOUNDED_TRIPS: i64 = 10_000_000;

type Value = Arc<HostTensor>;

/// Named outputs, in declaration order.
pub type Outputs = Vec<(String, Value)>;
/// What one executed step took, for the profiler.
#[derive(Clone, Debug)]
pub struct StepTime {
    /// Position of the step in the plan (top-level steps only).
    pub step: usize,
    pub seconds: f64,
    /// Bytes of the values it produced (host or device memory).
    pub output_bytes: usize,
}

/// Each executed step's time and output size, in execution order.
pub type StepTimes = Vec<StepTime>;

/// What bounds one run: cancellation (the client went away), a deadline, and memory (the
/// largest value, and the values alive at once). Checked at every node boundary and every
/// `Loop`/`Scan` iteration, so a cancelled or overdue request stops there and frees its memory.
pub struct RunControl {
    cancelled: AtomicBool,
    deadline: Option<Instant>,
    max_tensor_bytes: usize,
    max_live_bytes: usize,
    live: AtomicUsize,
    /// The most `live` has been.
    peak: AtomicUsize,
    copies: AtomicU64,
    copy_bytes: AtomicU64,
    /// Wait for the device after each device kernel (profiled runs: step times mean
    /// something only then).
    wait_devices: AtomicBool,
}

impl RunControl {
    /// No deadline, no limits (benchmarks, folding has its own).
    pub fn unbounded() -> Self {
        Self::new(usize::MAX, usize::MAX, None)
    }

    /// Values up to `max_tensor_bytes` each and `max_live_bytes` alive at once, stopping at
    /// `deadline`.
    pub fn new(max_tensor_bytes: usize, max_live_bytes: usize, deadline: Option<Instant>) -> Self {
        RunControl {
            cancelled: AtomicBool::new(false),
            deadline,
            max_tensor_bytes,
            max_live_bytes,
            live: AtomicUsize::new(0),
            peak: AtomicUsize::new(0),
            copies: AtomicU64::new(0),
            copy_bytes: AtomicU64::new(0),
            wait_devices: AtomicBool::new(false),
        }
    }

    /// Copy steps this run executed, and the bytes they moved.
    pub fn copies(&self) -> (u64, u64) {
        (
            self.copies.load(Ordering::Relaxed),
            self.copy_bytes.load(Ordering::Relaxed),
        )
    }

    /// The most bytes the run's values held at once.
    pub fn peak_bytes(&self) -> usize {
        self.peak.load(Ordering::Relaxed)
    }

    /// Asks the run to stop at its next node boundary.
    pub fn cancel(&self) {
        self.cancelled.store(true, Ordering::Release);
    }

    /// Whether device kernels are waited for one by one (profiled runs).
    pub fn waits_for_devices(&self) -> bool {
        self.wait_devices.load(Ordering::Relaxed)
    }

    /// The largest single value a kernel may allocate.
    pub fn max_tensor_bytes(&self) -> usize {
        self.max_tensor_bytes
    }

    /// True once the run should stop (cancelled or past its deadline): asked between chunks of
    /// a kernel's parallel work, so one long kernel call is cut short too.
    pub fn should_stop(&self) -> bool {
        self.cancelled.load(Ordering::Acquire) || self.deadline.is_some_and(|d| Instant::now() >= d)
    }

    fn check(&self, node: &str) -> Result<(), GraphError> {
        if self.cancelled.load(Ordering::Acquire) {
            return Err(GraphError::Cancelled { node: node.into() });
        }
        if self.deadline.is_some_and(|d| Instant::now() >= d) {
            return Err(GraphError::DeadlineExceeded { node: node.into() });
        }
        Ok(())
    }

    /// Counts `bytes` more alive; fails when the request's live total passes its limit.
    fn hold(&self, node: &str, bytes: usize) -> Result<(), GraphError> {
        let live = self
            .live
            .fetch_add(bytes, Ordering::Relaxed)
            .saturating_add(bytes);
        self.peak.fetch_max(live, Ordering::Relaxed);
        if live > self.max_live_bytes {
            return Err(GraphError::Limit {
                node: node.into(),
                reason: format!(
                    "the request's values would hold {live} bytes at once, more than the limit of {} (max_request_bytes)",
                    self.max_live_bytes
                ),
            });
        }
        Ok(())
    }

    fn free(&self, bytes: usize) {
        // Saturating: a value counted by an outer run may be released by a nested one.
        let _ = self
            .live
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |l| {
                Some(l.saturating_sub(bytes))
            });
    }
}

/// Bytes a value holds (strings: their slots; their text is bounded by the wire limits), in
/// host or device memory.
fn bytes_of(t: &HostTensor) -> usize {
    t.byte_len()
}

/// Runs `plan` on `feeds` (one tensor per input, checked by the caller) and returns the
/// outputs in declaration order, with no deadline or limits. Call it on the compute pool.
pub fn run(plan: &Plan, feeds: HashMap<String, Value>) -> Result<Vec<(String, Value)>, GraphError> {
    run_tensors(plan, feeds, &RunControl::unbounded(), None)
}

/// Like [`run`], bounded and cancellable by `control`.
pub fn run_with_control(
    plan: &Plan,
    feeds: HashMap<String, Value>,
    control: &RunControl,
) -> Result<Vec<(String, Value)>, GraphError> {
    run_tensors(plan, feeds, control, None)
}

/// Like [`run_with_control`], also returning the time each top-level step took and the bytes
/// it produced, for profiling.
pub fn run_profiled(
    plan: &Plan,
    feeds: HashMap<String, Value>,
    control: &RunControl,
) -> Result<(Outputs, StepTimes), GraphError> {
    let mut times = Vec::new();
    control.wait_devices.store(true, Ordering::Relaxed);
    let out = run_tensors(plan, feeds, control, Some(&mut |t| times.push(t)))?;
    Ok((out, times))
}

/// A run whose inputs and outputs are tensors (a served model's: sequences stay inside).
fn run_tensors(
    plan: &Plan,
    feeds: HashMap<String, Value>,
    control: &RunControl,
    observe: Option<&mut dyn FnMut(StepTime)>,
) -> Result<Vec<(String, Value)>, GraphError> {
    // A batch-separable graph's large batch runs image by image, the images side by side.
    if observe.is_none() {
        if let Some(out) = super::batch::run_split(plan, &feeds, control) {
            return out;
        }
    }
    let feeds = feeds
        .into_iter()
        .map(|(n, t)| (n, Slot::Tensor(t)))
        .collect();
    // The pool's other workers poll for this run's loops instead of sleeping between them
    // (see `exec::with_workers_awake`); nested plans run inside it.
    crate::exec::with_workers_awake(|| run_with(plan, feeds, control, observe))?
        .into_iter()
        .map(|(name, v)| {
            let t = v.tensor(|| format!("output '{name}'"))?.clone();
            Ok((name, t))
        })
        .collect()
}

/// One part of a split batch ([`super::batch`]): `plan` on `feeds`, on the calling thread
/// (inside the split's parallel loop, where the other workers are already awake).
pub(super) fn run_part(
    plan: &Plan,
    feeds: HashMap<String, Value>,
    control: &RunControl,
) -> Result<Outputs, GraphError> {
    let feeds = feeds
        .into_iter()
        .map(|(n, t)| (n, Slot::Tensor(t)))
        .collect();
    run_with(plan, feeds, control, None)?
        .into_iter()
        .map(|(name, v)| {
            let t = v.tensor(|| format!("output '{name}'"))?.clone();
            Ok((name, t))
        })
        .collect()
}

/// The value table of one run. What it holds counts against the run's live bytes until the
/// table drops, also when the run fails half-way.
struct Values<'c> {
    slots: Vec<Option<Slot>>,
    /// Slots whose value this run owns (constants belong to the plan).
    owned: Vec<bool>,
    control: &'c RunControl,
}

impl Values<'_> {
    fn set(&mut self, slot: usize, t: Slot, node: &str) -> Result<(), GraphError> {
        let Some(place) = self.slots.get_mut(slot) else {
            return Err(GraphError::Invalid(format!(
                "node {node}: value slot {slot} out of range"
            )));
        };
        let bytes = t.byte_len();
        if let Some(old) = place.replace(t) {
            if self.owned.get(slot).copied().unwrap_or(false) {
                self.control.free(old.byte_len());
            }
        }
        if let Some(o) = self.owned.get_mut(slot) {
            *o = true;
        }
        self.control.hold(node, bytes)
    }

    fn get(&self, slot: usize) -> Option<Slot> {
        self.slot(slot).cloned()
    }

    fn slot(&self, slot: usize) -> Option<&Slot> {
        self.slots.get(slot).and_then(Option::as_ref)
    }

    fn release(&mut self, slot: usize) {
        if let Some(t) = self.slots.get_mut(slot).and_then(Option::take) {
            if self.owned.get(slot).copied().unwrap_or(false) {
                self.control.free(t.byte_len());
            }
        }
    }
}

impl Drop for Values<'_> {
    fn drop(&mut self) {
        for slot in 0..self.slots.len() {
            self.release(slot);
        }
    }
}

fn run_with(
    plan: &Plan,
    mut feeds: HashMap<String, Slot>,
    control: &RunControl,
    // Called after each step with its time, when profiling (reading the clock twice per step
    // is a measurable part of a small node's cost, so runs that do not profile do not).
    mut observe: Option<&mut dyn FnMut(StepTime)>,
) -> Result<Vec<(String, Slot)>, GraphError> {
    // The input shapes pick the memory pattern: an arena when one was learnt for them, else
    // this run records the sizes to learn it.
    let key: ShapeKey = plan
        .inputs
        .iter()
        .map(|(name, _)| match feeds.get(name) {
            Some(Slot::Tensor(t)) => (t.dtype(), t.shape().to_vec()),
            _ => (DType::UNDEFINED, Vec::new()),
        })
        .collect();
    let arena = plan.memory.arena(&key);
    let mut sizes: Vec<Option<usize>> = if arena.is_none() {
        vec![None; plan.slots]
    } else {
        Vec::new()
    };
    let mut values = Values {
        slots: vec![None; plan.slots],
        owned: vec![false; plan.slots],
        control,
    };
    // Which of the plan's concatenations had every input as one contiguous run of the output
    // (recorded with the sizes, for the pattern to place them in place).
    let concats = plan.memory.concats();
    let mut contiguous = vec![false; if sizes.is_empty() { 0 } else { concats.len() }];
    for (s, t) in &plan.constants {
        if let Some(place) = values.slots.get_mut(*s) {
            *place = Some(Slot::Tensor(t.clone()));
        }
    }
    for (name, s) in &plan.inputs {
        let t = feeds.remove(name).ok_or_else(|| GraphError::Input {
            name: name.clone(),
            reason: "missing".into(),
        })?;
        values.set(*s, t, name)?;
    }
    for (index, step) in plan.steps.iter().enumerate() {
        control.check(&step.label)?;
        let started = observe.is_some().then(Instant::now);
        // Kernels read their inputs where the value table holds them (no clone of each
        // input's handle per step); the other steps take their own handles.
        let ins = || -> Vec<Option<Slot>> {
            step.inputs
                .iter()
                .map(|s| s.and_then(|s| values.get(s)))
                .collect()
        };
        let in_place = arena.as_ref().and_then(|a| Some((a, a.in_place(index)?)));
        // The inputs made end to end inside the output's range: the output is that range,
        // nothing to copy.
        let assembled = match (&step.work, in_place) {
            (Work::Kernel(_), Some((a, c))) => assembled(a, c, step, &values),
            _ => None,
        };
        let outs: Vec<Slot> = match &step.work {
            _ if assembled.is_some() => {
                plan.memory.assembled_one();
                assembled.into_iter().collect()
            }
            Work::Kernel(bound) => {
                let views = kernel_inputs(step, &values)?;
                // A concatenation placed in place whose inputs are not where the plan put
                // them copies into memory of its own: its planned range holds its inputs.
                let planned = match arena.as_ref() {
                    Some(a) if in_place.is_none() => step
                        .outputs
                        .iter()
                        .map(|s| s.and_then(|s| place_output(a, index, s, &values)))
                        .collect(),
                    _ => Vec::new(),
                };
                let handed = planned.iter().flatten().filter(|p| p.holds_input).count();
                plan.memory.handed(handed);
                if !sizes.is_empty() {
                    if let Some(g) = concats.iter().position(|c| c.step == index) {
                        if let Some(c) = contiguous.get_mut(g) {
                            *c = contiguous_pieces(step, &views);
                        }
                    }
                }
                run_kernel_step(step, bound, &views, &plan.snapshot, control, planned)?
                    .into_iter()
                    .map(Slot::Tensor)
                    .collect()
            }
            Work::Copy { from, to } => {
                let t = tensors(step, &ins())?
                    .first()
                    .cloned()
                    .flatten()
                    .ok_or_else(|| {
                        GraphError::Invalid(format!("{}: nothing to copy", step.label))
                    })?;
                let moved = copy::copy(&plan.snapshot, &t, *from, *to).map_err(|e| {
                    KernelError::Failed {
                        node: step.label.clone(),
                        plugin: "opregd".into(),
                        code: e.code,
                        message: e.message.to_string(),
                    }
                })?;
                control.copies.fetch_add(1, Ordering::Relaxed);
                control
                    .copy_bytes
                    .fetch_add(t.byte_len() as u64, Ordering::Relaxed);
                vec![Slot::Tensor(Arc::new(moved))]
            }
            Work::Sequence(op) => sequence::run(step, op, &ins())?,
            control_work => {
                let captured: Vec<Slot> = step
                    .captured
                    .iter()
                    .map(|&s| {
                        values.get(s).ok_or_else(|| {
                            GraphError::Invalid(format!(
                                "node {}: outer value not computed",
                                step.label
                            ))
                        })
                    })
                    .collect::<Result<_, _>>()?;
                run_control(step, control_work, &ins(), &captured, control)?
            }
        };
        let output_bytes = outs.iter().map(Slot::byte_len).sum();
        for (s, t) in step.outputs.iter().zip(outs) {
            if let Some(s) = s {
                if let Slot::Tensor(t) = &t {
                    if plan.memory.plannable(*s) && t.on_host() && t.dtype() != DType::String {
                        if let Some(size) = sizes.get_mut(*s) {
                            *size = Some(t.byte_len());
                        }
                    }
                }
                values.set(*s, t, &step.label)?;
            }
        }
        for s in &step.release {
            values.release(*s);
        }
        if let (Some(observe), Some(started)) = (observe.as_mut(), started) {
            observe(StepTime {
                step: index,
                seconds: started.elapsed().as_secs_f64(),
                output_bytes,
            });
        }
    }
    let outputs = plan
        .outputs
        .iter()
        .map(|(name, s)| {
            values
                .get(*s)
                .map(|t| (name.clone(), t))
                .ok_or_else(|| GraphError::Invalid(format!("output '{name}' was not computed")))
        })
        .collect::<Result<Vec<_>, _>>()?;
    if !sizes.is_empty() {
        plan.memory.learn(key, &sizes, &contiguous);
    }
    Ok(outputs)
}

/// Runs one kernel step on `inputs` (by position; `None` for absent ones).
fn run_kernel_step(
    step: &Step,
    bound: &BoundKernel,
    views: &[TensorView<'_>],
    snapshot: &Snapshot,
    control: &RunControl,
    planned: Vec<Option<PlannedBuf>>,
) -> Result<Vec<Arc<HostTensor>>, GraphError> {
    let stop = || control.should_stop();
    let limits = CallLimits {
        max_tensor_bytes: control.max_tensor_bytes(),
        stop: &stop,
        wait_device: control.waits_for_devices(),
    };
    match exec::call(
        snapshot,
        bound,
        &step.label,
        step.outputs.len(),
        views,
        &limits,
        planned,
    ) {
        Ok(outs) => Ok(outs),
        Err(KernelError::Stopped { .. }) => {
            // Chunks were skipped: whatever the kernel computed is incomplete. Say why.
            control.check(&step.label)?;
            Err(GraphError::DeadlineExceeded {
                node: step.label.clone(),
            })
        }
        Err(e) => Err(e.into()),
    }
}

/// The range planned for output `slot` of kernel step `step`. Where the pattern placed it
/// over an input (`memory::Alias`) that lies there now, the range is handed over holding that
/// input ([`PlannedBuf::holds_input`]: not zeroed, the kernel declared it may write over it);
/// where the input ended up elsewhere (a size the pattern did not expect), the range is the
/// output's alone.
fn place_output(
    arena: &RunArena,
    step: usize,
    slot: usize,
    values: &Values<'_>,
) -> Option<PlannedBuf> {
    let mut place = arena.place(slot)?;
    if let Some(input) = arena.aliased(step, slot) {
        place.holds_input = matches!(values.slot(input), Some(Slot::Tensor(t))
            if t.on_host() && std::ptr::eq(t.bytes().as_ptr(), place.ptr.as_ptr()));
    }
    Some(place)
}

/// Whether a `Concat` step's inputs are each one contiguous run of its output: host tensors of
/// one (non-string) type with nothing but ones before the axis.
fn contiguous_pieces(step: &Step, inputs: &[TensorView<'_>]) -> bool {
    let Some(axis) = step.concat_axis else {
        return false;
    };
    let dtype = inputs.first().map(|v| v.dtype);
    !inputs.is_empty()
        && inputs.iter().all(|v| {
            let rank = v.shape().len() as i64;
            let ax = if axis < 0 { axis + rank } else { axis };
            Some(v.dtype) == dtype
                && v.dtype != DType::String
                && v.device.host_accessible()
                && usize::try_from(ax)
                    .ok()
                    .and_then(|ax| v.shape().get(..ax).filter(|_| ax < v.shape().len()))
                    .is_some_and(|before| before.iter().all(|&d| d == 1))
        })
}

/// Concatenation `c`'s output when its inputs lie end to end in the output's planned range,
/// as the pattern placed them: each input a host tensor at its planned address, of one type,
/// nothing but ones before the axis and the same extents after it, their bytes adding up to
/// the output's range. `None` (the kernel runs) for anything else: an input a kernel returned
/// from elsewhere, shapes the kernel should judge.
fn assembled(arena: &RunArena, c: &Concat, step: &Step, values: &Values<'_>) -> Option<Slot> {
    let out = arena.place(c.output)?;
    let mut at = out.ptr.as_ptr() as usize;
    let mut views = Vec::with_capacity(c.inputs.len());
    let mut shape: Option<Vec<usize>> = None;
    for &s in &c.inputs {
        let (Some(p), Some(Slot::Tensor(t))) = (arena.place(s), values.slot(s)) else {
            return None;
        };
        if !t.on_host() || t.bytes().as_ptr() as usize != at || p.ptr.as_ptr() as usize != at {
            return None;
        }
        at += t.byte_len();
        views.push(t.view());
        let rank = t.shape().len() as i64;
        let axis = step.concat_axis?;
        let ax = usize::try_from(if axis < 0 { axis + rank } else { axis }).ok()?;
        match shape.as_mut() {
            None => shape = Some(t.shape().to_vec()),
            Some(sh) => {
                let same = sh.len() == t.shape().len()
                    && sh
                        .iter()
                        .zip(t.shape())
                        .enumerate()
                        .all(|(i, (a, b))| i == ax || a == b);
                let grown = sh.get(ax)?.checked_add(*t.shape().get(ax)?)?;
                if !same {
                    return None;
                }
                *sh.get_mut(ax)? = grown;
            }
        }
    }
    if at != out.ptr.as_ptr() as usize + out.len || !contiguous_pieces(step, &views) {
        return None;
    }
    let dtype = views.first()?.dtype;
    let t = HostTensor::over_planned(dtype, &shape?, &out).ok()?;
    Some(Slot::Tensor(Arc::new(t)))
}

/// A kernel step's inputs as views of the tensors the value table holds (absent optional
/// inputs as [`TensorView::absent`]; a sequence reaching a kernel is refused).
fn kernel_inputs<'v>(
    step: &Step,
    values: &'v Values<'_>,
) -> Result<Vec<TensorView<'v>>, GraphError> {
    step.inputs
        .iter()
        .enumerate()
        .map(|(k, s)| match s.and_then(|s| values.slot(s)) {
            Some(v) => v
                .tensor(|| format!("node {}: input {k}", step.label))
                .map(|t| t.view()),
            None => Ok(TensorView::absent()),
        })
        .collect()
}

/// Non-kernel steps' inputs: tensors (a sequence is refused).
fn tensors(step: &Step, ins: &[Option<Slot>]) -> Result<Vec<Option<Value>>, GraphError> {
    ins.iter()
        .enumerate()
        .map(|(k, v)| match v {
            Some(v) => v
                .tensor(|| format!("node {}: input {k}", step.label))
                .map(|t| Some(t.clone())),
            None => Ok(None),
        })
        .collect()
}

/// A tensor operand of control flow.
fn tensor_of<'v>(step: &Step, v: &'v Slot, what: &str) -> Result<&'v Value, GraphError> {
    v.tensor(|| format!("node {}: {what}", step.label))
}

fn invalid(step: &Step, msg: impl std::fmt::Display) -> GraphError {
    GraphError::Invalid(format!("node {}: {msg}", step.label))
}

/// Feeds a nested plan: its formal inputs from `formal`, then the captured outer values.
fn feeds(
    step: &Step,
    plan: &Plan,
    formal: Vec<Slot>,
    captured: &[Slot],
) -> Result<HashMap<String, Slot>, GraphError> {
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
    Ok(t.bytes().first().is_some_and(|&b| b != 0))
}

fn bool_value(b: bool) -> Result<Slot, GraphError> {
    HostTensor::from_bytes(DType::Bool, &[], &[b as u8])
        .map(|t| Slot::Tensor(Arc::new(t)))
        .map_err(|e| GraphError::Invalid(e.message.to_string()))
}

/// Runs a nested plan under the same control as its parent, returning its outputs in order.
fn run_nested(
    plan: &Plan,
    feeds: HashMap<String, Slot>,
    control: &RunControl,
) -> Result<Vec<Slot>, GraphError> {
    Ok(run_with(plan, feeds, control, None)?
        .into_iter()
        .map(|(_, t)| t)
        .collect())
}

fn run_control(
    step: &Step,
    work: &Work,
    ins: &[Option<Slot>],
    captured: &[Slot],
    control: &RunControl,
) -> Result<Vec<Slot>, GraphError> {
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
            let branch = if scalar_bool(
                step,
                tensor_of(step, &cond, "the condition")?,
                "the condition",
            )? {
                then_branch
            } else {
                else_branch
            };
            run_nested(branch, feeds(step, branch, vec![], captured)?, control)
        }
        Work::Loop { body } => run_loop(step, body, ins, captured, control),
        Work::Scan(spec) => run_scan(step, spec, ins, captured, control),
        Work::SequenceMap { body } => run_sequence_map(step, body, ins, captured, control),
        Work::Kernel { .. } | Work::Copy { .. } | Work::Sequence(_) => {
            Err(invalid(step, "kernel step run as control flow"))
        }
    }
}

/// Per-iteration outputs a `Loop` or `Scan` collects, counted against the request's live
/// bytes until they are stacked.
struct Collected<'c> {
    items: Vec<Vec<Value>>,
    bytes: usize,
    control: &'c RunControl,
}

impl<'c> Collected<'c> {
    fn new(outputs: usize, control: &'c RunControl) -> Self {
        Collected {
            items: vec![Vec::new(); outputs],
            bytes: 0,
            control,
        }
    }

    fn push(&mut self, step: &Step, values: &[Slot]) -> Result<(), GraphError> {
        for (k, t) in values.iter().enumerate() {
            let t = tensor_of(step, t, "a scan output (stacked per iteration)")?;
            let list = self
                .items
                .get_mut(k)
                .ok_or_else(|| invalid(step, "an iteration returned more outputs than declared"))?;
            opreg_sdk::alloc::try_reserve(list, 1).map_err(|e| GraphError::Limit {
                node: step.label.clone(),
                reason: e.message.to_string(),
            })?;
            list.push(t.clone());
            self.bytes = self.bytes.saturating_add(bytes_of(t));
            self.control.hold(&step.label, bytes_of(t))?;
        }
        Ok(())
    }
}

impl Drop for Collected<'_> {
    fn drop(&mut self) {
        self.control.free(self.bytes);
    }
}

fn run_loop(
    step: &Step,
    body: &Plan,
    ins: &[Option<Slot>],
    captured: &[Slot],
    control: &RunControl,
) -> Result<Vec<Slot>, GraphError> {
    let trips = match ins.first().cloned().flatten() {
        Some(m) => Some(
            tensor_of(step, &m, "the trip count")?
                .view()
                .to_i64s()
                .map_err(|e| invalid(step, e.message))?
                .first()
                .copied()
                .unwrap_or(0),
        ),
        None => None,
    };
    let mut cond = match ins.get(1).cloned().flatten() {
        Some(c) => scalar_bool(
            step,
            tensor_of(step, &c, "the loop condition")?,
            "the loop condition",
        )?,
        None => true,
    };
    let mut carried: Vec<Slot> = ins
        .iter()
        .skip(2)
        .map(|t| {
            t.clone()
                .ok_or_else(|| invalid(step, "a loop-carried input is absent"))
        })
        .collect::<Result<_, _>>()?;
    let n = carried.len();
    let scans = body.outputs.len().saturating_sub(1 + n);
    let mut scanned = Collected::new(scans, control);
    let mut i: i64 = 0;
    while cond && trips.is_none_or(|m| i < m) {
        control.check(&step.label)?;
        if trips.is_none() && i >= MAX_UNBOUNDED_TRIPS {
            return Err(invalid(
                step,
                format!("Loop ran {MAX_UNBOUNDED_TRIPS} iterations without a trip count"),
            ));
        }
        let iter = HostTensor::from_vec::<i64>(&[], &[i])
            .map(|t| Slot::Tensor(Arc::new(t)))
            .map_err(|e| invalid(step, e.message))?;
        let mut formal = vec![iter, bool_value(cond)?];
        formal.extend(carried.iter().cloned());
        let outs = run_nested(body, feeds(step, body, formal, captured)?, control)?;
        // The plan checked the body's arity; a short result is still an error, not a panic.
        let (Some(c), Some(rest)) = (outs.first(), outs.get(1..)) else {
            return Err(invalid(step, "the body returned no condition"));
        };
        cond = scalar_bool(
            step,
            tensor_of(step, c, "the body's condition output")?,
            "the body's condition output",
        )?;
        if rest.len() < n {
            return Err(invalid(
                step,
                format!("the body returned {} values for {n} carried", rest.len()),
            ));
        }
        let (next, scan_values) = rest.split_at(n);
        carried = next.to_vec();
        scanned.push(step, scan_values)?;
        i += 1;
    }
    let mut out = carried;
    for (k, items) in std::mem::take(&mut scanned.items).into_iter().enumerate() {
        let dtype = body
            .output_types
            .get(1 + n + k)
            .copied()
            .flatten()
            .unwrap_or(DType::F32);
        out.push(Slot::Tensor(Arc::new(stack(step, &items, 0, dtype)?)));
    }
    Ok(out)
}

/// `SequenceMap`: the body once per element of the first input's sequence (the other
/// sequence inputs give their element at the same position; tensor inputs are passed whole),
/// each output collected into a sequence.
fn run_sequence_map(
    step: &Step,
    body: &Plan,
    ins: &[Option<Slot>],
    captured: &[Slot],
    control: &RunControl,
) -> Result<Vec<Slot>, GraphError> {
    let len = match ins.first() {
        Some(Some(Slot::Seq(s))) => s.items.len(),
        _ => return Err(invalid(step, "input 0 must be a sequence")),
    };
    for (k, v) in ins.iter().enumerate() {
        match v {
            Some(Slot::Seq(s)) if s.items.len() != len => {
                return Err(invalid(
                    step,
                    format!(
                        "input {k} has {} elements, input 0 has {len}",
                        s.items.len()
                    ),
                ))
            }
            Some(Slot::Empty) | None => {
                return Err(invalid(step, format!("input {k} is missing or empty")))
            }
            _ => {}
        }
    }
    let mut collected = Collected::new(body.outputs.len(), control);
    for i in 0..len {
        control.check(&step.label)?;
        let formal: Vec<Slot> = ins
            .iter()
            .flatten()
            .map(|v| match v {
                Slot::Seq(s) => s
                    .items
                    .get(i)
                    .cloned()
                    .map(Slot::Tensor)
                    .ok_or_else(|| invalid(step, "sequence element out of range")),
                other => Ok(other.clone()),
            })
            .collect::<Result<_, _>>()?;
        let outs = run_nested(body, feeds(step, body, formal, captured)?, control)?;
        collected.push(step, &outs)?;
    }
    let items = std::mem::take(&mut collected.items);
    Ok(items
        .into_iter()
        .enumerate()
        .map(|(k, items)| {
            let dtype = items.first().map_or_else(
                || {
                    body.output_types
                        .get(k)
                        .copied()
                        .flatten()
                        .unwrap_or(DType::F32)
                },
                |t| t.dtype(),
            );
            Slot::Seq(Arc::new(sequence::Sequence { dtype, items }))
        })
        .collect())
}

fn run_scan(
    step: &Step,
    spec: &ScanSpec,
    ins: &[Option<Slot>],
    captured: &[Slot],
    control: &RunControl,
) -> Result<Vec<Slot>, GraphError> {
    let all: Vec<Slot> = ins
        .iter()
        .map(|t| {
            t.clone()
                .ok_or_else(|| invalid(step, "Scan inputs may not be absent"))
        })
        .collect::<Result<_, _>>()?;
    if all.len() < spec.states || spec.input_axes.len() != all.len() - spec.states {
        return Err(invalid(
            step,
            "Scan inputs do not match its states and axes",
        ));
    }
    let (states, scanned) = all.split_at(spec.states);
    let scanned: Vec<&Value> = scanned
        .iter()
        .map(|v| tensor_of(step, v, "a scanned input"))
        .collect::<Result<_, _>>()?;
    let axes: Vec<usize> = scanned
        .iter()
        .zip(&spec.input_axes)
        .map(|(t, &a)| normalize_axis(step, a, t.shape().len()))
        .collect::<Result<_, _>>()?;
    let extent = |t: &&Value, a: usize| t.shape().get(a).copied().unwrap_or(0);
    let len = scanned
        .first()
        .zip(axes.first())
        .map_or(0, |(t, &a)| extent(t, a));
    if scanned.iter().zip(&axes).any(|(t, &a)| extent(t, a) != len) {
        return Err(invalid(step, "scan inputs differ in sequence length"));
    }
    let mut carried: Vec<Slot> = states.to_vec();
    let outs_n = spec.body.outputs.len().saturating_sub(spec.states);
    let mut collected = Collected::new(outs_n, control);
    for t in 0..len {
        control.check(&step.label)?;
        let mut formal = carried.clone();
        for ((x, &a), &rev) in scanned.iter().zip(&axes).zip(&spec.input_reverse) {
            let idx = if rev { len - 1 - t } else { t };
            formal.push(Slot::Tensor(Arc::new(slice_axis(step, x, a, idx)?)));
        }
        let outs = run_nested(
            &spec.body,
            feeds(step, &spec.body, formal, captured)?,
            control,
        )?;
        if outs.len() < spec.states {
            return Err(invalid(
                step,
                format!(
                    "the body returned {} values for {} states",
                    outs.len(),
                    spec.states
                ),
            ));
        }
        let (next, scan_values) = outs.split_at(spec.states);
        carried = next.to_vec();
        collected.push(step, scan_values)?;
    }
    let mut out = carried;
    for (k, mut items) in std::mem::take(&mut collected.items).into_iter().enumerate() {
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
        out.push(Slot::Tensor(Arc::new(stack(step, &items, axis, dtype)?)));
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
    axis::slice(t, axis, index, 1, false).map_err(|e| invalid(step, e))
}

/// Stacks equally shaped tensors along a new `axis` (`dtype` for an empty stack).
fn stack(
    step: &Step,
    items: &[Value],
    axis: usize,
    dtype: DType,
) -> Result<HostTensor, GraphError> {
    if items.is_empty() {
        return HostTensor::zeroed(dtype, &[0]).map_err(|e| invalid(step, e.message));
    }
    axis::concat(items, axis, true).map_err(|e| invalid(step, format!("iterations' outputs: {e}")))
}

//! Compiling a model into a plan bound to one registry generation.
//!
//! Kernels come from plugins; the control-flow operators (`If`, `Loop`, `Scan`) are the
//! runtime's own, because they run subgraphs: their subgraphs are compiled here into nested
//! plans, and the outer values a subgraph reads are bound to it as extra inputs.

// Indexing here is into the plan's own tables (slots, nodes), sized by the plan as it is
// built; what comes from the model is checked where it enters (names, arities, attributes).

use super::compiled::{Placement, Plan, Step, Work};
use super::control::{self, Typed};
use super::memory::{Alias, Concat, MemoryPlan};
use super::passes::Fusion;
use super::schedule::schedule;
use super::subgraphs::{subgraphs, Subgraphs};
use super::values::Values;
use super::{
    copies,
    import::{Dim, Model, Node},
    sequence, GraphError,
};
use crate::{
    exec::{self, BoundKernel, CallLimits, KernelError, NodeDesc},
    registry::{KernelQuery, KernelRef, Snapshot},
};
use opreg_sdk::{
    host::HostTensor, kernel::ValueInfo, AttrValue, DType, Device, ErrorCode, TensorView,
};
use std::{
    collections::{HashMap, HashSet},
    sync::Arc,
};

/// Longest one constant fold may take at model load.
const FOLD_STEP_TIME: std::time::Duration = std::time::Duration::from_secs(5);

/// Ops whose result is not a function of their inputs: never folded.
const NONDETERMINISTIC: &[&str] = &[
    "RandomNormal",
    "RandomUniform",
    "RandomNormalLike",
    "RandomUniformLike",
    "Multinomial",
    "Bernoulli",
    // In training mode (training_mode input true, nonzero ratio) its mask is random: a
    // Dropout of constant inputs must not be frozen into one mask at load. Little folding is
    // lost: the plain inference form (no ratio, training_mode or mask) is removed by the
    // identities pass before this.
    "Dropout",
];

/// Compiles `model` against `snapshot`, placing each node on the first device of `devices`
/// that has a kernel for it. Call it on the compute pool: folding runs kernels.
///
/// The plan holds no constant that every reader absorbed (ABI 1.8: packed at instantiation
/// and passed absent); `model` keeps its own handles to them. [`compile_owned`] frees them.
pub fn compile(
    model: &Model,
    snapshot: Arc<Snapshot>,
    devices: &[Device],
    max_folded_bytes: usize,
) -> Result<Plan, GraphError> {
    compile_with(
        model,
        model.initializers.clone(),
        snapshot,
        devices,
        max_folded_bytes,
        &mut |_, _| {},
    )
}

/// Like [`compile`], but the plan takes `model`'s initializers over while it binds, so that
/// each constant every reader absorbed is freed as soon as its last reader has packed it:
/// a model's weights are never held twice, as loaded and as packed, not even at the peak
/// (a BERT-base encoder's MatMul weights are 170 MB of its 265). Afterwards `model` holds
/// again every initializer the plan still holds; the names of the others (freed) are
/// returned, and `model` is no longer complete without them (see
/// `repo::model::ServedModel::full_model`). On an error some may be freed already.
/// `on_free(name, tensor)` sees each constant the plan lets go of, just before (a folded
/// result's name is its node output's).
pub fn compile_owned(
    model: &mut Model,
    snapshot: Arc<Snapshot>,
    devices: &[Device],
    max_folded_bytes: usize,
    on_free: &mut dyn FnMut(&str, &HostTensor),
) -> Result<(Plan, Vec<String>), GraphError> {
    // Weak handles say afterwards which tensors the plan kept: the same allocations go back.
    let handles: Vec<(String, std::sync::Weak<HostTensor>)> = model
        .initializers
        .iter()
        .map(|(n, t)| (n.clone(), Arc::downgrade(t)))
        .collect();
    let initializers = std::mem::take(&mut model.initializers);
    let plan = compile_with(
        model,
        initializers,
        snapshot,
        devices,
        max_folded_bytes,
        on_free,
    );
    let mut freed = Vec::new();
    for (name, weak) in handles {
        match weak.upgrade() {
            Some(t) => {
                model.initializers.insert(name, t);
            }
            None => freed.push(name),
        }
    }
    freed.sort_unstable();
    Ok((plan?, freed))
}

/// [`compile`] with the initializers given apart from the graph (`model`'s own are not read),
/// and `on_free` told of each constant the plan lets go of.
fn compile_with(
    model: &Model,
    initializers: HashMap<String, Arc<HostTensor>>,
    snapshot: Arc<Snapshot>,
    devices: &[Device],
    max_folded_bytes: usize,
    on_free: &mut dyn FnMut(&str, &HostTensor),
) -> Result<Plan, GraphError> {
    let formal: Typed = model
        .inputs
        .iter()
        .map(|i| (i.name.clone(), Some(i.dtype)))
        .collect();
    let mut fold_budget = max_folded_bytes;
    // Fusions into opreg's operators depend on the kernels this snapshot has: they run per
    // compile (a hot swap may add or remove them), on a copy sharing the initializers.
    let fusions: Vec<&dyn super::passes::Pass> = super::passes::FUSIONS
        .iter()
        .copied()
        .filter(|p| {
            p.fuses()
                .is_some_and(|f| fusion_available(&snapshot, devices, f))
        })
        .collect();
    let fused;
    let (model, initializers) = if fusions.is_empty() {
        (model, initializers)
    } else {
        let mut m = Model {
            initializers,
            ..model.clone()
        };
        super::passes::run(&mut m, &fusions)?;
        let initializers = std::mem::take(&mut m.initializers);
        fused = m;
        (&fused, initializers)
    };
    let plan = compile_graph(
        model,
        initializers,
        &formal,
        &[],
        &HashSet::new(),
        snapshot,
        devices,
        &mut fold_budget,
        on_free,
    )?;
    // KServe v2 carries tensors: a sequence may live inside the graph, not leave it.
    if let Some(((name, _), _)) = plan.outputs.iter().zip(&plan.output_seqs).find(|(_, &s)| s) {
        return Err(GraphError::Unsupported(format!(
            "output '{name}' is a sequence: KServe v2 carries tensors only, so sequences may be used inside a served graph but not returned from it"
        )));
    }
    Ok(plan)
}

/// Whether the fused operator can run wherever the original could: every preferred device with
/// a kernel for the original (probed with float inputs) has one for the fused operator (any
/// input types: an integer fusion's inputs are integers), and some device has it and each of
/// the other operators the pass writes.
fn fusion_available(snapshot: &Snapshot, devices: &[Device], f: Fusion) -> bool {
    let has = |op: &str, domain: &str, device: Device, probe: &[Option<DType>]| {
        snapshot
            .resolve(&KernelQuery {
                domain,
                op_type: op,
                opset: if domain.is_empty() { 17 } else { 1 },
                device,
                inputs: probe,
            })
            .is_ok()
    };
    let floats = |t: DType| [Some(t), Some(t), Some(t)];
    let mut any = false;
    for &d in devices {
        let has_fused = has(f.fused, f.domain, d, &[]);
        let has_original = [DType::F32, DType::F16]
            .iter()
            .any(|&t| has(f.original, "", d, &floats(t)));
        if has_original && !has_fused {
            return false;
        }
        any |= has_fused;
    }
    // What the pass writes besides: on some device (placement puts each node where it is).
    any && f
        .also
        .iter()
        .all(|&(domain, op)| devices.iter().any(|&d| has(op, domain, d, &[])))
}

/// Lowers one graph (the model's, or a subgraph's) whose initializers are `initializers`.
#[allow(clippy::too_many_arguments)]
fn compile_graph(
    model: &Model,
    initializers: HashMap<String, Arc<HostTensor>>,
    formal: &[(String, Option<DType>)],
    captured: &[(String, Option<DType>)],
    seqs: &HashSet<String>,
    snapshot: Arc<Snapshot>,
    devices: &[Device],
    fold_budget: &mut usize,
    on_free: &mut dyn FnMut(&str, &HostTensor),
) -> Result<Plan, GraphError> {
    let batch_split = super::batch::separable(model, &initializers);
    let mut values = Values::new(model, initializers, formal, captured)?;
    for (name, s) in &values.inputs {
        if seqs.contains(name) {
            values.seqs.insert(*s);
        }
    }
    // Control nodes read their subgraphs' outer values too.
    let subs: Vec<Option<Subgraphs<'_>>> = model.nodes.iter().map(subgraphs).collect();
    let reads = |i: usize| -> Vec<&str> {
        let n = &model.nodes[i];
        let mut r: Vec<&str> = n
            .inputs
            .iter()
            .filter(|x| !x.is_empty())
            .map(|x| x.as_str())
            .collect();
        if let Some(s) = &subs[i] {
            r.extend(s.free.iter().map(|x| x.as_str()));
        }
        r
    };
    let order = schedule(model, &values, reads)?;
    // Reads of each constant still to be lowered. A constant read any other way than absorbed
    // by a kernel (ABI 1.8) or consumed by a fold is pinned: the plan keeps it. One whose
    // last read is lowered unpinned is freed there, before the next node packs its weights.
    // Every value's reads are counted, not only the initializers': a folded result becomes a
    // constant on the way (a QDQ model's dequantized weights), after its readers were counted.
    let slot_reads = |i: usize, values: &Values| -> Vec<usize> {
        reads(i)
            .into_iter()
            .filter_map(|x| values.slot_of.get(x).copied())
            .collect()
    };
    let mut pending: HashMap<usize, usize> = HashMap::new();
    for i in 0..model.nodes.len() {
        for s in slot_reads(i, &values) {
            *pending.entry(s).or_default() += 1;
        }
    }
    let mut pinned: HashSet<usize> = model
        .outputs
        .iter()
        .filter_map(|o| values.slot_of.get(&o.name).copied())
        .collect();

    let mut steps = Vec::new();
    let mut placement = Vec::new();
    for i in order {
        let read: Vec<usize> = slot_reads(i, &values)
            .into_iter()
            .filter(|s| values.constants.contains_key(s))
            .collect();
        let n = &model.nodes[i];
        let domain_opset = model.opset(&n.domain).ok_or_else(|| {
            GraphError::Invalid(format!(
                "node {} uses domain '{}', which the model does not import",
                n.label(),
                n.domain
            ))
        })?;
        let in_slots = values.slots(&n.inputs);
        let out_slots = values.slots(&n.outputs);
        let input_is_seq = first_is_seq(&values, &in_slots);
        let (step, place) = if let Some(sub) = &subs[i] {
            let mut compile_body =
                |m: &Model, formal: &[_], captured: &[_], seqs: &HashSet<String>| {
                    compile_graph(
                        m,
                        m.initializers.clone(),
                        formal,
                        captured,
                        seqs,
                        snapshot.clone(),
                        devices,
                        fold_budget,
                        &mut |_, _| {},
                    )
                };
            let step = control::lower(
                n,
                sub,
                &values,
                in_slots,
                out_slots.clone(),
                &mut compile_body,
            )?;
            let out_types = control::output_types(&step.work);
            let out_seqs = control::output_seqs(&step.work);
            for (k, s) in out_slots.iter().enumerate() {
                if let Some(s) = s {
                    values.set(*s, out_types.get(k).copied().flatten(), None);
                    if out_seqs.get(k).copied().unwrap_or(false) {
                        values.seqs.insert(*s);
                    }
                }
            }
            let place = host_placement(n, domain_opset);
            (Some(step), place)
        } else if let Some(op) = sequence::op_of(n, input_is_seq)? {
            let dtype = sequence::output_type(&op, &values, &in_slots);
            let makes_seq = op.makes_sequence(input_is_seq);
            if let Some(Some(s)) = out_slots.first() {
                values.set(*s, dtype, None);
                if makes_seq {
                    values.seqs.insert(*s);
                }
            }
            let place = host_placement(n, domain_opset);
            let step = Step {
                label: n.label(),
                work: Work::Sequence(op),
                device: Device::CPU,
                inputs: in_slots,
                captured: Vec::new(),
                outputs: out_slots,
                release: Vec::new(),
                concat_axis: None,
            };
            (Some(step), place)
        } else {
            if let Some(k) = in_slots
                .iter()
                .position(|s| s.is_some_and(|s| values.seqs.contains(&s)))
            {
                return Err(GraphError::Unsupported(format!(
                    "node {}: input {k} ('{}') is a sequence; {} takes tensors",
                    n.label(),
                    n.inputs.get(k).map_or("", |s| s.as_str()),
                    n.op_type
                )));
            }
            let opset = i32::try_from(domain_opset).unwrap_or(i32::MAX);
            let node = NodeSlots {
                node: n,
                domain_opset,
                opset,
                inputs: in_slots,
                outputs: out_slots,
            };
            lower_kernel(&node, &mut values, &snapshot, devices, fold_budget)?
        };
        let mut step = step;
        // No step: folded, its constants were read at compile time and are not again.
        if let Some(st) = &mut step {
            let absorbed = match &st.work {
                Work::Kernel(b) => b.absorbed.as_slice(),
                _ => &[],
            };
            for (k, slot) in st.inputs.iter_mut().enumerate() {
                if let Some(sl) = slot.filter(|sl| read.contains(sl)) {
                    if absorbed.contains(&k) {
                        *slot = None;
                    } else {
                        pinned.insert(sl);
                    }
                }
            }
            if !matches!(st.work, Work::Kernel(_)) {
                pinned.extend(read.iter().copied());
            }
        }
        for s in &read {
            if let Some(left) = pending.get_mut(s) {
                *left = left.saturating_sub(1);
                if *left == 0 && !pinned.contains(s) {
                    if let Some(t) = values.constants.remove(s) {
                        if let Some(name) = values.slot_of.iter().find(|(_, v)| **v == *s) {
                            on_free(name.0, &t);
                        }
                    }
                }
            }
        }
        placement.push(place);
        steps.extend(step);
    }
    let mut plan = finish(model, formal.len(), values, steps, placement, snapshot)?;
    // Split runs are host-only: every step on the CPU, no copies between memories.
    plan.batch_split = batch_split
        && plan.copies.is_empty()
        && plan.placement.iter().all(|p| p.device == Device::CPU);
    Ok(plan)
}

/// Where a node the daemon runs itself (control flow, sequences) is placed.
fn host_placement(n: &Node, domain_opset: i64) -> Placement {
    Placement {
        node: n.name.clone(),
        op_type: n.op_type.clone(),
        opset: domain_opset,
        kernel: format!("host::{}", n.op_type),
        plugin: "opregd".into(),
        device: Device::CPU,
        folded: false,
    }
}

/// Whether a node's first input holds a sequence.
fn first_is_seq(values: &Values, inputs: &[Option<usize>]) -> bool {
    inputs
        .first()
        .copied()
        .flatten()
        .is_some_and(|s| values.seqs.contains(&s))
}

/// A node with its value slots.
struct NodeSlots<'m> {
    node: &'m Node,
    /// The opset the model imports the node's domain at, and the same as kernels see it.
    domain_opset: i64,
    opset: i32,
    inputs: Vec<Option<usize>>,
    outputs: Vec<Option<usize>>,
}

/// Resolves, infers, binds and (when its inputs are all constants) folds one kernel node:
/// its step (`None` when folded) and where it was placed. Records what is known about the
/// node's outputs in `values`.
///
/// A kernel on a device (not the host) may decline a node it matched by registration but
/// cannot run (a CUDA Conv over 4 spatial dims, say) by answering `UNIMPLEMENTED` at
/// inference or instantiation: placement then goes on along the model's device list, as ONNX
/// Runtime's execution providers decline nodes in `GetCapability`. Any other refusal, or one
/// from the host's own kernels, fails the load as before.
fn lower_kernel(
    ns: &NodeSlots<'_>,
    values: &mut Values,
    snapshot: &Arc<Snapshot>,
    devices: &[Device],
    fold_budget: &mut usize,
) -> Result<(Option<Step>, Placement), GraphError> {
    let mut devices = devices;
    loop {
        match lower_kernel_on(ns, values, snapshot, devices, fold_budget) {
            Err(Lowering::Declined(device, e)) => {
                // Nothing is recorded before a kernel accepts: retry after the decliner.
                let at = devices.iter().position(|&d| d == device).unwrap_or(0);
                let rest = &devices[at + 1..];
                if rest.is_empty() {
                    return Err(e.into());
                }
                tracing::debug!(node = %ns.node.label(), %device, "declined: {e}");
                devices = rest;
            }
            Err(Lowering::Failed(e)) => return Err(e),
            Ok(done) => return Ok(done),
        }
    }
}

/// Why [`lower_kernel_on`] did not lower a node.
enum Lowering {
    /// A device kernel answered `UNIMPLEMENTED` for this node on this device.
    Declined(Device, crate::exec::KernelError),
    Failed(GraphError),
}

impl<E: Into<GraphError>> From<E> for Lowering {
    fn from(e: E) -> Self {
        Lowering::Failed(e.into())
    }
}

/// A refusal a device kernel may answer to send the node on along the device list.
fn declined(device: Device, e: crate::exec::KernelError) -> Lowering {
    match &e {
        crate::exec::KernelError::Refused { code, .. }
            if *code == ErrorCode::Unimplemented && !device.host_accessible() =>
        {
            Lowering::Declined(device, e)
        }
        _ => Lowering::Failed(e.into()),
    }
}

fn lower_kernel_on(
    ns: &NodeSlots<'_>,
    values: &mut Values,
    snapshot: &Arc<Snapshot>,
    devices: &[Device],
    fold_budget: &mut usize,
) -> Result<(Option<Step>, Placement), Lowering> {
    let n = ns.node;
    let (kernel, device) = resolve(snapshot, devices, n, ns.opset, &values.types_of(&ns.inputs))?;
    let label = n.label();
    let shapes: Vec<Option<Vec<i64>>> = ns
        .inputs
        .iter()
        .map(|s| s.and_then(|s| values.shapes[s].as_deref().map(dims)))
        .collect();
    let describing = Describing {
        ns,
        values,
        shapes: &shapes,
        label: &label,
        device,
    };
    // The kernel tells what its outputs will be; later nodes resolve by these types.
    let facts =
        exec::infer(&kernel, &describing.desc(&[], &[])).map_err(|e| declined(device, e))?;
    let out_types: Vec<Option<DType>> = (0..n.outputs.len())
        .map(|k| facts.get(k).and_then(|f| f.dtype))
        .collect();
    let out_shapes: Vec<Option<Vec<i64>>> = (0..n.outputs.len())
        .map(|k| facts.get(k).and_then(|f| f.shape.clone()))
        .collect();
    let mut desc = describing.desc(&out_types, &out_shapes);
    // ABI 1.0 kernels read F32 for a type not known statically at instantiation; kept.
    for v in desc.inputs.iter_mut().chain(desc.outputs.iter_mut()) {
        if v.dtype == DType::UNDEFINED {
            v.dtype = DType::F32;
        }
    }
    // The node description borrows the constants; it ends with `bind`, before folding adds
    // to them.
    let bound = exec::bind(snapshot, &kernel, desc).map_err(|e| declined(device, e))?;
    for (k, s) in ns.outputs.iter().enumerate() {
        if let Some(s) = s {
            let shape = out_shapes.get(k).cloned().flatten().map(|d| from_dims(&d));
            values.set(*s, out_types.get(k).copied().flatten(), shape);
        }
    }
    let place = Placement {
        node: n.name.clone(),
        op_type: n.op_type.clone(),
        opset: ns.domain_opset,
        kernel: bound.kernel.clone(),
        plugin: kernel.plugin.name.clone(),
        device,
        folded: false,
    };
    // Constant folding: every present input is a constant, and the results fit in what is
    // left of the model's folding budget (a tiny model must not make a huge constant at load:
    // past the budget the node runs per request, under the request's limits).
    let foldable = !NONDETERMINISTIC.contains(&n.op_type.as_str())
        && ns
            .inputs
            .iter()
            .flatten()
            .all(|s| values.constants.contains_key(s))
        && device.host_accessible();
    let folded = if foldable {
        fold(
            snapshot,
            &bound,
            &label,
            &ns.inputs,
            ns.outputs.len(),
            &values.constants,
            fold_budget,
        )?
    } else {
        None
    };
    if let Some(outs) = folded {
        for (s, t) in ns.outputs.iter().zip(outs) {
            if let Some(s) = s {
                values.set_constant(*s, t);
            }
        }
        return Ok((
            None,
            Placement {
                folded: true,
                ..place
            },
        ));
    }
    let node = ns.node;
    let concat_axis = (node.domain.is_empty() && node.op_type == "Concat" && device == Device::CPU)
        .then(|| {
            node.attributes
                .iter()
                .find_map(|a| match (&*a.name, &a.value) {
                    ("axis", AttrValue::Int(v)) => Some(*v),
                    _ => None,
                })
        })
        .flatten();
    let step = Step {
        label,
        work: Work::Kernel(bound),
        device,
        inputs: ns.inputs.clone(),
        captured: Vec::new(),
        outputs: ns.outputs.clone(),
        release: Vec::new(),
        concat_axis,
    };
    Ok((Some(step), place))
}

/// What a node description is made of, before and after inference.
struct Describing<'a> {
    ns: &'a NodeSlots<'a>,
    values: &'a Values,
    /// Input shapes as kernels see them.
    shapes: &'a [Option<Vec<i64>>],
    label: &'a str,
    device: Device,
}

impl<'a> Describing<'a> {
    /// The node as its kernel sees it, with what is known of its outputs.
    fn desc(
        &self,
        out_types: &[Option<DType>],
        out_shapes: &'a [Option<Vec<i64>>],
    ) -> NodeDesc<'a> {
        let (ns, values, n) = (self.ns, self.values, self.ns.node);
        let inputs = ns
            .inputs
            .iter()
            .zip(self.shapes)
            .zip(&n.inputs)
            .map(|((s, shape), name)| ValueInfo {
                name: name.as_str(),
                present: s.is_some(),
                dtype: s.and_then(|s| values.types[s]).unwrap_or(DType::UNDEFINED),
                shape: shape.as_deref(),
                constant: s.and_then(|s| values.constants.get(&s)).map(|t| t.view()),
            })
            .collect();
        let outputs = ns
            .outputs
            .iter()
            .zip(&n.outputs)
            .enumerate()
            .map(|(k, (s, name))| ValueInfo {
                name: name.as_str(),
                present: s.is_some(),
                dtype: out_types
                    .get(k)
                    .copied()
                    .flatten()
                    .unwrap_or(DType::UNDEFINED),
                shape: out_shapes.get(k).and_then(|s| s.as_deref()),
                constant: None,
            })
            .collect();
        NodeDesc {
            label: self.label,
            name: &n.name,
            domain: &n.domain,
            op_type: &n.op_type,
            opset: ns.opset,
            device: self.device,
            attributes: &n.attributes,
            inputs,
            outputs,
        }
    }
}

/// The kernel for `n` on the first device of `devices` that has one.
fn resolve(
    snapshot: &Snapshot,
    devices: &[Device],
    n: &Node,
    opset: i32,
    in_types: &[Option<DType>],
) -> Result<(KernelRef, Device), GraphError> {
    let mut errors = Vec::new();
    for &device in devices {
        match snapshot.resolve(&KernelQuery {
            domain: &n.domain,
            op_type: &n.op_type,
            opset,
            device,
            inputs: in_types,
        }) {
            Ok(k) => return Ok((k, device)),
            Err(e) => errors.push(e.to_string()),
        }
    }
    Err(GraphError::NoKernel {
        node: n.label(),
        reason: errors.join("; "),
    })
}

/// A shape as kernels see it: -1 marks a dimension known only at run time.
fn dims(shape: &[Dim]) -> Vec<i64> {
    shape
        .iter()
        .map(|d| match d {
            Dim::Fixed(v) => i64::try_from(*v).unwrap_or(-1),
            Dim::Symbolic(_) => -1,
        })
        .collect()
}

/// A shape from a kernel's inference: any negative extent is a run-time dimension.
fn from_dims(dims: &[i64]) -> Vec<Dim> {
    dims.iter()
        .map(|&d| match usize::try_from(d) {
            Ok(v) => Dim::Fixed(v),
            Err(_) => Dim::Symbolic(String::new()),
        })
        .collect()
}

/// Completes the plan: outputs, copies at device boundaries, and liveness (each computed
/// value released after its last reader, unless it is an output or a constant).
fn finish(
    model: &Model,
    formal_inputs: usize,
    values: Values,
    steps: Vec<Step>,
    placement: Vec<Placement>,
    snapshot: Arc<Snapshot>,
) -> Result<Plan, GraphError> {
    let Values {
        slot_of,
        mut types,
        mut shapes,
        constants,
        inputs,
        seqs,
    } = values;
    let mut outputs: Vec<(String, usize)> = model
        .outputs
        .iter()
        .map(|o| {
            slot_of
                .get(&o.name)
                .map(|&s| (o.name.clone(), s))
                .ok_or_else(|| GraphError::Invalid(format!("output '{}' is never defined", o.name)))
        })
        .collect::<Result<_, _>>()?;
    let names: HashMap<usize, String> = slot_of.iter().map(|(n, &s)| (s, n.clone())).collect();
    let (mut steps, copies) = copies::insert(
        steps,
        &mut outputs,
        &mut types,
        &mut shapes,
        &names,
        &snapshot,
    )?;
    let output_types = outputs.iter().map(|(_, s)| types[*s]).collect();
    let output_seqs = outputs.iter().map(|(_, s)| seqs.contains(s)).collect();
    let output_shapes = outputs.iter().map(|(_, s)| shapes[*s].clone()).collect();
    let keep: HashSet<usize> = outputs
        .iter()
        .map(|(_, s)| *s)
        .chain(constants.keys().copied())
        .collect();
    let mut last_use: HashMap<usize, usize> = HashMap::new();
    for (k, st) in steps.iter().enumerate() {
        for s in st.inputs.iter().flatten().chain(&st.captured) {
            last_use.insert(*s, k);
        }
    }
    let mut lifetimes = vec![None; types.len()];
    for (&s, &k) in &last_use {
        if !keep.contains(&s) {
            steps[k].release.push(s);
        }
    }
    // Values a step may hand on as they are, to a sequence or an optional or out of a
    // subgraph (the same tensor under another slot, or in a list): their memory lives past
    // their slot's last read, so a run must not place another value in it after that read.
    let escapes: HashSet<usize> = steps
        .iter()
        .filter(|st| !matches!(st.work, Work::Kernel(_) | Work::Copy { .. }))
        .flat_map(|st| st.inputs.iter().flatten().chain(&st.captured))
        .copied()
        .collect();
    // Values a run may place in its arena: made by a host kernel step and released by the
    // run (not outputs, constants, values handed on, or values from control flow and copies).
    for (made, st) in steps.iter().enumerate() {
        if !matches!(st.work, Work::Kernel(_)) || st.device != Device::CPU {
            continue;
        }
        for s in st.outputs.iter().flatten() {
            if escapes.contains(s) {
                continue;
            }
            if let (Some(&last), false) = (last_use.get(s), keep.contains(s)) {
                if let Some(l) = lifetimes.get_mut(*s) {
                    *l = Some((made, last.max(made)));
                }
            }
        }
    }
    let concats = in_place_concats(&steps, &lifetimes);
    let aliases = aliases(&steps, &lifetimes, &concats);
    // Graph outputs made by a host kernel step (not inputs or constants passed through, nor
    // values from control flow or another device): their memory is kept between runs.
    let host_outputs: Vec<usize> = steps
        .iter()
        .filter(|st| matches!(st.work, Work::Kernel(_)) && st.device == Device::CPU)
        .flat_map(|st| st.outputs.iter().flatten().copied())
        .filter(|s| outputs.iter().any(|(_, o)| o == s))
        .collect();
    Ok(Plan {
        steps,
        slots: types.len(),
        constants: constants.into_iter().collect(),
        inputs,
        formal_inputs,
        outputs,
        output_types,
        output_seqs,
        output_shapes,
        placement,
        copies,
        memory: MemoryPlan::new(lifetimes, concats, aliases, &host_outputs),
        snapshot,
        batch_split: false,
    })
}

/// The `Concat` steps whose inputs the memory plan may make inside the output: every input
/// and the output placeable, each input read by that step alone (a value read twice, or by a
/// later step that may write it in place, keeps its own memory), and no value in two of them.
fn in_place_concats(steps: &[Step], lifetimes: &[Option<(usize, usize)>]) -> Vec<Concat> {
    let mut readers: HashMap<usize, usize> = HashMap::new();
    for st in steps {
        for s in st.inputs.iter().flatten().chain(&st.captured) {
            *readers.entry(*s).or_default() += 1;
        }
    }
    let placeable = |s: &usize| matches!(lifetimes.get(*s), Some(Some(_)));
    let mut taken = HashSet::new();
    let mut concats = Vec::new();
    for (step, st) in steps.iter().enumerate() {
        let (Some(_), [Some(output)]) = (st.concat_axis, st.outputs.as_slice()) else {
            continue;
        };
        let Some(inputs) = st.inputs.iter().copied().collect::<Option<Vec<usize>>>() else {
            continue;
        };
        let members = || inputs.iter().chain([output]);
        if inputs.is_empty()
            || !members().all(placeable)
            || members().any(|s| taken.contains(s))
            || inputs.iter().any(|s| readers.get(s) != Some(&1))
        {
            continue;
        }
        taken.extend(members().copied());
        concats.push(Concat {
            step,
            output: *output,
            inputs,
        });
    }
    concats
}

/// The outputs the memory plan may place over an input (see `memory::Alias`): a host kernel
/// declared the pair, the input is read last by that step (and once by it) and both values
/// are placeable; neither in an in-place concatenation. A value may be the output of one alias
/// and the input of a later one (a residual chain: the memory plan places the chain at one
/// range); being read last once, an input joins one alias at most, and an output is made once.
fn aliases(steps: &[Step], lifetimes: &[Option<(usize, usize)>], concats: &[Concat]) -> Vec<Alias> {
    let taken: HashSet<usize> = concats
        .iter()
        .flat_map(|c| c.inputs.iter().chain([&c.output]))
        .copied()
        .collect();
    let mut aliases = Vec::new();
    for (step, st) in steps.iter().enumerate() {
        let Work::Kernel(bound) = &st.work else {
            continue;
        };
        if st.device != Device::CPU {
            continue;
        }
        for &(i, o) in &bound.aliases {
            let (Some(Some(input)), Some(Some(output))) = (st.inputs.get(i), st.outputs.get(o))
            else {
                continue;
            };
            let (input, output) = (*input, *output);
            let read_once = st.inputs.iter().flatten().filter(|&&s| s == input).count() == 1
                && !st.captured.contains(&input);
            let last_read_here =
                matches!(lifetimes.get(input), Some(Some((_, last))) if *last == step);
            let placeable = matches!(lifetimes.get(output), Some(Some(_)));
            if read_once
                && last_read_here
                && placeable
                && !taken.contains(&input)
                && !taken.contains(&output)
            {
                aliases.push(Alias {
                    step,
                    input,
                    output,
                });
            }
        }
    }
    aliases
}

/// Runs a node whose inputs are all constants once, at load, when its results fit in what is
/// left of `budget`: `None` when it does not fit or takes longer than [`FOLD_STEP_TIME`] (the
/// node then runs per request, under the request's limits).
fn fold(
    snapshot: &Snapshot,
    bound: &BoundKernel,
    label: &str,
    in_slots: &[Option<usize>],
    num_outputs: usize,
    constants: &HashMap<usize, Arc<HostTensor>>,
    budget: &mut usize,
) -> Result<Option<Vec<Arc<HostTensor>>>, GraphError> {
    let views: Vec<TensorView<'_>> = in_slots
        .iter()
        .map(|s| {
            s.and_then(|s| constants.get(&s))
                .map_or(TensorView::absent(), |t| t.view())
        })
        .collect();
    let deadline = std::time::Instant::now() + FOLD_STEP_TIME;
    let stop = || std::time::Instant::now() >= deadline;
    let limits = CallLimits {
        max_tensor_bytes: *budget,
        stop: &stop,
        wait_device: true,
    };
    match exec::call(
        snapshot,
        bound,
        label,
        num_outputs,
        &views,
        &limits,
        Vec::new(),
    ) {
        Ok(outs) => {
            let bytes: usize = outs.iter().map(|t| t.byte_len()).sum();
            Ok((bytes <= *budget).then(|| {
                *budget -= bytes;
                outs
            }))
        }
        Err(KernelError::Stopped { .. }) => Ok(None),
        Err(e) if e.code() == Some(opreg_sdk::ErrorCode::ResourceExhausted) => Ok(None),
        Err(e) => Err(e.into()),
    }
}

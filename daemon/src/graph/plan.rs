//! Compiling a model into a plan bound to one registry generation.
//!
//! Kernels come from plugins; the control-flow operators (`If`, `Loop`, `Scan`) are the
//! runtime's own, because they run subgraphs: their subgraphs are compiled here into nested
//! plans, and the outer values a subgraph reads are bound to it as extra inputs.

// Indexing here is into the plan's own tables (slots, nodes), sized by the plan as it is
// built; what comes from the model is checked where it enters (names, arities, attributes).

use super::compiled::{Placement, Plan};
use super::compiled::{ScanSpec, Step, Work};
use super::subgraphs::{subgraphs, Subgraphs};
use super::{
    copies,
    import::{Dim, Model},
    shapes, types, GraphError,
};
use crate::{
    exec::{self, BoundKernel, CallLimits, KernelError, NodeDesc},
    registry::{KernelQuery, Snapshot},
};
use opreg_sdk::{host::HostTensor, kernel::ValueInfo, AttrValue, DType, Device, TensorView};
use std::{
    collections::{HashMap, HashSet, VecDeque},
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
];

/// Compiles `model` against `snapshot`, placing each node on the first device of `devices`
/// that has a kernel for it. Call it on the compute pool: folding runs kernels.
pub fn compile(
    model: &Model,
    snapshot: Arc<Snapshot>,
    devices: &[Device],
    max_folded_bytes: usize,
) -> Result<Plan, GraphError> {
    let formal: Vec<(String, Option<DType>)> = model
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
            p.fuses().is_some_and(|(original, fused)| {
                fusion_available(&snapshot, devices, original, fused)
            })
        })
        .collect();
    let fused;
    let model = if fusions.is_empty() {
        model
    } else {
        let mut m = model.clone();
        super::passes::run(&mut m, &fusions)?;
        fused = m;
        &fused
    };
    compile_graph(model, &formal, &[], snapshot, devices, &mut fold_budget)
}

/// Whether `opreg::<fused>` can run wherever `<original>` could: every preferred device with
/// a kernel for the original has one for the fused operator, and some device has it.
fn fusion_available(snapshot: &Snapshot, devices: &[Device], original: &str, fused: &str) -> bool {
    let has = |op: &str, domain: &str, device: Device| {
        [DType::F32, DType::F16].iter().any(|&t| {
            snapshot
                .resolve(&KernelQuery {
                    domain,
                    op_type: op,
                    opset: if domain.is_empty() { 17 } else { 1 },
                    device,
                    inputs: &[Some(t), Some(t), Some(t)],
                })
                .is_ok()
        })
    };
    let mut any = false;
    for &d in devices {
        let has_fused = has(fused, "opreg", d);
        if has(original, "", d) && !has_fused {
            return false;
        }
        any |= has_fused;
    }
    any
}

fn compile_graph(
    model: &Model,
    formal: &[(String, Option<DType>)],
    captured: &[(String, Option<DType>)],
    snapshot: Arc<Snapshot>,
    devices: &[Device],
    fold_budget: &mut usize,
) -> Result<Plan, GraphError> {
    let mut slot_of: HashMap<String, usize> = HashMap::new();
    let mut types: Vec<Option<DType>> = Vec::new();
    let new_slot = |types: &mut Vec<Option<DType>>, t: Option<DType>| -> usize {
        types.push(t);
        types.len() - 1
    };
    // Constants (initializers, later folded results) by slot.
    let mut constants: HashMap<usize, Arc<HostTensor>> = HashMap::new();
    for (name, t) in &model.initializers {
        let s = new_slot(&mut types, Some(t.dtype()));
        slot_of.insert(name.clone(), s);
        constants.insert(s, t.clone());
    }
    let mut inputs = Vec::new();
    for (name, t) in formal.iter().chain(captured) {
        // An input shadows an initializer of the same name (ONNX's default-value inputs).
        let s = new_slot(&mut types, *t);
        if let Some(old) = slot_of.insert(name.clone(), s) {
            constants.remove(&old);
        }
        inputs.push((name.clone(), s));
    }
    let fixed = |t: &HostTensor| -> shapes::Shape {
        Some(t.shape().iter().map(|&d| Dim::Fixed(d)).collect())
    };
    let declared = |name: &str| {
        model
            .inputs
            .iter()
            .find(|i| i.name == name)
            .and_then(|i| i.shape.clone())
    };
    for n in &model.nodes {
        for o in n.outputs.iter().filter(|o| !o.is_empty()) {
            if slot_of.contains_key(o) {
                return Err(GraphError::Invalid(format!(
                    "value '{o}' is produced twice (node {})",
                    n.label()
                )));
            }
            let s = new_slot(&mut types, None);
            slot_of.insert(o.clone(), s);
        }
    }

    let mut shape_of: Vec<shapes::Shape> = vec![None; types.len()];
    for (s, t) in &constants {
        shape_of[*s] = fixed(t);
    }
    for (name, s) in &inputs {
        shape_of[*s] = declared(name);
    }

    // Control nodes read their subgraphs' outer values too.
    let subs: Vec<Option<Subgraphs>> = model
        .nodes
        .iter()
        .map(|n| subgraphs(n, &model.opsets))
        .collect::<Result<_, _>>()?;
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

    // Dead-node removal: keep what the outputs depend on.
    let producer = model.producers();
    let mut needed = vec![false; model.nodes.len()];
    let mut stack: Vec<&str> = model.outputs.iter().map(|o| o.name.as_str()).collect();
    let mut seen: HashSet<&str> = HashSet::new();
    while let Some(v) = stack.pop() {
        if !seen.insert(v) {
            continue;
        }
        match (producer.get(v), slot_of.contains_key(v)) {
            (Some(&i), _) => {
                if !needed[i] {
                    needed[i] = true;
                    stack.extend(reads(i));
                }
            }
            (None, true) => {}
            (None, false) => {
                return Err(GraphError::Invalid(format!(
                    "value '{v}' is used but never defined"
                )))
            }
        }
    }

    // Topological order (Kahn), in model order among ready nodes.
    let mut available: HashSet<usize> = constants
        .keys()
        .copied()
        .chain(inputs.iter().map(|(_, s)| *s))
        .collect();
    let mut pending: VecDeque<usize> = (0..model.nodes.len()).filter(|&i| needed[i]).collect();
    let mut order = Vec::new();
    let mut stalled = 0;
    while let Some(i) = pending.pop_front() {
        let n = &model.nodes[i];
        let mut ready = true;
        for x in reads(i) {
            match slot_of.get(x) {
                Some(s) if available.contains(s) => {}
                Some(_) => ready = false,
                None => {
                    return Err(GraphError::Invalid(format!(
                        "node {} reads '{x}', which is never defined",
                        n.label()
                    )))
                }
            }
        }
        if ready {
            order.push(i);
            available.extend(n.outputs.iter().filter_map(|o| slot_of.get(o).copied()));
            stalled = 0;
        } else {
            pending.push_back(i);
            stalled += 1;
            if stalled > pending.len() {
                return Err(GraphError::Invalid(format!(
                    "the graph has a cycle through node {}",
                    n.label()
                )));
            }
        }
    }

    let mut steps = Vec::new();
    let mut placement = Vec::new();
    for &i in &order {
        let n = &model.nodes[i];
        let domain_opset = model.opset(&n.domain).ok_or_else(|| {
            GraphError::Invalid(format!(
                "node {} uses domain '{}', which the model does not import",
                n.label(),
                n.domain
            ))
        })?;
        let in_slots: Vec<Option<usize>> = n
            .inputs
            .iter()
            .map(|x| {
                if x.is_empty() {
                    None
                } else {
                    slot_of.get(x).copied()
                }
            })
            .collect();
        let in_types: Vec<Option<DType>> =
            in_slots.iter().map(|s| s.and_then(|s| types[s])).collect();
        let out_slots: Vec<Option<usize>> = n
            .outputs
            .iter()
            .map(|o| {
                if o.is_empty() {
                    None
                } else {
                    slot_of.get(o).copied()
                }
            })
            .collect();

        if let Some(sub) = &subs[i] {
            let step = compile_control(
                n,
                sub,
                &slot_of,
                &types,
                in_slots,
                out_slots.clone(),
                &snapshot,
                devices,
                fold_budget,
            )?;
            let out_types = control_output_types(&step.work);
            for (k, s) in out_slots.iter().enumerate() {
                if let Some(s) = s {
                    types[*s] = out_types.get(k).copied().flatten();
                }
            }
            placement.push(Placement {
                node: n.name.clone(),
                op_type: n.op_type.clone(),
                opset: domain_opset,
                kernel: format!("host::{}", n.op_type),
                plugin: "opregd".into(),
                device: Device::CPU,
                folded: false,
            });
            steps.push(step);
            continue;
        }

        for (k, s) in out_slots.iter().enumerate() {
            if let Some(s) = s {
                types[*s] = types::output_type(n, k, &in_types);
            }
        }

        // Bind: the first preferred device with a kernel wins.
        let opset = i32::try_from(domain_opset).unwrap_or(i32::MAX);
        let mut errors = Vec::new();
        let mut bound = None;
        for &device in devices {
            match snapshot.resolve(&KernelQuery {
                domain: &n.domain,
                op_type: &n.op_type,
                opset,
                device,
                inputs: &in_types,
            }) {
                Ok(k) => {
                    bound = Some((k, device));
                    break;
                }
                Err(e) => errors.push(e.to_string()),
            }
        }
        let Some((kernel, device)) = bound else {
            return Err(GraphError::NoKernel {
                node: n.label(),
                reason: errors.join("; "),
            });
        };

        let in_shapes: Vec<shapes::Shape> = in_slots
            .iter()
            .map(|s| s.and_then(|s| shape_of[s].clone()))
            .collect();
        let in_consts: Vec<Option<&HostTensor>> = in_slots
            .iter()
            .map(|s| s.and_then(|s| constants.get(&s)).map(|t| &**t))
            .collect();
        for (s, sh) in out_slots
            .iter()
            .zip(shapes::infer(n, &in_shapes, &in_consts))
        {
            if let Some(s) = s {
                shape_of[*s] = sh;
            }
        }
        // -1 marks a dimension known only at run time.
        let shapes: Vec<Option<Vec<i64>>> = in_shapes
            .iter()
            .map(|s| {
                s.as_ref().map(|d| {
                    d.iter()
                        .map(|d| if let Dim::Fixed(v) = d { *v as i64 } else { -1 })
                        .collect()
                })
            })
            .collect();
        let input_infos: Vec<ValueInfo<'_>> = in_slots
            .iter()
            .zip(&in_types)
            .zip(&shapes)
            .zip(&n.inputs)
            .map(|(((s, t), shape), name)| ValueInfo {
                name: name.as_str(),
                present: s.is_some(),
                dtype: t.unwrap_or(DType::F32),
                shape: shape.as_deref(),
                constant: s.and_then(|s| constants.get(&s)).map(|t| t.view()),
            })
            .collect();
        let output_infos: Vec<ValueInfo<'_>> = out_slots
            .iter()
            .zip(&n.outputs)
            .map(|(s, name)| ValueInfo {
                name: name.as_str(),
                present: s.is_some(),
                dtype: s.and_then(|s| types[s]).unwrap_or(DType::F32),
                shape: None,
                constant: None,
            })
            .collect();
        // The node description borrows the constants; it ends with `bind`, before folding
        // below adds to them.
        let label = n.label();
        let bound = exec::bind(
            &snapshot,
            &kernel,
            NodeDesc {
                label: &label,
                name: &n.name,
                domain: &n.domain,
                op_type: &n.op_type,
                opset,
                device,
                attributes: &n.attributes,
                inputs: input_infos,
                outputs: output_infos,
            },
        )?;
        let kernel_name = bound.kernel.clone();
        let plugin_name = kernel.plugin.name.clone();

        // Constant folding: every present input is a constant, and the results fit in what is
        // left of the model's folding budget (a tiny model must not make a huge constant at
        // load: past the budget the node runs per request, under the request's limits).
        let foldable = !NONDETERMINISTIC.contains(&n.op_type.as_str())
            && in_slots.iter().flatten().all(|s| constants.contains_key(s))
            && device.host_accessible();
        let folded = if foldable {
            fold(
                &snapshot,
                &bound,
                &label,
                &in_slots,
                out_slots.len(),
                &constants,
                fold_budget,
            )?
        } else {
            None
        };
        placement.push(Placement {
            node: n.name.clone(),
            op_type: n.op_type.clone(),
            opset: domain_opset,
            kernel: kernel_name,
            plugin: plugin_name,
            device,
            folded: folded.is_some(),
        });
        if let Some(outs) = folded {
            for (s, t) in out_slots.iter().zip(outs) {
                if let Some(s) = s {
                    types[*s] = Some(t.dtype());
                    shape_of[*s] = fixed(&t);
                    constants.insert(*s, Arc::new(t));
                }
            }
            continue;
        }
        steps.push(Step {
            label,
            work: Work::Kernel(bound),
            device,
            inputs: in_slots.clone(),
            captured: Vec::new(),
            outputs: out_slots.clone(),
            release: Vec::new(),
        });
    }

    let outputs: Vec<(String, usize)> = model
        .outputs
        .iter()
        .map(|o| {
            slot_of
                .get(&o.name)
                .map(|&s| (o.name.clone(), s))
                .ok_or_else(|| GraphError::Invalid(format!("output '{}' is never defined", o.name)))
        })
        .collect::<Result<_, _>>()?;
    let mut outputs = outputs;
    let names: HashMap<usize, String> = slot_of.iter().map(|(n, &s)| (s, n.clone())).collect();
    let (steps, copies) = copies::insert(
        steps,
        &mut outputs,
        &mut types,
        &mut shape_of,
        &names,
        &snapshot,
    )?;
    let mut steps = steps;
    let output_types = outputs.iter().map(|(_, s)| types[*s]).collect();
    let output_shapes = outputs.iter().map(|(_, s)| shape_of[*s].clone()).collect();

    // Liveness: release each computed value after its last reader, unless it is an output.
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
    for (s, k) in last_use {
        if !keep.contains(&s) {
            steps[k].release.push(s);
        }
    }

    Ok(Plan {
        steps,
        slots: types.len(),
        constants: constants.into_iter().collect(),
        inputs,
        formal_inputs: formal.len(),
        outputs,
        output_types,
        output_shapes,
        placement,
        copies,
        snapshot,
    })
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
) -> Result<Option<Vec<HostTensor>>, GraphError> {
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
    };
    match exec::call(snapshot, bound, label, num_outputs, &views, &limits) {
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

#[allow(clippy::too_many_arguments)]
fn compile_control(
    n: &super::import::Node,
    sub: &Subgraphs,
    slot_of: &HashMap<String, usize>,
    types: &[Option<DType>],
    inputs: Vec<Option<usize>>,
    outputs: Vec<Option<usize>>,
    snapshot: &Arc<Snapshot>,
    devices: &[Device],
    fold_budget: &mut usize,
) -> Result<Step, GraphError> {
    let captured_slots: Vec<usize> = sub
        .free
        .iter()
        .map(|v| {
            slot_of.get(v).copied().ok_or_else(|| {
                GraphError::Invalid(format!(
                    "node {}: subgraph reads '{v}', which is never defined",
                    n.label()
                ))
            })
        })
        .collect::<Result<_, _>>()?;
    let captured: Vec<(String, Option<DType>)> = sub
        .free
        .iter()
        .zip(&captured_slots)
        .map(|(v, &s)| (v.clone(), types[s]))
        .collect();
    let in_types: Vec<Option<DType>> = inputs.iter().map(|s| s.and_then(|s| types[s])).collect();
    let mut body = |g: usize, formal_types: Vec<Option<DType>>| -> Result<Box<Plan>, GraphError> {
        let (m, formal) = sub.graphs.get(g).ok_or_else(|| {
            GraphError::Invalid(format!("node {}: subgraph {g} is missing", n.label()))
        })?;
        // Declared subgraph input types win; otherwise those the node binds.
        let formal: Vec<(String, Option<DType>)> = formal
            .iter()
            .enumerate()
            .map(|(k, (name, t))| (name.clone(), t.or(formal_types.get(k).copied().flatten())))
            .collect();
        compile_graph(
            m,
            &formal,
            &captured,
            snapshot.clone(),
            devices,
            fold_budget,
        )
        .map(Box::new)
        .map_err(|e| GraphError::Invalid(format!("node {}: subgraph: {e}", n.label())))
    };
    let attr_ints = |name: &str| -> Vec<i64> {
        match n
            .attributes
            .iter()
            .find(|a| a.name.as_str() == name)
            .map(|a| &a.value)
        {
            Some(AttrValue::Ints(v)) => v.to_vec(),
            _ => Vec::new(),
        }
    };
    let work = match n.op_type.as_str() {
        "If" => Work::If {
            then_branch: body(0, vec![])?,
            else_branch: body(1, vec![])?,
        },
        "Loop" => {
            let mut formal = vec![Some(DType::I64), Some(DType::Bool)];
            formal.extend(in_types.iter().skip(2).copied());
            let body = body(0, formal)?;
            // Body: (iteration, condition, carried...) -> (condition, carried..., scans...).
            let carried = inputs.len().saturating_sub(2);
            if body.formal_inputs != 2 + carried || body.outputs.len() < 1 + carried {
                return Err(GraphError::Invalid(format!(
                    "node {}: Loop carries {carried} values, so its body must take {} inputs and return at least {}; it takes {} and returns {}",
                    n.label(),
                    2 + carried,
                    1 + carried,
                    body.formal_inputs,
                    body.outputs.len()
                )));
            }
            Work::Loop { body }
        }
        "Scan" => {
            let scanned = match n
                .attributes
                .iter()
                .find(|a| a.name.as_str() == "num_scan_inputs")
                .map(|a| &a.value)
            {
                Some(AttrValue::Int(k)) if *k >= 1 && (*k as usize) <= inputs.len() => *k as usize,
                _ => {
                    return Err(GraphError::Invalid(format!(
                        "node {}: Scan needs num_scan_inputs in 1..={}",
                        n.label(),
                        inputs.len()
                    )))
                }
            };
            let states = inputs.len() - scanned;
            let body_outputs = sub.graphs.first().map_or(0, |g| g.0.outputs.len());
            if body_outputs < states {
                return Err(GraphError::Invalid(format!(
                    "node {}: Scan has {states} state values, so its body must return at least {states} outputs; it returns {body_outputs}",
                    n.label()
                )));
            }
            let outs = body_outputs - states;
            let or_zero = |v: Vec<i64>, len: usize| if v.is_empty() { vec![0; len] } else { v };
            let input_axes = or_zero(attr_ints("scan_input_axes"), scanned);
            let input_reverse = or_zero(attr_ints("scan_input_directions"), scanned)
                .into_iter()
                .map(|d| d != 0)
                .collect();
            let output_axes = or_zero(attr_ints("scan_output_axes"), outs);
            let output_reverse = or_zero(attr_ints("scan_output_directions"), outs)
                .into_iter()
                .map(|d| d != 0)
                .collect();
            let body = body(0, in_types.clone())?;
            if body.formal_inputs != inputs.len()
                || input_axes.len() != scanned
                || output_axes.len() != outs
            {
                return Err(GraphError::Invalid(format!(
                    "node {}: Scan body takes {} inputs for {} node inputs; {} scan_input_axes for {scanned} scanned inputs; {} scan_output_axes for {outs} scan outputs",
                    n.label(),
                    body.formal_inputs,
                    inputs.len(),
                    input_axes.len(),
                    output_axes.len()
                )));
            }
            Work::Scan(Box::new(ScanSpec {
                body: *body,
                states,
                input_axes,
                input_reverse,
                output_axes,
                output_reverse,
            }))
        }
        other => return Err(GraphError::Unsupported(format!("control op {other}"))),
    };
    Ok(Step {
        label: n.label(),
        work,
        device: Device::CPU,
        inputs,
        captured: captured_slots,
        outputs,
        release: Vec::new(),
    })
}

fn control_output_types(work: &Work) -> Vec<Option<DType>> {
    match work {
        Work::If { then_branch, .. } => then_branch.output_types.clone(),
        // Body outputs: cond, carried..., scan outputs...
        Work::Loop { body } => body.output_types.iter().skip(1).copied().collect(),
        Work::Scan(s) => s.body.output_types.clone(),
        Work::Kernel { .. } | Work::Copy { .. } => Vec::new(),
    }
}

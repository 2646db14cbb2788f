//! Compiling a model into a plan bound to one registry generation.

use super::{import::Model, run, types, GraphError};
use crate::{
    plugin::{kernel_label, LoadedPlugin},
    registry::{KernelQuery, Snapshot},
};
use abi_stable::std_types::{RNone, RSome};
use opreg_sdk::{
    host::HostTensor,
    kernel::{FfiKernelBox, NodeInfo, ValueInfo},
    DType, Device,
};
use std::{
    collections::{HashMap, HashSet, VecDeque},
    sync::Arc,
};

/// Ops whose result is not a function of their inputs: never folded.
const NONDETERMINISTIC: &[&str] = &[
    "RandomNormal",
    "RandomUniform",
    "RandomNormalLike",
    "RandomUniformLike",
    "Multinomial",
    "Bernoulli",
];

/// Where one node runs, for the placement query.
#[derive(Clone, Debug)]
pub struct Placement {
    pub node: String,
    pub op_type: String,
    pub opset: i64,
    /// `domain::Op(range)@device` of the kernel, or empty when folded.
    pub kernel: String,
    pub plugin: String,
    pub device: Device,
    /// Computed once at compile time (all inputs constant).
    pub folded: bool,
}

pub(super) struct Step {
    pub label: String,
    // Declared before `plugin`: plugin code must be dropped while the library is mapped.
    pub instance: FfiKernelBox,
    pub plugin: Arc<LoadedPlugin>,
    pub device: Device,
    pub inputs: Vec<Option<usize>>,
    /// `None` for an output the node leaves unnamed (computed and dropped).
    pub outputs: Vec<Option<usize>>,
    /// Slots whose last reader is this step: released after it.
    pub release: Vec<usize>,
}

/// A model compiled against one registry snapshot; run it with [`run`](super::run).
pub struct Plan {
    pub(super) steps: Vec<Step>,
    pub(super) slots: usize,
    pub(super) constants: Vec<(usize, Arc<HostTensor>)>,
    pub(super) inputs: Vec<(String, usize)>,
    pub(super) outputs: Vec<(String, usize)>,
    pub placement: Vec<Placement>,
    /// The snapshot the plan is bound to: keeps its plugins mapped and gives BLAS backends.
    pub snapshot: Arc<Snapshot>,
}

impl Plan {
    pub fn generation(&self) -> u64 {
        self.snapshot.generation
    }
}

/// Compiles `model` against `snapshot`, placing each node on the first device of `devices`
/// that has a kernel for it. Call it on the compute pool: folding runs kernels.
pub fn compile(
    model: &Model,
    snapshot: Arc<Snapshot>,
    devices: &[Device],
) -> Result<Plan, GraphError> {
    let mut slot_of: HashMap<&str, usize> = HashMap::new();
    let mut types: Vec<Option<DType>> = Vec::new();
    let slot = |types: &mut Vec<Option<DType>>| -> usize {
        types.push(None);
        types.len() - 1
    };
    // Constants (initializers, later folded results) by slot.
    let mut constants: HashMap<usize, Arc<HostTensor>> = HashMap::new();
    for (name, t) in &model.initializers {
        let s = slot(&mut types);
        slot_of.insert(name.as_str(), s);
        types[s] = Some(t.dtype());
        constants.insert(s, t.clone());
    }
    let mut inputs = Vec::new();
    for i in &model.inputs {
        let s = slot(&mut types);
        slot_of.insert(i.name.as_str(), s);
        types[s] = Some(i.dtype);
        inputs.push((i.name.clone(), s));
    }
    for n in &model.nodes {
        for o in n.outputs.iter().filter(|o| !o.is_empty()) {
            if slot_of.contains_key(o.as_str()) {
                return Err(GraphError::Invalid(format!(
                    "value '{o}' is produced twice (node {})",
                    n.label()
                )));
            }
            let s = slot(&mut types);
            slot_of.insert(o.as_str(), s);
        }
    }

    // Dead-node removal: keep what the outputs depend on.
    let producer: HashMap<&str, usize> = model
        .nodes
        .iter()
        .enumerate()
        .flat_map(|(i, n)| {
            n.outputs
                .iter()
                .filter(|o| !o.is_empty())
                .map(move |o| (o.as_str(), i))
        })
        .collect();
    let mut needed = vec![false; model.nodes.len()];
    let mut stack: Vec<&str> = model.outputs.iter().map(|o| o.name.as_str()).collect();
    let mut seen: HashSet<&str> = HashSet::new();
    while let Some(v) = stack.pop() {
        if !seen.insert(v) {
            continue;
        }
        match (producer.get(v), slot_of.contains_key(v)) {
            (Some(&i), _) => {
                needed[i] = true;
                stack.extend(
                    model.nodes[i]
                        .inputs
                        .iter()
                        .filter(|x| !x.is_empty())
                        .map(|x| x.as_str()),
                );
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
        for x in n.inputs.iter().filter(|x| !x.is_empty()) {
            match slot_of.get(x.as_str()) {
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
            available.extend(
                n.outputs
                    .iter()
                    .filter_map(|o| slot_of.get(o.as_str()).copied()),
            );
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
                    slot_of.get(x.as_str()).copied()
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
                    slot_of.get(o.as_str()).copied()
                }
            })
            .collect();
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

        let shapes: Vec<Option<Vec<i64>>> = in_slots
            .iter()
            .map(|s| {
                s.and_then(|s| constants.get(&s))
                    .map(|t| t.shape().iter().map(|&d| d as i64).collect())
            })
            .collect();
        let input_infos: Vec<ValueInfo<'_>> = in_slots
            .iter()
            .zip(&in_types)
            .zip(&shapes)
            .zip(&n.inputs)
            .map(|(((s, t), shape), name)| ValueInfo {
                name: name.as_str().into(),
                present: s.is_some(),
                dtype: t.unwrap_or(DType::F32),
                shape: shape
                    .as_ref()
                    .map(|v| v.as_slice().into())
                    .map_or(RNone, RSome),
                constant: s
                    .and_then(|s| constants.get(&s))
                    .map(|t| t.view())
                    .map_or(RNone, RSome),
            })
            .collect();
        let output_infos: Vec<ValueInfo<'_>> = out_slots
            .iter()
            .zip(&n.outputs)
            .map(|(s, name)| ValueInfo {
                name: name.as_str().into(),
                present: s.is_some(),
                dtype: s.and_then(|s| types[s]).unwrap_or(DType::F32),
                shape: RNone,
                constant: RNone,
            })
            .collect();
        let info = NodeInfo {
            name: n.name.as_str().into(),
            domain: n.domain.as_str().into(),
            op_type: n.op_type.as_str().into(),
            opset,
            device,
            attributes: n.attributes.as_slice().into(),
            inputs: input_infos.as_slice().into(),
            outputs: output_infos.as_slice().into(),
        };
        let reg = kernel.registration();
        let instance =
            reg.factory
                .instantiate(&info)
                .into_result()
                .map_err(|e| GraphError::Instantiate {
                    node: n.label(),
                    plugin: kernel.plugin.name.clone(),
                    code: e.code,
                    message: e.message.to_string(),
                })?;
        let label = kernel_label(&reg.desc);
        let step = Step {
            label: n.label(),
            instance,
            plugin: kernel.plugin.clone(),
            device,
            inputs: in_slots.clone(),
            outputs: out_slots.clone(),
            release: Vec::new(),
        };

        // Constant folding: every present input is a constant.
        let foldable = !NONDETERMINISTIC.contains(&n.op_type.as_str())
            && in_slots.iter().flatten().all(|s| constants.contains_key(s))
            && device.host_accessible();
        if foldable {
            let ins: Vec<Option<Arc<HostTensor>>> = in_slots
                .iter()
                .map(|s| s.and_then(|s| constants.get(&s).cloned()))
                .collect();
            let outs = run::run_step(&step, &ins, snapshot.blas_for(device))?;
            for (s, t) in out_slots.iter().zip(outs) {
                if let Some(s) = s {
                    types[*s] = Some(t.dtype());
                    constants.insert(*s, Arc::new(t));
                }
            }
            placement.push(Placement {
                node: n.name.clone(),
                op_type: n.op_type.clone(),
                opset: domain_opset,
                kernel: label,
                plugin: kernel.plugin.name.clone(),
                device,
                folded: true,
            });
            continue;
        }
        placement.push(Placement {
            node: n.name.clone(),
            op_type: n.op_type.clone(),
            opset: domain_opset,
            kernel: label,
            plugin: kernel.plugin.name.clone(),
            device,
            folded: false,
        });
        steps.push(step);
    }

    let outputs: Vec<(String, usize)> = model
        .outputs
        .iter()
        .map(|o| {
            slot_of
                .get(o.name.as_str())
                .map(|&s| (o.name.clone(), s))
                .ok_or_else(|| GraphError::Invalid(format!("output '{}' is never defined", o.name)))
        })
        .collect::<Result<_, _>>()?;

    // Liveness: release each computed value after its last reader, unless it is an output.
    let keep: HashSet<usize> = outputs
        .iter()
        .map(|(_, s)| *s)
        .chain(constants.keys().copied())
        .collect();
    let mut last_use: HashMap<usize, usize> = HashMap::new();
    for (k, st) in steps.iter().enumerate() {
        for s in st.inputs.iter().flatten() {
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
        outputs,
        placement,
        snapshot,
    })
}

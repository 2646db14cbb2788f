//! The compiled form of a graph: a plan of steps (what each does, which value slots it reads
//! and writes, which it releases), where nodes were placed and where values are copied.
//! Written by the compiler (`plan`, `copies`), read by execution (`run`) and the placement
//! query; it imports neither, so they do not import each other.

use crate::{exec::BoundKernel, registry::Snapshot};
use opreg_sdk::{host::HostTensor, DType, Device};
use std::sync::Arc;

/// Where a value lives.
#[derive(Copy, Clone, Debug, PartialEq, Eq, Hash)]
pub enum Place {
    Host,
    Device(Device),
}

impl std::fmt::Display for Place {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Place::Host => f.write_str("host"),
            Place::Device(d) => write!(f, "{d}"),
        }
    }
}

/// One copy step the plan has, for the placement query.
#[derive(Clone, Debug, PartialEq)]
pub struct CopyInfo {
    /// The value copied (its name in the graph).
    pub value: String,
    pub from: Place,
    pub to: Place,
}

/// Where one node runs, for the placement query.
#[derive(Clone, Debug)]
pub struct Placement {
    pub node: String,
    pub op_type: String,
    pub opset: i64,
    /// `domain::Op(range)@device` of the kernel (`host::Op` for control flow).
    pub kernel: String,
    pub plugin: String,
    pub device: Device,
    /// Computed once at compile time (all inputs constant).
    pub folded: bool,
}

/// A model compiled against one registry snapshot; run it with [`run`](super::run).
pub struct Plan {
    pub(super) steps: Vec<Step>,
    pub(super) slots: usize,
    pub(super) constants: Vec<(usize, Arc<HostTensor>)>,
    /// Formal inputs first, then captured outer values.
    pub(super) inputs: Vec<(String, usize)>,
    pub(super) formal_inputs: usize,
    pub(super) outputs: Vec<(String, usize)>,
    pub(super) output_types: Vec<Option<DType>>,
    /// Which outputs are sequences (only a subgraph's may be).
    pub(super) output_seqs: Vec<bool>,
    /// Inferred output shapes (symbolic where only known at run time).
    pub output_shapes: Vec<super::import::Shape>,
    pub placement: Vec<Placement>,
    /// The copy steps at device boundaries, in plan order.
    pub copies: Vec<CopyInfo>,
    /// Where runs place their values (see [`memory`](super::memory)).
    pub memory: super::memory::MemoryPlan,
    /// The snapshot the plan is bound to: keeps its plugins mapped and gives BLAS backends.
    pub snapshot: Arc<Snapshot>,
    /// Whether a large batch may run image by image, side by side (see
    /// [`batch`](super::batch)).
    pub(super) batch_split: bool,
}

/// What one step of a plan is, for the profiler and listings.
#[derive(Clone, Debug)]
pub struct StepInfo {
    /// The node's label (`'name' (Op)`), or `copy VALUE FROM->TO`.
    pub label: String,
    /// `domain::Op(range)@device` of the kernel, `host::Op` for control flow, `copy`.
    pub kernel: String,
    pub plugin: String,
    pub device: Device,
}

impl Plan {
    /// The top-level steps, in execution order.
    pub fn steps(&self) -> Vec<StepInfo> {
        self.steps
            .iter()
            .map(|s| {
                let (kernel, plugin) = match &s.work {
                    Work::Kernel(b) => (b.kernel.clone(), b.plugin.name.clone()),
                    Work::Copy { .. } => ("copy".to_string(), "opregd".to_string()),
                    Work::If { .. } => ("host::If".to_string(), "opregd".to_string()),
                    Work::Loop { .. } => ("host::Loop".to_string(), "opregd".to_string()),
                    Work::Scan(_) => ("host::Scan".to_string(), "opregd".to_string()),
                    Work::SequenceMap { .. } => {
                        ("host::SequenceMap".to_string(), "opregd".to_string())
                    }
                    Work::Sequence(op) => (format!("host::{op:?}"), "opregd".to_string()),
                };
                StepInfo {
                    label: s.label.clone(),
                    kernel,
                    plugin,
                    device: s.device,
                }
            })
            .collect()
    }

    pub fn generation(&self) -> u64 {
        self.snapshot.generation
    }

    /// Adds the name of every plugin whose kernels the plan binds or folded constants with,
    /// its subgraphs' included, to `names`.
    pub fn plugins(&self, names: &mut std::collections::BTreeSet<String>) {
        names.extend(self.placement.iter().map(|p| p.plugin.clone()));
        for s in &self.steps {
            match &s.work {
                Work::Kernel(b) => {
                    names.insert(b.plugin.name.clone());
                }
                Work::If {
                    then_branch,
                    else_branch,
                } => {
                    then_branch.plugins(names);
                    else_branch.plugins(names);
                }
                Work::Loop { body } | Work::SequenceMap { body } => body.plugins(names),
                Work::Scan(scan) => scan.body.plugins(names),
                Work::Copy { .. } | Work::Sequence(_) => {}
            }
        }
    }
}

/// What a step does.
pub(super) enum Work {
    Kernel(BoundKernel),
    If {
        then_branch: Box<Plan>,
        else_branch: Box<Plan>,
    },
    Loop {
        body: Box<Plan>,
    },
    Scan(Box<ScanSpec>),
    /// Runs `body` once per element of the input sequences (see [`sequence`](super::sequence)).
    SequenceMap {
        body: Box<Plan>,
    },
    /// A sequence operator, run on the host (see [`sequence`](super::sequence)).
    Sequence(super::sequence::SeqOp),
    /// Moves one value between host and device memory (see [`copies`](super::copies)).
    Copy {
        from: Place,
        to: Place,
    },
}

pub(super) struct ScanSpec {
    pub body: Plan,
    /// Number of state variables (the remaining inputs are scanned).
    pub states: usize,
    pub input_axes: Vec<i64>,
    pub input_reverse: Vec<bool>,
    pub output_axes: Vec<i64>,
    pub output_reverse: Vec<bool>,
}

pub(super) struct Step {
    pub label: String,
    pub work: Work,
    pub device: Device,
    pub inputs: Vec<Option<usize>>,
    /// Outer values the step's subgraphs read, in the order of their plans' captured inputs.
    pub captured: Vec<usize>,
    /// `None` for an output the node leaves unnamed (computed and dropped).
    pub outputs: Vec<Option<usize>>,
    /// Slots whose last reader is this step: released after it.
    pub release: Vec<usize>,
    /// The axis of a standard `Concat` run by a kernel on the host, which the memory plan may
    /// assemble in place (see `memory::Concat`).
    pub concat_axis: Option<i64>,
}

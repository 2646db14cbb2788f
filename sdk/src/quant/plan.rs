//! What a strategy asks the host for (ABI 1.2): tensors to observe, the plan per node and per
//! tensor, and the host's evaluator of candidate plans.

use super::{Observation, QuantPlan, TensorPlan};
use crate::{DType, PluginError};
use abi_stable::{
    sabi_trait,
    std_types::{RResult, RString, RVec},
    RRef, StableAbi,
};

/// One tensor to observe during calibration, and how.
#[repr(C)]
#[derive(StableAbi, Clone, Debug, PartialEq)]
pub struct TensorObservation {
    /// Value name in the graph.
    pub name: RString,
    /// What to gather.
    pub observation: Observation,
}

impl TensorObservation {
    /// Observe `name` with `observation`.
    pub fn new(name: impl Into<String>, observation: Observation) -> Self {
        TensorObservation {
            name: RString::from(name.into()),
            observation,
        }
    }
}

/// The kind of a [`NodePlan`]. An open code: a host that does not know a kind refuses the plan
/// with `UNIMPLEMENTED`, naming the strategy and node.
#[repr(transparent)]
#[derive(StableAbi, Copy, Clone, Debug, PartialEq, Eq, Hash)]
pub struct NodeKind(pub u32);

impl NodeKind {
    /// The host decides from the tensors' directives (the default for unlisted nodes).
    pub const AUTO: NodeKind = NodeKind(0);
    /// Keep the node in its float type: no quantization of its weights, no integer kernel.
    pub const EXCLUDE: NodeKind = NodeKind(1);
    /// Compute in `precision` (F16, BF16: the node's float inputs and weights are cast).
    pub const FLOAT: NodeKind = NodeKind(2);
}

/// What to do with one node.
#[repr(C)]
#[derive(StableAbi, Clone, Debug, PartialEq)]
pub struct NodePlan {
    /// Node name.
    pub node: RString,
    /// What to do.
    pub kind: NodeKind,
    /// Compute precision for [`NodeKind::FLOAT`].
    pub precision: DType,
    /// Reserved for properties added in later minors (0 today).
    pub flags: u64,
}

impl NodePlan {
    /// Keep `node` in float.
    pub fn exclude(node: impl Into<String>) -> Self {
        NodePlan {
            node: RString::from(node.into()),
            kind: NodeKind::EXCLUDE,
            precision: DType::F32,
            flags: 0,
        }
    }

    /// Compute `node` in `precision` (F16 or BF16): its float constants are stored in that
    /// type and its computed inputs cast to it (once per value, none between two nodes
    /// lowered alike); its output is cast back to f32 where a reader needs it.
    pub fn float(node: impl Into<String>, precision: DType) -> Self {
        NodePlan {
            node: RString::from(node.into()),
            kind: NodeKind::FLOAT,
            precision,
            flags: 0,
        }
    }
}

/// A figure a strategy reports about one tensor or node (the calibration threshold, the KL
/// divergence at it, a layer's sensitivity); the host puts it in the report.
#[repr(C)]
#[derive(StableAbi, Clone, Debug, PartialEq)]
pub struct Annotation {
    /// Tensor or node name.
    pub subject: RString,
    /// What the figure is, e.g. `threshold`, `kl`, `sensitivity_db`.
    pub key: RString,
    /// The figure.
    pub value: f64,
}

impl Annotation {
    /// `subject`'s `key` is `value`.
    pub fn new(subject: &str, key: &str, value: f64) -> Self {
        Annotation {
            subject: subject.into(),
            key: key.into(),
            value,
        }
    }
}

/// A strategy's plan (ABI 1.2): per tensor and per node.
#[repr(C)]
#[derive(StableAbi, Clone, Debug, PartialEq, Default)]
pub struct GraphPlan {
    /// One entry per tensor to change; tensors not listed are kept.
    pub tensors: RVec<TensorPlan>,
    /// One entry per node with a decision of its own; unlisted nodes are [`NodeKind::AUTO`].
    pub nodes: RVec<NodePlan>,
    /// Figures for the report.
    pub annotations: RVec<Annotation>,
    /// Free text for the report (method, parameters chosen).
    pub notes: RString,
    /// Properties of the whole plan: [`GraphPlan::ADAPTIVE`]; other bits are reserved (0).
    pub flags: u64,
}

impl GraphPlan {
    /// Serve the result as an **adaptive** model: the host keeps the float model beside the
    /// quantized one, samples the live requests, and every so often calls this strategy's
    /// `observe` and `plan_graph` again over the recent samples; when the activation ranges
    /// have drifted and the new plan verifies better against the float model, the host swaps
    /// it in while serving. The host's policy (how often, how much drift) takes the
    /// [`Annotation`]s on the subject `"adaptive"` with the keys `drift` (largest move of a
    /// range's end as a fraction of the served range), `window` (samples kept), `sample_every`
    /// (one request in N), `check_every` (samples between checks), `min_gain_db` (SQNR a new
    /// plan must gain) and `max_window_bytes`; missing keys take the host's defaults.
    ///
    /// Defined within ABI 1.2 (a flag, no layout change): a host that predates it serves the
    /// plan with fixed parameters, which is still a correct model.
    pub const ADAPTIVE: u64 = 1;
}

impl From<QuantPlan> for GraphPlan {
    fn from(p: QuantPlan) -> Self {
        GraphPlan {
            tensors: p.tensors,
            nodes: RVec::new(),
            annotations: RVec::new(),
            notes: p.notes,
            flags: 0,
        }
    }
}

/// The error of a candidate plan against the float model, over the host's held-out samples
/// (every float output, concatenated).
#[repr(C)]
#[derive(StableAbi, Copy, Clone, Debug, PartialEq, Default)]
pub struct Evaluation {
    /// Signal-to-quantization-noise ratio in dB (`f64::INFINITY` for identical outputs).
    pub sqnr_db: f64,
    /// Largest absolute difference.
    pub max_abs: f64,
    /// Cosine similarity of the flattened outputs.
    pub cosine: f64,
    /// Held-out samples the figures cover.
    pub samples: u32,
    /// Reserved for properties added in later minors (0 today).
    pub flags: u64,
}

/// An [`Evaluation`] with the measured latency of the candidate (ABI 1.3).
#[repr(C)]
#[derive(StableAbi, Copy, Clone, Debug, PartialEq, Default)]
pub struct TimedEvaluation {
    /// The error figures, as [`Evaluator::evaluate`] gives them.
    pub evaluation: Evaluation,
    /// Milliseconds per held-out sample: the fastest of several timed passes over the samples
    /// (the candidate compiled and optimized as it would be served, warmed up first), on this
    /// host, with the model's thread settings.
    pub latency_ms: f64,
    /// Timed passes the figure is the fastest of.
    pub passes: u32,
    /// Reserved for properties added in later minors (0 today).
    pub flags: u64,
}

/// The host's evaluator, as it crosses the ABI. Implemented by hosts.
#[sabi_trait]
pub trait FfiEvaluator: Sync {
    /// Applies `plan` to the float model, runs it on the held-out samples and compares.
    #[sabi(last_prefix_field)]
    fn evaluate(&self, plan: &GraphPlan) -> RResult<Evaluation, PluginError>;

    /// [`evaluate`](FfiEvaluator::evaluate), then times the candidate. Appended in 1.3: a
    /// host that predates it answers with this default, an `UNIMPLEMENTED` error.
    fn evaluate_timed(&self, plan: &GraphPlan) -> RResult<TimedEvaluation, PluginError> {
        let _ = plan;
        RResult::RErr(PluginError::unimplemented(
            "this host predates ABI 1.3: it measures no latency",
        ))
    }
}

/// A borrowed evaluator object.
pub type FfiEvaluatorRef<'a> = FfiEvaluator_TO<'a, RRef<'a, ()>>;

/// The host's evaluator of candidate plans, as a strategy sees it.
pub struct Evaluator<'a> {
    inner: FfiEvaluatorRef<'a>,
}

impl<'a> Evaluator<'a> {
    /// Wraps the host's object.
    pub fn new(inner: FfiEvaluatorRef<'a>) -> Self {
        Evaluator { inner }
    }

    /// Applies `plan` to the float model, runs it on the held-out samples and compares with the
    /// float model's outputs. Costs one quantized compile and run per call: strategies should
    /// evaluate a bounded number of candidates.
    pub fn evaluate(&self, plan: &GraphPlan) -> Result<Evaluation, PluginError> {
        self.inner.evaluate(plan).into()
    }

    /// [`evaluate`](Self::evaluate), then the candidate's latency on this host (ABI 1.3): for
    /// strategies that trade error for speed. Costs the evaluation plus a few timed passes
    /// over the held-out samples. A host older than 1.3 answers `UNIMPLEMENTED`.
    pub fn evaluate_timed(&self, plan: &GraphPlan) -> Result<TimedEvaluation, PluginError> {
        self.inner.evaluate_timed(plan).into()
    }
}

//! Quantization strategies.
//!
//! A strategy sees a read-only view of the float model ([`GraphView`]: nodes, value types and
//! shapes, weights as borrowed views) and says which tensors the host must observe during
//! calibration and how ([`Quantizer::observe`]); the host streams calibration batches through
//! the model, keeps only those statistics (never the activations themselves), and hands them to
//! [`Quantizer::plan_graph`]. The plan says, per node (exclude, compute precision) and per
//! tensor (scale and zero point per tensor or channel, dynamic, pruning, casts), what to do; a
//! strategy may measure candidate plans on calibration data through the host's [`Evaluator`].
//! The host applies the chosen plan as standard ONNX (QDQ, or integer ops for dynamic
//! quantization) and reports the figures.
//!
//! A strategy that needs a statistic the host does not gather asks for
//! [`ObservationKind::CUSTOM`] and supplies the [`Observer`] itself (ABI 1.4; see
//! [`observer`](self::observer)); what it finishes with reaches [`Quantizer::plan_observed`].
//!
//! ABI 1.0/1.1 strategies implement only [`Quantizer::observation`] and [`Quantizer::plan`];
//! the 1.2 methods' defaults keep them working (the host observes its default tensors and
//! passes weights as copies in [`TensorStats::weight`]).

pub mod calib;
mod graph;
pub mod observer;
mod plan;

pub use graph::{GraphView, NodeView, ValueView};
pub use observer::{
    into_ffi_observer, FfiObserver, FfiObserverBox, FfiObserver_TO, Observer, ObserverOutput,
};
pub use plan::{
    Annotation, Evaluation, Evaluator, FfiEvaluator, FfiEvaluatorRef, FfiEvaluator_TO, GraphPlan,
    NodeKind, NodePlan, TensorObservation, TimedEvaluation,
};

use crate::{error::guard, tensor::OwnedTensor, DType, PluginError};
use abi_stable::{
    sabi_trait,
    sabi_trait::TD_Opaque,
    std_types::{RBox, ROption, RResult, RSlice, RStr, RString, RVec},
    StableAbi,
};

/// The kind of an [`Observation`]. An open code: a host that does not know a kind refuses the
/// calibration with `UNIMPLEMENTED`, naming the strategy.
#[repr(transparent)]
#[derive(StableAbi, Copy, Clone, Debug, PartialEq, Eq, Hash)]
pub struct ObservationKind(pub u32);

impl ObservationKind {
    /// Nothing: weights only, or dynamic quantization.
    pub const NOTHING: ObservationKind = ObservationKind(0);
    /// Running minimum and maximum.
    pub const MIN_MAX: ObservationKind = ObservationKind(1);
    /// A histogram of `bins` bins over the running range of absolute values (for KL/entropy
    /// or percentile calibration), plus min and max.
    pub const HISTOGRAM: ObservationKind = ObservationKind(2);
    /// Observed on a **weight's** name (ABI 1.2): the Gram matrix `XᵀX` of the input rows of
    /// the `Conv` (2-D, one group: im2col patches) or `MatMul` reading it, kept by the host
    /// (`K²` values, at most 4096 per row) for [`Directive::RECONSTRUCT`]. No statistics come
    /// back for it; a layer whose layout the host cannot take is not observed (the report
    /// says so).
    pub const GRAM: ObservationKind = ObservationKind(3);
    /// The strategy's own statistic (ABI 1.4): the host asks
    /// [`Quantizer::observer`] for an [`Observer`] of the tensor (one per calibration lane),
    /// feeds it the tensor's batches, merges the lanes and passes what it finishes with to
    /// [`Quantizer::plan_observed`]. `bins`, `axis` and `flags` of the [`Observation`] are the
    /// strategy's to interpret. A host older than 1.4 refuses the kind by name.
    pub const CUSTOM: ObservationKind = ObservationKind(4);
}

impl ObservationKind {
    /// The kind's name, for messages.
    pub fn name(self) -> String {
        match self {
            ObservationKind::NOTHING => "nothing".into(),
            ObservationKind::MIN_MAX => "min-max".into(),
            ObservationKind::HISTOGRAM => "histogram".into(),
            ObservationKind::GRAM => "gram".into(),
            ObservationKind::CUSTOM => "custom".into(),
            ObservationKind(other) => format!("kind {other}"),
        }
    }
}

/// What a strategy needs the host to observe on each activation during calibration: a kind
/// and its parameters (kind + params, so kinds can be added without a layout change).
#[repr(C)]
#[derive(StableAbi, Copy, Clone, Debug, PartialEq, Eq)]
pub struct Observation {
    /// What to gather.
    pub kind: ObservationKind,
    /// Histogram bins ([`ObservationKind::HISTOGRAM`]).
    pub bins: u32,
    /// Channel axis for per-channel kinds (-1: none).
    pub axis: i32,
    /// Extension bits; none are defined in 1.0.
    pub flags: u64,
}

impl Observation {
    /// Observe nothing.
    pub const NOTHING: Observation = Observation {
        kind: ObservationKind::NOTHING,
        bins: 0,
        axis: -1,
        flags: 0,
    };
    /// Running min and max.
    pub const MIN_MAX: Observation = Observation {
        kind: ObservationKind::MIN_MAX,
        ..Observation::NOTHING
    };

    /// The input Gram matrix of the product reading a weight ([`ObservationKind::GRAM`]).
    pub const GRAM: Observation = Observation {
        kind: ObservationKind::GRAM,
        ..Observation::NOTHING
    };

    /// The strategy's own observer ([`ObservationKind::CUSTOM`]).
    pub const CUSTOM: Observation = Observation {
        kind: ObservationKind::CUSTOM,
        ..Observation::NOTHING
    };

    /// A histogram of |x| with `bins` bins.
    pub fn histogram(bins: u32) -> Observation {
        Observation {
            kind: ObservationKind::HISTOGRAM,
            bins,
            ..Observation::NOTHING
        }
    }
}

/// Statistics of one tensor, as the host gathered them.
#[repr(C)]
#[derive(StableAbi, Clone, Debug)]
pub struct TensorStats {
    /// Tensor name in the graph.
    pub name: RString,
    /// Element type in the float model.
    pub dtype: DType,
    /// True for initializers (weights); their values are in `weight`.
    pub is_weight: bool,
    /// Smallest value seen.
    pub min: f32,
    /// Largest value seen.
    pub max: f32,
    /// Histogram counts over `[0, hist_max]` of |x| (empty unless requested).
    pub histogram: RVec<u64>,
    /// Upper edge of the histogram's last bin.
    pub hist_max: f32,
    /// The weight itself, for weights — for strategies built against ABI 1.0/1.1 only; 1.2
    /// strategies read weights through the [`GraphView`] (borrowed, not copied) and get `None`.
    pub weight: ROption<OwnedTensor>,
}

/// A `key = value` option.
#[repr(C)]
#[derive(StableAbi, Clone, Debug, PartialEq)]
pub struct KeyValue {
    /// Key.
    pub key: RString,
    /// Value.
    pub value: RString,
}

/// Input of [`Quantizer::plan`].
#[repr(C)]
#[derive(StableAbi, Clone, Debug)]
pub struct QuantRequest {
    /// Statistics of every tensor the host observed.
    pub tensors: RVec<TensorStats>,
    /// Options from the user (`per_channel=true`, `weight_type=INT8`, ...).
    pub options: RVec<KeyValue>,
}

impl QuantRequest {
    /// The option `key`, if given.
    pub fn option(&self, key: &str) -> Option<&str> {
        self.options
            .iter()
            .find(|kv| kv.key.as_str() == key)
            .map(|kv| kv.value.as_str())
    }
}

/// The kind of a [`Directive`]. An open code: a host that does not know a kind refuses the
/// plan with `UNIMPLEMENTED`, naming the strategy and tensor.
#[repr(transparent)]
#[derive(StableAbi, Copy, Clone, Debug, PartialEq, Eq, Hash)]
pub struct DirectiveKind(pub u32);

impl DirectiveKind {
    /// Leave the tensor as it is.
    pub const KEEP: DirectiveKind = DirectiveKind(0);
    /// One scale and zero point (`scales[0]`, `zero_points[0]`).
    pub const PER_TENSOR: DirectiveKind = DirectiveKind(1);
    /// One scale and zero point per slice along `axis`.
    pub const PER_CHANNEL: DirectiveKind = DirectiveKind(2);
    /// Quantized at run time from the live range (dynamic quantization).
    pub const DYNAMIC: DirectiveKind = DirectiveKind(3);
    /// Zero the elements whose `mask` byte is 0 (pruning); the mask has the tensor's shape.
    pub const PRUNE: DirectiveKind = DirectiveKind(4);
    /// Store in another float type (`dtype`: F16, BF16).
    pub const CAST: DirectiveKind = DirectiveKind(5);
    /// Structured pruning of a weight (ABI 1.2): keep only the slices `indices` (ascending)
    /// along `axis` (a Conv's output filters: 0; a MatMul's columns: 1). The host removes the
    /// other slices from the graph where its structure allows — the layer and the layers that
    /// read it get smaller — and zeroes them where it does not. A quantization directive for
    /// the same weight lists per-channel scales for the original slices; the host keeps those
    /// of the kept ones.
    pub const KEEP_INDICES: DirectiveKind = DirectiveKind(6);
}

/// What to do with one tensor: a kind and its parameters (kind + params, so kinds can be
/// added without a layout change). Fields a kind does not use are empty.
#[repr(C)]
#[derive(StableAbi, Clone, Debug, PartialEq)]
pub struct Directive {
    /// What to do.
    pub kind: DirectiveKind,
    /// Target type: U8, I8, U16, I16 for quantization; F16, BF16 for casts.
    pub dtype: DType,
    /// Channel axis for per-channel kinds (-1: none).
    pub axis: i32,
    /// Block size along `axis` for blocked kinds (0: none).
    pub block_size: u32,
    /// Scales.
    pub scales: RVec<f32>,
    /// Zero points, one per scale.
    pub zero_points: RVec<i32>,
    /// Pruning mask, one byte per element.
    pub mask: RVec<u8>,
    /// Indices (e.g. kept channels for structured pruning).
    pub indices: RVec<i64>,
    /// Extension bits: [`Directive::RECONSTRUCT`] (1.2); the others are reserved (0).
    pub flags: u64,
}

impl Directive {
    fn of(kind: DirectiveKind, dtype: DType) -> Directive {
        Directive {
            kind,
            dtype,
            axis: -1,
            block_size: 0,
            scales: RVec::new(),
            zero_points: RVec::new(),
            mask: RVec::new(),
            indices: RVec::new(),
            flags: 0,
        }
    }

    /// Leave the tensor as it is.
    pub fn keep() -> Directive {
        Directive::of(DirectiveKind::KEEP, DType::F32)
    }

    /// Quantize with one scale and zero point.
    pub fn per_tensor(scale: f32, zero_point: i32, dtype: DType) -> Directive {
        Directive {
            scales: vec![scale].into(),
            zero_points: vec![zero_point].into(),
            ..Directive::of(DirectiveKind::PER_TENSOR, dtype)
        }
    }

    /// Quantize a weight with one scale and zero point per slice along `axis`.
    pub fn per_channel(
        axis: i32,
        scales: Vec<f32>,
        zero_points: Vec<i32>,
        dtype: DType,
    ) -> Directive {
        Directive {
            axis,
            scales: scales.into(),
            zero_points: zero_points.into(),
            ..Directive::of(DirectiveKind::PER_CHANNEL, dtype)
        }
    }

    /// Quantize at run time.
    pub fn dynamic(dtype: DType) -> Directive {
        Directive::of(DirectiveKind::DYNAMIC, dtype)
    }

    /// In [`flags`](Self::flags) of a `PRUNE` directive (ABI 1.2): after masking, the host
    /// re-fits the kept weights to the layer's calibration inputs (least squares through the
    /// input's Gram matrix, which the strategy must have observed with
    /// [`Observation::GRAM`]), so the pruned layer's output stays close to the original's.
    /// Without the Gram matrix the weight is only masked and the report says why.
    pub const RECONSTRUCT: u64 = 1;

    /// Zero the elements whose mask byte is 0.
    pub fn prune(mask: Vec<u8>) -> Directive {
        Directive {
            mask: mask.into(),
            ..Directive::of(DirectiveKind::PRUNE, DType::F32)
        }
    }

    /// Keep only the slices `indices` of a weight along `axis` (structured pruning).
    pub fn keep_indices(axis: i32, indices: Vec<i64>) -> Directive {
        Directive {
            axis,
            indices: indices.into(),
            ..Directive::of(DirectiveKind::KEEP_INDICES, DType::F32)
        }
    }

    /// Store in another float type.
    pub fn cast(dtype: DType) -> Directive {
        Directive::of(DirectiveKind::CAST, dtype)
    }
}

/// One entry of a plan.
#[repr(C)]
#[derive(StableAbi, Clone, Debug, PartialEq)]
pub struct TensorPlan {
    /// Tensor name in the graph.
    pub name: RString,
    /// What to do with it.
    pub directive: Directive,
}

/// Output of [`Quantizer::plan`].
#[repr(C)]
#[derive(StableAbi, Clone, Debug, PartialEq)]
pub struct QuantPlan {
    /// One entry per tensor to change; tensors not listed are kept.
    pub tensors: RVec<TensorPlan>,
    /// Free text for the report (method, parameters chosen).
    pub notes: RString,
}

/// What a quantization strategy is (the plugin's side of
/// [`FfiRegistrar::add_quantizer`](crate::module::FfiRegistrar::add_quantizer)).
#[derive(Clone, Debug)]
pub struct QuantizerDesc {
    /// Unique name, e.g. `"ptq-static-kl"`.
    pub name: String,
    /// One line for listings.
    pub description: String,
}

/// A quantization strategy, as a plugin author implements it.
///
/// A 1.2 strategy implements [`observe`](Quantizer::observe) and
/// [`plan_graph`](Quantizer::plan_graph); the 1.0 pair [`observation`](Quantizer::observation)
/// and [`plan`](Quantizer::plan) remains for strategies written against older SDKs.
pub trait Quantizer: Send + Sync + 'static {
    /// What the host must observe on each of its default tensors (1.0 form; see
    /// [`observe`](Quantizer::observe)). Default: nothing.
    fn observation(&self) -> Observation {
        Observation::NOTHING
    }

    /// Turns observations into a plan (1.0 form; see [`plan_graph`](Quantizer::plan_graph)).
    /// Default: refused, for strategies that implement `plan_graph` only.
    fn plan(&self, request: &QuantRequest) -> Result<QuantPlan, PluginError> {
        let _ = request;
        Err(PluginError::unimplemented(
            "this strategy implements plan_graph only",
        ))
    }

    /// Which tensors of `graph` to observe during calibration, and how (ABI 1.2). `options`
    /// are the user's. An empty list asks for the host's default: every activation a `Conv`,
    /// `MatMul` or `Gemm` reads or writes, observed with [`observation`](Quantizer::observation).
    fn observe(
        &self,
        graph: &GraphView<'_>,
        options: &[KeyValue],
    ) -> Result<Vec<TensorObservation>, PluginError> {
        let _ = (graph, options);
        Ok(Vec::new())
    }

    /// Turns the statistics in `request` into a plan for `graph` (ABI 1.2). `evaluator` runs a
    /// candidate plan on held-out calibration data and measures its error against the float
    /// model. Default: [`plan`](Quantizer::plan), with no per-node entries.
    fn plan_graph(
        &self,
        graph: &GraphView<'_>,
        request: &QuantRequest,
        evaluator: &Evaluator<'_>,
    ) -> Result<GraphPlan, PluginError> {
        let _ = (graph, evaluator);
        self.plan(request).map(GraphPlan::from)
    }

    /// Checks the strategy: run by the daemon when the plugin loads (and before a hot swap is
    /// published); a strategy that fails is refused with its plugin. Default: nothing to check.
    fn self_test(&self) -> Result<(), PluginError> {
        Ok(())
    }

    /// A fresh observer of `tensor` for an [`ObservationKind::CUSTOM`] observation this
    /// strategy asked for in [`observe`](Quantizer::observe) (ABI 1.4). The host calls it once
    /// per calibration lane. Default: refused (a strategy that asks for custom observations
    /// must supply them).
    fn observer(
        &self,
        tensor: &str,
        observation: &Observation,
        options: &[KeyValue],
    ) -> Result<Box<dyn Observer>, PluginError> {
        let _ = (observation, options);
        Err(PluginError::unimplemented(format!(
            "this strategy has no observer of its own (asked for '{tensor}')"
        )))
    }

    /// [`plan_graph`](Quantizer::plan_graph) with what the strategy's own observers finished
    /// with (ABI 1.4; `observed` is empty when it asked for none). Default: `plan_graph`.
    fn plan_observed(
        &self,
        graph: &GraphView<'_>,
        request: &QuantRequest,
        observed: &[ObserverOutput],
        evaluator: &Evaluator<'_>,
    ) -> Result<GraphPlan, PluginError> {
        let _ = observed;
        self.plan_graph(graph, request, evaluator)
    }
}

/// The ABI form of [`Quantizer`]. Implemented by the SDK; hosts call it.
#[sabi_trait]
pub trait FfiQuantizer: Send + Sync {
    /// See [`Quantizer::observation`].
    fn observation(&self) -> Observation;
    /// See [`Quantizer::plan`].
    fn plan(&self, request: &QuantRequest) -> RResult<QuantPlan, PluginError>;
    /// See [`Quantizer::self_test`].
    #[sabi(last_prefix_field)]
    fn self_test(&self) -> RResult<(), PluginError>;

    /// See [`Quantizer::observe`]. Appended in 1.2: an older plugin's vtable lacks it, and
    /// this default (the host's default tensors) answers for it.
    fn observe(
        &self,
        graph: &GraphView<'_>,
        options: RSlice<'_, KeyValue>,
    ) -> RResult<RVec<TensorObservation>, PluginError> {
        let _ = (graph, options);
        RResult::ROk(RVec::new())
    }

    /// See [`Quantizer::plan_graph`]. Appended in 1.2: for an older plugin this default calls
    /// its 1.0 `plan`.
    fn plan_graph(
        &self,
        graph: &GraphView<'_>,
        request: &QuantRequest,
        evaluator: FfiEvaluatorRef<'_>,
    ) -> RResult<GraphPlan, PluginError> {
        let _ = (graph, evaluator);
        self.plan(request).map(GraphPlan::from)
    }

    /// See [`Quantizer::observer`]. Appended in 1.4: an older plugin's vtable lacks it, and
    /// this default refuses (an older strategy never asks for a custom observation).
    fn observer(
        &self,
        tensor: RStr<'_>,
        observation: &Observation,
        options: RSlice<'_, KeyValue>,
    ) -> RResult<FfiObserverBox, PluginError> {
        let _ = (observation, options);
        RResult::RErr(PluginError::unimplemented(format!(
            "this strategy predates ABI 1.4: it has no observer of its own (asked for '{tensor}')"
        )))
    }

    /// See [`Quantizer::plan_observed`]. Appended in 1.4: for an older plugin this default
    /// calls its `plan_graph`.
    fn plan_observed(
        &self,
        graph: &GraphView<'_>,
        request: &QuantRequest,
        observed: RSlice<'_, ObserverOutput>,
        evaluator: FfiEvaluatorRef<'_>,
    ) -> RResult<GraphPlan, PluginError> {
        let _ = observed;
        self.plan_graph(graph, request, evaluator)
    }
}

/// An owned quantizer object, as it crosses the ABI.
pub type FfiQuantizerBox = FfiQuantizer_TO<'static, RBox<()>>;

struct QuantizerAdapter<Q>(Q);

impl<Q: Quantizer> FfiQuantizer for QuantizerAdapter<Q> {
    fn observation(&self) -> Observation {
        // A panic here has no error channel: fall back to observing nothing, which makes the
        // plan step fail loudly instead of the process aborting.
        std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| self.0.observation()))
            .unwrap_or(Observation::NOTHING)
    }
    fn plan(&self, request: &QuantRequest) -> RResult<QuantPlan, PluginError> {
        guard("quantizer plan", || self.0.plan(request)).into()
    }
    fn self_test(&self) -> RResult<(), PluginError> {
        guard("quantizer self-test", || self.0.self_test()).into()
    }
    fn observe(
        &self,
        graph: &GraphView<'_>,
        options: RSlice<'_, KeyValue>,
    ) -> RResult<RVec<TensorObservation>, PluginError> {
        guard("quantizer observe", || {
            self.0.observe(graph, options.as_slice()).map(RVec::from)
        })
        .into()
    }
    fn plan_graph(
        &self,
        graph: &GraphView<'_>,
        request: &QuantRequest,
        evaluator: FfiEvaluatorRef<'_>,
    ) -> RResult<GraphPlan, PluginError> {
        let evaluator = Evaluator::new(evaluator);
        guard("quantizer plan", || {
            self.0.plan_graph(graph, request, &evaluator)
        })
        .into()
    }
    fn observer(
        &self,
        tensor: RStr<'_>,
        observation: &Observation,
        options: RSlice<'_, KeyValue>,
    ) -> RResult<FfiObserverBox, PluginError> {
        guard("quantizer observer", || {
            self.0
                .observer(tensor.as_str(), observation, options.as_slice())
                .map(into_ffi_observer)
        })
        .into()
    }
    fn plan_observed(
        &self,
        graph: &GraphView<'_>,
        request: &QuantRequest,
        observed: RSlice<'_, ObserverOutput>,
        evaluator: FfiEvaluatorRef<'_>,
    ) -> RResult<GraphPlan, PluginError> {
        let evaluator = Evaluator::new(evaluator);
        guard("quantizer plan", || {
            self.0
                .plan_observed(graph, request, observed.as_slice(), &evaluator)
        })
        .into()
    }
}

/// Wraps a [`Quantizer`] into its ABI form, with every call guarded against panics.
pub fn into_ffi_quantizer<Q: Quantizer>(q: Q) -> FfiQuantizerBox {
    FfiQuantizer_TO::from_value(QuantizerAdapter(q), TD_Opaque)
}

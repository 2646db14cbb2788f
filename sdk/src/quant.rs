//! Quantization strategies.
//!
//! A strategy declares what it needs observed during calibration ([`Observation`]); the host
//! streams calibration batches through the model, keeps only those statistics (never the
//! activations themselves), and hands them to [`Quantizer::plan`]. The plan says, per tensor,
//! what to do; the host applies it as standard ONNX (QDQ, or integer ops for dynamic
//! quantization) and reports the figures.

use crate::{error::guard, tensor::OwnedTensor, DType, PluginError};
use abi_stable::{
    sabi_trait,
    sabi_trait::TD_Opaque,
    std_types::{RBox, ROption, RResult, RString, RVec},
    StableAbi,
};

/// What a strategy needs the host to observe on each activation during calibration.
#[repr(u8)]
#[derive(StableAbi, Copy, Clone, Debug, PartialEq, Eq)]
pub enum Observation {
    /// Nothing: weights only, or dynamic quantization.
    Nothing,
    /// Running minimum and maximum.
    MinMax,
    /// A histogram of `bins` bins over the running range of absolute values (for KL/entropy
    /// or percentile calibration), plus min and max.
    Histogram {
        /// Number of bins.
        bins: u32,
    },
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
    /// The weight itself, for weights.
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

/// What to do with one tensor.
#[repr(u8)]
#[derive(StableAbi, Clone, Debug, PartialEq)]
pub enum Directive {
    /// Leave it as it is.
    Keep,
    /// Quantize with one scale and zero point.
    PerTensor {
        /// Scale.
        scale: f32,
        /// Zero point.
        zero_point: i32,
        /// `U8`, `I8`, `U16` or `I16`.
        dtype: DType,
    },
    /// Quantize a weight with one scale and zero point per slice along `axis`.
    PerChannel {
        /// The channel axis.
        axis: i32,
        /// One scale per channel.
        scales: RVec<f32>,
        /// One zero point per channel.
        zero_points: RVec<i32>,
        /// `U8`, `I8`, `U16` or `I16`.
        dtype: DType,
    },
    /// Quantize at run time from the live range (dynamic quantization).
    Dynamic {
        /// `U8` or `I8`.
        dtype: DType,
    },
    /// Zero the elements whose mask byte is 0 (pruning); the mask has the tensor's shape.
    Prune {
        /// One byte per element: 0 prunes it.
        mask: RVec<u8>,
    },
    /// Store in another float type (`F16`, `BF16`).
    Cast {
        /// The new type.
        dtype: DType,
    },
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

/// What a quantization strategy is.
#[repr(C)]
#[derive(StableAbi, Clone, Debug)]
pub struct QuantizerDesc {
    /// Unique name, e.g. `"ptq-static-kl"`.
    pub name: RString,
    /// One line for listings.
    pub description: RString,
}

/// A quantization strategy, as a plugin author implements it.
pub trait Quantizer: Send + Sync + 'static {
    /// What the host must observe during calibration.
    fn observation(&self) -> Observation;
    /// Turns observations into a plan.
    fn plan(&self, request: &QuantRequest) -> Result<QuantPlan, PluginError>;

    /// Checks the strategy: run by the daemon when the plugin loads (and before a hot swap is
    /// published); a strategy that fails is refused with its plugin. Default: nothing to check.
    fn self_test(&self) -> Result<(), PluginError> {
        Ok(())
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
}

/// An owned quantizer object, as it crosses the ABI.
pub type FfiQuantizerBox = FfiQuantizer_TO<'static, RBox<()>>;

struct QuantizerAdapter<Q>(Q);

impl<Q: Quantizer> FfiQuantizer for QuantizerAdapter<Q> {
    fn observation(&self) -> Observation {
        // A panic here has no error channel: fall back to observing nothing, which makes the
        // plan step fail loudly instead of the process aborting.
        std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| self.0.observation()))
            .unwrap_or(Observation::Nothing)
    }
    fn plan(&self, request: &QuantRequest) -> RResult<QuantPlan, PluginError> {
        guard("quantizer plan", || self.0.plan(request)).into()
    }
    fn self_test(&self) -> RResult<(), PluginError> {
        guard("quantizer self-test", || self.0.self_test()).into()
    }
}

/// Wraps a [`Quantizer`] into its ABI form, with every call guarded against panics.
pub fn into_ffi_quantizer<Q: Quantizer>(q: Q) -> FfiQuantizerBox {
    FfiQuantizer_TO::from_value(QuantizerAdapter(q), TD_Opaque)
}

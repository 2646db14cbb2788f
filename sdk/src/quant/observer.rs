//! A strategy's own observers (ABI 1.4): statistics the host does not gather itself, computed
//! by the strategy on each calibration batch.
//!
//! The host calibrates on several lanes at once (one sample per lane, run side by side), so it
//! asks the strategy for one observer per lane and tensor ([`Quantizer::observer`]
//! (super::Quantizer::observer)), feeds each lane's observers the batches of that lane
//! ([`Observer::update`]), then folds the lanes into one: it takes each other lane's partial
//! state ([`Observer::state`]) and merges it into the first ([`Observer::merge`]), and hands
//! what that observer finishes with ([`Observer::finish`]) to the plan
//! ([`Quantizer::plan_observed`](super::Quantizer::plan_observed)). The same contract as a
//! distributed aggregate (update, partial state, merge, evaluate): an observer whose merge is
//! exact gives the same result whatever the number of lanes and however the samples fall on
//! them. State and results are plain numbers, so nothing but numbers crosses the ABI and no
//! observer needs to know another's type.

use crate::{error::guard, PluginError, TensorView};
use abi_stable::{
    sabi_trait,
    sabi_trait::TD_Opaque,
    std_types::{RBox, RResult, RSlice, RString, RVec},
    StableAbi,
};

/// A strategy's own statistic of one tensor, updated batch by batch during calibration.
///
/// Memory must not grow with the number of batches: keep a fixed-size summary, never the
/// values.
pub trait Observer: Send + 'static {
    /// Folds in one calibration batch of the tensor (f32, on the host; its shape is the
    /// batch's).
    fn update(&mut self, batch: &TensorView<'_>) -> Result<(), PluginError>;

    /// The partial state another lane's observer of the same tensor will
    /// [`merge`](Observer::merge).
    fn state(&self) -> Result<Vec<f64>, PluginError>;

    /// Folds in another observer's [`state`](Observer::state), as if its batches had been
    /// passed to [`update`](Observer::update) here. A state this observer cannot read (wrong
    /// length) is refused.
    fn merge(&mut self, state: &[f64]) -> Result<(), PluginError>;

    /// The statistic, for [`Quantizer::plan_observed`](super::Quantizer::plan_observed).
    /// The host also lists it in the report.
    fn finish(&self) -> Result<Vec<f64>, PluginError>;
}

/// What one of a strategy's own observers finished with (ABI 1.4).
#[repr(C)]
#[derive(StableAbi, Clone, Debug, PartialEq)]
pub struct ObserverOutput {
    /// The observed tensor.
    pub name: RString,
    /// [`Observer::finish`]'s values.
    pub values: RVec<f64>,
    /// Calibration samples the observer saw (over every lane).
    pub samples: u64,
    /// Reserved for properties added in later minors (0 today).
    pub flags: u64,
}

impl ObserverOutput {
    /// The output for `name` among `outputs`.
    pub fn find<'a>(outputs: &'a [ObserverOutput], name: &str) -> Option<&'a ObserverOutput> {
        outputs.iter().find(|o| o.name.as_str() == name)
    }
}

/// The ABI form of [`Observer`]. Implemented by the SDK; hosts call it.
#[sabi_trait]
pub trait FfiObserver: Send {
    /// See [`Observer::update`].
    fn update(&mut self, batch: TensorView<'_>) -> RResult<(), PluginError>;
    /// See [`Observer::state`].
    fn state(&self) -> RResult<RVec<f64>, PluginError>;
    /// See [`Observer::merge`].
    fn merge(&mut self, state: RSlice<'_, f64>) -> RResult<(), PluginError>;
    /// See [`Observer::finish`].
    #[sabi(last_prefix_field)]
    fn finish(&self) -> RResult<RVec<f64>, PluginError>;
}

/// An owned observer object, as it crosses the ABI.
pub type FfiObserverBox = FfiObserver_TO<'static, RBox<()>>;

struct ObserverAdapter(Box<dyn Observer>);

impl FfiObserver for ObserverAdapter {
    fn update(&mut self, batch: TensorView<'_>) -> RResult<(), PluginError> {
        guard("observer update", || self.0.update(&batch)).into()
    }
    fn state(&self) -> RResult<RVec<f64>, PluginError> {
        guard("observer state", || self.0.state().map(RVec::from)).into()
    }
    fn merge(&mut self, state: RSlice<'_, f64>) -> RResult<(), PluginError> {
        guard("observer merge", || self.0.merge(state.as_slice())).into()
    }
    fn finish(&self) -> RResult<RVec<f64>, PluginError> {
        guard("observer finish", || self.0.finish().map(RVec::from)).into()
    }
}

/// Wraps an [`Observer`] into its ABI form, with every call guarded against panics.
pub fn into_ffi_observer(o: Box<dyn Observer>) -> FfiObserverBox {
    FfiObserver_TO::from_value(ObserverAdapter(o), TD_Opaque)
}

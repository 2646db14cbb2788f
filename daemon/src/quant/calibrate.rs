//! Calibration: the model compiled once with every observed tensor as an extra output; each
//! sample runs it, updates the bounded statistics of [`observe`](super::observe) and is
//! dropped, so memory does not grow with the number of samples.
//!
//! Samples run side by side on *lanes* (one per compute thread, at most [`MAX_LANES`]): each
//! lane keeps statistics of its own, updated by the thread that ran the sample, and after
//! each group of samples the lanes are folded into the first (min/max and histograms here; a
//! strategy's own observers through their partial state and merge). One sample per lane, so
//! small models, whose operators are too small to spread over the threads, still keep every
//! core busy. Folding after each group keeps one invariant: between calls, the first lane
//! holds everything seen so far. Histograms merge exactly because every lane starts from the
//! first lane's range (ranges then only double): the result does not depend on the lanes.

// Model and request data reach this module: no unchecked index or slice.
#![deny(clippy::indexing_slicing)]

use super::{
    data::Sample,
    observe::{AbsHistogram, MinMax},
    reconstruct::{Gram, Grams, Rows},
    view::Facts,
    QuantError,
};
use crate::{
    graph::{self, IoSpec, Model},
    registry::Snapshot,
};
use opreg_sdk::{
    abi_stable::std_types::{RNone, RString, RVec},
    quant::{FfiObserverBox, ObserverOutput},
    DType, Device, Observation, ObservationKind, TensorObservation, TensorStats,
};
use rayon::prelude::*;
use std::{collections::HashMap, sync::Arc};

/// Most histogram bins a strategy may ask for per tensor (the statistics' memory bound).
pub const MAX_BINS: u32 = 1 << 16;

/// Most samples run side by side (each holds its activations while it runs).
pub const MAX_LANES: usize = 4;

/// Makes a strategy's own observer of a tensor ([`ObservationKind::CUSTOM`]), one per lane.
pub type ObserverFactory =
    Box<dyn Fn(&str, &Observation) -> Result<FfiObserverBox, QuantError> + Send + Sync>;

struct Observed {
    name: String,
    /// A graph input: read from the feeds, not from the run's outputs.
    is_input: bool,
    observation: Observation,
}

/// One lane's statistics of one observed tensor.
struct Stats {
    minmax: MinMax,
    histogram: Option<AbsHistogram>,
    custom: Option<FfiObserverBox>,
    /// The tensor's type and shape on the lane's first sample.
    fact: Option<(DType, Vec<i64>)>,
}

/// Folds one tensor of one sample into a lane's statistics.
fn update(
    strategy: &str,
    o: &Observed,
    stats: &mut Stats,
    t: &opreg_sdk::host::HostTensor,
) -> Result<(), QuantError> {
    if t.dtype() != DType::F32 || !t.on_host() {
        return Err(QuantError::Data(format!(
            "tensor '{}' is {:?}: only f32 host tensors can be observed",
            o.name,
            t.dtype()
        )));
    }
    let view = t.view();
    let xs = view
        .as_slice::<f32>()
        .map_err(|e| QuantError::Data(format!("tensor '{}': {e}", o.name)))?;
    stats.minmax.update(xs);
    if let Some(h) = &mut stats.histogram {
        h.update(xs);
    }
    if let Some(custom) = &mut stats.custom {
        custom
            .update(view)
            .into_result()
            .map_err(|e| observer_error(strategy, &o.name, "update", e))?;
    }
    if stats.fact.is_none() {
        let shape = t
            .shape()
            .iter()
            .map(|&d| i64::try_from(d).unwrap_or(-1))
            .collect();
        stats.fact = Some((t.dtype(), shape));
    }
    Ok(())
}

/// A strategy's observer failed: the error names the strategy, the tensor and the call.
fn observer_error(
    strategy: &str,
    tensor: &str,
    call: &str,
    e: opreg_sdk::PluginError,
) -> QuantError {
    QuantError::Strategy {
        strategy: strategy.into(),
        code: e.code,
        message: format!("its observer of '{tensor}' failed in {call}: {}", e.message),
    }
}

/// The statistics of the samples one lane ran, per observed tensor (in `observed` order).
struct Lane {
    stats: Vec<Stats>,
    samples: u64,
}

/// An input Gram matrix kept for reconstructing a pruned weight.
struct GramObserved {
    weight: String,
    /// The product's input, and whether it is a graph input (read from the feeds).
    input: String,
    is_input: bool,
    rows: Rows,
    gram: Gram,
}

/// Most bytes all Gram matrices of a run may take together.
pub const MAX_GRAM_BYTES: usize = 1 << 30;

/// The running calibration of one model.
pub struct Calibrator {
    plan: graph::Plan,
    observed: Vec<Observed>,
    /// Declared before `factory`: the strategy's observers drop before the plugin handle the
    /// factory holds.
    lanes: Vec<Lane>,
    grams: Vec<GramObserved>,
    /// Gram observations the host could not take, and why (for the report).
    skipped: Vec<String>,
    /// The strategy's name (for messages).
    strategy: String,
    factory: Option<ObserverFactory>,
}

impl Calibrator {
    /// Checks `observations` against `model` and compiles the model with the observed tensors
    /// as outputs; `factory` makes the strategy's own observers (custom observations are
    /// refused without one). Call it on the compute pool.
    pub fn new(
        model: &Model,
        observations: &[TensorObservation],
        snapshot: Arc<Snapshot>,
        devices: &[Device],
        max_folded_bytes: usize,
        strategy: &str,
        factory: Option<ObserverFactory>,
    ) -> Result<Self, QuantError> {
        let produced: std::collections::HashSet<&str> = model
            .nodes
            .iter()
            .flat_map(|n| n.outputs.iter().map(String::as_str))
            .collect();
        let bad = |reason: String| QuantError::BadPlan {
            strategy: strategy.into(),
            reason,
        };
        let mut observed: Vec<Observed> = Vec::new();
        let mut grams: Vec<GramObserved> = Vec::new();
        let mut skipped = Vec::new();
        let mut gram_bytes = 0usize;
        for o in observations {
            let name = o.name.as_str();
            if o.observation.kind == ObservationKind::GRAM {
                if grams.iter().any(|g| g.weight == name) {
                    return Err(bad(format!(
                        "observe: the Gram matrix of '{name}' is listed twice"
                    )));
                }
                let (rows, input) = match Rows::of(model, name) {
                    Ok(found) => found,
                    Err(why) => {
                        skipped.push(format!("'{name}' was not reconstructed: {why}"));
                        continue;
                    }
                };
                let k = rows.k();
                gram_bytes = gram_bytes.saturating_add(k.saturating_mul(k).saturating_mul(8));
                if gram_bytes > MAX_GRAM_BYTES {
                    skipped.push(format!(
                        "'{name}' was not reconstructed: the Gram matrices would take more than {} MiB",
                        MAX_GRAM_BYTES >> 20
                    ));
                    continue;
                }
                let gram = Gram::new(k).map_err(QuantError::Data)?;
                let is_input = model.inputs.iter().any(|i| i.name == input)
                    && !model.initializers.contains_key(&input);
                grams.push(GramObserved {
                    weight: name.into(),
                    input,
                    is_input,
                    rows,
                    gram,
                });
                continue;
            }
            let is_input = model.inputs.iter().any(|i| i.name == name)
                && !model.initializers.contains_key(name);
            if !is_input && !produced.contains(name) {
                return Err(bad(format!(
                    "observe: '{name}' is not an activation of the model (a graph input or a node output)"
                )));
            }
            match o.observation.kind {
                ObservationKind::NOTHING => continue,
                ObservationKind::MIN_MAX => {}
                ObservationKind::CUSTOM if factory.is_some() => {}
                ObservationKind::HISTOGRAM => {
                    let bins = o.observation.bins;
                    if !(2..=MAX_BINS).contains(&bins) {
                        return Err(bad(format!(
                            "observe '{name}': a histogram of {bins} bins (2..={MAX_BINS})"
                        )));
                    }
                }
                other => {
                    return Err(QuantError::Unimplemented {
                        strategy: strategy.into(),
                        what: format!("the observation '{}' of '{name}'", other.name()),
                    })
                }
            };
            if observed.iter().any(|x| x.name == name) {
                return Err(bad(format!("observe: '{name}' is listed twice")));
            }
            observed.push(Observed {
                name: name.to_string(),
                is_input,
                observation: o.observation,
            });
        }
        let mut augmented = model.clone();
        let extra = observed
            .iter()
            .filter(|o| !o.is_input)
            .map(|o| &o.name)
            .chain(grams.iter().filter(|g| !g.is_input).map(|g| &g.input));
        for name in extra {
            if !augmented.outputs.iter().any(|x| &x.name == name) {
                augmented.outputs.push(IoSpec {
                    name: name.clone(),
                    dtype: DType::F32,
                    shape: None,
                });
            }
        }
        let plan = graph::compile(&augmented, snapshot, devices, max_folded_bytes)?;
        let mut calibrator = Calibrator {
            plan,
            observed,
            lanes: Vec::new(),
            grams,
            skipped,
            strategy: strategy.into(),
            factory,
        };
        let lanes = rayon::current_num_threads().clamp(1, MAX_LANES);
        for _ in 0..lanes {
            let lane = calibrator.fresh_lane(None)?;
            calibrator.lanes.push(lane);
        }
        Ok(calibrator)
    }

    /// A lane that has seen nothing; its histograms start from `like`'s ranges (so that
    /// merging it back is exact).
    fn fresh_lane(&self, like: Option<&Lane>) -> Result<Lane, QuantError> {
        let mut stats = Vec::with_capacity(self.observed.len());
        for (i, o) in self.observed.iter().enumerate() {
            let histogram = (o.observation.kind == ObservationKind::HISTOGRAM).then(|| {
                let mut h = AbsHistogram::new(o.observation.bins as usize);
                if let Some(base) = like
                    .and_then(|l| l.stats.get(i))
                    .and_then(|s| s.histogram.as_ref())
                {
                    h.max = base.max;
                }
                h
            });
            let custom = match (o.observation.kind, &self.factory) {
                (ObservationKind::CUSTOM, Some(make)) => Some(make(&o.name, &o.observation)?),
                _ => None,
            };
            stats.push(Stats {
                minmax: MinMax::new(),
                histogram,
                custom,
                fact: None,
            });
        }
        Ok(Lane { stats, samples: 0 })
    }

    /// Samples run side by side: as many as [`feed`](Self::feed) takes at once.
    pub fn lanes(&self) -> usize {
        self.lanes.len()
    }

    /// Runs `samples` (one per lane, side by side; more are taken in groups) and updates the
    /// statistics. Call it on the compute pool.
    pub fn feed(&mut self, samples: &[Sample]) -> Result<(), QuantError> {
        let mut rest = samples;
        if self.samples() == 0 {
            // The very first sample runs alone: it fixes the histogram ranges every other
            // lane then starts from, which is what makes their merges exact.
            let Some((first, others)) = rest.split_first() else {
                return Ok(());
            };
            self.feed_group(std::slice::from_ref(first))?;
            rest = others;
        }
        for group in rest.chunks(self.lanes.len().max(1)) {
            self.feed_group(group)?;
        }
        Ok(())
    }

    fn feed_group(&mut self, group: &[Sample]) -> Result<(), QuantError> {
        let plan = &self.plan;
        let observed = &self.observed;
        let strategy = self.strategy.as_str();
        // Gram matrices can be large: one copy, updated below in sample order, not per lane.
        let gram_inputs: Vec<(&str, bool)> = self
            .grams
            .iter()
            .map(|g| (g.input.as_str(), g.is_input))
            .collect();
        type Kept = Vec<Option<Arc<opreg_sdk::host::HostTensor>>>;
        let runs: Vec<Result<Kept, QuantError>> = group
            .par_iter()
            .zip(self.lanes.par_iter_mut())
            .map(|(sample, lane)| {
                let outputs: HashMap<String, Arc<opreg_sdk::host::HostTensor>> =
                    graph::run(plan, sample.feeds.clone())?
                        .into_iter()
                        .collect();
                // A graph input is read from the feeds, anything else from the run's outputs.
                let fetch = |name: &str, is_input: bool| {
                    let t = if is_input {
                        sample.feeds.get(name)
                    } else {
                        outputs.get(name)
                    };
                    t.ok_or_else(|| {
                        QuantError::Data(format!("{}: the run gave no '{name}'", sample.origin))
                    })
                };
                for (o, stats) in observed.iter().zip(lane.stats.iter_mut()) {
                    let t = fetch(&o.name, o.is_input)?;
                    update(strategy, o, stats, t)?;
                }
                lane.samples += 1;
                gram_inputs
                    .iter()
                    .map(|&(name, is_input)| Ok(fetch(name, is_input).ok().cloned()))
                    .collect()
            })
            .collect();
        for (sample, run) in group.iter().zip(runs) {
            let kept = run?;
            for (g, t) in self.grams.iter_mut().zip(kept) {
                let Some(t) = t else {
                    return Err(QuantError::Data(format!(
                        "{}: the run gave no '{}'",
                        sample.origin, g.input
                    )));
                };
                if t.dtype() != DType::F32 || !t.on_host() {
                    continue;
                }
                let view = t.view();
                let xs = view
                    .as_slice::<f32>()
                    .map_err(|e| QuantError::Data(format!("tensor '{}': {e}", g.input)))?;
                g.gram
                    .update(&g.rows, xs, t.shape())
                    .map_err(|e| QuantError::Data(format!("the input of '{}': {e}", g.weight)))?;
            }
        }
        self.fold_lanes()
    }

    /// Folds every lane into the first and gives the others fresh statistics on the first's
    /// histogram ranges.
    fn fold_lanes(&mut self) -> Result<(), QuantError> {
        if self.lanes.len() < 2 {
            return Ok(());
        }
        let mut rest = self.lanes.split_off(1);
        let Some(first) = self.lanes.first_mut() else {
            return Ok(());
        };
        for lane in &rest {
            if lane.samples == 0 {
                continue;
            }
            for ((o, into), from) in self.observed.iter().zip(&mut first.stats).zip(&lane.stats) {
                into.minmax.merge(&from.minmax);
                if let (Some(a), Some(b)) = (&mut into.histogram, &from.histogram) {
                    a.merge(b);
                }
                if let (Some(a), Some(b)) = (&mut into.custom, &from.custom) {
                    let state = b
                        .state()
                        .into_result()
                        .map_err(|e| observer_error(&self.strategy, &o.name, "state", e))?;
                    a.merge(state.as_slice().into())
                        .into_result()
                        .map_err(|e| observer_error(&self.strategy, &o.name, "merge", e))?;
                }
            }
            first.samples += lane.samples;
        }
        // Every other lane starts again from the first's ranges, also the ones this group
        // left idle (they may still be on the ranges they were made with).
        for lane in &mut rest {
            *lane = self.fresh_lane(self.lanes.first())?;
        }
        self.lanes.append(&mut rest);
        Ok(())
    }

    /// What the strategy's own observers finished with.
    pub fn observer_outputs(&self) -> Result<Vec<ObserverOutput>, QuantError> {
        let Some(first) = self.lanes.first() else {
            return Ok(Vec::new());
        };
        let mut out = Vec::new();
        for (o, s) in self.observed.iter().zip(&first.stats) {
            if let Some(custom) = &s.custom {
                let values = custom
                    .finish()
                    .into_result()
                    .map_err(|e| observer_error(&self.strategy, &o.name, "finish", e))?;
                out.push(ObserverOutput {
                    name: RString::from(o.name.as_str()),
                    values,
                    samples: first.samples,
                    flags: 0,
                });
            }
        }
        Ok(out)
    }

    /// The input Gram matrices observed, by weight.
    pub fn grams(&self) -> Grams<'_> {
        self.grams
            .iter()
            .map(|g| (g.weight.clone(), (&g.rows, &g.gram)))
            .collect()
    }

    /// Gram observations not taken, and why.
    pub fn skipped(&self) -> &[String] {
        &self.skipped
    }

    /// Samples fed so far.
    pub fn samples(&self) -> u64 {
        self.lanes.first().map_or(0, |l| l.samples)
    }

    /// The observed tensors with the first lane's statistics (which hold every sample).
    fn settled(&self) -> impl Iterator<Item = (&Observed, &Stats)> {
        self.observed.iter().zip(
            self.lanes
                .first()
                .map(|l| l.stats.as_slice())
                .unwrap_or_default(),
        )
    }

    /// The statistics, as a strategy receives them.
    pub fn stats(&self) -> Vec<TensorStats> {
        self.settled()
            .map(|(o, s)| {
                let (histogram, hist_max) = match &s.histogram {
                    Some(h) => (h.counts.iter().copied().collect::<RVec<u64>>(), h.max),
                    None => (RVec::new(), 0.0),
                };
                let (min, max) = if s.minmax.is_empty() {
                    (0.0, 0.0)
                } else {
                    (s.minmax.min, s.minmax.max)
                };
                TensorStats {
                    name: RString::from(o.name.as_str()),
                    dtype: DType::F32,
                    is_weight: false,
                    min,
                    max,
                    histogram,
                    hist_max,
                    weight: RNone,
                }
            })
            .collect()
    }

    /// The type and shape of each observed tensor on the first sample.
    pub fn facts(&self) -> Facts {
        self.settled()
            .filter_map(|(o, s)| s.fact.clone().map(|f| (o.name.clone(), f)))
            .collect()
    }

    /// Bytes the statistics hold, over every lane (constant in the number of samples; the
    /// strategy's own observers are not counted).
    pub fn stats_bytes(&self) -> usize {
        self.lanes
            .iter()
            .flat_map(|l| &l.stats)
            .map(|s| {
                std::mem::size_of::<Stats>()
                    + s.histogram.as_ref().map_or(0, |h| h.counts.len() * 8)
            })
            .sum::<usize>()
            + self.grams.iter().map(|g| g.gram.bytes()).sum::<usize>()
    }
}

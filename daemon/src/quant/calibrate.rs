//! Calibration: the model compiled once with every observed tensor as an extra output; each
//! sample runs it, updates the bounded statistics of [`observe`](super::observe) and is
//! dropped, so memory does not grow with the number of samples.

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
    DType, Device, ObservationKind, TensorObservation, TensorStats,
};
use std::{collections::HashMap, sync::Arc};

/// Most histogram bins a strategy may ask for per tensor (the statistics' memory bound).
pub const MAX_BINS: u32 = 1 << 16;

struct Observed {
    name: String,
    /// A graph input: read from the feeds, not from the run's outputs.
    is_input: bool,
    minmax: MinMax,
    histogram: Option<AbsHistogram>,
    fact: Option<(DType, Vec<i64>)>,
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
    grams: Vec<GramObserved>,
    /// Gram observations the host could not take, and why (for the report).
    skipped: Vec<String>,
    samples: u64,
}

impl Calibrator {
    /// Checks `observations` against `model` and compiles the model with the observed tensors
    /// as outputs. Call it on the compute pool.
    pub fn new(
        model: &Model,
        observations: &[TensorObservation],
        snapshot: Arc<Snapshot>,
        devices: &[Device],
        max_folded_bytes: usize,
        strategy: &str,
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
            let histogram = match o.observation.kind {
                ObservationKind::NOTHING => continue,
                ObservationKind::MIN_MAX => None,
                ObservationKind::HISTOGRAM => {
                    let bins = o.observation.bins;
                    if !(2..=MAX_BINS).contains(&bins) {
                        return Err(bad(format!(
                            "observe '{name}': a histogram of {bins} bins (2..={MAX_BINS})"
                        )));
                    }
                    Some(AbsHistogram::new(bins as usize))
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
                minmax: MinMax::new(),
                histogram,
                fact: None,
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
        Ok(Calibrator {
            plan,
            observed,
            grams,
            skipped,
            samples: 0,
        })
    }

    /// Runs one sample and updates the statistics. Call it on the compute pool.
    pub fn feed(&mut self, sample: &Sample) -> Result<(), QuantError> {
        let outputs: HashMap<String, Arc<opreg_sdk::host::HostTensor>> =
            graph::run(&self.plan, sample.feeds.clone())?
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
        for o in &mut self.observed {
            let t = fetch(&o.name, o.is_input)?;
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
            o.minmax.update(xs);
            if let Some(h) = &mut o.histogram {
                h.update(xs);
            }
            if o.fact.is_none() {
                let shape = t
                    .shape()
                    .iter()
                    .map(|&d| i64::try_from(d).unwrap_or(-1))
                    .collect();
                o.fact = Some((t.dtype(), shape));
            }
        }
        for g in &mut self.grams {
            let t = fetch(&g.input, g.is_input)?;
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
        self.samples += 1;
        Ok(())
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
        self.samples
    }

    /// The statistics, as a strategy receives them.
    pub fn stats(&self) -> Vec<TensorStats> {
        self.observed
            .iter()
            .map(|o| {
                let (histogram, hist_max) = match &o.histogram {
                    Some(h) => (h.counts.iter().copied().collect::<RVec<u64>>(), h.max),
                    None => (RVec::new(), 0.0),
                };
                let (min, max) = if o.minmax.is_empty() {
                    (0.0, 0.0)
                } else {
                    (o.minmax.min, o.minmax.max)
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
        self.observed
            .iter()
            .filter_map(|o| o.fact.clone().map(|f| (o.name.clone(), f)))
            .collect()
    }

    /// Bytes the statistics hold (constant in the number of samples).
    pub fn stats_bytes(&self) -> usize {
        self.observed
            .iter()
            .map(|o| {
                std::mem::size_of::<Observed>()
                    + o.histogram.as_ref().map_or(0, |h| h.counts.len() * 8)
            })
            .sum::<usize>()
            + self.grams.iter().map(|g| g.gram.bytes()).sum::<usize>()
    }
}

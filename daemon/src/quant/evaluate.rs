//! The float and quantized models side by side on held-out samples: SQNR, largest absolute
//! error, cosine similarity, and top-1 accuracy when the samples carry labels.

// Model and request data reach this module: no unchecked index or slice.
#![deny(clippy::indexing_slicing)]

use super::{data::Sample, QuantError};
use crate::graph::{self, Plan};
use opreg_sdk::{DType, Evaluation};
use std::{
    sync::Arc,
    time::{Duration, Instant},
};

/// Held-out samples and the float model's outputs on them (computed once).
pub struct Heldout {
    pub samples: Vec<Sample>,
    /// Per sample, the float outputs (f32 outputs only, flattened, in declaration order).
    reference: Vec<Vec<Vec<f32>>>,
    /// Top-1 accuracy of the float model, when labels are given.
    pub float_accuracy: Option<f64>,
}

/// The f32 outputs of one run, flattened.
fn run(plan: &Plan, sample: &Sample) -> Result<Vec<Vec<f32>>, QuantError> {
    let outs = graph::run(plan, sample.feeds.clone())?;
    outs.into_iter()
        .filter(|(_, t)| t.dtype() == DType::F32)
        .map(|(name, t)| {
            t.to_vec::<f32>()
                .map_err(|e| QuantError::Data(format!("output '{name}': {e}")))
        })
        .collect()
}

/// Top-1 of the first output's rows against the labels: (correct, total).
fn top1(outputs: &[Vec<f32>], labels: &[i64]) -> (usize, usize) {
    let Some(first) = outputs.first() else {
        return (0, 0);
    };
    if labels.is_empty() || first.len() % labels.len() != 0 {
        return (0, 0);
    }
    let classes = first.len() / labels.len();
    let correct = first
        .chunks(classes.max(1))
        .zip(labels)
        .filter(|(row, &l)| {
            let arg = row
                .iter()
                .enumerate()
                .fold((0usize, f32::NEG_INFINITY), |best, (i, &v)| {
                    if v > best.1 {
                        (i, v)
                    } else {
                        best
                    }
                })
                .0;
            i64::try_from(arg).ok() == Some(l)
        })
        .count();
    (correct, labels.len())
}

fn accuracy(outputs: &[Vec<Vec<f32>>], samples: &[Sample]) -> Option<f64> {
    let mut correct = 0;
    let mut total = 0;
    for (o, s) in outputs.iter().zip(samples) {
        let (c, t) = top1(o, s.labels.as_deref()?);
        correct += c;
        total += t;
    }
    (total > 0).then(|| correct as f64 / total as f64)
}

impl Heldout {
    /// Runs the float `plan` on `samples` once.
    pub fn new(plan: &Plan, samples: Vec<Sample>) -> Result<Self, QuantError> {
        let reference = samples
            .iter()
            .map(|s| run(plan, s))
            .collect::<Result<Vec<_>, _>>()?;
        let float_accuracy = accuracy(&reference, &samples);
        Ok(Heldout {
            samples,
            reference,
            float_accuracy,
        })
    }

    /// Runs `plan` (the quantized model) on the samples and compares with the float outputs:
    /// the error figures, and the top-1 accuracy when labels are given.
    pub fn compare(&self, plan: &Plan) -> Result<(Evaluation, Option<f64>), QuantError> {
        let mut signal = 0f64;
        let mut noise = 0f64;
        let mut dot = 0f64;
        let mut norm_q = 0f64;
        let mut max_abs = 0f64;
        let mut outputs = Vec::with_capacity(self.samples.len());
        for (s, reference) in self.samples.iter().zip(&self.reference) {
            let got = run(plan, s)?;
            for (r, g) in reference.iter().zip(&got) {
                if r.len() != g.len() {
                    return Err(QuantError::Data(format!(
                        "{}: the quantized model's output has {} values, the float model's {}",
                        s.origin,
                        g.len(),
                        r.len()
                    )));
                }
                for (&a, &b) in r.iter().zip(g) {
                    let (a, b) = (f64::from(a), f64::from(b));
                    signal += a * a;
                    noise += (a - b) * (a - b);
                    dot += a * b;
                    norm_q += b * b;
                    max_abs = max_abs.max((a - b).abs());
                }
            }
            outputs.push(got);
        }
        let sqnr_db = if noise == 0.0 {
            f64::INFINITY
        } else {
            10.0 * (signal / noise).log10()
        };
        let cosine = if signal == 0.0 || norm_q == 0.0 {
            if signal == norm_q {
                1.0
            } else {
                0.0
            }
        } else {
            dot / (signal.sqrt() * norm_q.sqrt())
        };
        Ok((
            Evaluation {
                sqnr_db,
                max_abs,
                cosine,
                samples: u32::try_from(self.samples.len()).unwrap_or(u32::MAX),
                flags: 0,
            },
            accuracy(&outputs, &self.samples),
        ))
    }
}

/// Timed passes over the held-out samples per latency figure, at most; fewer when the passes
/// would take longer than [`TIME_BUDGET`] (a big model on many samples).
const MAX_PASSES: u32 = 5;
/// Time the passes of one figure may take in all (beyond the first, which always runs).
const TIME_BUDGET: Duration = Duration::from_millis(1500);

impl Heldout {
    /// Milliseconds per sample of `plan` on these samples: the fastest of up to [`MAX_PASSES`]
    /// passes (the fastest, not the mean: on a shared machine the other figures measure the
    /// neighbours). Call it after [`compare`](Self::compare), which warms the plan up.
    /// Returns the figure and the passes it is the fastest of.
    pub fn time(&self, plan: &Plan) -> Result<(f64, u32), QuantError> {
        let n = self.samples.len().max(1) as f64;
        let started = Instant::now();
        let mut best = f64::INFINITY;
        let mut passes = 0;
        while passes < MAX_PASSES && (passes == 0 || started.elapsed() < TIME_BUDGET) {
            let t = Instant::now();
            for s in &self.samples {
                graph::run(plan, s.feeds.clone())?;
            }
            best = best.min(t.elapsed().as_secs_f64() * 1e3 / n);
            passes += 1;
        }
        Ok((best, passes))
    }
}

/// A compiled plan for `model`, shared by evaluations.
pub type Compiled = Arc<Plan>;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn top1_counts_rows_whose_largest_logit_is_the_label() {
        let logits = vec![vec![0.1, 0.9, 0.0, 0.5, 0.2, 0.3]];
        assert_eq!(top1(&logits, &[1, 0]), (2, 2));
        assert_eq!(top1(&logits, &[1, 2]), (1, 2));
        // A label count that does not divide the output: nothing is claimed.
        assert_eq!(top1(&logits, &[1, 2, 3, 4]), (0, 0));
    }
}

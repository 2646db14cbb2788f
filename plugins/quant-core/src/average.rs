//! The `average` calibrator's observer: the mean of each calibration batch's minimum and
//! maximum (a strategy's own observer, ABI 1.4).
//!
//! The range PyTorch's `MovingAverageMinMaxObserver` and ONNX Runtime's MinMax calibrator
//! with `moving_average` estimate: a range no single batch's outliers can stretch, unlike the
//! global min-max, without a histogram. They take an exponential moving average, which depends
//! on the order of the batches and so cannot be merged across the host's calibration lanes;
//! the equal-weight mean here is what that average estimates on a stationary stream, and it
//! merges exactly (sums and a count), whatever the lanes.

use opreg_sdk::{Observer, PluginError, TensorView};

/// Running sums of per-batch minima and maxima.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct AverageRange {
    sum_min: f64,
    sum_max: f64,
    /// Batches with at least one finite value.
    batches: u64,
}

impl AverageRange {
    /// Folds one batch's values in; a batch without a finite value is not counted (NaN and
    /// infinities say nothing a finite range could cover).
    pub fn update_values(&mut self, xs: &[f32]) {
        let (lo, hi) = xs
            .iter()
            .filter(|x| x.is_finite())
            .fold((f32::INFINITY, f32::NEG_INFINITY), |(lo, hi), &x| {
                (lo.min(x), hi.max(x))
            });
        if lo <= hi {
            self.sum_min += f64::from(lo);
            self.sum_max += f64::from(hi);
            self.batches += 1;
        }
    }

    /// The mean range `(min, max)`, or `None` before any finite value.
    pub fn range(&self) -> Option<(f32, f32)> {
        (self.batches > 0).then(|| {
            let n = self.batches as f64;
            ((self.sum_min / n) as f32, (self.sum_max / n) as f32)
        })
    }
}

impl Observer for AverageRange {
    fn update(&mut self, batch: &TensorView<'_>) -> Result<(), PluginError> {
        self.update_values(batch.as_slice::<f32>()?);
        Ok(())
    }

    fn state(&self) -> Result<Vec<f64>, PluginError> {
        Ok(vec![self.sum_min, self.sum_max, self.batches as f64])
    }

    fn merge(&mut self, state: &[f64]) -> Result<(), PluginError> {
        let &[sum_min, sum_max, batches] = state else {
            return Err(PluginError::invalid(format!(
                "an average-range state has 3 values, not {}",
                state.len()
            )));
        };
        if !(batches >= 0.0 && batches.fract() == 0.0 && sum_min.is_finite() && sum_max.is_finite())
        {
            return Err(PluginError::invalid(format!(
                "malformed average-range state {state:?}"
            )));
        }
        self.sum_min += sum_min;
        self.sum_max += sum_max;
        self.batches = self.batches.saturating_add(batches as u64);
        Ok(())
    }

    /// `[mean min, mean max, batches]`; empty when no batch held a finite value.
    fn finish(&self) -> Result<Vec<f64>, PluginError> {
        Ok(self
            .range()
            .map(|(lo, hi)| vec![f64::from(lo), f64::from(hi), self.batches as f64])
            .unwrap_or_default())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_mean_of_batch_ranges_merges_exactly_across_lanes() {
        let batches: [&[f32]; 4] = [
            &[1.0, -2.0, 0.5],
            &[f32::NAN, 4.0, 0.0],
            &[f32::NAN, f32::INFINITY],
            &[-1.0, 3.0],
        ];
        let mut serial = AverageRange::default();
        for b in batches {
            serial.update_values(b);
        }
        // Three counted batches: mins -2, 0, -1; maxes 1, 4, 3.
        assert_eq!(serial.range(), Some((-1.0, 8.0 / 3.0)));

        let (mut a, mut b) = (AverageRange::default(), AverageRange::default());
        a.update_values(batches[0]);
        b.update_values(batches[1]);
        b.update_values(batches[2]);
        a.update_values(batches[3]);
        a.merge(&b.state().unwrap()).unwrap();
        assert_eq!(a, serial);
        assert_eq!(
            a.finish().unwrap(),
            vec![-1.0, f64::from(8.0f32 / 3.0), 3.0]
        );
    }

    #[test]
    fn a_malformed_state_is_refused_and_an_empty_observer_finishes_empty() {
        let mut a = AverageRange::default();
        assert!(a.finish().unwrap().is_empty());
        assert!(a.merge(&[1.0, 2.0]).is_err());
        assert!(a.merge(&[1.0, 2.0, 0.5]).is_err());
        assert!(a.merge(&[f64::NAN, 2.0, 1.0]).is_err());
        assert_eq!(a, AverageRange::default());
    }
}

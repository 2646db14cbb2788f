//! STFT and MelWeightMatrix (opset 17), computed in f64.

use crate::util::{fill_from_f64, numel, optional, read_f64, required, scalar_i64 as scalar};
use opreg_sdk::{
    alloc::{try_vec, try_with_capacity},
    prelude::*,
};

use opreg_sdk::numeric::FLOATS;

#[derive(Clone)]
struct Stft {
    onesided: bool,
}

impl Kernel for Stft {
    fn compute(
        &self,
        ctx: &KernelContext<'_>,
        inputs: &[TensorView<'_>],
    ) -> Result<(), PluginError> {
        const OP: &str = "STFT";
        let [x, step] = required(OP, inputs, ["signal", "frame_step"])?;
        let s = x.shape();
        if s.len() != 3 || !(s[2] == 1 || s[2] == 2) {
            return Err(PluginError::invalid(format!(
                "{OP}: signal must be [batch, length, 1 or 2], got {s:?}"
            )));
        }
        let (batch, len, parts) = (s[0], s[1], s[2]);
        let step = scalar(&step, OP, "frame_step")?;
        let window = optional(inputs, 2).map(|w| read_f64(w, OP)).transpose()?;
        let frame_len = match (optional(inputs, 3), &window) {
            (Some(f), _) => scalar(f, OP, "frame_length")?,
            (None, Some(w)) => w.len() as i64,
            (None, None) => len as i64,
        };
        if step <= 0 || frame_len <= 0 || frame_len as usize > len {
            return Err(PluginError::invalid(format!(
                "{OP}: frame_step {step} and frame_length {frame_len} do not fit a signal of \
                 length {len}"
            )));
        }
        let (step, n) = (step as usize, frame_len as usize);
        let frames = 1 + (len - n) / step;
        let bins = if self.onesided { n / 2 + 1 } else { n };
        if batch == 0 {
            // An empty signal may still claim a huge length: no window or twiddles needed.
            return fill_from_f64(ctx, 0, x.dtype, &[0, frames, bins, 2], |_| 0.0);
        }
        let window = match window {
            Some(w) => w,
            None => try_vec(n, 1.0)?,
        };
        if window.len() != n {
            return Err(PluginError::invalid(format!(
                "{OP}: window has {} values, frame_length is {n}",
                window.len()
            )));
        }
        if self.onesided && parts == 2 {
            return Err(PluginError::invalid(format!(
                "{OP}: onesided output needs a real signal"
            )));
        }
        let xv = read_f64(&x, OP)?;
        // Twiddles: exp(-2 pi i m / n) for m in 0..n.
        let mut tw: Vec<(f64, f64)> = try_with_capacity(n)?;
        tw.extend((0..n).map(|m| {
            let a = -2.0 * std::f64::consts::PI * m as f64 / n as f64;
            (a.cos(), a.sin())
        }));
        let mut out = try_vec(numel(&[batch, frames, bins, 2])?, 0.0f64)?;
        for b in 0..batch {
            for f in 0..frames {
                let start = f * step;
                for k in 0..bins {
                    let (mut re, mut im) = (0.0, 0.0);
                    for (t, &w) in window.iter().enumerate() {
                        let at = ((b * len) + start + t) * parts;
                        let xr = xv[at] * w;
                        let xi = if parts == 2 { xv[at + 1] * w } else { 0.0 };
                        let (c, s) = tw[(k * t) % n];
                        re += xr * c - xi * s;
                        im += xr * s + xi * c;
                    }
                    let o = ((b * frames + f) * bins + k) * 2;
                    out[o] = re;
                    out[o + 1] = im;
                }
            }
        }
        fill_from_f64(ctx, 0, x.dtype, &[batch, frames, bins, 2], |i| out[i])
    }
}

#[derive(Clone)]
struct MelWeightMatrix {
    output: DType,
}

impl Kernel for MelWeightMatrix {
    fn compute(
        &self,
        ctx: &KernelContext<'_>,
        inputs: &[TensorView<'_>],
    ) -> Result<(), PluginError> {
        const OP: &str = "MelWeightMatrix";
        let [bins, dft, rate, lower, upper] = required(
            OP,
            inputs,
            [
                "num_mel_bins",
                "dft_length",
                "sample_rate",
                "lower_edge_hertz",
                "upper_edge_hertz",
            ],
        )?;
        let bins = scalar(&bins, OP, "num_mel_bins")?;
        let dft = scalar(&dft, OP, "dft_length")?;
        let rate = scalar(&rate, OP, "sample_rate")?;
        let edge = |t: TensorView<'_>, what: &str| -> Result<f64, PluginError> {
            match read_f64(&t, OP)?.as_slice() {
                [v] => Ok(*v),
                _ => Err(PluginError::invalid(format!(
                    "{OP}: input '{what}' must be a scalar"
                ))),
            }
        };
        let single = lower.dtype != DType::F64;
        let (lower, upper) = (
            edge(lower, "lower_edge_hertz")?,
            edge(upper, "upper_edge_hertz")?,
        );
        if bins <= 0 || dft <= 0 || rate <= 0 {
            return Err(PluginError::invalid(format!(
                "{OP}: num_mel_bins {bins}, dft_length {dft} and sample_rate {rate} must be \
                 positive"
            )));
        }
        // Both sizes are input values: the tables below are allocated fallibly.
        let (bins, spec) = (bins as usize, dft as usize / 2 + 1);
        let mut out = try_vec(numel(&[spec, bins])?, 0.0f64)?;
        // As the reference: the mel edges from the inputs' own precision (f32 for f32 inputs),
        // then f64.
        let mel = |hz: f64| -> f64 {
            let l = if single {
                (2595.0f32 * ((hz as f32) / 700.0).ln_1p()) as f64
            } else {
                2595.0 * (hz / 700.0).ln_1p()
            };
            l / std::f64::consts::LN_10
        };
        let (lo, hi) = (mel(lower), mel(upper));
        let step = (hi - lo) / (bins + 2) as f64;
        let mut points: Vec<i64> = try_with_capacity(bins + 2)?;
        points.extend((0..bins + 2).map(|i| {
            let m = i as f64 * step + lo;
            let hz = 700.0 * (m / 2595.0 * std::f64::consts::LN_10).exp_m1();
            // (dft + 1 in f64: dft may be i64::MAX.)
            ((dft as f64 + 1.0) * hz / rate as f64).floor() as i64
        }));
        let mut set = |j: i64, i: usize, v: f64| -> Result<(), PluginError> {
            if j < 0 || j as usize >= spec {
                return Err(PluginError::invalid(format!(
                    "{OP}: mel point {j} falls outside the {spec} spectrogram bins"
                )));
            }
            out[j as usize * bins + i] = v;
            Ok(())
        };
        for i in 0..bins {
            let (l, c, h) = (points[i], points[i + 1], points[i + 2]);
            if c == l {
                set(c, i, 1.0)?;
            } else {
                for j in l..=c {
                    set(j, i, (j - l) as f64 / (c - l) as f64)?;
                }
            }
            if h > c {
                for j in c..h {
                    set(j, i, (h - j) as f64 / (h - c) as f64)?;
                }
            }
        }
        fill_from_f64(ctx, 0, self.output, &[spec, bins], |i| out[i])
    }
}

fn stft_factory(node: &NodeInfo<'_>) -> Result<Box<dyn Kernel>, PluginError> {
    Ok(Box::new(Stft {
        onesided: node.int_or("onesided", 1)? != 0,
    }))
}

fn mel_factory(node: &NodeInfo<'_>) -> Result<Box<dyn Kernel>, PluginError> {
    let code = node.int_or("output_datatype", 1)?;
    let output = DType::from_onnx_code(code as i32).ok_or_else(|| {
        PluginError::invalid(format!(
            "MelWeightMatrix: attribute 'output_datatype' {code} is not a supported type"
        ))
    })?;
    Ok(Box::new(MelWeightMatrix { output }))
}

pub fn register(r: &mut Registrar) {
    r.kernel(
        KernelDesc::onnx("STFT", 17, OPEN_END)
            .constraint("T1", FLOATS)
            .constraint("T2", &[DType::I32, DType::I64])
            .inputs(&["T1", "T2", "T1", "T2"])
            .outputs(&["T1"]),
        stft_factory,
    );
    r.kernel(
        KernelDesc::onnx("MelWeightMatrix", 17, OPEN_END)
            .constraint("T1", &[DType::I32, DType::I64])
            .constraint("T2", FLOATS)
            .inputs(&["T1", "T1", "T1", "T2", "T2"])
            .outputs(&["T3"]),
        mel_factory,
    );
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testcases::run_cases;
    use opreg_sdk::{
        host::HostTensor,
        testkit::{run_kernel_opt, NodeSpec},
    };

    #[test]
    fn stft_by_hand() {
        // Signal [1, 2, 3, 4], frames of 2 every 2: DFTs [3, -1] and [7, -1] (onesided: 2 bins).
        let x = HostTensor::from_vec(&[1, 4, 1], &[1.0f32, 2.0, 3.0, 4.0]).expect("x");
        let step = HostTensor::from_vec(&[], &[2i64]).expect("step");
        let len = HostTensor::from_vec(&[], &[2i64]).expect("len");
        let out = run_kernel_opt(
            stft_factory,
            &NodeSpec::onnx("STFT", 17),
            &[Some(&x), Some(&step), None, Some(&len)],
            None,
        )
        .expect("run");
        assert_eq!(out[0].shape(), &[1, 2, 2, 2]);
        let got = out[0].to_vec::<f32>().expect("f32");
        let want = [3.0, 0.0, -1.0, 0.0, 7.0, 0.0, -1.0, 0.0];
        for (g, w) in got.iter().zip(want) {
            assert!((g - w).abs() < 1e-6, "{got:?}");
        }
    }

    #[test]
    fn official_cases() {
        run_cases(&["test_stft"], stft_factory);
        run_cases(&["test_melweightmatrix"], mel_factory);
    }

    /// MelWeightMatrix sizes come from input values: 2^40 bins fail as too large (they used
    /// to abort). STFT of an empty batch claiming a 2^40-sample signal builds no window.
    #[test]
    fn huge_sizes_from_input_values() {
        let i = |v: i64| HostTensor::from_vec(&[], &[v]).expect("scalar");
        let f = |v: f32| HostTensor::from_vec(&[], &[v]).expect("scalar");
        let (bins, dft, rate, lo, hi) = (i(1 << 40), i(1 << 10), i(8000), f(0.0), f(4000.0));
        let e = run_kernel_opt(
            mel_factory,
            &NodeSpec::onnx("MelWeightMatrix", 17),
            &[Some(&bins), Some(&dft), Some(&rate), Some(&lo), Some(&hi)],
            None,
        )
        .expect_err("too large");
        assert_eq!(e.code, ErrorCode::ResourceExhausted, "{}", e.message);

        let signal = HostTensor::from_vec::<f32>(&[0, 1 << 40, 1], &[]).expect("signal");
        let out = run_kernel_opt(
            stft_factory,
            &NodeSpec::onnx("STFT", 17),
            &[Some(&signal), Some(&i(1)), None, Some(&i(1 << 40))],
            None,
        )
        .expect("run");
        assert_eq!(out[0].shape(), &[0, 1, (1 << 39) + 1, 2]);
    }
}

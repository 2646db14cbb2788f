//! `DFT`: discrete Fourier transform along one axis, computed in f64.

use crate::util::fill_from_f64;
use crate::util::{input, normalize_axis, optional, product_sat, read_f64, scalar_i64, Factory};
use opreg_sdk::numeric::INDICES;
use opreg_sdk::prelude::*;

#[derive(Clone)]
struct Dft {
    /// The `axis` attribute (opset 17); from opset 20 it is an input defaulting to -2.
    axis_attr: Option<i64>,
    inverse: bool,
    onesided: bool,
}

impl Kernel for Dft {
    fn compute(
        &self,
        ctx: &KernelContext<'_>,
        inputs: &[TensorView<'_>],
    ) -> Result<(), PluginError> {
        const OP: &str = "DFT";
        let x = &input(OP, inputs, 0, "input")?;
        let s = x.shape();
        let rank = s.len();
        if rank < 2 || (s[rank - 1] != 1 && s[rank - 1] != 2) {
            return Err(PluginError::invalid(format!(
                "{OP}: input must be [..., 1] (real) or [..., 2] (complex), got {s:?}"
            )));
        }
        let present = |i: usize| optional(inputs, i);
        let axis = match (self.axis_attr, present(2)) {
            (Some(a), _) => a,
            (None, Some(t)) => scalar_i64(t, OP, "axis")?,
            (None, None) => -2,
        };
        let axis = normalize_axis(axis, rank)?;
        if axis == rank - 1 {
            return Err(PluginError::invalid(format!(
                "{OP}: axis {axis} is the real/imaginary dimension"
            )));
        }
        let in_len = s[axis];
        let irfft = self.inverse && self.onesided;
        let n = match present(1) {
            Some(t) => {
                let v = scalar_i64(t, OP, "dft_length")?;
                if v < 1 {
                    return Err(PluginError::invalid(format!(
                        "{OP}: dft_length must be >= 1, got {v}"
                    )));
                }
                v as usize
            }
            None if irfft => in_len.saturating_sub(1).saturating_mul(2),
            None => in_len,
        };
        let comp = s[rank - 1];
        // Saturating: exact whenever the input has elements.
        let post = product_sat(&s[axis + 1..rank - 1]);
        let (out_len, out_comp) = if irfft {
            (n, 1)
        } else if self.onesided {
            (n / 2 + 1, 2)
        } else {
            (n, 2)
        };
        let mut out_shape = s.to_vec();
        out_shape[axis] = out_len;
        out_shape[rank - 1] = out_comp;
        let xs = read_f64(x, OP)?;
        // Input sample t of the transformed line (p, q), zero beyond the input or dft_length.
        let used = if irfft {
            in_len.min(n / 2 + 1)
        } else {
            in_len.min(n)
        };
        let sample = |p: usize, q: usize, t: usize| -> (f64, f64) {
            let base = ((p * in_len + t) * post + q) * comp;
            (xs[base], if comp == 2 { xs[base + 1] } else { 0.0 })
        };
        let sign = if self.inverse { 1.0 } else { -1.0 };
        let scale = if self.inverse { 1.0 / n as f64 } else { 1.0 };
        let tau = 2.0 * std::f64::consts::PI;
        let twiddle = |k: usize, t: usize| {
            // In u128: dft_length is data, and k * t may pass usize.
            let ang = sign * tau * ((k as u128 * t as u128) % n as u128) as f64 / n as f64;
            (ang.cos(), ang.sin())
        };
        fill_from_f64(ctx, 0, x.dtype, &out_shape, |i| {
            let c = i % out_comp;
            let e = i / out_comp;
            let q = e % post;
            let k = (e / post) % out_len;
            let p = e / (post * out_len);
            let (mut re, mut im) = (0.0, 0.0);
            if irfft {
                // Hermitian extension of the one-sided spectrum; the real part of the sum.
                for j in 0..n {
                    let (src, conj) = if j <= n / 2 {
                        (j, false)
                    } else {
                        (n - j, true)
                    };
                    if src >= used {
                        continue;
                    }
                    let (a, mut b) = sample(p, q, src);
                    if conj {
                        b = -b;
                    }
                    let (wr, wi) = twiddle(j, k);
                    re += a * wr - b * wi;
                }
            } else {
                for t in 0..used {
                    let (a, b) = sample(p, q, t);
                    let (wr, wi) = twiddle(k, t);
                    re += a * wr - b * wi;
                    im += a * wi + b * wr;
                }
            }
            scale * if c == 0 { re } else { im }
        })
    }
}

fn dft_factory(node: &NodeInfo<'_>) -> Result<Box<dyn Kernel>, PluginError> {
    Ok(Box::new(Dft {
        axis_attr: if node.opset < 20 {
            Some(node.int_or("axis", 1)?)
        } else {
            None
        },
        inverse: node.int_or("inverse", 0)? != 0,
        onesided: node.int_or("onesided", 0)? != 0,
    }))
}

pub fn register(r: &mut Registrar) {
    let floats = &[DType::F16, DType::F32, DType::F64, DType::BF16];
    for (since, end) in [(17, 19), (20, OPEN_END)] {
        r.kernel(
            KernelDesc::onnx("DFT", since, end)
                .constraint("T1", floats)
                .constraint("T2", INDICES)
                .constraint("I", &[DType::I64])
                .inputs(&["T1", "T2", "I"])
                .outputs(&["T1"]),
            dft_factory as Factory,
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::util::testing::{close, run, t};
    use opreg_sdk::testkit::NodeSpec;

    #[test]
    fn dft_forward_inverse_onesided() {
        // Real signal [1, 2, 3, 4] as [1, 4, 1] along axis 1: X = [10, -2+2i, -2, -2-2i].
        let x = t(&[1, 4, 1], &[1.0f32, 2.0, 3.0, 4.0]);
        let out = run(dft_factory, NodeSpec::onnx("DFT", 17), &[Some(&x)]).unwrap();
        assert_eq!(out[0].shape(), &[1, 4, 2]);
        close(
            &out[0].to_vec::<f32>().unwrap(),
            &[10.0, 0.0, -2.0, 2.0, -2.0, 0.0, -2.0, -2.0],
            1e-5,
        );
        // Onesided, axis as an input (opset 20).
        let axis = t::<i64>(&[], &[-2]);
        let node = NodeSpec::onnx("DFT", 20).attr("onesided", AttrValue::Int(1));
        let out = run(dft_factory, node, &[Some(&x), None, Some(&axis)]).unwrap();
        assert_eq!(out[0].shape(), &[1, 3, 2]);
        close(
            &out[0].to_vec::<f32>().unwrap(),
            &[10.0, 0.0, -2.0, 2.0, -2.0, 0.0],
            1e-5,
        );
        // dft_length pads with zeros: [1, 2] with n = 4 -> [3, 1-2i, -1, 1+2i].
        let x2 = t(&[1, 2, 1], &[1.0f32, 2.0]);
        let n = t::<i64>(&[], &[4]);
        let out = run(
            dft_factory,
            NodeSpec::onnx("DFT", 20),
            &[Some(&x2), Some(&n)],
        )
        .unwrap();
        close(
            &out[0].to_vec::<f32>().unwrap(),
            &[3.0, 0.0, 1.0, -2.0, -1.0, 0.0, 1.0, 2.0],
            1e-5,
        );
        // Inverse of the full spectrum gives the signal back (complex, imaginary 0).
        let spec = t(
            &[1, 4, 2],
            &[10.0f64, 0.0, -2.0, 2.0, -2.0, 0.0, -2.0, -2.0],
        );
        let node = NodeSpec::onnx("DFT", 20).attr("inverse", AttrValue::Int(1));
        let out = run(dft_factory, node, &[Some(&spec)]).unwrap();
        let y = out[0].to_vec::<f64>().unwrap();
        let want = [1.0, 0.0, 2.0, 0.0, 3.0, 0.0, 4.0, 0.0];
        assert!(
            y.iter().zip(want).all(|(a, b)| (a - b).abs() < 1e-12),
            "{y:?}"
        );
        // irfft of the one-sided spectrum: default n = 2 * (3 - 1) = 4, real output.
        let half = t(&[1, 3, 2], &[10.0f64, 0.0, -2.0, 2.0, -2.0, 0.0]);
        let node = NodeSpec::onnx("DFT", 20)
            .attr("inverse", AttrValue::Int(1))
            .attr("onesided", AttrValue::Int(1));
        let out = run(dft_factory, node, &[Some(&half)]).unwrap();
        assert_eq!(out[0].shape(), &[1, 4, 1]);
        let y = out[0].to_vec::<f64>().unwrap();
        assert!(
            y.iter()
                .zip([1.0, 2.0, 3.0, 4.0])
                .all(|(a, b)| (a - b).abs() < 1e-12),
            "{y:?}"
        );
        // The last axis is not a signal axis.
        let bad = t::<i64>(&[], &[-1]);
        assert!(run(
            dft_factory,
            NodeSpec::onnx("DFT", 20),
            &[Some(&x), None, Some(&bad)]
        )
        .is_err());
    }
}

//! Softmax, LogSoftmax and Hardmax: before opset 13 over the input coerced to 2-D at `axis`,
//! from 13 along the single axis `axis`.

use super::{not_implemented_for, register_versions, Arith, Float, Real, FLOATS};
use crate::util::{input, normalize_axis};
use opreg_sdk::prelude::*;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    Softmax,
    LogSoftmax,
    Hardmax,
}

#[derive(Clone)]
struct SoftmaxOp {
    op: &'static str,
    kind: Kind,
    axis: i64,
    coerce_2d: bool,
}

fn factory(
    node: &NodeInfo<'_>,
    op: &'static str,
    kind: Kind,
) -> Result<Box<dyn Kernel>, PluginError> {
    let coerce_2d = node.opset < 13;
    Ok(Box::new(SoftmaxOp {
        op,
        kind,
        axis: node.int_or("axis", if coerce_2d { 1 } else { -1 })?,
        coerce_2d,
    }))
}

fn softmax_factory(node: &NodeInfo<'_>) -> Result<Box<dyn Kernel>, PluginError> {
    factory(node, "Softmax", Kind::Softmax)
}
fn log_softmax_factory(node: &NodeInfo<'_>) -> Result<Box<dyn Kernel>, PluginError> {
    factory(node, "LogSoftmax", Kind::LogSoftmax)
}
fn hardmax_factory(node: &NodeInfo<'_>) -> Result<Box<dyn Kernel>, PluginError> {
    factory(node, "Hardmax", Kind::Hardmax)
}

impl SoftmaxOp {
    /// `(n, inner)`: the length of the normalized axis (of the trailing block before opset 13)
    /// and the stride between its elements.
    fn layout(&self, xs: &[usize]) -> Result<(usize, usize), PluginError> {
        let rank = xs.len().max(1);
        let axis = normalize_axis(self.axis, rank).map_err(|e| {
            PluginError::invalid(format!("{}: attribute 'axis': {}", self.op, e.message))
        })?;
        let xs1: Vec<usize> = if xs.is_empty() { vec![1] } else { xs.to_vec() };
        Ok(if self.coerce_2d {
            (xs1[axis..].iter().product::<usize>(), 1)
        } else {
            (xs1[axis], xs1[axis + 1..].iter().product::<usize>())
        })
    }

    /// f32 Softmax / LogSoftmax over contiguous rows (the normalized axis innermost, as in
    /// attention): each row in [`rows_f32`].
    fn run_rows_f32(
        &self,
        ctx: &KernelContext<'_>,
        x: &TensorView<'_>,
        n: usize,
    ) -> Result<(), PluginError> {
        let xs = x.as_slice::<f32>()?;
        let y = ctx.output_slice_to_overwrite::<f32>(0, x.shape())?;
        if y.is_empty() || n == 0 {
            return Ok(());
        }
        let log = self.kind == Kind::LogSoftmax;
        let grain = (8 * 1024 / n).max(1) * n;
        #[cfg(target_arch = "x86_64")]
        if crate::simd::has_avx512() {
            return ctx.parallel_chunks(y, grain, |start, chunk| {
                // SAFETY: the CPU has AVX-512 F (checked).
                unsafe { rows_avx512(&xs[start..start + chunk.len()], chunk, n, log) }
            });
        }
        ctx.parallel_chunks(y, grain, |start, chunk| {
            rows_f32(&xs[start..start + chunk.len()], chunk, n, log)
        })
    }

    fn run<T: Float>(
        &self,
        ctx: &KernelContext<'_>,
        inputs: &[TensorView<'_>],
    ) -> Result<(), PluginError> {
        let xv = input(self.op, inputs, 0, "input")?;
        let xs = xv.shape();
        let x = xv.as_slice::<T>()?;
        let y = ctx.output_slice::<T>(0, xs)?;
        if y.is_empty() {
            return Ok(());
        }
        let (n, inner) = self.layout(xs)?;
        let block = n * inner;
        let grain = (8 * 1024 / block).max(1) * block;
        let kind = self.kind;
        ctx.parallel_chunks(y, grain, |start, chunk| {
            for (bi, yb) in chunk.chunks_mut(block).enumerate() {
                let xb = &x[start + bi * block..start + (bi + 1) * block];
                for lane in 0..inner {
                    let at = |j: usize| lane + j * inner;
                    let mut max = <T::Compute as Real>::NEG_INFINITY;
                    let mut arg = 0;
                    for j in 0..n {
                        let v = xb[at(j)].load();
                        if v > max {
                            max = v;
                            arg = j;
                        }
                    }
                    match kind {
                        Kind::Hardmax => {
                            for j in 0..n {
                                yb[at(j)] = T::store(if j == arg {
                                    <T::Compute as Arith>::ONE
                                } else {
                                    <T::Compute as Arith>::ZERO
                                });
                            }
                        }
                        Kind::Softmax if T::DTYPE == DType::F16 || T::DTYPE == DType::BF16 => {
                            // As the reference's numpy arithmetic in the element type: x - max
                            // and exp rounded to T, the sum accumulated in f32 (f16) or in
                            // bf16 step by step (ml_dtypes), the quotient rounded to T.
                            let r = |v: T::Compute| T::store(v).load();
                            let step = T::DTYPE == DType::BF16;
                            let mut sum = <T::Compute as Arith>::ZERO;
                            for j in 0..n {
                                let e = r(r(xb[at(j)].load() - max).exp());
                                sum = if step { r(sum + e) } else { sum + e };
                                yb[at(j)] = T::store(e);
                            }
                            let sum = r(sum);
                            for j in 0..n {
                                yb[at(j)] = T::store(yb[at(j)].load() / sum);
                            }
                        }
                        Kind::Softmax => {
                            // The exponentials in a loop of their own, which vectorizes (the
                            // sum, a float reduction, would keep it serial).
                            for j in 0..n {
                                yb[at(j)] = T::store((xb[at(j)].load() - max).exp_fast());
                            }
                            let mut sum = <T::Compute as Arith>::ZERO;
                            for j in 0..n {
                                sum += yb[at(j)].load();
                            }
                            for j in 0..n {
                                yb[at(j)] = T::store(yb[at(j)].load() / sum);
                            }
                        }
                        Kind::LogSoftmax => {
                            let mut sum = <T::Compute as Arith>::ZERO;
                            for j in 0..n {
                                sum += (xb[at(j)].load() - max).exp_fast();
                            }
                            let lse = max + sum.ln();
                            for j in 0..n {
                                yb[at(j)] = T::store(xb[at(j)].load() - lse);
                            }
                        }
                    }
                }
            }
        })
    }
}

/// Lanes of the max and sum reductions in [`rows_f32`]: independent partial results, so that
/// the loops vectorize (a float reduction in one accumulator stays serial).
const LANES: usize = 16;

crate::simd::simd_fn! {
    /// Softmax (or LogSoftmax with `log`) of each row of `n` elements of `x` into `y`,
    /// compiled for AVX-512 and AVX2 too. As the generic loop: `x - max` exponentiated with
    /// `exp32`, NaN propagating (a NaN never wins the max, and poisons the sum).
    fn rows_f32(x: &[f32], y: &mut [f32], n: usize, log: bool) {
        for (xr, yr) in x.chunks_exact(n).zip(y.chunks_exact_mut(n)) {
            let mut lanes = [f32::NEG_INFINITY; LANES];
            let mut tail = xr.chunks_exact(LANES);
            for c in &mut tail {
                for (m, &v) in lanes.iter_mut().zip(c) {
                    *m = if v > *m { v } else { *m };
                }
            }
            let mut max = f32::NEG_INFINITY;
            for &v in lanes.iter().chain(tail.remainder()) {
                max = if v > max { v } else { max };
            }
            // The exponentials summed as they are stored (one pass over the row, not a second
            // one reading them back), in the same lanes and order.
            let exp = |v: f32| opreg_sdk::numeric::exp32(v - max);
            let mut sums = [0.0f32; LANES];
            let mut outs = yr.chunks_exact_mut(LANES);
            let mut ins = xr.chunks_exact(LANES);
            for (oc, ic) in (&mut outs).zip(&mut ins) {
                for ((o, &v), s) in oc.iter_mut().zip(ic).zip(sums.iter_mut()) {
                    *o = exp(v);
                    *s += *o;
                }
            }
            let mut rest = 0.0f32;
            for (o, &v) in outs.into_remainder().iter_mut().zip(ins.remainder()) {
                *o = exp(v);
                rest += *o;
            }
            let sum = sums.iter().sum::<f32>() + rest;
            if log {
                let lse = max + sum.ln();
                for (o, &v) in yr.iter_mut().zip(xr) {
                    *o = v - lse;
                }
            } else {
                for o in yr.iter_mut() {
                    *o /= sum;
                }
            }
        }
    }
}

/// [`rows_f32`] in AVX-512 intrinsics: the maximum, then the exponentials stored and summed in
/// one pass ([`exp32_avx512`](crate::simd::exp32_avx512), within an ulp of `exp32`), then the row
/// scaled by the sum's reciprocal, as ONNX Runtime's MLAS does, where `rows_f32` divides (a
/// division per element was the loop's largest cost: 8x12x128x128 ran at 2.8x ONNX Runtime).
/// The reciprocal puts each value within an ulp of the quotient. NaN as `rows_f32`: never the
/// maximum (`max(v, m)` keeps `m` when `v` is NaN), poisoning the sum.
///
/// # Safety
/// The CPU has AVX-512 F.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn rows_avx512(x: &[f32], y: &mut [f32], n: usize, log: bool) {
    use crate::simd::{exp32_avx512, lanes_mask};
    use std::arch::x86_64::*;
    for (xr, yr) in x.chunks_exact(n).zip(y.chunks_exact_mut(n)) {
        let (xp, yp) = (xr.as_ptr(), yr.as_mut_ptr());
        let neg = _mm512_set1_ps(f32::NEG_INFINITY);
        let mut m = neg;
        for i in (0..n).step_by(LANES) {
            // SAFETY: masked to the row's `n - i` elements left.
            let v = unsafe { _mm512_mask_loadu_ps(neg, lanes_mask(n - i), xp.add(i)) };
            m = _mm512_max_ps(v, m);
        }
        let max = _mm512_reduce_max_ps(m);
        let mv = _mm512_set1_ps(max);
        let mut sums = _mm512_setzero_ps();
        for i in (0..n).step_by(LANES) {
            let mask = lanes_mask(n - i);
            // SAFETY: masked to the row's `n - i` elements left, in `xr` and in `yr`.
            unsafe {
                let e = exp32_avx512(_mm512_sub_ps(_mm512_maskz_loadu_ps(mask, xp.add(i)), mv));
                _mm512_mask_storeu_ps(yp.add(i), mask, e);
                sums = _mm512_mask_add_ps(sums, mask, sums, e);
            }
        }
        let sum = _mm512_reduce_add_ps(sums);
        let (scale, add) = if log {
            (_mm512_set1_ps(1.0), _mm512_set1_ps(-(max + sum.ln())))
        } else {
            (_mm512_set1_ps(1.0 / sum), _mm512_setzero_ps())
        };
        for i in (0..n).step_by(LANES) {
            let mask = lanes_mask(n - i);
            // SAFETY: masked to the row's `n - i` elements left, in `xr` and in `yr`.
            unsafe {
                let v = if log {
                    _mm512_add_ps(_mm512_maskz_loadu_ps(mask, xp.add(i)), add)
                } else {
                    _mm512_mul_ps(_mm512_maskz_loadu_ps(mask, yp.add(i)), scale)
                };
                _mm512_mask_storeu_ps(yp.add(i), mask, v);
            }
        }
    }
}

impl Kernel for SoftmaxOp {
    fn compute(
        &self,
        ctx: &KernelContext<'_>,
        inputs: &[TensorView<'_>],
    ) -> Result<(), PluginError> {
        let x = input(self.op, inputs, 0, "input")?;
        let dtype = x.dtype;
        if dtype == DType::F32 && self.kind != Kind::Hardmax {
            if let (n, 1) = self.layout(x.shape())? {
                return self.run_rows_f32(ctx, &x, n);
            }
        }
        opreg_sdk::dispatch!(dtype, FLOATS, |T| self.run::<T>(ctx, inputs), other => Err(not_implemented_for(self.op, other)))
    }
}

pub fn register(r: &mut Registrar) {
    let t: &[(&str, &[DType])] = &[("T", FLOATS)];
    register_versions(
        r,
        "Softmax",
        &[1, 11, 13],
        t,
        &["T"],
        &["T"],
        softmax_factory,
    );
    register_versions(
        r,
        "LogSoftmax",
        &[1, 11, 13],
        t,
        &["T"],
        &["T"],
        log_softmax_factory,
    );
    register_versions(
        r,
        "Hardmax",
        &[1, 11, 13],
        t,
        &["T"],
        &["T"],
        hardmax_factory,
    );
}

#[cfg(test)]
mod tests {
    use super::*;
    use opreg_sdk::{
        host::HostTensor,
        testkit::{run_kernel, NodeSpec},
    };

    fn run(
        f: super::super::Factory,
        op: &str,
        opset: i32,
        axis: Option<i64>,
        shape: &[usize],
        x: &[f32],
    ) -> Vec<f32> {
        let mut node = NodeSpec::onnx(op, opset);
        if let Some(a) = axis {
            node = node.attr("axis", AttrValue::Int(a));
        }
        let tx = HostTensor::from_vec(shape, x).expect("x");
        let out = run_kernel(f, &node, &[&tx], None).expect("run");
        assert_eq!(out[0].shape(), shape);
        out[0].to_vec::<f32>().expect("f32")
    }

    fn close(a: &[f32], b: &[f32]) {
        crate::util::testing::assert_close(a, b, 1e-5);
    }

    #[test]
    fn softmax_hand_values_and_row_sums() {
        let y = run(
            softmax_factory,
            "Softmax",
            13,
            None,
            &[2, 3],
            &[1.0, 2.0, 3.0, 0.0, 0.0, 1000.0],
        );
        let e = [1.0f32.exp(), 2.0f32.exp(), 3.0f32.exp()];
        let s: f32 = e.iter().sum();
        close(&y, &[e[0] / s, e[1] / s, e[2] / s, 0.0, 0.0, 1.0]);
        let x: Vec<f32> = (0..60).map(|i| ((i * 7 % 13) as f32 - 6.0) / 3.0).collect();
        for axis in [0, 1, 2, -1, -2] {
            let y = run(softmax_factory, "Softmax", 13, Some(axis), &[3, 4, 5], &x);
            let a = normalize_axis(axis, 3).expect("axis");
            let shape = [3usize, 4, 5];
            let inner: usize = shape[a + 1..].iter().product();
            let n = shape[a];
            for outer in 0..60 / (n * inner) {
                for lane in 0..inner {
                    let sum: f32 = (0..n)
                        .map(|j| y[outer * n * inner + j * inner + lane])
                        .sum();
                    assert!((sum - 1.0).abs() < 1e-5, "axis {axis}: {sum}");
                }
            }
        }
    }

    #[test]
    fn f32_rows_match_an_f64_reference_with_inf_and_nan() {
        // Rows of 37 and 128 (vector lanes and a tail), values spread over +-40.
        for n in [1usize, 37, 128] {
            let rows = 4;
            let mut x: Vec<f32> = (0..rows * n)
                .map(|i| ((i * 7919 % 1009) as f32 / 1009.0 - 0.5) * 80.0)
                .collect();
            // Row 1 has a -inf (exp 0), row 2 a +inf and row 3 a NaN: the generic loop's
            // answers (a +inf max makes inf - inf = NaN, as numpy's reference does).
            x[n] = f32::NEG_INFINITY;
            x[2 * n + n / 2] = f32::INFINITY;
            x[3 * n + n - 1] = f32::NAN;
            for (f, op, log) in [
                (softmax_factory as super::super::Factory, "Softmax", false),
                (log_softmax_factory, "LogSoftmax", true),
            ] {
                let y = run(f, op, 13, None, &[rows, n], &x);
                for (r, (xr, yr)) in x.chunks(n).zip(y.chunks(n)).enumerate() {
                    let max = xr.iter().fold(f64::NEG_INFINITY, |m, &v| {
                        if f64::from(v) > m {
                            f64::from(v)
                        } else {
                            m
                        }
                    });
                    let sum: f64 = xr.iter().map(|&v| (f64::from(v) - max).exp()).sum();
                    for (j, (&v, &got)) in xr.iter().zip(yr).enumerate() {
                        let want = if log {
                            f64::from(v) - max - sum.ln()
                        } else {
                            (f64::from(v) - max).exp() / sum
                        };
                        let ok = if want.is_nan() {
                            got.is_nan()
                        } else if want.is_infinite() {
                            f64::from(got) == want
                        } else {
                            // f32 rounding of x - max (and of max + ln sum) scales with
                            // their magnitude.
                            let scale = 1.0 + f64::from(v).abs() + max.abs();
                            (f64::from(got) - want).abs() <= 4e-7 * scale * (1.0 + want.abs())
                        };
                        assert!(ok, "{op} n={n} row {r} [{j}]: {got} vs {want}");
                    }
                }
            }
        }
    }

    #[test]
    fn softmax_before_13_coerces_to_2d() {
        let x: Vec<f32> = (0..24).map(|i| i as f32 / 10.0).collect();
        // axis 1 of [2, 3, 4]: rows of 12.
        let y = run(softmax_factory, "Softmax", 11, None, &[2, 3, 4], &x);
        for r in 0..2 {
            let row = &x[r * 12..(r + 1) * 12];
            let m = row.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
            let s: f32 = row.iter().map(|v| (v - m).exp()).sum();
            let want: Vec<f32> = row.iter().map(|v| (v - m).exp() / s).collect();
            close(&y[r * 12..(r + 1) * 12], &want);
        }
        // LogSoftmax is the log of it.
        let ly = run(log_softmax_factory, "LogSoftmax", 11, None, &[2, 3, 4], &x);
        let want: Vec<f32> = y.iter().map(|v| v.ln()).collect();
        close(&ly, &want);
        // Opset 13: the same call normalises along the last axis only.
        let y = run(softmax_factory, "Softmax", 13, None, &[2, 3, 4], &x);
        let s: f32 = y[..4].iter().sum();
        assert!((s - 1.0).abs() < 1e-6);
    }

    #[test]
    fn softmax_f16_and_bf16_compute_in_f32() {
        use opreg_sdk::half::{bf16, f16};
        let x = [1.0f32, 2.0, 3.0, 4.0];
        let e: Vec<f32> = x.iter().map(|v| (v - 4.0).exp()).collect();
        let s: f32 = e.iter().sum();
        let want: Vec<f32> = e.iter().map(|v| v / s).collect();
        let xh: Vec<f16> = x.iter().map(|&v| f16::from_f32(v)).collect();
        let out = run_kernel(
            softmax_factory,
            &NodeSpec::onnx("Softmax", 13),
            &[&HostTensor::from_vec(&[4], &xh).expect("x")],
            None,
        )
        .expect("run");
        let y: Vec<f32> = out[0]
            .to_vec::<f16>()
            .expect("y")
            .iter()
            .map(|v| v.to_f32())
            .collect();
        for (a, b) in y.iter().zip(&want) {
            assert!((a - b).abs() < 1e-3, "{a} vs {b}");
        }
        let xb: Vec<bf16> = x.iter().map(|&v| bf16::from_f32(v)).collect();
        let out = run_kernel(
            log_softmax_factory,
            &NodeSpec::onnx("LogSoftmax", 13),
            &[&HostTensor::from_vec(&[4], &xb).expect("x")],
            None,
        )
        .expect("run");
        let y: Vec<f32> = out[0]
            .to_vec::<bf16>()
            .expect("y")
            .iter()
            .map(|v| v.to_f32())
            .collect();
        for (a, b) in y.iter().zip(&want) {
            assert!((a - b.ln()).abs() < 2e-2, "{a} vs {}", b.ln());
        }
    }

    #[test]
    fn hardmax_first_max_wins() {
        let y = run(
            hardmax_factory,
            "Hardmax",
            13,
            None,
            &[2, 3],
            &[1.0, 3.0, 3.0, -1.0, -2.0, -3.0],
        );
        assert_eq!(y, vec![0.0, 1.0, 0.0, 1.0, 0.0, 0.0]);
        let y = run(
            hardmax_factory,
            "Hardmax",
            13,
            Some(0),
            &[2, 3],
            &[1.0, 3.0, 3.0, -1.0, 4.0, -3.0],
        );
        assert_eq!(y, vec![1.0, 0.0, 1.0, 0.0, 1.0, 0.0]);
        let y = run(
            log_softmax_factory,
            "LogSoftmax",
            13,
            None,
            &[1, 2],
            &[0.0, 0.0],
        );
        close(&y, &[-(2.0f32.ln()), -(2.0f32.ln())]);
    }

    #[test]
    fn softmax_bf16_sums_step_by_step_like_the_reference() {
        // 300 equal inputs: exp 1 each; summed in bf16 one at a time the sum stops at 256
        // (256 + 1 rounds back to 256), so every output is 1/256, not 1/300.
        use opreg_sdk::half::bf16;
        let x = HostTensor::from_vec(&[300], &[bf16::from_f32(0.5); 300]).expect("x");
        let out =
            run_kernel(softmax_factory, &NodeSpec::onnx("Softmax", 13), &[&x], None).expect("run");
        let y = out[0].to_vec::<bf16>().expect("bf16");
        assert!(y.iter().all(|v| v.to_f32() == 1.0 / 256.0), "{:?}", &y[..4]);
    }
}

//! Linear algebra: `Det` (determinants of square matrices, by LU in f64).

use crate::util::fill_from_f64;
use crate::util::{input, read_f64};
use opreg_sdk::prelude::*;

/// Determinant of the row-major `n x n` matrix `a` by LU with partial pivoting.
fn det(mut a: Vec<f64>, n: usize) -> f64 {
    let mut det = 1.0;
    for c in 0..n {
        let p = (c..n)
            .max_by(|&i, &j| a[i * n + c].abs().total_cmp(&a[j * n + c].abs()))
            .unwrap_or(c);
        if a[p * n + c] == 0.0 {
            return 0.0;
        }
        if p != c {
            for k in 0..n {
                a.swap(p * n + k, c * n + k);
            }
            det = -det;
        }
        let pivot = a[c * n + c];
        det *= pivot;
        for r in c + 1..n {
            let f = a[r * n + c] / pivot;
            if f != 0.0 {
                for k in c..n {
                    a[r * n + k] -= f * a[c * n + k];
                }
            }
        }
    }
    det
}

#[derive(Clone)]
struct Det;

impl Kernel for Det {
    fn compute(
        &self,
        ctx: &KernelContext<'_>,
        inputs: &[TensorView<'_>],
    ) -> Result<(), PluginError> {
        let x = &input("Det", inputs, 0, "X")?;
        let s = x.shape();
        if s.len() < 2 || s[s.len() - 1] != s[s.len() - 2] {
            return Err(PluginError::invalid(format!(
                "Det: input must be [*, M, M], got {s:?}"
            )));
        }
        let n = s[s.len() - 1];
        let xs = read_f64(x, "Det")?;
        let out_shape = &s[..s.len() - 2];
        fill_from_f64(ctx, 0, x.dtype, out_shape, |b| {
            det(xs[b * n * n..(b + 1) * n * n].to_vec(), n)
        })
    }
}

pub fn register(r: &mut Registrar) {
    for (since, end, types) in [
        (11, 21, &[DType::F16, DType::F32, DType::F64][..]),
        (
            22,
            OPEN_END,
            &[DType::BF16, DType::F16, DType::F32, DType::F64][..],
        ),
    ] {
        r.kernel(
            KernelDesc::onnx("Det", since, end)
                .constraint("T", types)
                .inputs(&["T"])
                .outputs(&["T"]),
            stateless(Det),
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::util::testing::{close, t};
    use opreg_sdk::testkit::{run_kernel_opt, NodeSpec};

    #[test]
    fn det_batched() {
        // Conformance test_det_nd.
        let x = t(
            &[3, 2, 2],
            &[
                1.0f32, 2.0, 3.0, 4.0, 1.0, 2.0, 2.0, 1.0, 1.0, 3.0, 3.0, 1.0,
            ],
        );
        let out = run_kernel_opt(
            stateless(Det),
            &NodeSpec::onnx("Det", 22),
            &[Some(&x)],
            None,
        )
        .unwrap();
        assert_eq!(out[0].shape(), &[3]);
        close(&out[0].to_vec::<f32>().unwrap(), &[-2.0, -3.0, -8.0], 1e-5);
        // Needs pivoting; singular gives 0.
        let x = t(
            &[2, 3, 3],
            &[
                0.0f64, 2.0, 1.0, 1.0, 1.0, 1.0, 2.0, 1.0, 3.0, 1.0, 2.0, 3.0, 2.0, 4.0, 6.0, 1.0,
                0.0, 1.0,
            ],
        );
        let out = run_kernel_opt(
            stateless(Det),
            &NodeSpec::onnx("Det", 11),
            &[Some(&x)],
            None,
        )
        .unwrap();
        let d = out[0].to_vec::<f64>().unwrap();
        assert!((d[0] - -3.0).abs() < 1e-12 && d[1].abs() < 1e-12, "{d:?}");
    }
}

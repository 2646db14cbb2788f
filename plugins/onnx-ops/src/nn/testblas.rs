//! A naive reference BLAS backend for unit tests.

use opreg_sdk::prelude::*;

/// Triple-loop gemm honouring layout, transposes, alpha, beta and leading dimensions.
pub(crate) struct NaiveBlas;

impl Blas for NaiveBlas {
    fn gemm(&self, _ctx: &KernelContext<'_>, g: &GemmArgs) -> Result<(), PluginError> {
        assert_eq!(g.types, GemmTypes::F32);
        let a = g.a.cast::<f32>();
        let b = g.b.cast::<f32>();
        let c = g.c.cast::<f32>();
        // Element (r, col) of a stored matrix with leading dimension ld.
        let at = |p: *const f32, ld: usize, r: usize, col: usize| -> f32 {
            let i = match g.layout {
                Layout::RowMajor => r * ld + col,
                Layout::ColMajor => col * ld + r,
            };
            // SAFETY: the caller passes operands covering the described matrices.
            unsafe { *p.add(i) }
        };
        for i in 0..g.m {
            for j in 0..g.n {
                let mut acc = 0.0f32;
                for p in 0..g.k {
                    let av = match g.trans_a {
                        Transpose::No => at(a, g.lda, i, p),
                        Transpose::Yes => at(a, g.lda, p, i),
                    };
                    let bv = match g.trans_b {
                        Transpose::No => at(b, g.ldb, p, j),
                        Transpose::Yes => at(b, g.ldb, j, p),
                    };
                    acc += av * bv;
                }
                let ci = match g.layout {
                    Layout::RowMajor => i * g.ldc + j,
                    Layout::ColMajor => j * g.ldc + i,
                };
                // SAFETY: as above.
                unsafe {
                    let prev = if g.beta == 0.0 {
                        0.0
                    } else {
                        g.beta * *c.add(ci)
                    };
                    *c.add(ci) = g.alpha * acc + prev;
                }
            }
        }
        Ok(())
    }
}

/// Row-major `a (m x k) * b (k x n)`.
pub(crate) fn naive_matmul(a: &[f32], b: &[f32], m: usize, k: usize, n: usize) -> Vec<f32> {
    let mut c = vec![0.0; m * n];
    for i in 0..m {
        for j in 0..n {
            c[i * n + j] = (0..k).map(|p| a[i * k + p] * b[p * n + j]).sum();
        }
    }
    c
}

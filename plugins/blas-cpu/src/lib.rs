//! CPU BLAS backend: the opreg gemm API for f32 on the host.
//!
//! The inner kernel is `matrixmultiply`'s packed, cache-blocked sgemm, which picks its
//! micro-kernel at run time by CPU feature (AVX+FMA, AVX, SSE2, portable). This crate maps
//! the gemm API's layouts, transposes and leading dimensions onto strides, and splits the
//! rows of C across the host's `parallel_for` (matrixmultiply's own threading is off: plugins
//! start no threads).

use opreg_sdk::prelude::*;

/// Rows of C per parallel task: large enough that packing B per task stays cheap.
const ROWS_PER_TASK: usize = 64;

struct CpuBlas;

/// (row stride, column stride) of `op(X)` for a matrix stored with leading dimension `ld`.
fn strides(layout: Layout, trans: Transpose, ld: usize) -> (isize, isize) {
    let ld = ld as isize;
    match (layout, trans) {
        (Layout::RowMajor, Transpose::No) | (Layout::ColMajor, Transpose::Yes) => (ld, 1),
        (Layout::RowMajor, Transpose::Yes) | (Layout::ColMajor, Transpose::No) => (1, ld),
    }
}

#[derive(Clone, Copy)]
struct Ptrs(*const f32, *const f32, *mut f32);
// SAFETY: the tasks write disjoint row blocks of C and only read A and B.
unsafe impl Send for Ptrs {}
unsafe impl Sync for Ptrs {}

impl Blas for CpuBlas {
    fn gemm(&self, ctx: &KernelContext<'_>, g: &GemmArgs) -> Result<(), PluginError> {
        if g.types != GemmTypes::F32 {
            return Err(PluginError::unimplemented(format!(
                "cpu blas: {} gemm is not supported yet",
                g.types
            )));
        }
        let (rsa, csa) = strides(g.layout, g.trans_a, g.lda);
        let (rsb, csb) = strides(g.layout, g.trans_b, g.ldb);
        let (rsc, csc) = strides(g.layout, Transpose::No, g.ldc);
        let p = Ptrs(g.a.cast(), g.b.cast(), g.c.cast());
        let (m, n, k, alpha, beta) = (g.m, g.n, g.k, g.alpha, g.beta);
        ctx.parallel_for(m, ROWS_PER_TASK, move |rows| {
            let p = p;
            let r0 = rows.start as isize;
            // SAFETY: the caller guarantees A, B, C cover the described matrices; this task
            // touches rows `rows` of C only.
            unsafe {
                matrixmultiply::sgemm(
                    rows.len(),
                    k,
                    n,
                    alpha,
                    p.0.offset(r0 * rsa),
                    rsa,
                    csa,
                    p.1,
                    rsb,
                    csb,
                    beta,
                    p.2.offset(r0 * rsc),
                    rsc,
                    csc,
                );
            }
            Ok(())
        })
    }
}

fn register(r: &mut Registrar) {
    r.blas(
        BlasDesc {
            name: "cpu-matrixmultiply".into(),
            device: Device::CPU,
            priority: 0,
            types: vec![GemmTypes::F32].into(),
        },
        CpuBlas,
    );
}

opreg_sdk::export_plugin! {
    name: "blas-cpu",
    version: env!("CARGO_PKG_VERSION"),
    description: "CPU BLAS backend (f32 gemm, run-time CPU feature dispatch, host-pool parallel)",
    register: register,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn naive(m: usize, n: usize, k: usize, a: &[f32], b: &[f32]) -> Vec<f32> {
        let mut c = vec![0f32; m * n];
        for i in 0..m {
            for j in 0..n {
                c[i * n + j] = (0..k).map(|p| a[i * k + p] * b[p * n + j]).sum();
            }
        }
        c
    }

    #[test]
    fn matches_naive_product_across_parallel_row_blocks() {
        use opreg_sdk::{blas::into_ffi_blas, host::CallFrame, LogLevel};
        let (m, n, k) = (150, 70, 33);
        let a: Vec<f32> = (0..m * k).map(|i| ((i * 7) % 13) as f32 - 6.0).collect();
        let b: Vec<f32> = (0..k * n).map(|i| ((i * 5) % 11) as f32 - 5.0).collect();
        let mut c = vec![f32::NAN; m * n]; // beta = 0 must ignore C's contents
        let args = GemmArgs::f32(m, n, k, &a, &b, &mut c).expect("args");
        let log = |_: LogLevel, _: &str| {};
        let blas = into_ffi_blas(CpuBlas);
        let frame = CallFrame::new(0, Device::CPU, Some(&blas), &log);
        frame
            .with_context(|ctx| ctx.blas().expect("blas").gemm(ctx, &args))
            .expect("gemm");
        assert_eq!(c, naive(m, n, k, &a, &b));
    }

    #[test]
    fn transposed_operands() {
        // op(A) = A^T with A stored k x m.
        assert_eq!(strides(Layout::RowMajor, Transpose::Yes, 5), (1, 5));
        assert_eq!(strides(Layout::ColMajor, Transpose::No, 5), (1, 5));
        assert_eq!(strides(Layout::RowMajor, Transpose::No, 5), (5, 1));
    }
}

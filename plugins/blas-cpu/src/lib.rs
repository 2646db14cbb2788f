//! CPU BLAS backend: the opreg gemm API for f32 on the host.
//!
//! The inner kernel is `matrixmultiply`'s packed, cache-blocked sgemm, which picks its
//! micro-kernel at run time by CPU feature (AVX+FMA, AVX, SSE2, portable). This crate maps
//! the gemm API's layouts, transposes and leading dimensions onto strides, and tiles C across
//! the host's `parallel_for` (matrixmultiply's own threading is off: plugins start no threads).
//!
//! Why not the `gemm` crate, which has AVX-512 kernels: it keeps a `thread_local!` packing
//! slab with a destructor, and glibc then never unmaps the library, so a hot-swapped BLAS
//! plugin would leak its mapping on every swap (DESIGN §3). matrixmultiply keeps none.

use opreg_sdk::prelude::*;

/// Smallest tile of C per parallel task: large enough that packing per task stays cheap.
const MIN_ROWS: usize = 64;
const MIN_COLS: usize = 128;

/// Splits `m x n` into tiles for `threads` workers: rows first (B is packed once per tile, A
/// streams), columns too when there are too few row blocks to keep every worker busy.
fn tiles(m: usize, n: usize, threads: usize) -> (usize, usize) {
    let want = threads.max(1) * 2;
    let row_blocks = (m / MIN_ROWS).clamp(1, want);
    let col_blocks = if row_blocks >= want {
        1
    } else {
        (n / MIN_COLS).clamp(1, want.div_ceil(row_blocks))
    };
    (m.div_ceil(row_blocks), n.div_ceil(col_blocks))
}

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
        if m == 0 || n == 0 {
            return Ok(());
        }
        let (tm, tn) = tiles(m, n, ctx.num_threads());
        let (row_tiles, col_tiles) = (m.div_ceil(tm), n.div_ceil(tn));
        ctx.parallel_for(row_tiles * col_tiles, 1, move |range| {
            let p = p;
            for t in range {
                let (r0, c0) = ((t / col_tiles) * tm, (t % col_tiles) * tn);
                let (rows, cols) = (tm.min(m - r0), tn.min(n - c0));
                let (r0, c0) = (r0 as isize, c0 as isize);
                // SAFETY: the caller guarantees A, B, C cover the described matrices; this
                // task writes only its own tile of C.
                unsafe {
                    matrixmultiply::sgemm(
                        rows,
                        k,
                        cols,
                        alpha,
                        p.0.offset(r0 * rsa),
                        rsa,
                        csa,
                        p.1.offset(c0 * csb),
                        rsb,
                        csb,
                        beta,
                        p.2.offset(r0 * rsc + c0 * csc),
                        rsc,
                        csc,
                    );
                }
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
    fn tiles_cover_c_and_use_columns_when_rows_are_few() {
        assert_eq!(tiles(1024, 1024, 2), (256, 1024));
        let (tm, tn) = tiles(64, 3136, 2);
        assert_eq!(tm, 64);
        assert!(tn < 3136 && 3136usize.div_ceil(tn) >= 4, "{tn}");
        assert_eq!(tiles(3, 5, 8), (3, 5));
    }

    #[test]
    fn transposed_operands() {
        // op(A) = A^T with A stored k x m.
        assert_eq!(strides(Layout::RowMajor, Transpose::Yes, 5), (1, 5));
        assert_eq!(strides(Layout::ColMajor, Transpose::No, 5), (1, 5));
        assert_eq!(strides(Layout::RowMajor, Transpose::No, 5), (5, 1));
    }
}

//! The cuBLAS BLAS backend: f32 gemm (plain and strided-batched) on device memory.
//!
//! **Unverified until a GPU run**: the argument mapping ([`plan`]) and the CPU reference are
//! tested here; the cuBLAS calls run only on a GPU (the backend's self-test at load, and the
//! `gpu` tests with `OPREG_GPU_TESTS=1`, compare them with the reference).
//!
//! cuBLAS is column-major. A row-major `C = op(A) op(B)` is the column-major
//! `C^T = op(B)^T op(A)^T`, and a row-major matrix read column-major *is* its transpose: so
//! a row-major gemm is cuBLAS's gemm with the operands swapped, `m` and `n` swapped, and the
//! transpose flags and leading dimensions passed as they are.
//!
//! Supported: f32 x f32 -> f32, compute f32, no epilogue, no bias, either layout and
//! transpose, any batch with strides. Everything else is refused by `supports` (callers fall
//! back to another backend); f16/bf16/int8, epilogues and pre-packing are later work.

use crate::device::{driver_error, Cuda};
use cudarc::{
    cublas::{result as cublas, sys::cublasOperation_t},
    driver::result,
};
use opreg_sdk::prelude::*;
use std::sync::Arc;

/// One cuBLAS call, column-major, with `a` and `b` already in cuBLAS's order.
#[derive(Clone, Debug, PartialEq)]
pub struct Call {
    pub trans_a: bool,
    pub trans_b: bool,
    pub m: i32,
    pub n: i32,
    pub k: i32,
    pub a: u64,
    pub lda: i32,
    pub stride_a: i64,
    pub b: u64,
    pub ldb: i32,
    pub stride_b: i64,
    pub c: u64,
    pub ldc: i32,
    pub stride_c: i64,
    pub batch: i32,
    pub alpha: f32,
    pub beta: f32,
}

/// Rows and columns of the stored matrix behind `op(X)` of `rows x cols`.
fn stored(trans: Transpose, rows: usize, cols: usize) -> (usize, usize) {
    if trans == Transpose::YES {
        (cols, rows)
    } else {
        (rows, cols)
    }
}

/// The smallest leading dimension a stored `rows x cols` matrix may have in `layout`.
fn min_ld(layout: Layout, rows: usize, cols: usize) -> usize {
    let ld = if layout == Layout::ROW_MAJOR {
        cols
    } else {
        rows
    };
    ld.max(1)
}

/// Elements a stored `rows x cols` matrix spans with leading dimension `ld`.
pub fn extent(layout: Layout, rows: usize, cols: usize, ld: usize) -> usize {
    if rows == 0 || cols == 0 {
        return 0;
    }
    if layout == Layout::ROW_MAJOR {
        (rows - 1) * ld + cols
    } else {
        (cols - 1) * ld + rows
    }
}

/// Whether the arguments are a flavour this backend runs.
pub fn supported(g: &GemmArgs) -> bool {
    g.flags == 0
        && g.types == GemmTypes::F32
        && g.compute == DType::F32
        && g.epilogue == Epilogue::NONE
        && g.bias.is_null()
        && matches!(g.layout, Layout::ROW_MAJOR | Layout::COL_MAJOR)
        && matches!(g.trans_a, Transpose::NO | Transpose::YES)
        && matches!(g.trans_b, Transpose::NO | Transpose::YES)
}

/// Whether [`plan`] accepts `g` whatever its pointers: callers ask before filling them in.
pub fn can_run(g: &GemmArgs) -> bool {
    let dangling = std::ptr::NonNull::<f32>::dangling().as_ptr().cast::<u8>();
    plan(&GemmArgs {
        a: dangling,
        b: dangling,
        c: dangling,
        ..*g
    })
    .is_ok()
}

/// The cuBLAS call for `g`, or `None` when there is nothing to compute.
pub fn plan(g: &GemmArgs) -> Result<Option<Call>, PluginError> {
    if !supported(g) {
        return Err(PluginError::unimplemented(format!(
            "cuda blas: {} gemm with compute {}, epilogue {}, layout {}, flags {:#x}{} is not supported",
            g.types,
            g.compute,
            g.epilogue.0,
            g.layout.0,
            g.flags,
            if g.bias.is_null() { "" } else { ", bias" }
        )));
    }
    if g.m == 0 || g.n == 0 || g.batch == 0 {
        return Ok(None);
    }
    let (ar, ac) = stored(g.trans_a, g.m, g.k);
    let (br, bc) = stored(g.trans_b, g.k, g.n);
    for (name, ld, want) in [
        ("lda", g.lda, min_ld(g.layout, ar, ac)),
        ("ldb", g.ldb, min_ld(g.layout, br, bc)),
        ("ldc", g.ldc, min_ld(g.layout, g.m, g.n)),
    ] {
        if ld < want {
            return Err(PluginError::invalid(format!(
                "cuda blas: {name} {ld} < {want} for a {}x{}x{} gemm",
                g.m, g.n, g.k
            )));
        }
    }
    if g.k > 0 && (g.a.is_null() || g.b.is_null()) || g.c.is_null() {
        return Err(PluginError::invalid("cuda blas: null operand"));
    }
    if g.batch > 1 && g.stride_c == 0 {
        return Err(PluginError::invalid(
            "cuda blas: a batch cannot write one shared C",
        ));
    }
    let int = |what: &str, v: usize| {
        i32::try_from(v).map_err(|_| {
            PluginError::unimplemented(format!("cuda blas: {what} = {v} exceeds 32 bits"))
        })
    };
    let long = |what: &str, v: usize| {
        i64::try_from(v).map_err(|_| PluginError::invalid(format!("cuda blas: {what} = {v}")))
    };
    let (m, n, k) = (int("m", g.m)?, int("n", g.n)?, int("k", g.k)?);
    let (lda, ldb, ldc) = (int("lda", g.lda)?, int("ldb", g.ldb)?, int("ldc", g.ldc)?);
    let (sa, sb, sc) = (
        long("stride_a", g.stride_a)?,
        long("stride_b", g.stride_b)?,
        long("stride_c", g.stride_c)?,
    );
    let batch = int("batch", g.batch)?;
    let (ta, tb) = (g.trans_a == Transpose::YES, g.trans_b == Transpose::YES);
    let (a, b, c) = (
        g.a as usize as u64,
        g.b as usize as u64,
        g.c as usize as u64,
    );
    let call = if g.layout == Layout::ROW_MAJOR {
        Call {
            trans_a: tb,
            trans_b: ta,
            m: n,
            n: m,
            k,
            a: b,
            lda: ldb,
            stride_a: sb,
            b: a,
            ldb: lda,
            stride_b: sa,
            c,
            ldc,
            stride_c: sc,
            batch,
            alpha: g.alpha,
            beta: g.beta,
        }
    } else {
        Call {
            trans_a: ta,
            trans_b: tb,
            m,
            n,
            k,
            a,
            lda,
            stride_a: sa,
            b,
            ldb,
            stride_b: sb,
            c,
            ldc,
            stride_c: sc,
            batch,
            alpha: g.alpha,
            beta: g.beta,
        }
    };
    Ok(Some(call))
}

/// The backend of one GPU.
pub struct CublasBlas {
    pub cuda: Arc<Cuda>,
    pub device: Device,
}

impl CublasBlas {
    /// Runs `g` on `stream` of this backend's device.
    pub fn run(&self, stream: Stream, g: &GemmArgs) -> Result<(), PluginError> {
        let Some(c) = plan(g)? else {
            return Ok(());
        };
        let gpu = self.cuda.gpu(self.device)?;
        let h = gpu.cublas(stream)?;
        let op = |t: bool| {
            if t {
                cublasOperation_t::CUBLAS_OP_T
            } else {
                cublasOperation_t::CUBLAS_OP_N
            }
        };
        let (pa, pb, pc) = (
            c.a as usize as *const f32,
            c.b as usize as *const f32,
            c.c as usize as *mut f32,
        );
        // SAFETY: the caller lends device memory of this GPU covering every operand as `g`
        // describes (the gemm contract); `plan` checked the leading dimensions; alpha and
        // beta are host values (cuBLAS's default pointer mode); the handle is bound to the
        // stream and the context is current.
        let r = unsafe {
            if c.batch == 1 {
                cublas::sgemm(
                    h,
                    op(c.trans_a),
                    op(c.trans_b),
                    c.m,
                    c.n,
                    c.k,
                    &c.alpha,
                    pa,
                    c.lda,
                    pb,
                    c.ldb,
                    &c.beta,
                    pc,
                    c.ldc,
                )
            } else {
                cublas::sgemm_strided_batched(
                    h,
                    op(c.trans_a),
                    op(c.trans_b),
                    c.m,
                    c.n,
                    c.k,
                    &c.alpha,
                    pa,
                    c.lda,
                    c.stride_a,
                    pb,
                    c.ldb,
                    c.stride_b,
                    &c.beta,
                    pc,
                    c.ldc,
                    c.stride_c,
                    c.batch,
                )
            }
        };
        r.map_err(|e| PluginError::internal(format!("cuda blas: cublasSgemm: {:?}", e.0)))
    }

    /// Runs `g` (pointers ignored) on fresh device copies of inputs made up here, and
    /// compares C with [`reference()`]. Used by the self-test and the GPU tests.
    pub fn verify(&self, stream: Stream, g: &GemmArgs) -> Result<(), PluginError> {
        let (ar, ac) = stored(g.trans_a, g.m, g.k);
        let (br, bc) = stored(g.trans_b, g.k, g.n);
        let span = |one: usize, stride: usize| {
            if one == 0 {
                0
            } else {
                (g.batch.max(1) - 1) * stride + one
            }
        };
        let la = span(extent(g.layout, ar, ac, g.lda), g.stride_a);
        let lb = span(extent(g.layout, br, bc, g.ldb), g.stride_b);
        let lc = span(extent(g.layout, g.m, g.n, g.ldc), g.stride_c);
        let fill = |n: usize, seed: u32| -> Vec<f32> {
            (0..n)
                .map(|i| ((i as u32).wrapping_mul(2654435761).wrapping_add(seed) % 17) as f32 - 8.0)
                .map(|v| v / 4.0)
                .collect()
        };
        let (a, b, c0) = (fill(la, 1), fill(lb, 2), fill(lc, 3));
        let mut want = c0.clone();
        reference(g, &a, &b, &mut want);

        let gpu = self.cuda.gpu(self.device)?;
        let bufs = [&a, &b, &c0].map(|v| DeviceVec::upload(gpu, v));
        let [da, db, dc] = match bufs {
            [Ok(a), Ok(b), Ok(c)] => [a, b, c],
            [a, b, c] => {
                return Err([a, b, c]
                    .into_iter()
                    .find_map(Result::err)
                    .unwrap_or_else(|| PluginError::internal("upload")))
            }
        };
        let mut args = *g;
        args.a = da.ptr as usize as *const u8;
        args.b = db.ptr as usize as *const u8;
        args.c = dc.ptr as usize as *mut u8;
        self.run(stream, &args)?;
        let s = gpu.stream(stream)?;
        // SAFETY: a live stream of the bound context.
        unsafe { result::stream::synchronize(s) }.map_err(|e| driver_error("synchronizing", e))?;
        let got = dc.download()?;
        compare(g, &a, &b, &c0, &want, &got)
    }
}

impl Blas for CublasBlas {
    fn supports(&self, g: &GemmArgs) -> bool {
        can_run(g)
    }

    fn gemm(&self, ctx: &KernelContext<'_>, g: &GemmArgs) -> Result<(), PluginError> {
        self.run(ctx.stream(), g)
    }

    fn self_test(&self, ctx: &KernelContext<'_>) -> Result<(), PluginError> {
        for (m, n, k, ta, tb, layout, beta) in [
            (
                3,
                5,
                4,
                Transpose::NO,
                Transpose::NO,
                Layout::ROW_MAJOR,
                0.0,
            ),
            (
                7,
                2,
                9,
                Transpose::YES,
                Transpose::NO,
                Layout::ROW_MAJOR,
                0.5,
            ),
            (
                4,
                6,
                3,
                Transpose::NO,
                Transpose::YES,
                Layout::COL_MAJOR,
                1.0,
            ),
        ] {
            let g = case(m, n, k, ta, tb, layout, beta);
            self.verify(ctx.stream(), &g)?;
        }
        Ok(())
    }
}

/// A gemm of the given shape with tight leading dimensions, no pointers.
pub fn case(
    m: usize,
    n: usize,
    k: usize,
    trans_a: Transpose,
    trans_b: Transpose,
    layout: Layout,
    beta: f32,
) -> GemmArgs {
    let mut g = GemmArgs::new(GemmTypes::F32, m, n, k);
    g.layout = layout;
    g.trans_a = trans_a;
    g.trans_b = trans_b;
    g.beta = beta;
    g.alpha = 1.5;
    let (ar, ac) = stored(trans_a, m, k);
    let (br, bc) = stored(trans_b, k, n);
    g.lda = min_ld(layout, ar, ac);
    g.ldb = min_ld(layout, br, bc);
    g.ldc = min_ld(layout, m, n);
    g
}

/// Element `(r, c)` of a stored matrix.
fn at(layout: Layout, ld: usize, r: usize, c: usize) -> usize {
    if layout == Layout::ROW_MAJOR {
        r * ld + c
    } else {
        c * ld + r
    }
}

/// `C = alpha op(A) op(B) + beta C` on the host, in f64, for every batch entry (`beta` 0
/// ignores C's prior contents).
pub fn reference(g: &GemmArgs, a: &[f32], b: &[f32], c: &mut [f32]) {
    for p in 0..g.batch.max(1) {
        let (oa, ob, oc) = (p * g.stride_a, p * g.stride_b, p * g.stride_c);
        for i in 0..g.m {
            for j in 0..g.n {
                let mut acc = 0f64;
                for q in 0..g.k {
                    let ai = if g.trans_a == Transpose::YES {
                        at(g.layout, g.lda, q, i)
                    } else {
                        at(g.layout, g.lda, i, q)
                    };
                    let bi = if g.trans_b == Transpose::YES {
                        at(g.layout, g.ldb, j, q)
                    } else {
                        at(g.layout, g.ldb, q, j)
                    };
                    acc += a[oa + ai] as f64 * b[ob + bi] as f64;
                }
                let ci = oc + at(g.layout, g.ldc, i, j);
                let prior = if g.beta == 0.0 {
                    0.0
                } else {
                    g.beta as f64 * c[ci] as f64
                };
                c[ci] = (g.alpha as f64 * acc + prior) as f32;
            }
        }
    }
}

/// Compares `got` with `want` within f32 accumulation error; elements outside C are left as
/// they were.
fn compare(
    g: &GemmArgs,
    a: &[f32],
    b: &[f32],
    c0: &[f32],
    want: &[f32],
    got: &[f32],
) -> Result<(), PluginError> {
    // Magnitudes bound the rounding error: |alpha| sum |a||b| + |beta c|.
    let mut bound = c0.iter().map(|c| (g.beta * c).abs()).collect::<Vec<_>>();
    let abs = GemmArgs {
        alpha: g.alpha.abs(),
        beta: 0.0,
        ..*g
    };
    let (aa, ba): (Vec<f32>, Vec<f32>) = (
        a.iter().map(|v| v.abs()).collect(),
        b.iter().map(|v| v.abs()).collect(),
    );
    let mut mag = vec![0f32; c0.len()];
    reference(&abs, &aa, &ba, &mut mag);
    for (b, m) in bound.iter_mut().zip(&mag) {
        *b += m;
    }
    let eps = 4.0 * (g.k.max(1) as f32) * f32::EPSILON;
    for (i, (w, x)) in want.iter().zip(got).enumerate() {
        if (w - x).abs() > eps * bound[i] + 1e-6 {
            return Err(PluginError::internal(format!(
                "cuda blas: {}x{}x{} gemm (layout {}, trans {}/{}, batch {}): element {i} is {x}, want {w}",
                g.m, g.n, g.k, g.layout.0, g.trans_a.0, g.trans_b.0, g.batch
            )));
        }
    }
    Ok(())
}

/// Device memory holding f32s, freed on drop (synchronously: tests and self-tests only).
struct DeviceVec<'a> {
    gpu: &'a crate::device::Gpu,
    ptr: u64,
    len: usize,
}

impl<'a> DeviceVec<'a> {
    fn upload(gpu: &'a crate::device::Gpu, v: &[f32]) -> Result<Self, PluginError> {
        gpu.bind()?;
        // SAFETY: the context is bound; the copy covers exactly the allocation.
        unsafe {
            let ptr = result::malloc_sync(std::mem::size_of_val(v).max(4))
                .map_err(|e| driver_error("allocating a test buffer", e))?;
            let d = DeviceVec {
                gpu,
                ptr,
                len: v.len(),
            };
            result::memcpy_htod_sync(ptr, v).map_err(|e| driver_error("uploading", e))?;
            Ok(d)
        }
    }

    fn download(&self) -> Result<Vec<f32>, PluginError> {
        self.gpu.bind()?;
        let mut out = vec![0f32; self.len];
        // SAFETY: `len` f32s were allocated; the context is bound.
        unsafe { result::memcpy_dtoh_sync(&mut out, self.ptr) }
            .map_err(|e| driver_error("downloading", e))?;
        Ok(out)
    }
}

impl Drop for DeviceVec<'_> {
    fn drop(&mut self) {
        if self.gpu.bind().is_ok() {
            // SAFETY: allocated by `upload`; the stream using it was synchronized (or the
            // call failed before enqueueing).
            let _ =
                unsafe { result::ctx::synchronize().and_then(|()| result::free_sync(self.ptr)) };
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn with_ptrs(mut g: GemmArgs) -> GemmArgs {
        g.a = 0x1000 as *const u8;
        g.b = 0x2000 as *const u8;
        g.c = 0x3000 as *mut u8;
        g
    }

    #[test]
    fn row_major_swaps_the_operands() {
        let g = with_ptrs(case(
            3,
            5,
            4,
            Transpose::YES,
            Transpose::NO,
            Layout::ROW_MAJOR,
            0.0,
        ));
        let c = plan(&g).expect("plan").expect("work");
        assert_eq!((c.m, c.n, c.k), (5, 3, 4));
        assert_eq!((c.a, c.b, c.c), (0x2000, 0x1000, 0x3000));
        assert_eq!((c.trans_a, c.trans_b), (false, true));
        // A stored 4x3 row-major (lda 3), B 4x5 (ldb 5), C 3x5 (ldc 5).
        assert_eq!((c.lda, c.ldb, c.ldc), (5, 3, 5));
        assert_eq!(c.alpha, 1.5);
    }

    #[test]
    fn column_major_passes_through() {
        let g = with_ptrs(case(
            3,
            5,
            4,
            Transpose::NO,
            Transpose::YES,
            Layout::COL_MAJOR,
            1.0,
        ));
        let c = plan(&g).expect("plan").expect("work");
        assert_eq!((c.m, c.n, c.k), (3, 5, 4));
        assert_eq!((c.a, c.b), (0x1000, 0x2000));
        assert_eq!((c.trans_a, c.trans_b), (false, true));
        assert_eq!((c.lda, c.ldb, c.ldc), (3, 5, 3));
        assert_eq!(c.beta, 1.0);
    }

    #[test]
    fn what_cublas_cannot_run_is_refused() {
        let base = with_ptrs(case(
            2,
            2,
            2,
            Transpose::NO,
            Transpose::NO,
            Layout::ROW_MAJOR,
            0.0,
        ));
        assert!(supported(&base));
        let bare = case(
            2,
            2,
            2,
            Transpose::NO,
            Transpose::NO,
            Layout::ROW_MAJOR,
            0.0,
        );
        assert!(can_run(&bare), "asked before the pointers are filled in");
        assert!(plan(&bare).is_err(), "but not run without them");
        let mut g = base;
        g.epilogue = Epilogue::RELU;
        assert!(!can_run(&g));
        assert!(!supported(&g));
        let mut g = base;
        g.types = GemmTypes {
            a: DType::U8,
            b: DType::I8,
            c: DType::I32,
        };
        assert!(plan(&g).is_err());
        let mut g = base;
        g.bias = 0x10 as *const u8;
        assert!(plan(&g).is_err());
        let mut g = base;
        g.flags = 1;
        assert!(plan(&g).is_err());
        let mut g = base;
        g.lda = 1;
        let e = plan(&g).expect_err("lda too small");
        assert_eq!(e.code, ErrorCode::InvalidArgument);
        let mut g = base;
        g.batch = 2;
        assert!(plan(&g).is_err(), "batch writing one C");
        g.stride_c = 4;
        assert_eq!(plan(&g).expect("batched").expect("work").batch, 2);
        let mut g = base;
        g.m = 1 << 31;
        g.lda = 1 << 31;
        g.ldc = 1 << 31;
        assert_eq!(
            plan(&g).expect_err("too big").code,
            ErrorCode::Unimplemented
        );
        let mut g = base;
        g.n = 0;
        assert_eq!(plan(&g).expect("empty"), None);
    }

    #[test]
    fn the_reference_computes_a_known_product() {
        // Row-major [1 2; 3 4] x [5 6; 7 8] = [19 22; 43 50].
        let mut g = case(
            2,
            2,
            2,
            Transpose::NO,
            Transpose::NO,
            Layout::ROW_MAJOR,
            0.0,
        );
        g.alpha = 1.0;
        let mut c = [f32::NAN; 4];
        reference(&g, &[1., 2., 3., 4.], &[5., 6., 7., 8.], &mut c);
        assert_eq!(c, [19., 22., 43., 50.]);
        // The same product with A given transposed, column-major: A^T stored col-major is A
        // stored row-major.
        let mut g = case(
            2,
            2,
            2,
            Transpose::YES,
            Transpose::YES,
            Layout::COL_MAJOR,
            0.0,
        );
        g.alpha = 1.0;
        let mut c = [0f32; 4];
        reference(&g, &[1., 2., 3., 4.], &[5., 6., 7., 8.], &mut c);
        // C col-major: [19 43 22 50].
        assert_eq!(c, [19., 43., 22., 50.]);
        assert_eq!(extent(Layout::ROW_MAJOR, 2, 3, 5), 8);
        assert_eq!(extent(Layout::COL_MAJOR, 2, 3, 5), 12);
    }
}

//! Register-blocked f32 micro-kernels and their run-time selection.
//!
//! A micro-kernel computes one `MR x NR` tile of C from an A micro-panel (`kc` steps of `MR`
//! values, column by column) and a B micro-panel (`kc` steps of `NR` values, row by row):
//! `C[i, j] = alpha * sum_p A[p][i] * B[p][j] + beta * C[i, j]`, for the top-left `mr x nr`
//! part of the tile only (edges), at `C + i * rsc + j * csc`. `beta == 0` never reads C.

use crate::epilogue::TileEpilogue;
use std::sync::OnceLock;

/// One micro-kernel with its blocking parameters.
pub(crate) trait MicroKernel {
    /// Rows of a C tile (A panel height).
    const MR: usize;
    /// Columns of a C tile (B panel width).
    const NR: usize;
    /// Rows of A packed per block (a multiple of `MR`; the block stays in L2).
    const MC: usize;
    /// Largest depth of a block (a B micro-panel of `KC x NR` stays in L1).
    const KC: usize;
    /// Columns of B packed per block (a multiple of `NR`; the block stays in L3).
    const NC: usize;

    /// Computes one tile (see the module docs).
    ///
    /// # Safety
    /// `a` holds `kc * MR` and `b` `kc * NR` readable floats (any alignment); the `mr x nr`
    /// tile at `c` with strides `rsc`, `csc` is writable (and readable unless `beta == 0`);
    /// `mr <= MR`, `nr <= NR`; the CPU has the kernel's features ([`KernelKind::available`]).
    #[allow(clippy::too_many_arguments)]
    unsafe fn tile(
        kc: usize,
        a: *const f32,
        b: *const f32,
        c: *mut f32,
        rsc: usize,
        csc: usize,
        alpha: f32,
        beta: f32,
        mr: usize,
        nr: usize,
    );

    /// Whether [`tile_b_rows`](Self::tile_b_rows) reads B in place (else it copies the panel
    /// first, and the driver packs instead).
    const B_ROWS: bool = false;

    /// [`tile`](Self::tile) with a full `NR`-wide B panel read in place: step `p` of it at
    /// `b + p * ldb` (rows of a row-major B), not packed.
    ///
    /// # Safety
    /// As [`tile`](Self::tile), with `NR` readable floats at `b + p * ldb` for `p < kc`
    /// instead of the packed panel.
    #[allow(clippy::too_many_arguments)]
    unsafe fn tile_b_rows(
        kc: usize,
        a: *const f32,
        b: *const f32,
        ldb: usize,
        c: *mut f32,
        rsc: usize,
        csc: usize,
        alpha: f32,
        beta: f32,
        mr: usize,
        nr: usize,
    ) {
        // One step at a time, C accumulating (correct, slow: kernels the driver sends rows to
        // override this).
        if kc == 0 {
            // SAFETY: forwarded from the caller (no step read).
            return unsafe { Self::tile(0, a, b, c, rsc, csc, alpha, beta, mr, nr) };
        }
        for p in 0..kc {
            let beta = if p == 0 { beta } else { 1.0 };
            // SAFETY: step `p` of A's panel and B's row `p`, both inside the caller's ranges.
            unsafe {
                Self::tile(
                    1,
                    a.add(p * Self::MR),
                    b.add(p * ldb),
                    c,
                    rsc,
                    csc,
                    alpha,
                    beta,
                    mr,
                    nr,
                )
            }
        }
    }

    /// One tile as [`tile`](Self::tile) (`ldb == NR`: a packed B panel) or
    /// [`tile_b_rows`](Self::tile_b_rows) computes it, then `epi` (the epilogue and the tile's
    /// first row and column in C) as [`finish`](Self::finish) applies it. Kernels that can
    /// apply an epilogue to their accumulators before the store override this.
    ///
    /// # Safety
    /// As [`tile_b_rows`](Self::tile_b_rows) and [`finish`](Self::finish).
    #[allow(clippy::too_many_arguments)]
    unsafe fn tile_then(
        kc: usize,
        a: *const f32,
        (b, ldb): (*const f32, usize),
        c: *mut f32,
        (rsc, csc): (usize, usize),
        (alpha, beta): (f32, f32),
        (mr, nr): (usize, usize),
        epi: Option<(&TileEpilogue, usize, usize)>,
    ) {
        // SAFETY: forwarded from the caller.
        unsafe {
            if ldb == Self::NR {
                Self::tile(kc, a, b, c, rsc, csc, alpha, beta, mr, nr);
            } else {
                Self::tile_b_rows(kc, a, b, ldb, c, rsc, csc, alpha, beta, mr, nr);
            }
            if let Some((e, row0, col0)) = epi {
                Self::finish(e, c, rsc, csc, row0, col0, mr, nr);
            }
        }
    }

    /// Whether [`tile_a_rows_then`](Self::tile_a_rows_then) reads A in place (else it packs
    /// the panel per call, and the driver packs instead).
    const A_ROWS: bool = false;

    /// [`tile_then`](Self::tile_then) with the A micro-panel read in place: row `i < mr` of it
    /// at `a + i * lda`, its steps consecutive (rows of a row-major A), not packed.
    ///
    /// # Safety
    /// As [`tile_then`](Self::tile_then), with `kc` readable floats at `a + i * lda` for each
    /// `i < mr` instead of the packed panel; `mr >= 1`.
    #[allow(clippy::too_many_arguments)]
    unsafe fn tile_a_rows_then(
        kc: usize,
        (a, lda): (*const f32, usize),
        b: (*const f32, usize),
        c: *mut f32,
        cs: (usize, usize),
        ab: (f32, f32),
        (mr, nr): (usize, usize),
        epi: Option<(&TileEpilogue, usize, usize)>,
    ) {
        // Packed here, the missing rows zero (correct, slow: kernels the driver sends rows of
        // A to override this).
        let mut panel = vec![0f32; kc * Self::MR];
        for (p, step) in panel.chunks_exact_mut(Self::MR).enumerate() {
            for (i, v) in step.iter_mut().enumerate().take(mr) {
                // SAFETY: row `i < mr`, step `p < kc`: inside the caller's rows.
                *v = unsafe { *a.add(i * lda + p) };
            }
        }
        // SAFETY: forwarded from the caller, the panel packed.
        unsafe { Self::tile_then(kc, panel.as_ptr(), b, c, cs, ab, (mr, nr), epi) }
    }

    /// Applies `e` to the `mr x nr` tile at `c` whose first element is C's `(row0, col0)`,
    /// compiled for the kernel's instruction set (see [`TileEpilogue::apply`]).
    ///
    /// # Safety
    /// As [`TileEpilogue::apply`]; the CPU has the kernel's features.
    #[allow(clippy::too_many_arguments)]
    unsafe fn finish(
        e: &TileEpilogue,
        c: *mut f32,
        rsc: usize,
        csc: usize,
        row0: usize,
        col0: usize,
        mr: usize,
        nr: usize,
    ) {
        // SAFETY: forwarded from the caller.
        unsafe { e.apply(c, rsc, csc, row0, col0, mr, nr) }
    }
}

/// The micro-kernels this build has.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum KernelKind {
    /// 8x32 tile in 16 zmm accumulators (AVX-512F).
    Avx512,
    /// 6x16 tile in 12 ymm accumulators (AVX2 + FMA).
    Avx2,
    /// 4x8 tile in plain Rust (any CPU).
    Portable,
}

impl KernelKind {
    /// Every kernel, best first.
    pub(crate) const ALL: [KernelKind; 3] =
        [KernelKind::Avx512, KernelKind::Avx2, KernelKind::Portable];

    /// Whether this CPU runs the kernel.
    pub(crate) fn available(self) -> bool {
        match self {
            #[cfg(target_arch = "x86_64")]
            KernelKind::Avx512 => std::arch::is_x86_feature_detected!("avx512f"),
            #[cfg(target_arch = "x86_64")]
            KernelKind::Avx2 => {
                std::arch::is_x86_feature_detected!("avx2")
                    && std::arch::is_x86_feature_detected!("fma")
            }
            #[cfg(not(target_arch = "x86_64"))]
            KernelKind::Avx512 | KernelKind::Avx2 => false,
            KernelKind::Portable => true,
        }
    }

    /// The best kernel for this CPU, detected once per process.
    pub(crate) fn best() -> KernelKind {
        // A plain static (no destructor, no thread-local): it does not pin the library.
        static BEST: OnceLock<KernelKind> = OnceLock::new();
        *BEST.get_or_init(|| {
            KernelKind::ALL
                .into_iter()
                .find(|k| k.available())
                .unwrap_or(KernelKind::Portable)
        })
    }
}

/// Writes `alpha`-scaled results from `buf` (row stride `ld`) into the `mr x nr` tile of C.
///
/// # Safety
/// As [`MicroKernel::tile`] for `c`; `buf` holds `mr` rows of `ld >= nr` values.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
unsafe fn store_scalar(
    buf: &[f32],
    ld: usize,
    c: *mut f32,
    rsc: usize,
    csc: usize,
    beta: f32,
    mr: usize,
    nr: usize,
) {
    let store = |i: usize, j: usize| {
        let v = buf[i * ld + j];
        // SAFETY: (i, j) lies in the caller's writable tile.
        unsafe {
            let p = c.add(i * rsc + j * csc);
            *p = if beta == 0.0 { v } else { v + beta * *p };
        }
    };
    if rsc < csc {
        // Column-major C (a convolution's NCHW output computed pixels x channels): walk each
        // column's contiguous run.
        for j in 0..nr {
            for i in 0..mr {
                store(i, j);
            }
        }
    } else {
        for i in 0..mr {
            for j in 0..nr {
                store(i, j);
            }
        }
    }
}

/// 4x8 portable kernel (LLVM vectorizes it for the baseline SIMD of the target).
pub(crate) struct Portable;

impl MicroKernel for Portable {
    const MR: usize = 4;
    const NR: usize = 8;
    const MC: usize = 64;
    const KC: usize = 256;
    const NC: usize = 2048;

    unsafe fn tile(
        kc: usize,
        a: *const f32,
        b: *const f32,
        c: *mut f32,
        rsc: usize,
        csc: usize,
        alpha: f32,
        beta: f32,
        mr: usize,
        nr: usize,
    ) {
        let mut acc = [[0f32; 8]; 4];
        // SAFETY: the caller guarantees `kc * MR` floats at `a` and `kc * NR` at `b`.
        let (a, b) = unsafe {
            (
                std::slice::from_raw_parts(a, kc * 4),
                std::slice::from_raw_parts(b, kc * 8),
            )
        };
        for (ap, bp) in a.chunks_exact(4).zip(b.chunks_exact(8)) {
            for (row, &x) in acc.iter_mut().zip(ap) {
                for (s, &y) in row.iter_mut().zip(bp) {
                    *s += x * y;
                }
            }
        }
        let mut buf = [0f32; 32];
        for (dst, src) in buf.chunks_exact_mut(8).zip(&acc) {
            for (d, s) in dst.iter_mut().zip(src) {
                *d = alpha * s;
            }
        }
        // SAFETY: forwarded from the caller.
        unsafe { store_scalar(&buf, 8, c, rsc, csc, beta, mr, nr) }
    }
}

#[cfg(target_arch = "x86_64")]
pub(crate) use x86::{Avx2, Avx512};

#[cfg(target_arch = "x86_64")]
mod x86 {
    use super::{store_scalar, MicroKernel, TileEpilogue};
    use opreg_sdk::blas::Epilogue;
    use opreg_sdk::simd::transpose16;
    use std::arch::x86_64::*;

    /// `MicroKernel::finish` compiled for the kernel's target features, so that the epilogue's
    /// loops vectorize for its instruction set.
    macro_rules! finish_for {
        ($features:literal) => {
            unsafe fn finish(
                e: &TileEpilogue,
                c: *mut f32,
                rsc: usize,
                csc: usize,
                row0: usize,
                col0: usize,
                mr: usize,
                nr: usize,
            ) {
                #[target_feature(enable = $features)]
                #[allow(clippy::too_many_arguments)]
                unsafe fn with_features(
                    e: &TileEpilogue,
                    c: *mut f32,
                    rsc: usize,
                    csc: usize,
                    row0: usize,
                    col0: usize,
                    mr: usize,
                    nr: usize,
                ) {
                    // SAFETY: forwarded from the caller.
                    unsafe { e.apply(c, rsc, csc, row0, col0, mr, nr) }
                }
                // SAFETY: forwarded from the caller, who checked that the CPU has the
                // kernel's features.
                unsafe { with_features(e, c, rsc, csc, row0, col0, mr, nr) }
            }
        };
    }

    /// The [`MicroKernel`] methods of a register kernel whose loops `$tile` ([`avx512_tile`],
    /// [`avx2_tile`]) compute a tile from a packed or in-place A and B (`tile` and
    /// `tile_b_rows` through it, the epilogues through [`then`]), with its `finish`.
    macro_rules! register_tiles {
        ($tile:ident, $features:literal) => {
            unsafe fn tile(
                kc: usize,
                a: *const f32,
                b: *const f32,
                c: *mut f32,
                rsc: usize,
                csc: usize,
                alpha: f32,
                beta: f32,
                mr: usize,
                nr: usize,
            ) {
                // SAFETY: forwarded from the caller (a packed B panel: its steps NR apart).
                unsafe { Self::tile_b_rows(kc, a, b, Self::NR, c, rsc, csc, alpha, beta, mr, nr) }
            }

            unsafe fn tile_b_rows(
                kc: usize,
                a: *const f32,
                b: *const f32,
                ldb: usize,
                c: *mut f32,
                rsc: usize,
                csc: usize,
                alpha: f32,
                beta: f32,
                mr: usize,
                nr: usize,
            ) {
                // SAFETY: forwarded from the caller, who checked that the CPU has the
                // kernel's features (a packed A panel: `lda` 0).
                unsafe {
                    $tile(
                        kc,
                        (a, 0),
                        (b, ldb),
                        c,
                        (rsc, csc),
                        (alpha, beta),
                        (mr, nr),
                        None,
                    )
                }
            }

            unsafe fn tile_then(
                kc: usize,
                a: *const f32,
                b: (*const f32, usize),
                c: *mut f32,
                cs: (usize, usize),
                ab: (f32, f32),
                mn: (usize, usize),
                epi: Option<(&TileEpilogue, usize, usize)>,
            ) {
                // SAFETY: forwarded from the caller (a packed panel: `lda` 0).
                unsafe { then::<Self>($tile, kc, (a, 0), b, c, cs, ab, mn, epi) }
            }

            const A_ROWS: bool = true;

            unsafe fn tile_a_rows_then(
                kc: usize,
                (a, lda): (*const f32, usize),
                b: (*const f32, usize),
                c: *mut f32,
                cs: (usize, usize),
                ab: (f32, f32),
                mn: (usize, usize),
                epi: Option<(&TileEpilogue, usize, usize)>,
            ) {
                // SAFETY: forwarded from the caller; a non-zero `lda` (rows in place)
                // whatever the caller's.
                unsafe { then::<Self>($tile, kc, (a, lda.max(1)), b, c, cs, ab, mn, epi) }
            }

            finish_for!($features);
        };
    }

    /// 8x32 AVX-512F kernel: per step, two zmm rows of B and eight broadcasts of A feed 16
    /// FMAs into 16 accumulators.
    pub(crate) struct Avx512;

    impl MicroKernel for Avx512 {
        const MR: usize = 8;
        const NR: usize = 32;
        const MC: usize = 192;
        const KC: usize = 256;
        const NC: usize = 4096;

        // B's rows read in place: see `IN_PLACE_ROWS` in the driver.
        const B_ROWS: bool = true;

        // A tile of fewer rows (a gemm of 1..4 rows: a batch-1 fully connected layer) runs
        // only its rows' FMAs: the 8-row kernel would spend 8x the FMAs on a product that only
        // has to stream B (measured: a 1 x 2048 x 1000 Gemm 4-6x slower than ONNX Runtime
        // with all 8 rows).
        register_tiles!(avx512_tile, "avx512f");
    }

    /// One tile of a register kernel's loop `rows` ([`avx512_tile`], [`avx2_tile`]) then its
    /// epilogue, A packed (`lda` 0) or read in place. A row-major tile takes the bias and a
    /// ReLU / ReLU6 in its registers, before the store: with a shallow product (a 1x1
    /// convolution of 16-32 input channels, as many steps per tile) reading the stored tile
    /// back for the epilogue took 12 % of the layer (AVX-512), 8 % of MobileNetV2's samples
    /// (AVX2). The other activations (an exponential, erf) stay with `K::finish`.
    ///
    /// # Safety
    /// As [`MicroKernel::tile_then`] (or [`MicroKernel::tile_a_rows_then`] for a non-zero
    /// `lda`); the CPU has `K`'s and `rows`' features. (Inlined: `rows` is then a direct
    /// call.)
    #[inline(always)]
    #[allow(clippy::too_many_arguments)]
    unsafe fn then<K: MicroKernel>(
        rows: Tile,
        kc: usize,
        a: (*const f32, usize),
        b: (*const f32, usize),
        c: *mut f32,
        (rsc, csc): (usize, usize),
        ab: (f32, f32),
        (mr, nr): (usize, usize),
        epi: Option<(&TileEpilogue, usize, usize)>,
    ) {
        let (now, later) = match epi {
            Some(e)
                if csc == 1
                    && matches!(e.0.act, Epilogue::NONE | Epilogue::RELU | Epilogue::RELU6) =>
            {
                (Some(e), None)
            }
            other => (None, other),
        };
        // SAFETY: forwarded from the caller.
        unsafe {
            rows(kc, a, b, c, (rsc, csc), ab, (mr, nr), now);
            if let Some((e, row0, col0)) = later {
                K::finish(e, c, rsc, csc, row0, col0, mr, nr);
            }
        }
    }

    /// A register kernel's tile with an epilogue done in registers ([`then`]).
    type Tile = unsafe fn(
        usize,
        (*const f32, usize),
        (*const f32, usize),
        *mut f32,
        (usize, usize),
        (f32, f32),
        (usize, usize),
        Option<(&TileEpilogue, usize, usize)>,
    );

    /// A register kernel's loop for a fixed number of rows and registers.
    type Rows = unsafe fn(
        usize,
        (*const f32, usize),
        (*const f32, usize),
        *mut f32,
        usize,
        usize,
        f32,
        f32,
        usize,
        usize,
        Option<(&TileEpilogue, usize, usize)>,
    );

    /// [`avx512_rows`] for the rows of the tile; `a.1`: 0 for a packed A panel, else the
    /// distance between the rows of A read in place.
    ///
    /// # Safety
    /// As [`avx512_rows`].
    #[allow(clippy::too_many_arguments)]
    unsafe fn avx512_tile(
        kc: usize,
        (a, lda): (*const f32, usize),
        b: (*const f32, usize),
        c: *mut f32,
        (rsc, csc): (usize, usize),
        (alpha, beta): (f32, f32),
        (mr, nr): (usize, usize),
        epi: Option<(&TileEpilogue, usize, usize)>,
    ) {
        // A tile of at most 16 columns (the last panel of a 196-pixel layer: 4 of 32, of a
        // 169-pixel one: 9) runs one register of B per step: half the multiply-adds of the
        // full width, on lanes that are mostly padding. (Row-major C only: a column-major
        // tile is turned in registers as a whole.)
        macro_rules! rows {
            ($in_place:literal) => {
                match (mr, nr <= 16 && csc == 1) {
                    (1, _) => avx512_rows::<1, 2, $in_place> as Rows,
                    (2, _) => avx512_rows::<2, 2, $in_place>,
                    (3 | 4, _) => avx512_rows::<4, 2, $in_place>,
                    (_, true) => avx512_rows::<8, 1, $in_place>,
                    (_, false) => avx512_rows::<8, 2, $in_place>,
                }
            };
        }
        let rows = match (lda, mr, nr <= 16 && csc == 1) {
            (0, ..) => rows!(false),
            // Balanced tiles of rows read in place (the driver's `row_tiles`: 49 rows as 7 x 7)
            // run their own rows only.
            (_, 5, false) => avx512_rows::<5, 2, true>,
            (_, 6, false) => avx512_rows::<6, 2, true>,
            (_, 7, false) => avx512_rows::<7, 2, true>,
            _ => rows!(true),
        };
        // SAFETY: forwarded from the caller.
        unsafe { rows(kc, (a, lda), b, c, rsc, csc, alpha, beta, mr, nr, epi) }
    }

    /// The product of the first `R` rows of an 8-row A panel (`IN_PLACE`: rows of A `lda`
    /// floats apart, as [`MicroKernel::tile_a_rows_then`] reads them) with the first `16 * V`
    /// columns of a 32-column B panel whose steps lie `ldb` floats apart (32: packed) (`mr <=
    /// R`, `nr <= 16 * V`), then, for a row-major C only
    /// (`csc == 1`), `epi`'s bias and ReLU / ReLU6 (NONE: the bias alone) before the store,
    /// computed as [`TileEpilogue::apply`] computes them (the same bits).
    ///
    /// # Safety
    /// The CPU has AVX-512F; as [`MicroKernel::tile_b_rows`]; with `epi`, as
    /// [`TileEpilogue::apply`] for the tile at `(row0, col0)`, and `csc == 1`.
    #[target_feature(enable = "avx512f")]
    #[allow(clippy::too_many_arguments)]
    unsafe fn avx512_rows<const R: usize, const V: usize, const IN_PLACE: bool>(
        kc: usize,
        (mut a, lda): (*const f32, usize),
        (mut b, ldb): (*const f32, usize),
        c: *mut f32,
        rsc: usize,
        csc: usize,
        alpha: f32,
        beta: f32,
        mr: usize,
        nr: usize,
        epi: Option<(&TileEpilogue, usize, usize)>,
    ) {
        let mut acc = [[_mm512_setzero_ps(); V]; R];
        if csc == 1 {
            // Bring the C tile in while the product runs.
            for i in 0..mr {
                let row = c.wrapping_add(i * rsc);
                _mm_prefetch::<_MM_HINT_T0>(row.cast());
                _mm_prefetch::<_MM_HINT_T0>(row.wrapping_add(nr.min(32) - 1).cast());
            }
        }
        if IN_PLACE {
            // Rows of A where they lie: row i's step p at `rows[i] + p` (base + index
            // addressing, no packing). The rows past `mr` read row 0 again; their sums are
            // never stored.
            let rows: [*const f32; R] =
                std::array::from_fn(|i| a.wrapping_add(if i < mr { i * lda } else { 0 }));
            for p in 0..kc {
                // SAFETY: rows `< mr` of A hold `kc` steps each, `b` advances through the
                // caller's `kc` panel steps.
                unsafe {
                    let mut bv = [_mm512_setzero_ps(); V];
                    for (h, v) in bv.iter_mut().enumerate() {
                        *v = _mm512_loadu_ps(b.add(16 * h));
                    }
                    for (row, &r) in acc.iter_mut().zip(&rows) {
                        let x = _mm512_set1_ps(*r.add(p));
                        for (s, &v) in row.iter_mut().zip(&bv) {
                            *s = _mm512_fmadd_ps(x, v, *s);
                        }
                    }
                    b = b.add(ldb);
                }
            }
        }
        for _ in 0..if IN_PLACE { 0 } else { kc } {
            // SAFETY: `a` and `b` advance through the caller's `kc` panel steps.
            unsafe {
                let mut bv = [_mm512_setzero_ps(); V];
                for (h, v) in bv.iter_mut().enumerate() {
                    *v = _mm512_loadu_ps(b.add(16 * h));
                }
                for (i, row) in acc.iter_mut().enumerate() {
                    let x = _mm512_set1_ps(*a.add(i));
                    for (s, &v) in row.iter_mut().zip(&bv) {
                        *s = _mm512_fmadd_ps(x, v, *s);
                    }
                }
                a = a.add(8);
                b = b.add(ldb);
            }
        }
        let va = _mm512_set1_ps(alpha);
        if csc == 1 {
            // Rows are contiguous: masked vector stores cover full and edge tiles alike.
            let vb = _mm512_set1_ps(beta);
            let (zero, six) = (_mm512_setzero_ps(), _mm512_set1_ps(6.0));
            for (i, row) in acc.iter().enumerate().take(mr) {
                // The bias of a row (or none: `apply` adds 0.0 then too).
                let row_bias = match epi {
                    // SAFETY: the bias covers the tile's rows (caller).
                    Some((e, row0, _)) if e.per_row && !e.bias.is_null() => unsafe {
                        _mm512_set1_ps(*e.bias.add(row0 + i))
                    },
                    _ => zero,
                };
                for (h, v) in row.iter().enumerate() {
                    let lanes = nr.saturating_sub(16 * h).min(16);
                    if lanes == 0 {
                        break;
                    }
                    let mask: __mmask16 = if lanes == 16 {
                        0xFFFF
                    } else {
                        (1u16 << lanes) - 1
                    };
                    // SAFETY: the masked lanes lie in the caller's tile (row i < mr, columns
                    // < nr); masked-off lanes are neither read nor written.
                    unsafe {
                        let p = c.add(i * rsc + 16 * h);
                        let r = if beta == 0.0 {
                            _mm512_mul_ps(*v, va)
                        } else {
                            let old = _mm512_maskz_loadu_ps(mask, p);
                            if beta == 1.0 {
                                _mm512_fmadd_ps(*v, va, old)
                            } else {
                                _mm512_fmadd_ps(*v, va, _mm512_mul_ps(old, vb))
                            }
                        };
                        let r = match epi {
                            None => r,
                            Some((e, _, col0)) => {
                                let bias = if e.bias.is_null() || e.per_row {
                                    row_bias
                                } else {
                                    _mm512_maskz_loadu_ps(mask, e.bias.add(col0 + 16 * h))
                                };
                                let s = _mm512_add_ps(r, bias);
                                // As `activate`: max(NaN, 0) is 0; clamp keeps NaN and -0.
                                match e.act {
                                    Epilogue::RELU => _mm512_max_ps(s, zero),
                                    Epilogue::RELU6 => _mm512_min_ps(six, _mm512_max_ps(zero, s)),
                                    _ => s,
                                }
                            }
                        };
                        _mm512_mask_storeu_ps(p, mask, r);
                    }
                }
            }
        } else if rsc == 1 && R == 8 && V == 2 && mr == 8 {
            // Column-major C (a convolution's NCHW output computed pixels x channels): the
            // tile turned in registers, each column's 8 rows one store. The scalar stores took
            // a third of such a layer (MobileNetV2's channels-last projections to NCHW).
            let mut rows = [_mm512_setzero_ps(); 16];
            for (i, row) in acc.iter().enumerate() {
                for (h, &v) in row.iter().enumerate() {
                    rows[8 * h + i] = v;
                }
            }
            // Register j: rows 0..8 of column j (low half) and of column 16 + j (high half).
            let cols = transpose16(rows);
            let (va, vb) = (_mm256_set1_ps(alpha), _mm256_set1_ps(beta));
            for (j, v) in cols.iter().enumerate() {
                let halves = [
                    _mm512_castps512_ps256(*v),
                    _mm256_castpd_ps(_mm512_extractf64x4_pd::<1>(_mm512_castps_pd(*v))),
                ];
                for (h, x) in halves.into_iter().enumerate() {
                    let col = j + 16 * h;
                    if col >= nr {
                        continue;
                    }
                    // SAFETY: rows 0..8 of column `col < nr` lie in the caller's tile,
                    // contiguous (rsc == 1).
                    unsafe {
                        let p = c.add(col * csc);
                        // As the row-major stores compute it.
                        let r = if beta == 0.0 {
                            _mm256_mul_ps(x, va)
                        } else if beta == 1.0 {
                            _mm256_fmadd_ps(x, va, _mm256_loadu_ps(p))
                        } else {
                            _mm256_fmadd_ps(x, va, _mm256_mul_ps(_mm256_loadu_ps(p), vb))
                        };
                        _mm256_storeu_ps(p, r);
                    }
                }
            }
        } else {
            let mut buf = [0f32; 8 * 32];
            debug_assert!(mr <= R);
            for (i, row) in acc.iter().enumerate() {
                for (h, v) in row.iter().enumerate() {
                    // SAFETY: 16 floats at row i, half h of the 8x32 buffer.
                    unsafe {
                        _mm512_storeu_ps(
                            buf.as_mut_ptr().add(i * 32 + 16 * h),
                            _mm512_mul_ps(*v, va),
                        )
                    };
                }
            }
            // SAFETY: forwarded from the caller.
            unsafe { store_scalar(&buf, 32, c, rsc, csc, beta, mr, nr) }
        }
    }

    /// 6x16 AVX2 + FMA kernel: per step, two ymm rows of B and six broadcasts of A feed 12
    /// FMAs into 12 accumulators. As [`Avx512`]: A's rows read in place, tiles of
    /// few rows or columns run only their own FMAs, and a row-major tile takes its bias and
    /// ReLU / ReLU6 in registers.
    pub(crate) struct Avx2;

    impl MicroKernel for Avx2 {
        const MR: usize = 6;
        const NR: usize = 16;
        const MC: usize = 144;
        const KC: usize = 256;
        const NC: usize = 4096;

        // Reads B's rows in place when asked (`tile` does, with packed panels), but does not
        // ask the driver to send them: a 16-float panel row is one cache line, and on Zen 3
        // ResNet-50's 1x1 layers (64-1024 rows, W x X) ran no faster in place than packed.
        const B_ROWS: bool = false;

        register_tiles!(avx2_tile, "avx2,fma");
    }

    /// [`avx2_rows`] for the rows of the tile; `a.1`: 0 for a packed A panel, else the
    /// distance between the rows of A read in place.
    ///
    /// # Safety
    /// As [`avx2_rows`].
    #[allow(clippy::too_many_arguments)]
    unsafe fn avx2_tile(
        kc: usize,
        (a, lda): (*const f32, usize),
        b: (*const f32, usize),
        c: *mut f32,
        (rsc, csc): (usize, usize),
        (alpha, beta): (f32, f32),
        (mr, nr): (usize, usize),
        epi: Option<(&TileEpilogue, usize, usize)>,
    ) {
        // As `avx512_tile`: a tile of few rows (a batch-1 fully connected layer) or of at
        // most 8 columns (the last panel of a 24-channel layer) runs only its own FMAs.
        macro_rules! rows {
            ($in_place:literal) => {
                match (mr, nr <= 8 && csc == 1) {
                    (1, _) => avx2_rows::<1, 2, $in_place> as Rows,
                    (2, _) => avx2_rows::<2, 2, $in_place>,
                    (3 | 4, _) => avx2_rows::<4, 2, $in_place>,
                    (_, true) => avx2_rows::<6, 1, $in_place>,
                    (_, false) => avx2_rows::<6, 2, $in_place>,
                }
            };
        }
        let rows = match (lda, mr, nr <= 8 && csc == 1) {
            (0, ..) => rows!(false),
            // As `avx512_tile`: a balanced tile of rows read in place (49 rows as 4 x 6 + 5 x 5).
            (_, 5, false) => avx2_rows::<5, 2, true>,
            _ => rows!(true),
        };
        // SAFETY: forwarded from the caller.
        unsafe { rows(kc, (a, lda), b, c, rsc, csc, alpha, beta, mr, nr, epi) }
    }

    /// The first `lanes` (1..=8) floats at `p` in the low lanes of a register, the rest zero,
    /// reading nothing past them. (`vmaskmovps` is microcoded on AMD CPUs; edges are rare.)
    ///
    /// # Safety
    /// `lanes` floats are readable at `p`; the CPU has AVX.
    #[inline(always)]
    unsafe fn load_first(p: *const f32, lanes: usize) -> __m256 {
        if lanes >= 8 {
            // SAFETY: eight readable floats (caller).
            return unsafe { _mm256_loadu_ps(p) };
        }
        let mut tmp = [0f32; 8];
        // SAFETY: `lanes < 8` readable floats (caller) into the 8-float array.
        unsafe {
            std::ptr::copy_nonoverlapping(p, tmp.as_mut_ptr(), lanes);
            _mm256_loadu_ps(tmp.as_ptr())
        }
    }

    /// Stores the low `lanes` (1..=8) lanes of `v` at `p`, writing nothing past them.
    ///
    /// # Safety
    /// `lanes` floats are writable at `p`; the CPU has AVX.
    #[inline(always)]
    unsafe fn store_first(p: *mut f32, lanes: usize, v: __m256) {
        if lanes >= 8 {
            // SAFETY: eight writable floats (caller).
            return unsafe { _mm256_storeu_ps(p, v) };
        }
        let mut tmp = [0f32; 8];
        // SAFETY: the 8-float array, then `lanes < 8` writable floats (caller).
        unsafe {
            _mm256_storeu_ps(tmp.as_mut_ptr(), v);
            std::ptr::copy_nonoverlapping(tmp.as_ptr(), p, lanes);
        }
    }

    /// The product of the first `R` rows of a 6-row A panel (`IN_PLACE`: rows of A `lda`
    /// floats apart, as [`MicroKernel::tile_a_rows_then`] reads them) with the first `8 * V`
    /// columns of a 16-column B panel whose steps lie `ldb` floats apart (16: packed) (`mr <=
    /// R`, `nr <= 8 * V`), then, for a row-major C only (`csc == 1`), `epi`'s bias and ReLU /
    /// ReLU6 (NONE: the bias alone) before the store, computed as [`TileEpilogue::apply`]
    /// computes them (the same bits).
    ///
    /// # Safety
    /// The CPU has AVX2 and FMA; as [`MicroKernel::tile_b_rows`]; with `epi`, as
    /// [`TileEpilogue::apply`] for the tile at `(row0, col0)`, and `csc == 1`.
    #[target_feature(enable = "avx2,fma")]
    #[allow(clippy::too_many_arguments)]
    unsafe fn avx2_rows<const R: usize, const V: usize, const IN_PLACE: bool>(
        kc: usize,
        (mut a, lda): (*const f32, usize),
        (mut b, ldb): (*const f32, usize),
        c: *mut f32,
        rsc: usize,
        csc: usize,
        alpha: f32,
        beta: f32,
        mr: usize,
        nr: usize,
        epi: Option<(&TileEpilogue, usize, usize)>,
    ) {
        let mut acc = [[_mm256_setzero_ps(); V]; R];
        if IN_PLACE {
            // Rows of A where they lie (see `avx512_rows`); rows past `mr` read row 0 again,
            // their sums never stored.
            let rows: [*const f32; R] =
                std::array::from_fn(|i| a.wrapping_add(if i < mr { i * lda } else { 0 }));
            for p in 0..kc {
                // SAFETY: rows `< mr` of A hold `kc` steps each, `b` advances through the
                // caller's `kc` panel steps.
                unsafe {
                    let mut bv = [_mm256_setzero_ps(); V];
                    for (h, v) in bv.iter_mut().enumerate() {
                        *v = _mm256_loadu_ps(b.add(8 * h));
                    }
                    for (row, &r) in acc.iter_mut().zip(&rows) {
                        let x = _mm256_broadcast_ss(&*r.add(p));
                        for (s, &v) in row.iter_mut().zip(&bv) {
                            *s = _mm256_fmadd_ps(x, v, *s);
                        }
                    }
                    b = b.add(ldb);
                }
            }
        }
        for _ in 0..if IN_PLACE { 0 } else { kc } {
            // SAFETY: `a` and `b` advance through the caller's `kc` panel steps.
            unsafe {
                let mut bv = [_mm256_setzero_ps(); V];
                for (h, v) in bv.iter_mut().enumerate() {
                    *v = _mm256_loadu_ps(b.add(8 * h));
                }
                for (i, row) in acc.iter_mut().enumerate() {
                    let x = _mm256_broadcast_ss(&*a.add(i));
                    for (s, &v) in row.iter_mut().zip(&bv) {
                        *s = _mm256_fmadd_ps(x, v, *s);
                    }
                }
                a = a.add(6);
                b = b.add(ldb);
            }
        }
        let va = _mm256_set1_ps(alpha);
        if csc == 1 {
            let vb = _mm256_set1_ps(beta);
            let (zero, six) = (_mm256_setzero_ps(), _mm256_set1_ps(6.0));
            for (i, row) in acc.iter().enumerate().take(mr) {
                // The bias of a row (or none: `apply` adds 0.0 then too).
                let row_bias = match epi {
                    // SAFETY: the bias covers the tile's rows (caller).
                    Some((e, row0, _)) if e.per_row && !e.bias.is_null() => unsafe {
                        _mm256_set1_ps(*e.bias.add(row0 + i))
                    },
                    _ => zero,
                };
                for (h, v) in row.iter().enumerate() {
                    let lanes = nr.saturating_sub(8 * h).min(8);
                    if lanes == 0 {
                        break;
                    }
                    // SAFETY: the first `lanes` floats of row i from column 8h lie in the
                    // caller's tile (row i < mr, columns < nr), and of the bias (caller).
                    unsafe {
                        let p = c.add(i * rsc + 8 * h);
                        let r = if beta == 0.0 {
                            _mm256_mul_ps(*v, va)
                        } else {
                            let old = load_first(p, lanes);
                            if beta == 1.0 {
                                _mm256_fmadd_ps(*v, va, old)
                            } else {
                                _mm256_fmadd_ps(*v, va, _mm256_mul_ps(old, vb))
                            }
                        };
                        let r = match epi {
                            None => r,
                            Some((e, _, col0)) => {
                                let bias = if e.bias.is_null() || e.per_row {
                                    row_bias
                                } else {
                                    load_first(e.bias.add(col0 + 8 * h), lanes)
                                };
                                let s = _mm256_add_ps(r, bias);
                                // As `activate`: max(NaN, 0) is 0 (the second operand is
                                // returned where either is NaN); clamp keeps NaN and -0.
                                match e.act {
                                    Epilogue::RELU => _mm256_max_ps(s, zero),
                                    Epilogue::RELU6 => _mm256_min_ps(six, _mm256_max_ps(zero, s)),
                                    _ => s,
                                }
                            }
                        };
                        store_first(p, lanes, r);
                    }
                }
            }
        } else {
            let mut buf = [0f32; 6 * 16];
            debug_assert!(mr <= R);
            for (i, row) in acc.iter().enumerate() {
                for (h, v) in row.iter().enumerate() {
                    // SAFETY: 8 floats at row i, half h of the 6x16 buffer.
                    unsafe {
                        _mm256_storeu_ps(
                            buf.as_mut_ptr().add(i * 16 + 8 * h),
                            _mm256_mul_ps(*v, va),
                        )
                    };
                }
            }
            // SAFETY: forwarded from the caller.
            unsafe { store_scalar(&buf, 16, c, rsc, csc, beta, mr, nr) }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Rows of A read in place give the packed panel's tile: the default (packing per call)
    /// and, where the CPU has them, the AVX-512 and AVX2 kernels' own loops, for an edge of 3 rows and a
    /// full tile, rows `lda` apart with other values between them.
    #[test]
    fn rows_of_a_in_place_match_the_packed_panel() {
        fn check<K: MicroKernel>() {
            let (kc, lda) = (37usize, 53usize);
            let a: Vec<f32> = (0..K::MR * lda)
                .map(|i| (i % 29) as f32 * 0.25 - 3.0)
                .collect();
            let b: Vec<f32> = (0..kc * K::NR)
                .map(|i| (i % 31) as f32 * 0.125 - 2.0)
                .collect();
            for mr in [3.min(K::MR), K::MR] {
                let mut packed = vec![0f32; kc * K::MR];
                for p in 0..kc {
                    for i in 0..mr {
                        packed[p * K::MR + i] = a[i * lda + 5 + p];
                    }
                }
                let (mut want, mut got) = (vec![7f32; K::MR * K::NR], vec![7f32; K::MR * K::NR]);
                let nr = K::NR - 1;
                // SAFETY: the panels and tiles above hold what the kernels read and write; the
                // kernel is available (checked by the caller).
                unsafe {
                    let (b, cs, ab) = ((b.as_ptr(), K::NR), (K::NR, 1), (1.5, 0.5));
                    K::tile_then(
                        kc,
                        packed.as_ptr(),
                        b,
                        want.as_mut_ptr(),
                        cs,
                        ab,
                        (mr, nr),
                        None,
                    );
                    let a = (a.as_ptr().add(5), lda);
                    K::tile_a_rows_then(kc, a, b, got.as_mut_ptr(), cs, ab, (mr, nr), None);
                }
                assert_eq!(got, want, "mr {mr}");
            }
        }
        check::<Portable>();
        #[cfg(target_arch = "x86_64")]
        {
            if KernelKind::Avx512.available() {
                check::<Avx512>();
            }
            if KernelKind::Avx2.available() {
                check::<Avx2>();
            }
        }
    }
}

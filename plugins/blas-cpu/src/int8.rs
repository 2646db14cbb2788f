//! Exact integer gemm for the quantized ONNX operators (MatMulInteger, QLinearMatMul,
//! ConvInteger, QLinearConv):
//!
//! `C[i, j] = Σ_k (A[i, k] - a_zp) * (B[k, j] - b_zp[j])`, C in i32.
//!
//! A (`m x k`, row-major, row stride `lda`) and B (`k x n`, row-major or stored transposed,
//! stride `ldb`) hold u8 or i8 elements (a flag each); `a_zp` is one value, `b_zp` one value or
//! one per column of B. B is packed once ([`pack_b`], for constant weights), A per row block
//! inside [`gemm_rows`], so that callers can split the rows of C over threads.
//!
//! # Exactness
//! All arithmetic is two's-complement i32 with wraparound, so C is the true sum reduced
//! modulo 2^32: bit-exact whenever the true sum fits in i32, which is guaranteed for
//! `k <= EXACT_MAX_K` (33025: `|(a - a_zp) * (b - b_zp)| <= 255 * 255`, and
//! `33025 * 65025 < 2^31`). Larger `k` is accepted, and an overflowing sum wraps exactly as
//! `(i64 sum) as i32` would (as ONNX Runtime's i32 accumulation does); callers that want to
//! refuse such models compare `k` with [`EXACT_MAX_K`]. (`k <= 2^16` is *not* enough for the
//! worst case: `65536 * 65025 > 2^31`.)
//!
//! # Kernels (picked at run time, best first; see [`Int8Kernel`])
//! - AVX-512 VNNI: `vpdpbusd` (u8 x s8, four products summed into i32, no saturation) on zmm.
//! - AVX-VNNI: the same instruction on ymm (CPUs with AVX-VNNI but no AVX-512).
//! - AVX2: operands widened to i16 with the zero points already subtracted
//!   (`(a - a_zp)` and `(b - b_zp)` lie in -255..=255) and `vpmaddwd` (pairs summed to i32).
//!   `vpmaddubsw` is never used: its i16 pair sums saturate (255 * 127 * 2 > i16::MAX).
//! - Portable Rust on the i16 layout (any CPU).
//!
//! The VNNI kernels need u8 A and s8 B, so operands of the other signedness are shifted by 128
//! (an xor of the top bit) with the zero point shifted alike, which leaves every difference
//! `x - zp` unchanged: i8 A becomes `A + 128` with `a_zp + 128`, u8 B becomes `B - 128` with
//! `b_zp - 128`. The zero points are then applied after the product, exactly:
//! `Σ(a - za)(b - zb) = Σab - zb * Σa + za * (k * zb - Σb)`, with `Σb` (per column) and
//! `k * zb - Σb` computed at pack time and `Σa` (per row) while packing A.
//!
//! Layout shared by all kernels: a "lane" is 4 bytes = one column (of B) or row (of A) over a
//! group of `G` consecutive k (`G = 4` bytes for VNNI, `G = 2` i16 for the others). B is cut
//! into depth blocks of `kc` (a multiple of 4) and each block into micro-panels of `NR`
//! columns (the last one only as wide as needed, rounded up to a vector), each micro-panel
//! storing, group after group, its columns' lanes; padding is zero. A's row block is packed
//! the same way into micro-panels of at most `MR` rows per depth block.

mod drive;
mod kernel;
mod pack;
mod portable;
mod requant;
#[cfg(test)]
mod tests;
#[cfg(target_arch = "x86_64")]
mod x86;

use drive::{drive, Dest};
use kernel::Geometry;
pub(crate) use kernel::Int8Kernel;
use pack::{AlignedBytes, BView};
use std::marker::PhantomData;
use std::ops::Range;

/// Largest depth for which C is guaranteed exact (no i32 overflow for any inputs).
// For callers that choose to refuse deeper products; the backend itself wraps.
#[allow(dead_code)]
pub(crate) const EXACT_MAX_K: usize = 33025;

/// B packed for one kernel ([`pack_b`]), reusable across calls and threads.
pub(crate) struct PackedB {
    kind: Int8Kernel,
    k: usize,
    n: usize,
    b_signed: bool,
    /// Depth block the panels were cut with.
    kc: usize,
    /// Packed width: `n` rounded up as the last micro-panel is ([`packed_width`]).
    width: usize,
    data: AlignedBytes,
    /// VNNI layout only (else empty), `width` values each, zero past `n`: the shifted zero
    /// point `zb'` of each column, and `k * zb' - Σ_k b'` (wrapping).
    zb: Vec<i32>,
    kzb_minus_sum: Vec<i32>,
    /// VNNI layout: `Some(zb')` when every column has the same shifted zero point.
    zb_uniform: Option<i32>,
}

impl PackedB {
    pub(crate) fn k(&self) -> usize {
        self.k
    }
    pub(crate) fn n(&self) -> usize {
        self.n
    }
    #[allow(dead_code)] // accessors for callers and tests
    pub(crate) fn b_signed(&self) -> bool {
        self.b_signed
    }
    #[allow(dead_code)]
    pub(crate) fn kernel(&self) -> Int8Kernel {
        self.kind
    }
    /// Heap bytes held (for memory accounting).
    pub(crate) fn size_bytes(&self) -> usize {
        self.data.len() + 4 * (self.zb.len() + self.kzb_minus_sum.len())
    }
}

/// Operand A: `m x k`, element `(i, k)` at `a[i * lda + k]`, u8 or (`signed`) i8 bytes.
#[derive(Clone, Copy, Debug)]
pub(crate) struct IntA<'a> {
    pub a: &'a [u8],
    pub signed: bool,
    pub lda: usize,
    pub zp: i32,
}

/// Output C (`m x n` values of `T`, element `(i, j)` at `ptr[i * ldc + j]`) shared by the
/// tasks of one product, each of which writes its own rows ([`gemm_rows`]).
#[derive(Clone, Copy)]
pub(crate) struct MatC<'a, T> {
    ptr: *mut T,
    len: usize,
    ldc: usize,
    _c: PhantomData<&'a mut [T]>,
}

/// i32 sums.
pub(crate) type IntC<'a> = MatC<'a, i32>;
/// Requantized bytes (u8, or i8 as its two's-complement bytes).
pub(crate) type ByteC<'a> = MatC<'a, u8>;

// SAFETY: a `MatC` is a mutable borrow of the buffer for `'a`; `gemm_rows`' contract makes
// the tasks sharing it write disjoint rows, so no element is accessed by two threads.
unsafe impl<T: Send> Send for MatC<'_, T> {}
unsafe impl<T: Send> Sync for MatC<'_, T> {}

impl<'a, T> MatC<'a, T> {
    /// The whole C buffer with row stride `ldc` (checked against `m` and `n` by the gemm).
    pub(crate) fn new(c: &'a mut [T], ldc: usize) -> Self {
        MatC {
            ptr: c.as_mut_ptr(),
            len: c.len(),
            ldc,
            _c: PhantomData,
        }
    }
}

/// The requantizing output stage ([`gemm_block_requant`], `GemmArgs::REQUANT_MULTIPLIER`):
/// `C[i, j] = requant_byte(acc[i, j] + bias[j], mult[j], zp, lo, hi)`, applied to each
/// register tile as soon as its sums are final (from L1), not in a pass over an i32 C.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Requant<'a> {
    /// One per column of C.
    pub bias: &'a [i32],
    /// One per column of C.
    pub mult: &'a [f32],
    pub zp: i32,
    /// The output type's bounds less `zp` (see `opreg_sdk::numeric::requant_byte`).
    pub lo: f32,
    pub hi: f32,
}

/// Checks that a u8 (`signed == false`) or i8 zero point is in range.
fn check_zp(what: &str, zp: i32, signed: bool) -> Result<(), String> {
    let range = if signed { -128..=127 } else { 0..=255 };
    if range.contains(&zp) {
        Ok(())
    } else {
        let ty = if signed { "i8" } else { "u8" };
        Err(format!(
            "int8 gemm: {what} zero point {zp} is out of range for {ty}"
        ))
    }
}

/// Checks that a strided matrix of `rows` rows of `cols` elements with stride `ld` lies in
/// `len` elements (nothing is needed when it is empty).
fn check_matrix(what: &str, len: usize, rows: usize, cols: usize, ld: usize) -> Result<(), String> {
    if rows == 0 || cols == 0 {
        return Ok(());
    }
    if ld < cols {
        return Err(format!(
            "int8 gemm: {what} has stride {ld}, less than its row length {cols}"
        ));
    }
    let need = (rows - 1)
        .checked_mul(ld)
        .and_then(|x| x.checked_add(cols))
        .ok_or_else(|| {
            format!("int8 gemm: {what} of {rows} x {cols} (stride {ld}) is too large")
        })?;
    if len < need {
        return Err(format!(
            "int8 gemm: {what} of {rows} x {cols} (stride {ld}) needs {need} elements, got {len}"
        ));
    }
    Ok(())
}

/// Width of the packed B (and its per-column tables): full micro-panels, and a last one of
/// `n % nr` columns rounded up to a vector.
fn packed_width(g: &Geometry, n: usize) -> usize {
    n / g.nr * g.nr + (n % g.nr).div_ceil(g.lanes) * g.lanes
}

/// A `Vec` of `len` zeros, allocated fallibly.
fn try_zeros(len: usize, what: &str) -> Result<Vec<i32>, String> {
    let mut v = Vec::new();
    v.try_reserve_exact(len)
        .map_err(|_| format!("int8 gemm: cannot allocate {len} i32 for {what}"))?;
    v.resize(len, 0);
    Ok(v)
}

/// Packs B (`k x n`; element `(k, j)` at `b[k * ldb + j]`, or at `b[j * ldb + k]` when
/// `transposed`; u8 or (`b_signed`) i8) with zero point(s) `b_zp` (one, or one per column)
/// for the best kernel of this CPU.
pub(crate) fn pack_b(
    b: &[u8],
    b_signed: bool,
    k: usize,
    n: usize,
    ldb: usize,
    transposed: bool,
    b_zp: &[i32],
) -> Result<PackedB, String> {
    pack_b_with(Int8Kernel::best(), b, b_signed, k, n, ldb, transposed, b_zp)
}

/// [`pack_b`] for a given kernel (which must be available on this CPU).
#[allow(clippy::too_many_arguments)]
pub(crate) fn pack_b_with(
    kind: Int8Kernel,
    b: &[u8],
    b_signed: bool,
    k: usize,
    n: usize,
    ldb: usize,
    transposed: bool,
    b_zp: &[i32],
) -> Result<PackedB, String> {
    if !kind.available() {
        return Err(format!(
            "int8 gemm: kernel {kind:?} is not available on this CPU"
        ));
    }
    if b_zp.len() != 1 && b_zp.len() != n {
        return Err(format!(
            "int8 gemm: B has {n} columns but {} zero points (expected 1 or {n})",
            b_zp.len()
        ));
    }
    for &zp in b_zp {
        check_zp("B", zp, b_signed)?;
    }
    if transposed {
        check_matrix("B (transposed)", b.len(), n, k, ldb)?;
    } else {
        check_matrix("B", b.len(), k, n, ldb)?;
    }
    let g = kind.geometry();
    let width = packed_width(&g, n);
    let kc = pack::depth_block(k, g.kc);
    let bytes = k
        .div_ceil(g.group())
        .checked_mul(width)
        .and_then(|x| x.checked_mul(4))
        .ok_or_else(|| format!("int8 gemm: packed B of {k} x {n} is too large"))?;
    let mut data = AlignedBytes::zeroed(bytes, "packed B")?;
    let view = BView {
        b,
        ldb,
        transposed,
        k,
        n,
    };
    let zp_of = |j: usize| if b_zp.len() == 1 { b_zp[0] } else { b_zp[j] };
    let (mut zb, mut kzb_minus_sum, mut zb_uniform) = (Vec::new(), Vec::new(), None);
    if g.vnni {
        let mut colsum = try_zeros(width, "B column sums")?;
        pack::pack_b_vnni(
            &view,
            b_signed,
            &g,
            kc,
            width,
            data.bytes_mut(),
            &mut colsum,
        );
        // u8 B was stored as B - 128: shift its zero point alike.
        let shift = if b_signed { 0 } else { 128 };
        zb = try_zeros(width, "B zero points")?;
        kzb_minus_sum = try_zeros(width, "B column terms")?;
        // `k` modulo 2^32 suffices: everything below is modulo 2^32.
        let k32 = k as u32 as i32;
        for j in 0..n {
            zb[j] = zp_of(j) - shift;
            kzb_minus_sum[j] = k32.wrapping_mul(zb[j]).wrapping_sub(colsum[j]);
        }
        let first = zb.first().copied().unwrap_or(0);
        zb_uniform = zb[..n].iter().all(|&z| z == first).then_some(first);
    } else {
        pack::pack_b_i16(&view, b_signed, &zp_of, &g, kc, width, data.bytes_mut());
    }
    Ok(PackedB {
        kind,
        k,
        n,
        b_signed,
        kc,
        width,
        data,
        zb,
        kzb_minus_sum,
        zb_uniform,
    })
}

/// Computes rows `rows` of C for A (`m x k`, [`IntA`]) times the packed B into `c`, which
/// holds all of C (`m x n`, row stride `ldc >= n`). Rows outside `rows`, and columns past `n`,
/// are not touched, so tasks may compute disjoint row ranges of one C in parallel. `k == 0`
/// gives zeros. A is checked for all `m` rows; only rows `rows` are read.
///
/// # Safety
/// While this runs, no other code accesses rows `rows` of C: concurrent calls sharing one
/// [`IntC`] must use disjoint row ranges. (Everything else is checked.)
pub(crate) unsafe fn gemm_rows(
    a: &IntA<'_>,
    m: usize,
    rows: Range<usize>,
    packed: &PackedB,
    c: IntC<'_>,
) -> Result<(), String> {
    // SAFETY: forwarded from the caller.
    unsafe { gemm_block(a, m, rows, 0..packed.n, packed, c) }
}

/// [`gemm_rows`] for the columns `cols` of those rows only: from the first column of one of
/// B's micro-panels (see [`PackedB::tasks`]) to another's first column or `n`, so that tasks
/// may split a product of few rows by columns too.
///
/// # Safety
/// As [`gemm_rows`], for the rows `rows` and columns `cols` of C.
pub(crate) unsafe fn gemm_block(
    a: &IntA<'_>,
    m: usize,
    rows: Range<usize>,
    cols: Range<usize>,
    packed: &PackedB,
    c: IntC<'_>,
) -> Result<(), String> {
    // SAFETY: forwarded from the caller.
    unsafe { block(a, m, rows, cols, packed, Dest::Sums(c)) }
}

/// [`gemm_block`] with the requantizing output stage `rq`: rows `rows` and columns `cols`
/// of C, as bytes, in `c` (`m x n`, row stride `ldc >= n`). `rq` holds `n` biases and
/// multipliers.
///
/// # Safety
/// As [`gemm_rows`]: no other code accesses that block of C while this runs.
pub(crate) unsafe fn gemm_block_requant(
    a: &IntA<'_>,
    m: usize,
    rows: Range<usize>,
    cols: Range<usize>,
    packed: &PackedB,
    c: ByteC<'_>,
    rq: &Requant<'_>,
) -> Result<(), String> {
    // SAFETY: forwarded from the caller.
    unsafe { block(a, m, rows, cols, packed, Dest::Requant(c, rq)) }
}

/// The block `rows x cols` of the product into `dest`: the checks, an empty block, an empty
/// depth (every sum 0: zeros, or their requantization), else the driver.
///
/// # Safety
/// As [`gemm_rows`]: no other code accesses that block of C while this runs.
unsafe fn block(
    a: &IntA<'_>,
    m: usize,
    rows: Range<usize>,
    cols: Range<usize>,
    packed: &PackedB,
    dest: Dest<'_>,
) -> Result<(), String> {
    let extent = match &dest {
        Dest::Sums(c) => (c.len, c.ldc),
        Dest::Requant(c, _) => (c.len, c.ldc),
    };
    check_call(a, m, &rows, &cols, packed, extent)?;
    let n = packed.n;
    if let Dest::Requant(_, rq) = &dest {
        if rq.bias.len() < n || rq.mult.len() < n {
            return Err(format!(
                "int8 gemm: {n} columns but {} biases and {} multipliers",
                rq.bias.len(),
                rq.mult.len()
            ));
        }
    }
    if rows.is_empty() || cols.is_empty() {
        return Ok(());
    }
    if packed.k == 0 {
        let zeros = try_zeros(cols.len(), "an empty product's sums")?;
        // Row i < m of C lies in it (checked above: (m-1)*ldc + n <= len), and the caller
        // gives this call exclusive access to its columns `cols`.
        for i in rows {
            match &dest {
                Dest::Sums(c) => {
                    // SAFETY: see above.
                    let row = unsafe { std::slice::from_raw_parts_mut(c.ptr.add(i * c.ldc), n) };
                    row[cols.clone()].copy_from_slice(&zeros);
                }
                Dest::Requant(c, rq) => {
                    // SAFETY: see above.
                    let row = unsafe { std::slice::from_raw_parts_mut(c.ptr.add(i * c.ldc), n) };
                    let tables = Requant {
                        bias: &rq.bias[cols.clone()],
                        mult: &rq.mult[cols.clone()],
                        ..**rq
                    };
                    requant::row(&zeros, &tables, &mut row[cols.clone()]);
                }
            }
        }
        return Ok(());
    }
    // SAFETY: A, C, the tables and the ranges are checked; exclusivity of the block is the
    // caller's.
    unsafe { drive(a, rows, cols, packed, dest) }
}

/// The checks every product call makes: the columns whole micro-panels of B, A's zero point
/// and extent, C's extent (`len` elements, row stride `ldc`), the row range within A's `m`
/// rows, and B packed for a kernel this CPU has.
fn check_call(
    a: &IntA<'_>,
    m: usize,
    rows: &Range<usize>,
    cols: &Range<usize>,
    packed: &PackedB,
    (len, ldc): (usize, usize),
) -> Result<(), String> {
    let nr = packed.kind.geometry().nr;
    // (No columns at all is an empty block wherever it lies.)
    let whole_panels =
        cols.start.is_multiple_of(nr) && (cols.end == packed.n || cols.end.is_multiple_of(nr));
    if cols.start > cols.end || cols.end > packed.n || (!cols.is_empty() && !whole_panels) {
        return Err(format!(
            "int8 gemm: columns {}..{} are not whole micro-panels of {nr} within {}",
            cols.start, cols.end, packed.n
        ));
    }
    check_zp("A", a.zp, a.signed)?;
    check_matrix("A", a.a.len(), m, packed.k, a.lda)?;
    check_matrix("C", len, m, packed.n, ldc)?;
    if rows.start > rows.end || rows.end > m {
        return Err(format!(
            "int8 gemm: row range {}..{} is not within the {m} rows of A",
            rows.start, rows.end
        ));
    }
    if !packed.kind.available() {
        return Err(format!(
            "int8 gemm: B was packed for {:?}, not available on this CPU",
            packed.kind
        ));
    }
    Ok(())
}

impl PackedB {
    /// Tasks for an `m`-row product over `threads` threads, as `(rows per task, columns per
    /// task)`: [`rows_per_task`](Self::rows_per_task), and where that makes fewer than two
    /// tasks per thread (a 7x7 or 14x14 layer's 49 or 196 positions), all rows in each task
    /// and the columns split instead, in whole micro-panels: rows alone split 49 positions
    /// into tiles of 32 and 17, a 1.5x speed-up on two threads at best.
    pub(crate) fn tasks(&self, m: usize, threads: usize) -> (usize, usize) {
        const MIN_WORK: usize = 1 << 18;
        let rows = self.rows_per_task(m, threads);
        let nr = self.kind.geometry().nr;
        let panels = self.n.div_ceil(nr);
        let threads = threads.max(1);
        if threads == 1 || m.div_ceil(rows) >= 2 * threads || panels < 2 {
            return (rows, self.n.max(1));
        }
        let work = m.saturating_mul(self.n).saturating_mul(self.k);
        let col_tasks = (2 * threads).min(panels).min(work / MIN_WORK);
        if col_tasks < 2 {
            return (rows, self.n.max(1));
        }
        (m.max(1), panels.div_ceil(col_tasks) * nr)
    }

    /// Rows of A per parallel task for an `m`-row product over `threads` threads: whole
    /// register tiles, at most one row block of the driver (each task streams all of B once
    /// per block), as many tasks as row blocks rounded up to a multiple of the threads (an
    /// even split), and no split of a product too small to pay for one (`MIN_WORK` MACs per
    /// task). A grain from the work alone gave tasks of one or two rows for deep products
    /// (ResNet-50's 3x3 layers at 28x28: k = 1152, n = 128): 1-row tiles streaming B from L2
    /// per row, a third of the kernel's speed (measured).
    pub(crate) fn rows_per_task(&self, m: usize, threads: usize) -> usize {
        const MIN_WORK: usize = 1 << 18;
        let g = self.kind.geometry();
        let block = g.mc.min(drive::MAX_MC).max(g.mr);
        let threads = threads.max(1);
        let work = m.saturating_mul(self.n).saturating_mul(self.k);
        let by_work = (work / MIN_WORK).max(1);
        let by_blocks = m.div_ceil(block).div_ceil(threads) * threads;
        let tasks = by_blocks.min(by_work).max(1);
        (m.div_ceil(tasks).div_ceil(g.mr) * g.mr).clamp(1, m.max(1))
    }
}

/// Safe single-threaded [`gemm_rows`]: `c` is all of C (`m x n`, row stride `ldc`).
pub(crate) fn gemm_rows_mut(
    a: &IntA<'_>,
    m: usize,
    rows: Range<usize>,
    packed: &PackedB,
    c: &mut [i32],
    ldc: usize,
) -> Result<(), String> {
    // SAFETY: `c` is borrowed mutably for the call, so nothing else accesses it.
    unsafe { gemm_rows(a, m, rows, packed, IntC::new(c, ldc)) }
}

/// The whole product on the calling thread: packs B (`k x n`, see [`pack_b`]) for the best
/// kernel and computes all `m` rows of C.
#[allow(clippy::too_many_arguments, dead_code)] // for one-off products (and the tests)
pub(crate) fn gemm(
    a: &IntA<'_>,
    m: usize,
    k: usize,
    n: usize,
    b: &[u8],
    b_signed: bool,
    ldb: usize,
    b_transposed: bool,
    b_zp: &[i32],
    c: &mut [i32],
    ldc: usize,
) -> Result<(), String> {
    let packed = pack_b(b, b_signed, k, n, ldb, b_transposed, b_zp)?;
    gemm_rows_mut(a, m, 0..m, &packed, c, ldc)
}

//! The BLIS-style blocked f32 gemm driver: packing, blocking and the parallel split.
//!
//! Loops, outermost first: `jc` over `NC` columns of B and C; `pc` over depth blocks of at
//! most `KC` (B's `kc x nc` block is packed into `NR`-column micro-panels, shared by all
//! tasks); then, in parallel, tasks of (`MC`-row block of A and C) x (a run of B
//! micro-panels), each packing its A block into `MR`-row micro-panels and running the
//! micro-kernel over its tiles (`jr` over B micro-panels, `ir` over A micro-panels).

use crate::epilogue::TileEpilogue;
use crate::kernels::{KernelKind, MicroKernel, Portable};
use opreg_sdk::prelude::*;
use std::ops::Range;

/// `$e` with `$k` the micro-kernel type of `kind` (the one place that maps a [`KernelKind`] to
/// its kernel).
macro_rules! by_kernel {
    ($kind:expr, $k:ident => $e:expr) => {
        match $kind {
            #[cfg(target_arch = "x86_64")]
            KernelKind::Avx512 => {
                type $k = crate::kernels::Avx512;
                $e
            }
            #[cfg(target_arch = "x86_64")]
            KernelKind::Avx2 => {
                type $k = crate::kernels::Avx2;
                $e
            }
            _ => {
                type $k = Portable;
                $e
            }
        }
    };
}

/// A strided f32 matrix: element `(i, j)` at `ptr + i * rs + j * cs`.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Mat {
    pub ptr: *const f32,
    pub rs: usize,
    pub cs: usize,
}

// SAFETY: a `Mat` only describes memory that the gemm call's caller owns and that tasks only
// read.
unsafe impl Send for Mat {}
unsafe impl Sync for Mat {}

/// Where B comes from.
#[derive(Clone, Copy, Debug)]
pub(crate) enum BSource {
    /// `op(B)` as stored, packed per block during the call.
    Strided(Mat),
    /// The panels of a [`pack_b_all`] buffer, packed for the same kernel (`kc` must be the
    /// depth block [`depth_block`] gives for this `k`).
    Packed { ptr: *const f32, kc: usize },
}

/// `C = alpha * A * B + beta * C` with A `m x k`, B `k x n`, C `m x n` at `c + i*rsc + j*csc`.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Problem {
    pub m: usize,
    pub n: usize,
    pub k: usize,
    pub alpha: f32,
    pub beta: f32,
    pub a: Mat,
    /// A packed by [`pack_a_all`] for this kernel and `m`, `k` (with its depth block), read
    /// instead of `a`.
    pub a_packed: Option<(*const f32, usize)>,
    pub b: BSource,
    pub c: *mut f32,
    pub rsc: usize,
    pub csc: usize,
    /// Bias and activation, applied to each tile after its last depth block.
    pub epi: Option<TileEpilogue>,
}

// SAFETY: a problem describes memory the caller owns for the call's duration; tasks read A
// and B and write disjoint tiles of C.
unsafe impl Send for Problem {}
unsafe impl Sync for Problem {}

/// A raw pointer that parallel tasks share (each writes its own disjoint part, or all only
/// read).
#[derive(Clone, Copy)]
struct SharedPtr(*mut f32);
// SAFETY: tasks write disjoint ranges through it (or only read); the buffer outlives the
// parallel loop.
unsafe impl Send for SharedPtr {}
unsafe impl Sync for SharedPtr {}
impl SharedPtr {
    fn get(self) -> *mut f32 {
        self.0
    }
}

/// Below this many multiply-adds a gemm runs on the calling thread.
const PARALLEL_MIN_WORK: usize = 48 * 48 * 48;
/// Smallest number of multiply-adds worth one parallel task.
const TASK_MIN_WORK: usize = 1 << 20;
/// The rows a block counts as at least when it is cut into tasks (see [`split`]).
const STREAM_ROWS: usize = 16;
/// Rows of A (and C) up to which a row-major B is read in place instead of packed: each B
/// panel then feeds at most 32 tiles, and its packing (a read and a write of all of B, a
/// convolution's input: 3.2 MB for a 56x56x256 layer) cost a fifth of a 1x1 layer's time
/// with 64 rows. Measured on ResNet-50's 1x1 layers (W x X, X in place), alternating builds:
/// 64 rows 8-12 % faster at one thread, 2-5 % at two; 256 rows 4 % and 9 %; 512 rows -4 % and
/// +3 %, left packing. One depth block only: with several (a 512-channel input), the panels
/// are read again per block and two threads ran 5-8 % slower in place.
const IN_PLACE_ROWS: usize = 256;
/// Whether rows `rs` floats apart spread over at least 16 of L1's 64 sets, so that a panel
/// read in place stays in L1 across its tiles. A row length that is a multiple of many cache
/// lines maps every row to a few sets: BERT's 768- and 3072-wide activations (4 and 1 sets)
/// ran 20 % slower in place than packed; a 56x56 image (3136 floats: 16 sets) and a 28x28 one
/// (all 64) ran faster.
fn spread(rs: usize) -> bool {
    let bytes = rs.saturating_mul(4);
    !bytes.is_multiple_of(64) || (bytes / 64).trailing_zeros() <= 2
}

/// Tasks per thread, for load balance.
const TASKS_PER_THREAD: usize = 3;

/// Depth of the `pc` blocks for depth `k`: at most `kc_max`, balanced so the last block is not
/// a thin sliver (a multiple of 8 where possible).
pub(crate) fn depth_block(k: usize, kc_max: usize) -> usize {
    if k <= kc_max {
        return k.max(1);
    }
    let blocks = k.div_ceil(kc_max);
    (k.div_ceil(blocks).div_ceil(8) * 8).min(kc_max)
}

/// An uninitialised f32 buffer whose start is 64-byte aligned.
pub(crate) struct AlignedBuf {
    v: Vec<f32>,
    off: usize,
}

impl AlignedBuf {
    pub(crate) fn new(len: usize) -> Result<Self, PluginError> {
        let mut v = Vec::<f32>::new();
        v.try_reserve_exact(len + 16).map_err(|_| {
            PluginError::new(
                ErrorCode::ResourceExhausted,
                format!("cpu blas: cannot allocate {len} floats of packing buffer"),
            )
        })?;
        let off = v.as_ptr().align_offset(64);
        Ok(AlignedBuf {
            v,
            off: if off <= 16 { off } else { 0 },
        })
    }

    /// The start (its `len` floats are writable; read only what was written).
    pub(crate) fn ptr(&mut self) -> *mut f32 {
        self.v.as_mut_ptr().wrapping_add(self.off)
    }

    /// The start, for reading what was written.
    pub(crate) fn as_ptr(&self) -> *const f32 {
        self.v.as_ptr().wrapping_add(self.off)
    }
}

/// Runs `f` over `0..len` on the host pool, or inline when `parallel` is off or one range
/// would do.
fn run_ranges<F>(
    ctx: &KernelContext<'_>,
    parallel: bool,
    len: usize,
    grain: usize,
    f: F,
) -> Result<(), PluginError>
where
    F: Fn(Range<usize>) -> Result<(), PluginError> + Sync,
{
    if !parallel || len <= grain {
        f(0..len)
    } else {
        ctx.parallel_for(len, grain, f)
    }
}

/// Runs `p` with the given kernel.
///
/// # Safety
/// `p` describes valid memory: A (`m x k`), B (`k x n`, or a packed buffer for this kernel
/// and `k`, `n`), C (`m x n`, disjoint from A and B); `kind` is available on this CPU.
pub(crate) unsafe fn gemm(
    ctx: &KernelContext<'_>,
    kind: KernelKind,
    p: &Problem,
) -> Result<(), PluginError> {
    // SAFETY: forwarded from the caller.
    unsafe { by_kernel!(kind, K => gemm_with::<K>(ctx, p)) }
}

/// `C = beta * C` (for `k == 0` or `alpha == 0`, where A and B are not read).
///
/// # Safety
/// C as in [`gemm`].
unsafe fn scale_c(p: &Problem) {
    for i in 0..p.m {
        for j in 0..p.n {
            // SAFETY: (i, j) lies in C.
            unsafe {
                let c = p.c.add(i * p.rsc + j * p.csc);
                *c = if p.beta == 0.0 { 0.0 } else { p.beta * *c };
            }
        }
    }
}

/// # Safety
/// As [`gemm`], with `K` the kernel.
unsafe fn gemm_with<K: MicroKernel>(
    ctx: &KernelContext<'_>,
    p: &Problem,
) -> Result<(), PluginError> {
    let (m, n, k) = (p.m, p.n, p.k);
    if m == 0 || n == 0 {
        return Ok(());
    }
    if k == 0 || p.alpha == 0.0 {
        // SAFETY: forwarded from the caller; the epilogue's tile is all of C.
        unsafe {
            scale_c(p);
            if let Some(e) = &p.epi {
                K::finish(e, p.c, p.rsc, p.csc, 0, 0, m, n);
            }
        }
        return Ok(());
    }
    let threads = ctx.num_threads().max(1);
    let parallel = threads > 1 && m.saturating_mul(n).saturating_mul(k) >= PARALLEL_MIN_WORK;
    let kc_max = depth_block(k, K::KC);
    let n_pad = n.div_ceil(K::NR) * K::NR;
    if let BSource::Packed { kc, .. } = p.b {
        if kc != kc_max {
            return Err(PluginError::internal(format!(
                "cpu blas: packed B has depth blocks of {kc}, expected {kc_max}"
            )));
        }
    }
    if let Some((_, kc)) = p.a_packed {
        if kc != kc_max {
            return Err(PluginError::internal(format!(
                "cpu blas: packed A has depth blocks of {kc}, expected {kc_max}"
            )));
        }
    }
    if let (BSource::Packed { ptr, .. }, true) = (p.b, m <= FEW_ROW_BLOCK && k > kc_max) {
        // SAFETY: forwarded from the caller; B is packed for this kernel and `kc_max`.
        return unsafe { one_row_block::<K>(ctx, parallel, p, ptr, kc_max) };
    }
    let mut b_buf = None;
    for jc in (0..n).step_by(K::NC) {
        let nc = K::NC.min(n - jc);
        let panels = nc.div_ceil(K::NR);
        let threads = if parallel { threads } else { 1 };
        // Several depth blocks, B packed at load or per task: one parallel loop in which each
        // task takes every depth block in turn over its own tile of C (in its cache), instead
        // of one loop per depth block, the threads meeting after each. Measured on 1x1
        // layers whose depth spans 2-4 blocks (SqueezeNet's 13x13 384->64: ~2x ONNX
        // Runtime's time in the model, the second thread adding nothing).
        let whole_split = split::<K>(m, nc, k, threads);
        let whole = match p.b {
            BSource::Packed { ptr, .. } if k > kc_max => Some(BlockB::PackedAll(ptr, n_pad)),
            // (The condition for packing per task below.)
            BSource::Strided(b) if k > kc_max && (whole_split.0 - 1) * nc <= m => {
                Some(BlockB::PerTask(b))
            }
            _ => None,
        };
        if let Some(b) = whole {
            let block = Block {
                jc,
                nc,
                depth: 0..k,
                kc_max,
                split: whole_split,
            };
            // SAFETY: forwarded from the caller; a packed B holds every depth block.
            unsafe { compute_block::<K>(ctx, parallel, p, b, &block)? };
            continue;
        }
        let split = split::<K>(m, nc, kc_max, threads);
        for pc in (0..k).step_by(kc_max) {
            let kc = kc_max.min(k - pc);
            let b_block = match p.b {
                BSource::Packed { ptr, .. } => {
                    BlockB::Packed(ptr.wrapping_add(pc * n_pad + jc * kc))
                }
                // Few rows, rows of B contiguous: B read where it is (see `IN_PLACE_ROWS`).
                BSource::Strided(b)
                    if K::B_ROWS
                        && b.cs == 1
                        && m <= IN_PLACE_ROWS
                        && k <= kc_max
                        && spread(b.rs) =>
                {
                    BlockB::Rows(b)
                }
                // Few row blocks: each task packs the B panels it uses (one parallel loop,
                // and the panels stay in that core's cache); the redundant packing across
                // row blocks costs no more than packing A.
                BSource::Strided(b) if (split.0 - 1) * nc <= m => BlockB::PerTask(b),
                BSource::Strided(b) => {
                    // Many row blocks: pack the B block once, shared by all tasks.
                    let buf = match &mut b_buf {
                        Some(buf) => buf,
                        None => b_buf.insert(AlignedBuf::new(kc_max * K::NC.min(n_pad))?),
                    };
                    let out = SharedPtr(buf.ptr());
                    let grain = panels.div_ceil(threads * 2).max(1);
                    run_ranges(ctx, parallel, panels, grain, |r| {
                        // SAFETY: B is valid (caller); the buffer holds `kc_max * nc` floats,
                        // and each range writes its own panels.
                        unsafe { pack_b_panels::<K>(b, pc, kc, jc, nc, r, out.get()) };
                        Ok(())
                    })?;
                    BlockB::Packed(out.get())
                }
            };
            let block = Block {
                jc,
                nc,
                depth: pc..pc + 1,
                kc_max,
                split,
            };
            // SAFETY: forwarded from the caller; a shared B block is packed.
            unsafe { compute_block::<K>(ctx, parallel, p, b_block, &block)? };
        }
    }
    Ok(())
}

/// All of `op(A)` packed as [`pack_a_all`] lays it out (depth block `pc` at `pc * m_pad`):
/// the caller's pre-packed A, else a buffer packed here, returned with it (keep it alive while
/// the pointer is used).
///
/// # Safety
/// As [`gemm`]; a pre-packed A was packed by [`pack_a_all`] for `K`.
unsafe fn all_of_a<K: MicroKernel>(
    p: &Problem,
) -> Result<(Option<AlignedBuf>, *const f32), PluginError> {
    if let Some((ptr, _)) = p.a_packed {
        return Ok((None, ptr));
    }
    let len =
        p.k.checked_mul(p.m.div_ceil(K::MR) * K::MR)
            .ok_or_else(|| PluginError::invalid("cpu blas: packed A size overflows"))?;
    let mut buf = AlignedBuf::new(len)?;
    // SAFETY: A is valid (caller); the buffer holds `k * m_pad` floats.
    unsafe { pack_a_all::<K>(p.a, p.m, p.k, buf.ptr()) };
    let ptr = buf.as_ptr();
    Ok((Some(buf), ptr))
}

/// Rows up to which a product with B packed and several depth blocks runs as
/// [`one_row_block`]: A (at most this many rows, all its depth) stays in L2.
const FEW_ROW_BLOCK: usize = 64;

/// A product of one row block (`m <= FEW_ROW_BLOCK`: a batch-1 fully connected layer, the
/// 7x7 layers of a CNN as pixels by channels, 49 rows) with B packed and several depth
/// blocks: it mostly streams B, each value used by few rows. The blocked loop ran one
/// parallel loop per depth block, the threads meeting after each (measured on MobileNetV2's
/// 49 x 320 x 960 layer: a third of the time in the scheduler, 0.23 ms against ONNX
/// Runtime's 0.095). Here one parallel loop runs over units of (B panel, part of the rows),
/// each unit taking every depth block in turn over its own C tile (in cache), the epilogue
/// after the last. A whose rows a kernel reads in place is not packed (packing it whole
/// before the loop ran on one thread: a tenth of a 49 x 160 x 960 product at two threads).
/// The rows are cut in parts where the panels alone do not share out evenly: 160 columns are
/// 5 panels, 3 for one thread and 2 for the other (the product measured 141 GF/s against
/// 181 GF/s through the general loop); as 10 units of half the rows they split 5 and 5.
///
/// # Safety
/// As [`gemm`]; `b` holds all of B packed by [`pack_b_all`] for `K` with depth blocks of
/// `kc_max`; `p.m <= FEW_ROW_BLOCK`.
unsafe fn one_row_block<K: MicroKernel>(
    ctx: &KernelContext<'_>,
    parallel: bool,
    p: &Problem,
    b: *const f32,
    kc_max: usize,
) -> Result<(), PluginError> {
    let (m, n, k) = (p.m, p.n, p.k);
    let n_pad = n.div_ceil(K::NR) * K::NR;
    let m_pad = m.div_ceil(K::MR) * K::MR;
    let a_rows = p.a_packed.is_none() && K::A_ROWS && p.a.cs == 1;
    // Balanced tiles for a row-major C only: a column-major one stores full tiles turned in
    // registers, and others through a buffer.
    let balanced = a_rows && p.csc == 1;
    // A's depth blocks, packed: block `pc` at `pc * m_pad` (unless read in place).
    // SAFETY: forwarded from the caller.
    let (_a_own, a_packed) = if a_rows {
        (None, std::ptr::null())
    } else {
        unsafe { all_of_a::<K>(p)? }
    };
    let (a_packed, b) = (SharedPtr(a_packed.cast_mut()), SharedPtr(b.cast_mut()));
    let panels = n_pad / K::NR;
    let threads = if parallel {
        ctx.num_threads().max(1)
    } else {
        1
    };
    let tiles = row_tiles(m, K::MR, balanced).count();
    let parts = row_parts(panels, tiles, threads);
    let units = panels * parts;
    let grain = units.div_ceil(threads * TASKS_PER_THREAD).max(1);
    run_ranges(ctx, parallel, units, grain, |range| {
        for pc in (0..k).step_by(kc_max) {
            let kc = kc_max.min(k - pc);
            let beta = if pc == 0 { p.beta } else { 1.0 };
            let last = pc + kc >= k;
            let a_block = a_packed.get().cast_const().wrapping_add(pc * m_pad);
            for unit in range.clone() {
                let (panel, part) = (unit / parts, unit % parts);
                let j = panel * K::NR;
                let nr = K::NR.min(n - j);
                let b_panel = b.get().cast_const().wrapping_add(pc * n_pad + j * kc);
                let mine = part * tiles / parts..(part + 1) * tiles / parts;
                // The next panel this range takes (of this depth block, or the range's first
                // of the next) brought into L2 while this one's tiles run, as in
                // `compute_block`.
                let next = if part + 1 < parts || mine.len() < PREFETCH_MIN_TILES {
                    None
                } else if unit + 1 < range.end {
                    Some(b_panel.wrapping_add(kc * K::NR))
                } else if pc + kc < k {
                    let kc_next = kc_max.min(k - pc - kc);
                    let first = range.start / parts * K::NR;
                    Some(
                        b.get()
                            .cast_const()
                            .wrapping_add((pc + kc) * n_pad + first * kc_next),
                    )
                } else {
                    None
                };
                for (t, (ir, mr)) in row_tiles(m, K::MR, balanced)
                    .take(mine.end)
                    .skip(mine.start)
                    .enumerate()
                {
                    prefetch_share::<K>(next, kc, t, mine.len());
                    let c = p.c.wrapping_add(ir * p.rsc + j * p.csc);
                    let epi = p.epi.as_ref().filter(|_| last).map(|e| (e, ir, j));
                    let (b, cs, ab) = ((b_panel, K::NR), (p.rsc, p.csc), (p.alpha, beta));
                    // SAFETY: rows `ir..ir + mr` of A (read in place from column `pc`, or
                    // block `pc` of the packed A) and panel `panel` of B's block `pc` hold
                    // `kc` steps each; the tile lies in C and belongs to this unit alone.
                    unsafe {
                        if a_rows {
                            let a = p.a.ptr.add(ir * p.a.rs + pc);
                            K::tile_a_rows_then(kc, (a, p.a.rs), b, c, cs, ab, (mr, nr), epi);
                        } else {
                            let a = a_block.wrapping_add(ir * kc);
                            K::tile_then(kc, a, b, c, cs, ab, (mr, nr), epi);
                        }
                    }
                }
            }
        }
        Ok(())
    })
}

/// Tiles per B panel from which a product prefetches the next panel during them. With fewer
/// (a batch-1 fully connected layer: one row, one tile per panel) B is one stream that the
/// hardware prefetchers follow, and a burst of a whole panel's prefetches per tile held up
/// its loads: ResNet-50's 2048 -> 1000 layer went from 0.35 to 0.43 ms at two threads.
const PREFETCH_MIN_TILES: usize = 4;

/// Tile `t`'s share (of `tiles`) of the prefetch of the packed B panel at `next` (`kc`
/// steps of `NR` floats), if any.
#[inline]
fn prefetch_share<K: MicroKernel>(next: Option<*const f32>, kc: usize, t: usize, tiles: usize) {
    if let Some(next) = next {
        let (bytes, tiles) = (kc * K::NR * 4, tiles.max(1));
        let (from, to) = (t * bytes / tiles, (t + 1) * bytes / tiles);
        prefetch_l2(
            next.cast::<u8>().wrapping_add(from),
            to.saturating_sub(from),
        );
    }
}

/// Asks for the `len` bytes at `p` to be brought into L2 (a hint: nothing is read, and no
/// fault follows from an address outside memory).
#[inline]
fn prefetch_l2(p: *const u8, len: usize) {
    #[cfg(target_arch = "x86_64")]
    for off in (0..len).step_by(64) {
        // SAFETY: a prefetch reads nothing architecturally and never faults.
        unsafe {
            std::arch::x86_64::_mm_prefetch::<{ std::arch::x86_64::_MM_HINT_T1 }>(
                p.wrapping_add(off).cast(),
            )
        };
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = (p, len);
}

/// The row tiles of a block of `rows` rows for a kernel of `mr` rows: `(first row, rows)`.
/// Packed A comes in `mr`-row panels, so its tiles are `mr` rows but the last. Rows read in
/// place (`balanced`) make as many tiles of near-equal height instead: the kernels run a tile
/// of one to three rows latency-bound (too few independent sums to keep the FMA units busy),
/// and 49 rows as 6 x 8 + 1 took the time of about 52 rows; as 7 x 7 they take the time of
/// 49. (Every row sums its products in the same order whatever its tile: the same bits.)
pub(crate) fn row_tiles(
    rows: usize,
    mr: usize,
    balanced: bool,
) -> impl Iterator<Item = (usize, usize)> + Clone {
    let tiles = rows.div_ceil(mr.max(1));
    let (base, extra) = if balanced && tiles > 0 {
        (rows / tiles, rows % tiles)
    } else {
        (mr, 0)
    };
    (0..tiles).map(move |t| {
        let first = t * base + t.min(extra);
        (first, (base + usize::from(t < extra)).min(rows - first))
    })
}

/// Into how many parts [`one_row_block`] cuts the row tiles (`tiles` of them) so that its
/// units (panels x parts) share out evenly over `threads`: 1 where the panels already do, or
/// are many enough that a leftover panel costs little.
pub(crate) fn row_parts(panels: usize, tiles: usize, threads: usize) -> usize {
    if threads <= 1 || panels.is_multiple_of(threads) || panels >= 4 * threads {
        return 1;
    }
    // The fewest parts that make the units a multiple of the threads.
    let gcd = |mut a: usize, mut b: usize| {
        while b != 0 {
            (a, b) = (b, a % b);
        }
        a
    };
    (threads / gcd(panels, threads)).clamp(1, tiles.max(1))
}

/// The B block of one `(jc, pc)` step.
#[derive(Clone, Copy)]
enum BlockB {
    /// Packed micro-panels (`kc x NR` each, one after another) of the one depth block.
    Packed(*const f32),
    /// All of B packed ([`pack_b_all`]: depth block `pc` at `pc * n_pad`, then column `jc`'s
    /// panels at `jc * kc` within it), with `n_pad`.
    PackedAll(*const f32, usize),
    /// Not packed yet: each task packs the panels it uses.
    PerTask(Mat),
    /// Not packed: full panels read in place (rows of `op(B)` contiguous), the last, narrower
    /// one packed by the task that has it.
    Rows(Mat),
}

// SAFETY: the block only describes memory that the gemm call's caller owns (or that the call
// packed before the parallel loop) and that tasks only read.
unsafe impl Send for BlockB {}
unsafe impl Sync for BlockB {}

/// One step of the parallel loop: columns `jc..jc+nc`, the depth blocks `depth` (their
/// starts, `kc_max` apart: one, or all of them taken in turn within each task), and the task
/// split ([`split`]).
struct Block {
    jc: usize,
    nc: usize,
    depth: std::ops::Range<usize>,
    kc_max: usize,
    split: (usize, usize, usize, usize),
}

/// How a `m x nc x kc` block is cut into tasks for `threads` threads: `(row blocks, rows per
/// block (at most MC, a multiple of MR), B micro-panels per column chunk at most, column chunks)`;
/// tasks are row blocks x column chunks. Row blocks are balanced (no thin last block).
pub(crate) fn split<K: MicroKernel>(
    m: usize,
    nc: usize,
    kc: usize,
    threads: usize,
) -> (usize, usize, usize, usize) {
    let panels = nc.div_ceil(K::NR).max(1);
    let m = m.max(1);
    // A block of at most MC rows; but where the columns are few panels (fewer than two per
    // thread) and the rows many, at least one block per thread: SqueezeNet's 13x13 layers of
    // 48 output channels (169 rows, panels of 32 and 16 columns) split by their two panels
    // ran 2:1 on two threads.
    let few_panels = threads > 1 && panels < 2 * threads && m >= 4 * K::MR * threads;
    let blocks = m.div_ceil(K::MC).max(if few_panels { threads } else { 1 });
    let mc = m.div_ceil(blocks).div_ceil(K::MR) * K::MR;
    let row_blocks = m.div_ceil(mc);
    // A task streams its B panels whatever the rows: a block of a few rows (a batch-1 fully
    // connected layer) costs per panel about as much as STREAM_ROWS rows, and counted by its
    // multiply-adds alone it stayed one task on one thread (measured: 1 x 2048 x 1000 went
    // from 0.17 to 0.11 ms on 2 threads).
    let tasks_wanted = if threads > 1 {
        (m.max(STREAM_ROWS).saturating_mul(nc).saturating_mul(kc) / TASK_MIN_WORK)
            .clamp(1, threads * TASKS_PER_THREAD)
    } else {
        1
    };
    // Chunks of balanced widths ([`chunk_panels`]): cut at the widest (`div_ceil`) the last
    // took the rest (32 panels in 6 chunks: 6,6,6,6,6,2), and a thread that drew three full
    // chunks ran 18 panels while the other ran 14 (1000-column 1x1 layers, 2 threads).
    let col_chunks = tasks_wanted.div_ceil(row_blocks).clamp(1, panels);
    (row_blocks, mc, panels.div_ceil(col_chunks), col_chunks)
}

/// The B micro-panels of column chunk `cb` of `col_chunks` over `panels`: balanced, widths
/// differing by at most one (at most `panels.div_ceil(col_chunks)`).
pub(crate) fn chunk_panels(panels: usize, col_chunks: usize, cb: usize) -> std::ops::Range<usize> {
    let at = |c: usize| c * panels / col_chunks.max(1);
    at(cb)..at(cb + 1).min(panels)
}

/// Multiplies rows `0..m` of A's depth block by the B block into C's columns of the block,
/// split into parallel tasks (row blocks x column chunks).
///
/// # Safety
/// As [`gemm`]; a packed `b` holds the packed `kc x nc` block.
unsafe fn compute_block<K: MicroKernel>(
    ctx: &KernelContext<'_>,
    parallel: bool,
    p: &Problem,
    b: BlockB,
    blk: &Block,
) -> Result<(), PluginError> {
    let m = p.m;
    let Block {
        jc,
        nc,
        ref depth,
        kc_max,
        split: (row_blocks, mc_max, chunk, col_chunks),
    } = *blk;
    let panels = nc.div_ceil(K::NR);
    let a_len = mc_max * kc_max;
    let m_pad = m.div_ceil(K::MR) * K::MR;
    // Rows of A contiguous and a kernel that reads them in place: no packing of A. (Packing
    // interleaved 8 row streams a float at a time: 5 % of MobileNetV2's samples, whose
    // channels-last 1x1 layers have A = the image, packed anew per call.)
    let a_rows = p.a_packed.is_none() && K::A_ROWS && p.a.cs == 1;
    run_ranges(ctx, parallel, row_blocks * col_chunks, 1, |range| {
        let mut a_buf = match p.a_packed {
            Some(_) => None,
            None if a_rows => None,
            None => Some(AlignedBuf::new(a_len)?),
        };
        let mut a_pack: *const f32 = std::ptr::null();
        let mut b_buf = match b {
            BlockB::PerTask(_) => Some(AlignedBuf::new(chunk * K::NR * kc_max)?),
            BlockB::Rows(_) if nc % K::NR != 0 => Some(AlignedBuf::new(K::NR * kc_max)?),
            BlockB::Packed(_) | BlockB::PackedAll(..) | BlockB::Rows(_) => None,
        };
        // What the buffers hold: (row block, depth block) of A, (column chunk, depth block)
        // of B.
        let (mut packed_rows, mut packed_cols) = (None, None);
        for (t, pc) in range.flat_map(|t| depth.clone().step_by(kc_max).map(move |pc| (t, pc))) {
            let kc = kc_max.min(p.k - pc);
            let beta = if pc == 0 { p.beta } else { 1.0 };
            // The epilogue goes with the last depth block's tiles.
            let epi = p.epi.filter(|_| pc + kc >= p.k);
            // Pre-packed A: depth block `pc` at `pc * m_pad`, rows `ic..` at `ic * kc` in it.
            let a_block = p.a_packed.map(|(ptr, _)| ptr.wrapping_add(pc * m_pad));
            let (rb, cb) = (t / col_chunks, t % col_chunks);
            let ic = rb * mc_max;
            let mc = mc_max.min(m - ic);
            if packed_rows != Some((rb, pc)) && !a_rows {
                a_pack = match (a_block, a_buf.as_mut()) {
                    (Some(block), _) => block.wrapping_add(ic * kc),
                    (None, Some(buf)) => {
                        // SAFETY: A is valid (caller); the buffer holds `mc_max * kc` floats.
                        unsafe { pack_a::<K>(p.a, ic, mc, pc, kc, buf.ptr()) };
                        buf.as_ptr()
                    }
                    (None, None) => {
                        return Err(PluginError::internal("cpu blas: no A packing buffer"))
                    }
                };
                packed_rows = Some((rb, pc));
            }
            let cols = chunk_panels(panels, col_chunks, cb);
            let first = cols.start;
            // `b_chunk` is the first panel of this chunk.
            let b_chunk: *const f32 = match (b, b_buf.as_mut()) {
                (BlockB::Packed(block), _) => block.wrapping_add(first * kc * K::NR),
                (BlockB::PackedAll(all, n_pad), _) => {
                    all.wrapping_add(pc * n_pad + jc * kc + first * kc * K::NR)
                }
                // Found per panel below.
                (BlockB::Rows(_), _) => std::ptr::null(),
                (BlockB::PerTask(mat), Some(buf)) => {
                    let out = buf.ptr();
                    if packed_cols != Some((cb, pc)) {
                        // SAFETY: B is valid (caller); the buffer holds `chunk` panels.
                        unsafe { pack_b_at::<K>(mat, (pc, kc), (jc, nc), cols.clone(), out) };
                        packed_cols = Some((cb, pc));
                    }
                    out
                }
                (BlockB::PerTask(_), None) => {
                    return Err(PluginError::internal("cpu blas: no B packing buffer"))
                }
            };
            let cols_end = cols.end;
            for panel in cols {
                let j = panel * K::NR;
                let nr = K::NR.min(nc - j);
                // The panel and the distance between its steps.
                let (b_panel, ldb) = match (b, b_buf.as_mut()) {
                    (BlockB::Rows(mat), _) if nr == K::NR => {
                        (mat.ptr.wrapping_add(pc * mat.rs + jc + j), mat.rs)
                    }
                    (BlockB::Rows(mat), Some(buf)) => {
                        // SAFETY: B is valid (caller); the buffer holds one panel.
                        let (out, panels) = (buf.ptr(), panel..panel + 1);
                        unsafe { pack_b_at::<K>(mat, (pc, kc), (jc, nc), panels, out) };
                        (buf.as_ptr(), K::NR)
                    }
                    (BlockB::Rows(_), None) => {
                        return Err(PluginError::internal("cpu blas: no B edge buffer"))
                    }
                    _ => (b_chunk.wrapping_add((panel - first) * kc * K::NR), K::NR),
                };
                // A packed B panel comes from L3 or memory (a layer's weights, read once per
                // run): the next one this task takes (the next of the chunk, or the chunk's
                // first in the next depth block) is brought into L2 a slice per tile while
                // this one's tiles run, so that its first tile does not wait on it. ResNet-50's
                // 1x1 layers at 14x14, one thread: 0.79-0.84 -> 0.72-0.78 ms (ORT 0.64-0.66).
                let tiles = mc.div_ceil(K::MR).max(1);
                let next = match b {
                    _ if tiles < PREFETCH_MIN_TILES => None,
                    BlockB::Packed(_) | BlockB::PackedAll(..) if panel + 1 < cols_end => {
                        Some(b_panel.wrapping_add(kc * K::NR))
                    }
                    BlockB::PackedAll(all, n_pad) if pc + kc < depth.end => {
                        let kc_next = kc_max.min(p.k - pc - kc);
                        let at = (pc + kc) * n_pad + jc * kc_next + first * kc_next * K::NR;
                        Some(all.wrapping_add(at))
                    }
                    _ => None,
                };
                for (t, (ir, mr)) in row_tiles(mc, K::MR, a_rows && p.csc == 1).enumerate() {
                    prefetch_share::<K>(next, kc, t, tiles);
                    let c = p.c.wrapping_add((ic + ir) * p.rsc + (jc + j) * p.csc);
                    let epi = epi.as_ref().map(|e| (e, ic + ir, jc + j));
                    let (b, cs, ab) = ((b_panel, ldb), (p.rsc, p.csc), (p.alpha, beta));
                    // SAFETY: the A micro-panel is packed (`kc` steps) or (`a_rows`) A's own
                    // rows `ic + ir..` from column `pc`, `mr >= 1` of them; the B one packed
                    // or (`ldb` apart, full width) B's own rows; the tile lies in C and
                    // belongs to this task alone; the kernel is available (caller).
                    unsafe {
                        if a_rows {
                            let a = p.a.ptr.add((ic + ir) * p.a.rs + pc);
                            K::tile_a_rows_then(kc, (a, p.a.rs), b, c, cs, ab, (mr, nr), epi);
                        } else {
                            let a = a_pack.wrapping_add(ir * kc);
                            K::tile_then(kc, a, b, c, cs, ab, (mr, nr), epi);
                        }
                    };
                }
            }
        }
        Ok(())
    })
}

/// Packs rows `ic..ic+mc`, columns `pc..pc+kc` of A into `MR`-row micro-panels at `out`
/// (panel `r` at `out + r * MR * kc`, step `p` of it holding `MR` values), zero-padding the
/// last panel's missing rows.
///
/// # Safety
/// A covers the block; `out` has room for `mc.div_ceil(MR) * MR * kc` floats.
unsafe fn pack_a<K: MicroKernel>(
    a: Mat,
    ic: usize,
    mc: usize,
    pc: usize,
    kc: usize,
    out: *mut f32,
) {
    let mr_ = K::MR;
    #[cfg(target_arch = "x86_64")]
    let turn8 = mr_ == 8 && a.cs == 1 && std::arch::is_x86_feature_detected!("avx");
    for r0 in (0..mc).step_by(mr_) {
        let rows = mr_.min(mc - r0);
        let dst = out.wrapping_add(r0 * kc);
        let src = a.ptr.wrapping_add((ic + r0) * a.rs + pc * a.cs);
        // SAFETY (all branches): reads stay inside A's block, writes inside this panel.
        unsafe {
            #[cfg(target_arch = "x86_64")]
            if rows == mr_ && turn8 {
                // Rows of A contiguous (a channels-last image's pixels): 8x8 blocks turned
                // in registers. The scalar interleave below cost a 1x1 layer of depth 64 over
                // 3136 pixels more than a tenth of its time.
                x86::pack_rows8(src, a.rs, kc, dst);
                continue;
            }
            if rows == mr_ && a.rs == 1 {
                // Columns of A are contiguous: MR values per step in one copy.
                for q in 0..kc {
                    std::ptr::copy_nonoverlapping(src.add(q * a.cs), dst.add(q * mr_), mr_);
                }
            } else if rows == mr_ && a.cs == 1 {
                // Rows of A are contiguous: interleave MR row streams.
                for q in 0..kc {
                    for i in 0..mr_ {
                        *dst.add(q * mr_ + i) = *src.add(i * a.rs + q);
                    }
                }
            } else {
                for q in 0..kc {
                    for i in 0..mr_ {
                        *dst.add(q * mr_ + i) = if i < rows {
                            *src.add(i * a.rs + q * a.cs)
                        } else {
                            0.0
                        };
                    }
                }
            }
        }
    }
}

/// [`pack_b_panels`] with the first of `panels` at `out` (a task's own buffer).
///
/// # Safety
/// As [`pack_b_panels`], `out` having room for `panels.len()` panels.
unsafe fn pack_b_at<K: MicroKernel>(
    b: Mat,
    (pc, kc): (usize, usize),
    (jc, nc): (usize, usize),
    panels: Range<usize>,
    out: *mut f32,
) {
    let base = out.wrapping_sub(panels.start * kc * K::NR);
    // SAFETY: forwarded; panel `q` lands at `base + q * kc * NR`, inside `out`'s room.
    unsafe { pack_b_panels::<K>(b, pc, kc, jc, nc, panels, base) }
}

/// Packs micro-panels `panels` of B's block (rows `pc..pc+kc`, columns `jc..jc+nc`) into
/// `NR`-column micro-panels at `out` (panel `q` at `out + q * kc * NR`, step `p` of it
/// holding `NR` values), zero-padding the last panel's missing columns.
///
/// # Safety
/// B covers the block; `out` has room for `nc.div_ceil(NR) * NR * kc` floats.
pub(crate) unsafe fn pack_b_panels<K: MicroKernel>(
    b: Mat,
    pc: usize,
    kc: usize,
    jc: usize,
    nc: usize,
    panels: Range<usize>,
    out: *mut f32,
) {
    let nr_ = K::NR;
    for panel in panels {
        let j0 = panel * nr_;
        let cols = nr_.min(nc - j0);
        let dst = out.wrapping_add(panel * kc * nr_);
        let src = b.ptr.wrapping_add(pc * b.rs + (jc + j0) * b.cs);
        // SAFETY (all branches): reads stay inside B's block, writes inside this panel.
        unsafe {
            if cols == nr_ && b.cs == 1 {
                // Rows of op(B) are contiguous: NR values per step in one copy.
                for q in 0..kc {
                    std::ptr::copy_nonoverlapping(src.add(q * b.rs), dst.add(q * nr_), nr_);
                }
            } else if b.rs == 1 && nr_ % 16 == 0 && avx512() {
                // Columns of op(B) contiguous (B transposed): 16 columns x 16 steps turned in
                // registers (the scalar loop below made a channels-last operand's packing
                // slower than the product it feeds).
                pack_transposed16(src, b.cs, kc, cols, dst, nr_);
            } else if b.rs == 1 {
                // Columns of op(B) are contiguous (B transposed): one column stream at a time.
                for j in 0..nr_ {
                    if j < cols {
                        let col = src.add(j * b.cs);
                        for q in 0..kc {
                            *dst.add(q * nr_ + j) = *col.add(q);
                        }
                    } else {
                        for q in 0..kc {
                            *dst.add(q * nr_ + j) = 0.0;
                        }
                    }
                }
            } else {
                for q in 0..kc {
                    for j in 0..nr_ {
                        *dst.add(q * nr_ + j) = if j < cols {
                            *src.add(q * b.rs + j * b.cs)
                        } else {
                            0.0
                        };
                    }
                }
            }
        }
    }
}

/// Packs all of `op(B)` (`k x n`) for kernel `K`: depth blocks of `kc = depth_block(k, KC)`
/// rows one after another, block `pc` at `out + pc * n_pad` (`n_pad` = `n` rounded up to
/// `NR`) holding all of its `NR`-column micro-panels, so that [`gemm`]'s block `(jc, pc)`
/// starts at `out + pc * n_pad + jc * kc`. Returns `kc`.
///
/// # Safety
/// B covers `k x n`; `out` has room for `k * n_pad` floats.
pub(crate) unsafe fn pack_b_all<K: MicroKernel>(
    b: Mat,
    k: usize,
    n: usize,
    out: *mut f32,
) -> usize {
    let kc_max = depth_block(k, K::KC);
    let n_pad = n.div_ceil(K::NR) * K::NR;
    for pc in (0..k).step_by(kc_max) {
        let kc = kc_max.min(k - pc);
        // SAFETY: forwarded from the caller; block `pc` has room for `kc * n_pad` floats.
        unsafe { pack_b_panels::<K>(b, pc, kc, 0, n, 0..n_pad / K::NR, out.add(pc * n_pad)) };
    }
    kc_max
}

/// Packs all of `op(A)` (`m x k`) for kernel `K`: depth blocks of `kc = depth_block(k, KC)`
/// columns one after another, block `pc` at `out + pc * m_pad` (`m_pad` = `m` rounded up to
/// `MR`) holding all of its `MR`-row micro-panels, so that a task's rows `ic..` of block `pc`
/// start at `out + pc * m_pad + ic * kc`, as [`pack_a`] would have packed them. Returns `kc`.
///
/// # Safety
/// A covers `m x k`; `out` has room for `k * m_pad` floats.
pub(crate) unsafe fn pack_a_all<K: MicroKernel>(
    a: Mat,
    m: usize,
    k: usize,
    out: *mut f32,
) -> usize {
    let kc_max = depth_block(k, K::KC);
    let m_pad = m.div_ceil(K::MR) * K::MR;
    for pc in (0..k).step_by(kc_max) {
        let kc = kc_max.min(k - pc);
        // SAFETY: forwarded from the caller; block `pc` has room for `kc * m_pad` floats.
        unsafe { pack_a::<K>(a, 0, m, pc, kc, out.add(pc * m_pad)) };
    }
    kc_max
}

/// [`pack_a_all`] for the kernel `kind`; returns `kc`.
///
/// # Safety
/// As [`pack_a_all`] with `MR` the kernel's (see [`panel_height`]).
pub(crate) unsafe fn pack_a_all_for(
    kind: KernelKind,
    a: Mat,
    m: usize,
    k: usize,
    out: *mut f32,
) -> usize {
    // SAFETY: forwarded from the caller.
    unsafe { by_kernel!(kind, K => pack_a_all::<K>(a, m, k, out)) }
}

/// `MR` of the kernel `kind`.
pub(crate) fn panel_height(kind: KernelKind) -> usize {
    by_kernel!(kind, K => K::MR)
}

/// [`pack_b_all`] for the kernel `kind`; returns `(kc, nr)`.
///
/// # Safety
/// As [`pack_b_all`] with `NR` the kernel's (see [`panel_width`]).
pub(crate) unsafe fn pack_b_all_for(
    kind: KernelKind,
    b: Mat,
    k: usize,
    n: usize,
    out: *mut f32,
) -> usize {
    // SAFETY: forwarded from the caller.
    unsafe { by_kernel!(kind, K => pack_b_all::<K>(b, k, n, out)) }
}

/// `(NR, KC)` of the kernel `kind`.
pub(crate) fn panel_width(kind: KernelKind) -> (usize, usize) {
    by_kernel!(kind, K => (K::NR, K::KC))
}

/// Whether the CPU has AVX-512F (cached by the standard library).
fn avx512() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::arch::is_x86_feature_detected!("avx512f")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// One packed panel (`kc` steps of `nr` values, a multiple of 16) from `cols` contiguous
/// column streams (column `j` at `src + j * cs`, `kc` values each); columns past `cols` zero.
///
/// # Safety
/// The CPU has AVX-512F; the streams hold `kc` values each; `dst` has room for `kc * nr`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn pack_transposed16(
    src: *const f32,
    cs: usize,
    kc: usize,
    cols: usize,
    dst: *mut f32,
    nr: usize,
) {
    use std::arch::x86_64::*;
    for jb in (0..nr).step_by(16) {
        for q0 in (0..kc).step_by(16) {
            let qn = (kc - q0).min(16);
            let mask = ((1u32 << qn) - 1) as u16;
            let mut r = [_mm512_setzero_ps(); 16];
            for (j, v) in r.iter_mut().enumerate() {
                if jb + j < cols {
                    // SAFETY: values q0..q0 + qn of column jb + j (caller).
                    *v = unsafe { _mm512_maskz_loadu_ps(mask, src.add((jb + j) * cs + q0)) };
                }
            }
            let t = opreg_sdk::simd::transpose16(r);
            for (q, v) in t.iter().take(qn).enumerate() {
                // SAFETY: step q0 + q < kc of the panel, values jb..jb + 16 < nr.
                unsafe { _mm512_storeu_ps(dst.add((q0 + q) * nr + jb), *v) };
            }
        }
    }
}

/// Never called off x86 ([`avx512`] is false there); the plain loop, to have a body.
#[cfg(not(target_arch = "x86_64"))]
unsafe fn pack_transposed16(
    src: *const f32,
    cs: usize,
    kc: usize,
    cols: usize,
    dst: *mut f32,
    nr: usize,
) {
    for q in 0..kc {
        for j in 0..nr {
            // SAFETY: as the x86 version.
            unsafe {
                *dst.add(q * nr + j) = if j < cols { *src.add(j * cs + q) } else { 0.0 };
            }
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::x86_64::*;

    /// Packs 8 rows of A (`rs` floats apart, each contiguous over `kc` values) into one
    /// micro-panel at `dst` (step `q` holding the 8 rows' values of column `q`), 8 columns at a
    /// time through an 8x8 transpose in registers.
    ///
    /// # Safety
    /// The CPU has AVX; the 8 rows hold `kc` floats each from `src`; `dst` has room for
    /// `8 * kc` floats.
    #[target_feature(enable = "avx")]
    pub(super) unsafe fn pack_rows8(src: *const f32, rs: usize, kc: usize, dst: *mut f32) {
        let mut q = 0;
        while q + 8 <= kc {
            // SAFETY: columns `q..q + 8` of the 8 rows, and 64 floats of the panel.
            unsafe {
                let r = |i: usize| _mm256_loadu_ps(src.add(i * rs + q));
                let (r0, r1, r2, r3) = (r(0), r(1), r(2), r(3));
                let (r4, r5, r6, r7) = (r(4), r(5), r(6), r(7));
                let (t0, t1) = (_mm256_unpacklo_ps(r0, r1), _mm256_unpackhi_ps(r0, r1));
                let (t2, t3) = (_mm256_unpacklo_ps(r2, r3), _mm256_unpackhi_ps(r2, r3));
                let (t4, t5) = (_mm256_unpacklo_ps(r4, r5), _mm256_unpackhi_ps(r4, r5));
                let (t6, t7) = (_mm256_unpacklo_ps(r6, r7), _mm256_unpackhi_ps(r6, r7));
                // Columns j and j + 4 of rows 0-3 (s0..s3) and of rows 4-7 (s4..s7).
                let s0 = _mm256_shuffle_ps::<0x44>(t0, t2);
                let s1 = _mm256_shuffle_ps::<0xEE>(t0, t2);
                let s2 = _mm256_shuffle_ps::<0x44>(t1, t3);
                let s3 = _mm256_shuffle_ps::<0xEE>(t1, t3);
                let s4 = _mm256_shuffle_ps::<0x44>(t4, t6);
                let s5 = _mm256_shuffle_ps::<0xEE>(t4, t6);
                let s6 = _mm256_shuffle_ps::<0x44>(t5, t7);
                let s7 = _mm256_shuffle_ps::<0xEE>(t5, t7);
                let d = dst.add(q * 8);
                _mm256_storeu_ps(d, _mm256_permute2f128_ps::<0x20>(s0, s4));
                _mm256_storeu_ps(d.add(8), _mm256_permute2f128_ps::<0x20>(s1, s5));
                _mm256_storeu_ps(d.add(16), _mm256_permute2f128_ps::<0x20>(s2, s6));
                _mm256_storeu_ps(d.add(24), _mm256_permute2f128_ps::<0x20>(s3, s7));
                _mm256_storeu_ps(d.add(32), _mm256_permute2f128_ps::<0x31>(s0, s4));
                _mm256_storeu_ps(d.add(40), _mm256_permute2f128_ps::<0x31>(s1, s5));
                _mm256_storeu_ps(d.add(48), _mm256_permute2f128_ps::<0x31>(s2, s6));
                _mm256_storeu_ps(d.add(56), _mm256_permute2f128_ps::<0x31>(s3, s7));
            }
            q += 8;
        }
        for q in q..kc {
            for i in 0..8 {
                // SAFETY: as above, the columns past the last whole 8.
                unsafe { *dst.add(q * 8 + i) = *src.add(i * rs + q) };
            }
        }
    }
}

//! The bf16 flavour of the gemm API: A and B bf16, C f32 or bf16, summed in f32 (the
//! products of `quant-mixed`'s `lowered=bf16` layers).
//!
//! With AVX-512 BF16 ([`Path::Pairs`]), `vdpbf16ps` adds to each of 16 f32 lanes the products
//! of a pair of bf16 values from each operand: twice the multiply-adds of an f32 FMA per
//! instruction, on half the bytes. Both operands are packed in pairs along the depth: B in
//! [`NR`]-column panels (per pair of depth, one u32 per column holding the two values one
//! above the other), A in [`MR`]-row micro-panels (per pair, one u32 per row, broadcast to
//! every lane). A register tile is 8 x 48 (24 zmm accumulators) over the whole depth, with no
//! depth blocks: a pair of depth reads 192 bytes of a B panel for 24 instructions, so even
//! BERT-base's 3072-deep panels (288 KiB) stream from L2 at a small part of its bandwidth.
//! Each tile's sums then go through a scratch tile: `alpha`, `beta * C`, the bias and
//! activation ([`TileEpilogue`], as in the f32 gemm), and into C as f32 or as bf16 rounded to
//! nearest even.
//!
//! Other CPUs ([`Path::Widen`]) widen the operands to f32 and run the f32 gemm: the same sums
//! up to the order of the additions. (`vdpbf16ps` and the bf16 rounding instruction treat
//! denormals as zero: values under 1.2e-38, far below anything a bf16 model computes with.)

use crate::epilogue::{SendPtr, TileEpilogue};
use crate::float::{self, check_strided, offset, PackedF32};
use crate::gemm::AlignedBuf;
use crate::kernels::KernelKind;
use opreg_sdk::half::bf16;
use opreg_sdk::prelude::*;
use std::sync::OnceLock;

/// Rows of a register tile (the height of A's micro-panels).
const MR: usize = 8;
/// Columns of a register tile (the width of B's panels): three vectors.
const NR: usize = 48;
/// f32 lanes of a vector.
const LANES: usize = 16;
/// A's micro-panels per parallel unit (a unit is one B panel times these rows).
const UNIT_PANELS: usize = 4;
/// Below this many multiply-adds a product runs on the calling thread.
const PARALLEL_MIN_WORK: usize = 1 << 18;

/// Whether `g` is a bf16 product this backend computes (see the module docs).
pub(crate) fn supports(g: &GemmArgs) -> bool {
    g.types.a == DType::BF16
        && g.types.b == DType::BF16
        && matches!(g.types.c, DType::F32 | DType::BF16)
        && g.compute == DType::F32
        && g.flags & !(GemmArgs::BIAS_PER_ROW | GemmArgs::PACKED_A) == 0
        && (g.flags & GemmArgs::PACKED_A == 0 || g.layout == Layout::ROW_MAJOR)
}

/// How the products are computed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Path {
    /// `vdpbf16ps` on operands packed in pairs of depth.
    Pairs,
    /// Operands widened to f32, then the f32 gemm with this kernel.
    Widen(KernelKind),
}

impl Path {
    /// The path for this CPU, detected once.
    pub(crate) fn best(kind: KernelKind) -> Path {
        static PAIRS: OnceLock<bool> = OnceLock::new();
        let pairs = *PAIRS.get_or_init(|| {
            #[cfg(target_arch = "x86_64")]
            {
                std::arch::is_x86_feature_detected!("avx512f")
                    && std::arch::is_x86_feature_detected!("avx512bw")
                    && std::arch::is_x86_feature_detected!("avx512bf16")
            }
            #[cfg(not(target_arch = "x86_64"))]
            {
                false
            }
        });
        if pairs {
            Path::Pairs
        } else {
            Path::Widen(kind)
        }
    }

    fn available(self) -> bool {
        match self {
            Path::Pairs => Path::best(KernelKind::Portable) == Path::Pairs,
            Path::Widen(kind) => kind.available(),
        }
    }
}

/// A bf16 matrix: element `(i, j)` at `ptr + i * rs + j * cs` (in elements).
#[derive(Clone, Copy, Debug)]
struct Mat16 {
    ptr: *const u16,
    rs: usize,
    cs: usize,
}

// SAFETY: only describes memory the gemm call's caller owns and tasks only read.
unsafe impl Send for Mat16 {}
unsafe impl Sync for Mat16 {}

impl Mat16 {
    /// Checks operand `name` (`op(X)` is `rows x cols`; nothing is read when either is 0).
    fn of(
        name: &str,
        ptr: *const u8,
        (layout, trans, ld): (Layout, Transpose, usize),
        rows: usize,
        cols: usize,
    ) -> Result<Self, PluginError> {
        let (rs, cs) = check_strided(name, ptr, (layout, trans, ld), rows, cols, 2)?;
        Ok(Mat16 {
            ptr: ptr.cast(),
            rs,
            cs,
        })
    }

    /// The transpose (a view: B's columns as rows).
    fn t(self) -> Self {
        Mat16 {
            rs: self.cs,
            cs: self.rs,
            ..self
        }
    }

    /// Element `(i, j)` widened.
    ///
    /// # Safety
    /// `(i, j)` lies in the matrix.
    unsafe fn get(&self, i: usize, j: usize) -> f32 {
        // SAFETY: the caller's bounds.
        bf16::from_bits(unsafe { *self.ptr.add(i * self.rs + j * self.cs) }).to_f32()
    }
}

/// Packs rows `lines` of `x` (`x`'s rows are A's rows, or B's columns through [`Mat16::t`])
/// in pairs along its `k` columns, as panel `p` of `width` rows: the pair `q` of row
/// `p * width + t` is the u32 at `dst + q * width + t`, its low half the even column. Rows
/// past `lines` and the odd depth's missing partner are zeros.
///
/// # Safety
/// `x` covers `lines x k`; `dst` has room for `k.div_ceil(2) * width` u32.
unsafe fn pack_panel(x: Mat16, lines: usize, k: usize, width: usize, p: usize, dst: *mut u32) {
    let pairs = k.div_ceil(2);
    let full = k / 2;
    if x.rs == 1 && (p + 1) * width <= lines {
        // The panel's rows side by side in memory (a row-major B's columns): a pair of
        // memory rows at a time, so that the reads run along them.
        for q in 0..pairs {
            // SAFETY (whole block): rows below `lines`, columns below `k`, `dst` in the panel.
            unsafe {
                let lo = x.ptr.add(p * width + 2 * q * x.cs);
                let hi = (2 * q + 1 < k).then(|| lo.add(x.cs));
                let out = dst.add(q * width);
                for t in 0..width {
                    let h = hi.map_or(0, |hi| *hi.add(t) as u32);
                    *out.add(t) = *lo.add(t) as u32 | h << 16;
                }
            }
        }
        return;
    }
    for t in 0..width {
        let line = p * width + t;
        // SAFETY (whole block): rows below `lines`, columns below `k`, `dst` within the panel.
        unsafe {
            if line >= lines {
                for q in 0..pairs {
                    *dst.add(q * width + t) = 0;
                }
                continue;
            }
            let row = x.ptr.add(line * x.rs);
            if x.cs == 1 {
                // The pair is one u32 in memory.
                for q in 0..full {
                    *dst.add(q * width + t) = row.add(2 * q).cast::<u32>().read_unaligned();
                }
            } else {
                for q in 0..full {
                    let lo = *row.add(2 * q * x.cs) as u32;
                    let hi = *row.add((2 * q + 1) * x.cs) as u32;
                    *dst.add(q * width + t) = lo | hi << 16;
                }
            }
            if pairs > full {
                *dst.add(full * width + t) = *row.add(full * 2 * x.cs) as u32;
            }
        }
    }
}

/// Packs every panel of `x` (`lines x k`, see [`pack_panel`]) into a new buffer, over the
/// host's threads when `ctx` is given.
fn pack_all(
    ctx: Option<&KernelContext<'_>>,
    x: Mat16,
    lines: usize,
    k: usize,
    width: usize,
) -> Result<AlignedBuf, PluginError> {
    let panels = lines.div_ceil(width);
    let per_panel = k.div_ceil(2) * width;
    let words = panels
        .checked_mul(per_panel)
        .ok_or_else(|| PluginError::invalid("cpu blas: packed bf16 operand size overflows"))?;
    let mut buf = AlignedBuf::new(words.max(1))?;
    // u32 and f32 have one size and alignment: the buffer holds the pairs' bits.
    let dst = SendPtr(buf.ptr().cast::<u32>());
    let run = |range: std::ops::Range<usize>| {
        for p in range {
            // SAFETY: the caller's operand covers `lines x k`; panel `p` writes its own
            // `per_panel` words of the buffer.
            unsafe { pack_panel(x, lines, k, width, p, dst.get().add(p * per_panel)) };
        }
        Ok(())
    };
    match ctx {
        Some(ctx) if panels > 1 && lines.saturating_mul(k) >= PARALLEL_MIN_WORK / 16 => {
            ctx.parallel_for(panels, ctx.even_grain(panels, 1), run)?
        }
        _ => run(0..panels)?,
    }
    Ok(buf)
}

/// An operand packed for the bf16 flavour: B (`k x n`) or, with `a`, `op(A)` (`n` rows x
/// `k`; [`GemmArgs::PACKED_A`]: a convolution's constant weights on the left).
pub(crate) struct PackedBf16 {
    a: bool,
    k: usize,
    n: usize,
    form: Form,
}

enum Form {
    /// [`NR`]-column panels of pairs, or for A [`MR`]-row micro-panels ([`Path::Pairs`]).
    Pairs(AlignedBuf),
    /// Widened to f32 and packed for the f32 kernel ([`Path::Widen`]).
    Widened(PackedF32),
}

// SAFETY: the panels are written once when packing and only read afterwards.
unsafe impl Send for PackedBf16 {}
unsafe impl Sync for PackedBf16 {}

impl PackedBf16 {
    /// Bytes held.
    pub(crate) fn bytes(&self) -> usize {
        match &self.form {
            Form::Pairs(_) => {
                let width = if self.a { MR } else { NR };
                self.n.div_ceil(width) * self.k.div_ceil(2) * width * 4
            }
            Form::Widened(p) => p.bytes(),
        }
    }
}

/// Packs `op(B)` of `g` once (constant weights) for `path`, or `op(A)` with
/// [`GemmArgs::PACKED_A`].
pub(crate) fn pack_b(
    ctx: &KernelContext<'_>,
    path: Path,
    g: &GemmArgs,
) -> Result<PackedBf16, PluginError> {
    if !supports(g) {
        return Err(PluginError::invalid("cpu blas: not a bf16 product"));
    }
    let a = g.flags & GemmArgs::PACKED_A != 0;
    let form = if a {
        let op = Mat16::of("a", g.a, (g.layout, g.trans_a, g.lda), g.m, g.k)?;
        match path {
            Path::Pairs => Form::Pairs(pack_all(Some(ctx), op, g.m, g.k, MR)?),
            Path::Widen(kind) => {
                let wide = widen(op, g.m, g.k, Layout::ROW_MAJOR)?;
                let mut f = GemmArgs::new(GemmTypes::F32, g.m, 1, g.k);
                (f.flags, f.a) = (GemmArgs::PACKED_A, wide.as_ptr().cast());
                Form::Widened(float::pack(kind, &f)?)
            }
        }
    } else {
        let op = Mat16::of("b", g.b, (g.layout, g.trans_b, g.ldb), g.k, g.n)?;
        match path {
            Path::Pairs => Form::Pairs(pack_all(Some(ctx), op.t(), g.n, g.k, NR)?),
            Path::Widen(kind) => {
                let wide = widen(op, g.k, g.n, Layout::ROW_MAJOR)?;
                let mut f = GemmArgs::new(GemmTypes::F32, 1, g.n, g.k);
                f.b = wide.as_ptr().cast();
                Form::Widened(float::pack(kind, &f)?)
            }
        }
    };
    Ok(PackedBf16 {
        a,
        k: g.k,
        n: if a { g.m } else { g.n },
        form,
    })
}

/// `x` (`rows x cols`) widened to a dense f32 matrix stored in `layout`.
fn widen(x: Mat16, rows: usize, cols: usize, layout: Layout) -> Result<AlignedBuf, PluginError> {
    let len = rows
        .checked_mul(cols)
        .ok_or_else(|| PluginError::invalid("cpu blas: bf16 operand size overflows"))?;
    let mut buf = AlignedBuf::new(len.max(1))?;
    let dst = buf.ptr();
    let (rs, cs) = if layout == Layout::ROW_MAJOR {
        (cols, 1)
    } else {
        (1, rows)
    };
    for i in 0..rows {
        for j in 0..cols {
            // SAFETY: `x` covers `rows x cols` (checked by the caller); `dst` holds `len`.
            unsafe { *dst.add(i * rs + j * cs) = x.get(i, j) };
        }
    }
    Ok(buf)
}

/// Runs every product of the batch `g` describes on `path` (with `packed` as B when given).
pub(crate) fn gemm(
    ctx: &KernelContext<'_>,
    path: Path,
    g: &GemmArgs,
    packed: Option<&PackedBf16>,
) -> Result<(), PluginError> {
    let wants_a = g.flags & GemmArgs::PACKED_A != 0;
    if let Some(p) = packed {
        float::check_packed(g, p.a, (p.k, p.n))?;
        let fits = matches!(
            (&p.form, path),
            (Form::Pairs(_), Path::Pairs) | (Form::Widened(_), Path::Widen(_))
        );
        if !fits || !path.available() {
            return Err(PluginError::invalid(
                "cpu blas: the operand was packed for another bf16 kernel",
            ));
        }
    } else if wants_a {
        return Err(PluginError::invalid(
            "cpu blas: PACKED_A is for gemm_packed with a packed A",
        ));
    }
    if g.batch > 1 && g.stride_c == 0 && g.m > 0 && g.n > 0 {
        return Err(PluginError::invalid(
            "cpu blas: a batch needs a non-zero C stride",
        ));
    }
    let c_bytes = if g.types.c == DType::BF16 { 2 } else { 4 };
    for p in 0..g.batch {
        let mut one = *g;
        one.batch = 1;
        one.a = offset(g.a, p, g.stride_a, 2)?;
        one.b = offset(g.b, p, g.stride_b, 2)?;
        one.c = offset(g.c.cast_const(), p, g.stride_c, c_bytes)?.cast_mut();
        if g.m == 0 || g.n == 0 {
            continue;
        }
        match path {
            Path::Pairs => pairs_gemm(ctx, &one, packed)?,
            Path::Widen(kind) => widened_gemm(ctx, kind, &one, packed)?,
        }
    }
    Ok(())
}

/// One product through the f32 gemm: A (and B unless packed) widened, C widened first when
/// it is bf16 and read (`beta`), rounded back after.
fn widened_gemm(
    ctx: &KernelContext<'_>,
    kind: KernelKind,
    g: &GemmArgs,
    packed: Option<&PackedBf16>,
) -> Result<(), PluginError> {
    let reads = g.k > 0 && g.alpha != 0.0;
    let packed_a = packed.is_some_and(|p| p.a);
    let (ar, br) = match (reads, packed_a) {
        (false, _) => (0, 0),
        (true, true) => (0, g.k),
        (true, false) => (g.m, g.k),
    };
    let a = Mat16::of("a", g.a, (g.layout, g.trans_a, g.lda), ar, g.k)?;
    let col_major = g.layout == Layout::COL_MAJOR;
    let mut f = *g;
    f.types = GemmTypes::F32;
    f.trans_a = Transpose::NO;
    f.trans_b = Transpose::NO;
    // Dense operands in `g`'s layout.
    let (lda, ldb, ldc) = if col_major {
        (g.m, g.k, g.m)
    } else {
        (g.k, g.n, g.n)
    };
    let wide_a = widen(a, ar, g.k, g.layout)?;
    (f.a, f.lda) = (wide_a.as_ptr().cast(), lda.max(1));
    let wide_b;
    let pre = match packed.map(|p| (&p.form, p.a)) {
        Some((Form::Widened(p), false)) => Some(p),
        Some((Form::Pairs(_), _)) => {
            return Err(PluginError::internal(
                "cpu blas: pairs given to the f32 path",
            ))
        }
        Some((Form::Widened(p), true)) => {
            let b = Mat16::of("b", g.b, (g.layout, g.trans_b, g.ldb), br, g.n)?;
            wide_b = widen(b, br, g.n, g.layout)?;
            (f.b, f.ldb) = (wide_b.as_ptr().cast(), ldb.max(1));
            Some(p)
        }
        None => {
            let b = Mat16::of("b", g.b, (g.layout, g.trans_b, g.ldb), br, g.n)?;
            wide_b = widen(b, br, g.n, g.layout)?;
            (f.b, f.ldb) = (wide_b.as_ptr().cast(), ldb.max(1));
            None
        }
    };
    if g.types.c == DType::F32 {
        return float::gemm(ctx, kind, &f, pre);
    }
    let c = Mat16::of(
        "c",
        g.c.cast_const(),
        (g.layout, Transpose::NO, g.ldc),
        g.m,
        g.n,
    )?;
    let mut wide_c = if g.beta != 0.0 {
        widen(c, g.m, g.n, g.layout)?
    } else {
        let len = g.m.checked_mul(g.n);
        AlignedBuf::new(len.ok_or_else(|| PluginError::invalid("cpu blas: C size overflows"))?)?
    };
    (f.c, f.ldc) = (wide_c.ptr().cast(), ldc);
    float::gemm(ctx, kind, &f, pre)?;
    let out = g.c.cast::<u16>();
    let (rs, cs) = (c.rs, c.cs);
    let (wrs, wcs) = if col_major { (1, ldc) } else { (ldc, 1) };
    for i in 0..g.m {
        for j in 0..g.n {
            // SAFETY: C covers `m x n` (checked above); `wide_c` holds `m * n` floats.
            unsafe {
                *out.add(i * rs + j * cs) =
                    bf16::from_f32(*wide_c.as_ptr().add(i * wrs + j * wcs)).to_bits();
            }
        }
    }
    Ok(())
}

/// What every tile of one product needs after its sums.
#[derive(Clone, Copy)]
struct Finish {
    /// C, its strides (elements), and whether it is bf16 (else f32).
    c: *mut u8,
    rsc: usize,
    csc: usize,
    c16: bool,
    alpha: f32,
    beta: f32,
    epi: Option<TileEpilogue>,
}

// SAFETY: tasks write disjoint tiles of C; the rest is read only.
unsafe impl Send for Finish {}
unsafe impl Sync for Finish {}

/// One product with `vdpbf16ps` (see the module docs).
fn pairs_gemm(
    ctx: &KernelContext<'_>,
    g: &GemmArgs,
    packed: Option<&PackedBf16>,
) -> Result<(), PluginError> {
    let (m, n) = (g.m, g.n);
    let reads = g.k > 0 && g.alpha != 0.0;
    // No depth: every sum is 0 and neither operand is read.
    let k = if reads { g.k } else { 0 };
    let pairs = k.div_ceil(2);
    let packed_a = packed.filter(|p| p.a);
    let a_rows = if packed_a.is_some() { 0 } else { m };
    let a = Mat16::of("a", g.a, (g.layout, g.trans_a, g.lda), a_rows, k)?;
    let c16 = g.types.c == DType::BF16;
    let (rsc, csc) = check_strided(
        "c",
        g.c.cast_const(),
        (g.layout, Transpose::NO, g.ldc),
        m,
        n,
        if c16 { 2 } else { 4 },
    )?;
    let parallel = m.saturating_mul(n).saturating_mul(k.max(1)) >= PARALLEL_MIN_WORK;
    let pctx = parallel.then_some(ctx);
    let owned_a;
    let a_buf = match packed_a.map(|p| &p.form) {
        Some(Form::Pairs(buf)) => buf,
        Some(Form::Widened(_)) => {
            return Err(PluginError::internal(
                "cpu blas: f32 panels given to the bf16 path",
            ))
        }
        None => {
            owned_a = pack_all(pctx, a, m, k, MR)?;
            &owned_a
        }
    };
    let owned_b;
    let b = match packed.filter(|p| !p.a).map(|p| &p.form) {
        Some(Form::Pairs(buf)) => buf,
        Some(Form::Widened(_)) => {
            return Err(PluginError::internal(
                "cpu blas: f32 panels given to the bf16 path",
            ))
        }
        None => {
            let b = Mat16::of("b", g.b, (g.layout, g.trans_b, g.ldb), k, n)?;
            owned_b = pack_all(pctx, b.t(), n, k, NR)?;
            &owned_b
        }
    };
    let (a_ptr, b_ptr) = (
        SendPtr(a_buf.as_ptr().cast::<u32>().cast_mut()),
        SendPtr(b.as_ptr().cast::<u32>().cast_mut()),
    );
    let fin = Finish {
        c: g.c,
        rsc,
        csc,
        c16,
        alpha: g.alpha,
        beta: g.beta,
        epi: TileEpilogue::of(g, false),
    };
    let (mpanels, npanels) = (m.div_ceil(MR), n.div_ceil(NR));
    let row_blocks = mpanels.div_ceil(UNIT_PANELS);
    let units = npanels * row_blocks;
    // Unit `u` is B panel `u / row_blocks` with row block `u % row_blocks`: a thread's range
    // walks the row blocks of one panel while the panel stays in L2.
    let run = |range: std::ops::Range<usize>| {
        for u in range {
            let (p, rb) = (u / row_blocks, u % row_blocks);
            let cols = NR.min(n - p * NR);
            for mp in rb * UNIT_PANELS..mpanels.min((rb + 1) * UNIT_PANELS) {
                let rows = MR.min(m - mp * MR);
                // SAFETY: the packed panels hold `pairs` pairs per row / column, zero padded
                // to whole panels; the tile lies in C, which `g` describes (checked above).
                unsafe {
                    tile(
                        &fin,
                        pairs,
                        a_ptr.get().add(mp * pairs * MR),
                        b_ptr.get().add(p * pairs * NR),
                        (mp * MR, p * NR),
                        (rows, cols),
                    )
                };
            }
        }
        Ok(())
    };
    if parallel && units > 1 {
        let grain = units.div_ceil(ctx.num_threads().max(1));
        ctx.parallel_for(units, ctx.even_grain(units, grain), run)
    } else {
        run(0..units)
    }
}

/// The scratch tile a tile's sums are finished in, on a cache line.
#[repr(C, align(64))]
struct Scratch([f32; MR * NR]);

/// Computes and stores the `rows x cols` tile at C's `(row0, col0)`.
///
/// # Safety
/// [`Path::Pairs`] is available; `a` is a micro-panel and `b` a panel of `pairs` pairs; the
/// tile lies in C.
unsafe fn tile(
    fin: &Finish,
    pairs: usize,
    a: *const u32,
    b: *const u32,
    (row0, col0): (usize, usize),
    (rows, cols): (usize, usize),
) {
    #[cfg(target_arch = "x86_64")]
    // SAFETY: the caller's.
    unsafe {
        let mut s = Scratch([0.0; MR * NR]);
        x86::sums(pairs, a, b, rows, cols.div_ceil(LANES), s.0.as_mut_ptr());
        x86::finish(fin, &mut s.0, (row0, col0), (rows, cols));
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        let _ = (fin, pairs, a, b, row0, col0, rows, cols);
        unreachable!("the bf16 pairs path exists on x86_64 only (Path::best)");
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use super::{Finish, LANES, MR, NR};
    use opreg_sdk::half::bf16;
    use std::arch::x86_64::*;

    /// The sums of a `R x (16 V)` tile into `s` (row stride [`NR`]).
    ///
    /// # Safety
    /// AVX-512 BF16; `a` holds `pairs * MR` and `b` `pairs * NR` u32; `s` is 64-byte aligned
    /// with room for `MR * NR` floats.
    #[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
    unsafe fn sums_of<const R: usize, const V: usize>(
        pairs: usize,
        a: *const u32,
        b: *const u32,
        s: *mut f32,
    ) {
        let mut acc = [[_mm512_setzero_ps(); V]; R];
        for q in 0..pairs {
            // SAFETY (whole block): the caller's bounds.
            unsafe {
                let bq = b.add(q * NR);
                let mut bv = [_mm512_setzero_si512(); V];
                for (v, x) in bv.iter_mut().enumerate() {
                    *x = _mm512_loadu_si512(bq.add(v * LANES).cast());
                }
                let aq = a.add(q * MR);
                for (r, row) in acc.iter_mut().enumerate() {
                    let av: __m512bh = std::mem::transmute(_mm512_set1_epi32(*aq.add(r) as i32));
                    for (x, bv) in row.iter_mut().zip(&bv) {
                        *x =
                            _mm512_dpbf16_ps(*x, av, std::mem::transmute::<__m512i, __m512bh>(*bv));
                    }
                }
            }
        }
        for (r, row) in acc.iter().enumerate() {
            for (v, x) in row.iter().enumerate() {
                // SAFETY: within the scratch tile, aligned (NR and LANES are multiples of 16).
                unsafe { _mm512_store_ps(s.add(r * NR + v * LANES), *x) };
            }
        }
    }

    /// [`sums_of`] for `rows` (1..=8) and `nv` (1..=3) vectors.
    ///
    /// # Safety
    /// As [`sums_of`].
    pub(super) unsafe fn sums(
        pairs: usize,
        a: *const u32,
        b: *const u32,
        rows: usize,
        nv: usize,
        s: *mut f32,
    ) {
        macro_rules! pick {
            ($($r:literal)*) => {
                match (rows, nv) {
                    $(
                        ($r, 1) => sums_of::<$r, 1>(pairs, a, b, s),
                        ($r, 2) => sums_of::<$r, 2>(pairs, a, b, s),
                        ($r, _) => sums_of::<$r, 3>(pairs, a, b, s),
                    )*
                    _ => sums_of::<8, 3>(pairs, a, b, s),
                }
            };
        }
        // SAFETY: the caller's.
        unsafe { pick!(1 2 3 4 5 6 7) }
    }

    /// `alpha`, `beta * C`, bias and activation over the tile's sums in `s`, then the tile
    /// into C (bf16 rounded to nearest even, 16 at a time where C's rows are contiguous).
    ///
    /// # Safety
    /// AVX-512 BF16; the tile lies in C, which is readable when `beta` is not 0.
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512bf16")]
    pub(super) unsafe fn finish(
        f: &Finish,
        s: &mut [f32; MR * NR],
        (row0, col0): (usize, usize),
        (rows, cols): (usize, usize),
    ) {
        let at = |i: usize, j: usize| (row0 + i) * f.rsc + (col0 + j) * f.csc;
        if f.alpha != 1.0 || f.beta != 0.0 {
            for i in 0..rows {
                for j in 0..cols {
                    let v = &mut s[i * NR + j];
                    *v *= f.alpha;
                    if f.beta != 0.0 {
                        // SAFETY: the caller's tile, readable with beta.
                        let c = unsafe {
                            if f.c16 {
                                bf16::from_bits(*f.c.cast::<u16>().add(at(i, j))).to_f32()
                            } else {
                                *f.c.cast::<f32>().add(at(i, j))
                            }
                        };
                        *v += f.beta * c;
                    }
                }
            }
        }
        if let Some(e) = &f.epi {
            // SAFETY: the scratch tile is `rows x cols` with row stride NR; the bias covers
            // C's rows / columns (the gemm contract).
            unsafe { e.apply(s.as_mut_ptr(), NR, 1, row0, col0, rows, cols) };
        }
        for i in 0..rows {
            let src = &s[i * NR..i * NR + cols];
            // SAFETY (whole block): the caller's tile.
            unsafe {
                if f.c16 {
                    let dst = f.c.cast::<u16>().add(at(i, 0));
                    if f.csc == 1 {
                        for (v, chunk) in src.chunks(LANES).enumerate() {
                            let mask = ((1u32 << chunk.len()) - 1) as u16;
                            let x = _mm512_maskz_loadu_ps(mask, chunk.as_ptr());
                            let h: __m256i = std::mem::transmute(_mm512_cvtneps_pbh(x));
                            _mm256_mask_storeu_epi16(dst.add(v * LANES).cast(), mask, h);
                        }
                    } else {
                        for (j, &v) in src.iter().enumerate() {
                            *dst.add(j * f.csc) = bf16::from_f32(v).to_bits();
                        }
                    }
                } else {
                    let dst = f.c.cast::<f32>().add(at(i, 0));
                    if f.csc == 1 {
                        std::ptr::copy_nonoverlapping(src.as_ptr(), dst, cols);
                    } else {
                        for (j, &v) in src.iter().enumerate() {
                            *dst.add(j * f.csc) = v;
                        }
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests;

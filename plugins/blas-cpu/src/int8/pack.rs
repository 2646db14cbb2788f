//! Packing of B (once, at [`super::pack_b_with`]) and of A's row blocks (per call) into the
//! lane layout described in the parent module.
//!
//! Packing runs on checked slices: it is `O(k * (m + n))` against the product's `O(m n k)`.

use super::kernel::Geometry;
use std::ops::Range;

/// A 64-byte aligned line: packed buffers start on a cache line so that no vector load
/// straddles two.
#[derive(Clone, Copy)]
#[repr(C, align(64))]
struct Line([u8; 64]);

/// A zeroed, 64-byte aligned byte buffer.
pub(super) struct AlignedBytes {
    v: Vec<Line>,
    len: usize,
}

impl AlignedBytes {
    /// `len` zero bytes (a multiple of 4), allocated fallibly.
    pub fn zeroed(len: usize, what: &str) -> Result<Self, String> {
        let lines = len.div_ceil(64);
        let mut v = Vec::new();
        v.try_reserve_exact(lines)
            .map_err(|_| format!("int8 gemm: cannot allocate {len} bytes for {what}"))?;
        v.resize(lines, Line([0; 64]));
        Ok(AlignedBytes { v, len })
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn ptr(&self) -> *const u8 {
        self.v.as_ptr().cast()
    }

    pub fn bytes_mut(&mut self) -> &mut [u8] {
        // SAFETY: `Line` is 64 plain bytes (`repr(C)`, no padding), so the vector is
        // `64 * lines >= len` initialised bytes, borrowed mutably through `self`.
        unsafe { std::slice::from_raw_parts_mut(self.v.as_mut_ptr().cast::<u8>(), self.len) }
    }
}

/// Depth block for depth `k`: at most `kc_max` (a multiple of 4), balanced so the last
/// block is not a thin sliver, and a multiple of 4 (so every block but the last fills whole
/// groups for both layouts).
pub(super) fn depth_block(k: usize, kc_max: usize) -> usize {
    let blocks = k.div_ceil(kc_max).max(1);
    (k.div_ceil(blocks).div_ceil(4) * 4).clamp(4, kc_max)
}

/// Operand B as given (checked to cover `k x n`).
pub(super) struct BView<'a> {
    pub b: &'a [u8],
    pub ldb: usize,
    pub transposed: bool,
    pub k: usize,
    pub n: usize,
}

/// Most columns of a micro-panel, over all kernels (`Geometry::nr`).
pub(super) const MAX_NR: usize = 64;

/// Width of the micro-panel starting at column `j0`.
fn panel_width(g: &Geometry, n: usize, j0: usize) -> usize {
    g.nr.min((n - j0).div_ceil(g.lanes) * g.lanes)
}

/// Packs B for the VNNI layout: bytes as s8 (u8 B shifted by -128, an xor of the top bit),
/// adding each column's sum of packed values to `colsum` (wrapping). `out` is zeroed and
/// `k.div_ceil(4) * width * 4` bytes long ([`super::packed_width`]).
#[allow(clippy::too_many_arguments)]
pub(super) fn pack_b_vnni(
    v: &BView<'_>,
    signed: bool,
    g: &Geometry,
    kc: usize,
    width: usize,
    out: &mut [u8],
    colsum: &mut [i32],
) {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx2") {
        // SAFETY: the CPU has AVX2.
        return unsafe { pack_b_vnni_avx2(v, signed, g, kc, width, out, colsum) };
    }
    pack_b_vnni_impl(v, signed, g, kc, width, out, colsum)
}

/// [`pack_b_vnni`] compiled for AVX2 (LLVM vectorizes the interleaving loops twice as wide).
///
/// # Safety
/// The CPU has AVX2.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
#[allow(clippy::too_many_arguments)]
unsafe fn pack_b_vnni_avx2(
    v: &BView<'_>,
    signed: bool,
    g: &Geometry,
    kc: usize,
    width: usize,
    out: &mut [u8],
    colsum: &mut [i32],
) {
    pack_b_vnni_impl(v, signed, g, kc, width, out, colsum)
}

#[allow(clippy::too_many_arguments)]
#[inline(always)]
fn pack_b_vnni_impl(
    v: &BView<'_>,
    signed: bool,
    g: &Geometry,
    kc: usize,
    width: usize,
    out: &mut [u8],
    colsum: &mut [i32],
) {
    let flip = if signed { 0 } else { 0x80 };
    // Rows past k, stored as the bytes that pack to zero.
    let pad = [flip; MAX_NR];
    for pc in (0..v.k).step_by(kc) {
        let kcb = kc.min(v.k - pc);
        let groups = kcb.div_ceil(4);
        let block = pc / 4 * width * 4;
        for j0 in (0..v.n).step_by(g.nr) {
            let w = panel_width(g, v.n, j0);
            let cols = g.nr.min(v.n - j0);
            let panel = &mut out[block + j0 * groups * 4..][..groups * w * 4];
            let sums = &mut colsum[j0..j0 + cols];
            if v.transposed {
                // Columns are contiguous: A's layout with the panel's columns as rows.
                let mode = AMode::Vnni { flip };
                for (jj, s) in sums.iter_mut().enumerate() {
                    let col = &v.b[(j0 + jj) * v.ldb + pc..][..kcb];
                    *s = s.wrapping_add(col.iter().map(|&x| i32::from((x ^ flip) as i8)).sum());
                }
                for c0 in (0..cols).step_by(8) {
                    let c1 = cols.min(c0 + 8);
                    let mut r: [&[u8]; 8] = [&[]; 8];
                    for (d, jj) in r.iter_mut().zip(c0..c1) {
                        *d = &v.b[(j0 + jj) * v.ldb + pc..][..kcb];
                    }
                    // The sums are taken above.
                    #[cfg(target_arch = "x86_64")]
                    let done = super::x86::pack_lanes(
                        &r[..c1 - c0],
                        mode,
                        &mut panel[c0 * 4..],
                        w,
                        &mut [0; 8],
                    );
                    #[cfg(not(target_arch = "x86_64"))]
                    let done = 0;
                    for (jj, col) in (c0..c1).zip(r) {
                        pack_row(&col[done * 4..], jj, w, mode, &mut panel[done * w * 4..]);
                    }
                }
            } else {
                // Rows are contiguous: interleave four rows per group.
                for (q4, lanes) in panel.chunks_exact_mut(w * 4).enumerate() {
                    let r: [&[u8]; 4] = std::array::from_fn(|t| match 4 * q4 + t {
                        q if q < kcb => &v.b[(pc + q) * v.ldb + j0..][..cols],
                        _ => &pad[..cols],
                    });
                    for (s, (((d, &x0), &x1), (&x2, &x3))) in sums.iter_mut().zip(
                        lanes
                            .chunks_exact_mut(4)
                            .zip(r[0])
                            .zip(r[1])
                            .zip(r[2].iter().zip(r[3])),
                    ) {
                        let y = [x0 ^ flip, x1 ^ flip, x2 ^ flip, x3 ^ flip];
                        d.copy_from_slice(&y);
                        let sum: i32 = y.iter().map(|&b| i32::from(b as i8)).sum();
                        *s = s.wrapping_add(sum);
                    }
                }
            }
        }
    }
}

/// Packs B for the i16 layout: `b - zp(j)` (in -255..=255). `out` is zeroed and
/// `k.div_ceil(2) * width * 2` words long.
pub(super) fn pack_b_i16(
    v: &BView<'_>,
    signed: bool,
    zp: &dyn Fn(usize) -> i32,
    g: &Geometry,
    kc: usize,
    width: usize,
    out: &mut [u8],
) {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx2") {
        // SAFETY: the CPU has AVX2.
        return unsafe { pack_b_i16_avx2(v, signed, zp, g, kc, width, out) };
    }
    pack_b_i16_impl(v, signed, zp, g, kc, width, out)
}

/// [`pack_b_i16`] compiled for AVX2 (LLVM vectorizes the interleaving loops twice as wide).
///
/// # Safety
/// The CPU has AVX2.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
#[allow(clippy::too_many_arguments)]
unsafe fn pack_b_i16_avx2(
    v: &BView<'_>,
    signed: bool,
    zp: &dyn Fn(usize) -> i32,
    g: &Geometry,
    kc: usize,
    width: usize,
    out: &mut [u8],
) {
    pack_b_i16_impl(v, signed, zp, g, kc, width, out)
}

#[allow(clippy::too_many_arguments)]
#[inline(always)]
fn pack_b_i16_impl(
    v: &BView<'_>,
    signed: bool,
    zp: &dyn Fn(usize) -> i32,
    g: &Geometry,
    kc: usize,
    width: usize,
    out: &mut [u8],
) {
    let val = |x: u8| {
        if signed {
            i16::from(x as i8)
        } else {
            i16::from(x)
        }
    };
    let mut zps = [0i16; MAX_NR];
    for pc in (0..v.k).step_by(kc) {
        let kcb = kc.min(v.k - pc);
        let groups = kcb.div_ceil(2);
        let block = pc / 2 * width * 4;
        for j0 in (0..v.n).step_by(g.nr) {
            let w = panel_width(g, v.n, j0);
            let cols = g.nr.min(v.n - j0);
            let zps = &mut zps[..cols];
            for (jj, z) in zps.iter_mut().enumerate() {
                // Checked to be in -128..=255 by the caller.
                *z = zp(j0 + jj) as i16;
            }
            let panel = &mut out[block + j0 * groups * 4..][..groups * w * 4];
            if v.transposed {
                // Columns are contiguous: A's layout with the panel's columns as rows, SIMD
                // for runs of 8 columns sharing a zero point.
                for c0 in (0..cols).step_by(8) {
                    let c1 = cols.min(c0 + 8);
                    let mut r: [&[u8]; 8] = [&[]; 8];
                    for (d, jj) in r.iter_mut().zip(c0..c1) {
                        *d = &v.b[(j0 + jj) * v.ldb + pc..][..kcb];
                    }
                    #[allow(unused_mut)]
                    let mut done = 0;
                    #[cfg(target_arch = "x86_64")]
                    if zps[c0..c1].iter().all(|&z| z == zps[c0]) {
                        let mode = AMode::I16 {
                            signed,
                            zp: zps[c0],
                        };
                        let lanes = &mut panel[c0 * 4..];
                        done = super::x86::pack_lanes(&r[..c1 - c0], mode, lanes, w, &mut [0; 8]);
                    }
                    for (jj, col) in (c0..c1).zip(r) {
                        let mode = AMode::I16 {
                            signed,
                            zp: zps[jj],
                        };
                        pack_row(&col[done * 2..], jj, w, mode, &mut panel[done * w * 4..]);
                    }
                }
            } else {
                // Rows are contiguous: interleave two rows per group (the second one zero
                // past k).
                for (q2, lanes) in panel.chunks_exact_mut(w * 4).enumerate() {
                    let r0 = &v.b[(pc + 2 * q2) * v.ldb + j0..][..cols];
                    let lanes = lanes.chunks_exact_mut(4);
                    if 2 * q2 + 1 < kcb {
                        let r1 = &v.b[(pc + 2 * q2 + 1) * v.ldb + j0..][..cols];
                        for (((d, &x0), &x1), &z) in lanes.zip(r0).zip(r1).zip(&*zps) {
                            d[..2].copy_from_slice(&(val(x0) - z).to_ne_bytes());
                            d[2..].copy_from_slice(&(val(x1) - z).to_ne_bytes());
                        }
                    } else {
                        for ((d, &x0), &z) in lanes.zip(r0).zip(&*zps) {
                            d[..2].copy_from_slice(&(val(x0) - z).to_ne_bytes());
                            d[2..].fill(0);
                        }
                    }
                }
            }
        }
    }
}

/// One row block and depth block of A to pack, in micro-panels of at most `mr` rows.
pub(super) struct ABlock<'a> {
    pub a: &'a [u8],
    pub lda: usize,
    pub rows: Range<usize>,
    pub pc: usize,
    pub kc: usize,
    pub mr: usize,
}

impl ABlock<'_> {
    /// For each micro-panel: (its first row relative to the block, its rows `h`, and each
    /// row's slice of the depth block).
    fn panels(&self) -> impl Iterator<Item = (usize, usize, impl Iterator<Item = &[u8]> + Clone)> {
        let mc = self.rows.len();
        (0..mc).step_by(self.mr).map(move |r0| {
            let h = self.mr.min(mc - r0);
            let first = self.rows.start + r0;
            let rows = (first..first + h).map(|i| &self.a[i * self.lda + self.pc..][..self.kc]);
            (r0, h, rows)
        })
    }
}

/// How A's bytes become packed lanes.
#[derive(Clone, Copy, Debug)]
pub(super) enum AMode {
    /// VNNI layout: 4 k per lane, bytes xored with `flip` (0x80 turns i8 into u8 + 128).
    Vnni { flip: u8 },
    /// i16 layout: 2 k per lane, `a - zp` (in -255..=255; `a` read as i8 when `signed`).
    I16 { signed: bool, zp: i16 },
}

impl AMode {
    /// k values per lane.
    pub fn group(self) -> usize {
        match self {
            AMode::Vnni { .. } => 4,
            AMode::I16 { .. } => 2,
        }
    }
}

/// Packs A's block: the micro-panel at row `r0` starts at byte `r0 * groups * 4` and holds,
/// per group, its `h` rows' lanes (zero-padded past `kc`). For the VNNI layout, writes each
/// row's sum of packed bytes to `rowsum` (zeros for the i16 layout).
pub(super) fn pack_a(s: &ABlock<'_>, mode: AMode, out: &mut [u8], rowsum: &mut [i32]) {
    let gk = mode.group();
    let groups = s.kc.div_ceil(gk);
    for (r0, h, rows) in s.panels() {
        let panel = &mut out[r0 * groups * 4..][..groups * h * 4];
        let sums = &mut rowsum[r0..r0 + h];
        sums.fill(0);
        #[allow(unused_mut)]
        let mut done = 0;
        #[cfg(target_arch = "x86_64")]
        {
            let mut r: [&[u8]; 8] = [&[]; 8];
            if h <= r.len() {
                for (d, row) in r.iter_mut().zip(rows.clone()) {
                    *d = row;
                }
                done = super::x86::pack_lanes(&r[..h], mode, panel, h, sums);
            }
        }
        for (i, row) in rows.enumerate() {
            let sum = pack_row(&row[done * gk..], i, h, mode, &mut panel[done * h * 4..]);
            sums[i] = sums[i].wrapping_add(sum);
        }
    }
}

/// Packs row `i` of a micro-panel of `h` rows into its lanes from the first group of `panel`,
/// and returns the sum of its packed bytes (VNNI layout; 0 for i16). At most 255 * kc: no
/// overflow for any depth block.
pub(super) fn pack_row(row: &[u8], i: usize, h: usize, mode: AMode, panel: &mut [u8]) -> i32 {
    let gk = mode.group();
    let chunks = row.chunks_exact(gk);
    let tail = chunks.remainder();
    // Lanes are built in registers: assembling them byte by byte in memory and reading them
    // back as one word would stall store forwarding on every lane.
    let lane = |ch: &[u8]| -> [u8; 4] {
        match mode {
            AMode::Vnni { flip } => {
                let mut b = [0; 4];
                b.copy_from_slice(ch);
                (u32::from_ne_bytes(b) ^ u32::from_ne_bytes([flip; 4])).to_ne_bytes()
            }
            AMode::I16 { signed, zp } => {
                let v = |x: u8| if signed { i16::from(x as i8) } else { i16::from(x) } - zp;
                let (lo, hi) = (v(ch[0]).to_ne_bytes(), v(ch[1]).to_ne_bytes());
                [lo[0], lo[1], hi[0], hi[1]]
            }
        }
    };
    let mut q = 0;
    for ch in chunks {
        let o = (q * h + i) * 4;
        panel[o..o + 4].copy_from_slice(&lane(ch));
        q += 1;
    }
    if !tail.is_empty() {
        // A partial last group: the padding meets zero padding in B; zero it anyway.
        let mut ch = [0u8; 4];
        ch[..tail.len()].copy_from_slice(tail);
        let mut l = lane(&ch[..gk]);
        let keep = match mode {
            AMode::Vnni { .. } => tail.len(),
            AMode::I16 { .. } => 2 * tail.len(),
        };
        l[keep..].fill(0);
        let o = (q * h + i) * 4;
        panel[o..o + 4].copy_from_slice(&l);
    }
    match mode {
        AMode::Vnni { flip } => row.iter().map(|&x| u32::from(x ^ flip)).sum::<u32>() as i32,
        AMode::I16 { .. } => 0,
    }
}

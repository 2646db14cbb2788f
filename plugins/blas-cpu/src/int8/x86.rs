//! x86-64 tile kernels. Each is generic over its tile (`MR` rows, `NV` vectors of columns) and
//! instantiated for every shape the driver asks for, so that edge tiles (the last rows of a
//! block, the last columns of B) do no work on padding rows and at most one vector's padding
//! columns.
//!
//! Per k group (4 k for VNNI, 2 for i16) a kernel loads `NV` vectors of B lanes, broadcasts
//! each row's A lane, and feeds `MR * NV` multiply-accumulates into `MR * NV` accumulators.

use super::drive::Tile;
use super::pack::AMode;
use super::requant::requant_avx512;
use std::arch::x86_64::*;

/// `match (mr, nv)` over the listed shapes, calling `$kernel::<MR, NV>(t)`; false for others.
macro_rules! dispatch {
    (@nv $kernel:ident, $t:expr, $m:literal, $nv:expr, [$($v:literal)*]) => {
        match $nv {
            $($v => {
                $kernel::<$m, $v>($t);
                true
            })*
            _ => false,
        }
    };
    ($kernel:ident, $t:expr, $mr:expr, $nv:expr, [$($m:literal)*], $nvs:tt) => {
        match $mr {
            $($m => dispatch!(@nv $kernel, $t, $m, $nv, $nvs),)*
            _ => false,
        }
    };
}

/// AVX-512 VNNI tiles up to 8 x 48.
///
/// # Safety
/// `t` describes packed VNNI micro-panels of `t.groups` groups for `mr` rows and `nv * 16`
/// columns, tables as documented on [`Tile`] covering them, and a writable `mr x t.nr` tile of
/// C (or of bytes, [`Tile::rq`]); the CPU has AVX-512 F, BW, VL and VNNI.
pub(super) unsafe fn tile_avx512vnni(t: &Tile, mr: usize, nv: usize) -> bool {
    // SAFETY: forwarded from the caller.
    unsafe {
        match (t.lda == 0, t.rq.is_null()) {
            (true, true) => dispatch!(vnni512_packed, t, mr, nv, [1 2 3 4 5 6 7 8], [1 2 3]),
            (false, true) => dispatch!(vnni512_in_place, t, mr, nv, [1 2 3 4 5 6 7 8], [1 2 3]),
            (true, false) => {
                dispatch!(vnni512_packed_requant, t, mr, nv, [1 2 3 4 5 6 7 8], [1 2 3])
            }
            (false, false) => {
                dispatch!(vnni512_in_place_requant, t, mr, nv, [1 2 3 4 5 6 7 8], [1 2 3])
            }
        }
    }
}

/// The instances of [`vnni512`]: A packed or read in place (`t.lda` apart); the sums stored
/// to C, or requantized in registers to bytes ([`Tile::rq`]). Which store stage is a constant
/// of each instance, not a test in the tile: tested, the store loop lost its unrolling and
/// the accumulators their registers (zeroed and kept on the stack).
macro_rules! vnni512_instances {
    ($($name:ident: $in_place:literal, $requant:literal;)*) => {$(
        /// See [`vnni512_instances`].
        ///
        /// # Safety
        /// As [`vnni512`].
        #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni")]
        unsafe fn $name<const MR: usize, const NV: usize>(t: &Tile) {
            // SAFETY: forwarded from the caller.
            unsafe { vnni512::<MR, NV, $in_place, $requant>(t) }
        }
    )*};
}

vnni512_instances! {
    vnni512_packed: false, false;
    vnni512_in_place: true, false;
    vnni512_packed_requant: false, true;
    vnni512_in_place_requant: true, true;
}

/// `$body` for each `$i` of the listed constants below `$n` (a const generic): unrolled by
/// construction, so that every `acc[i][v]` it names is a register, whatever LLVM's unrolling
/// thresholds make of a loop.
macro_rules! unrolled {
    ($i:ident < $n:expr, [$($k:literal)*], $body:block) => {$(
        if $k < $n {
            let $i: usize = $k;
            $body
        }
    )*};
}

/// AVX-VNNI tiles up to 6 x 16.
///
/// # Safety
/// As [`tile_avx512vnni`] with `nv * 8` columns; the CPU has AVX2 and AVX-VNNI.
pub(super) unsafe fn tile_avxvnni(t: &Tile, mr: usize, nv: usize) -> bool {
    // SAFETY: forwarded from the caller.
    unsafe { dispatch!(vnni256, t, mr, nv, [1 2 3 4 5 6], [1 2]) }
}

/// AVX2 tiles up to 6 x 16 on the i16 layout.
///
/// # Safety
/// As [`tile_avxvnni`] for i16 micro-panels (no tables); the CPU has AVX2.
pub(super) unsafe fn tile_avx2(t: &Tile, mr: usize, nv: usize) -> bool {
    // SAFETY: forwarded from the caller.
    unsafe { dispatch!(madd256, t, mr, nv, [1 2 3 4 5 6], [1 2]) }
}

/// Reads row `i`'s lane (4 bytes) of the current A group.
///
/// # Safety
/// `a + 4 * i .. + 4` is readable.
#[inline(always)]
unsafe fn a_lane(a: *const u8, i: usize) -> i32 {
    // SAFETY: forwarded from the caller.
    unsafe { a.add(4 * i).cast::<i32>().read_unaligned() }
}

/// The AVX-512 VNNI `MR x 16 NV` tile; `IN_PLACE`: row `i` of A at `t.a + i * t.lda`, its
/// groups contiguous (else a packed micro-panel, rows' lanes interleaved per group).
///
/// # Safety
/// As [`tile_avx512vnni`] with `mr == MR` and `nv == NV`.
#[inline(always)]
unsafe fn vnni512<const MR: usize, const NV: usize, const IN_PLACE: bool, const REQUANT: bool>(
    t: &Tile,
) {
    let mut acc = [[_mm512_setzero_si512(); NV]; MR];
    let (mut a, mut b) = (t.a, t.b);
    // Bytes from one row's lane to the next, and from one group to the next.
    let (row_step, group_step) = if IN_PLACE { (t.lda, 4) } else { (4, 4 * MR) };
    for _ in 0..t.groups {
        // SAFETY: `a` and `b` advance through the caller's `groups` groups of `MR` and
        // `16 * NV` lanes.
        unsafe {
            let mut bv = [_mm512_setzero_si512(); NV];
            for (v, y) in bv.iter_mut().enumerate() {
                *y = _mm512_loadu_si512(b.add(64 * v).cast());
            }
            for (i, row) in acc.iter_mut().enumerate() {
                // u8 A (first operand) x s8 B: four products per lane, summed into i32
                // without saturation (at most 4 * 255 * 128 in magnitude).
                let x = _mm512_set1_epi32(a.add(i * row_step).cast::<i32>().read_unaligned());
                for (s, y) in row.iter_mut().zip(&bv) {
                    *s = _mm512_dpbusd_epi32(*s, x, *y);
                }
            }
            a = a.add(group_step);
            b = b.add(64 * NV);
        }
    }
    if REQUANT {
        // SAFETY: forwarded from the caller; `rq` points to the driver's live `TileRequant`.
        unsafe { store_requant::<MR, NV>(t, &acc) };
        return;
    }
    for (i, row) in acc.iter().enumerate() {
        // SAFETY: the tables hold `MR` rows and `16 * NV` columns (caller).
        let (radd, rsum) = unsafe {
            (
                if t.rowadd.is_null() {
                    0
                } else {
                    *t.rowadd.add(i)
                },
                (!t.rowsum.is_null()).then(|| _mm512_set1_epi32(*t.rowsum.add(i))),
            )
        };
        let radd = _mm512_set1_epi32(radd);
        for (v, &s) in row.iter().enumerate() {
            let lanes = t.nr.saturating_sub(16 * v).min(16);
            if lanes == 0 {
                break;
            }
            let mask: __mmask16 = if lanes == 16 {
                0xFFFF
            } else {
                (1u16 << lanes) - 1
            };
            // SAFETY: the masked lanes lie in the caller's tile (row i < mr, columns < nr);
            // masked-off lanes are neither read nor written; the tables cover `16 * NV`
            // columns.
            unsafe {
                let mut r = _mm512_add_epi32(s, radd);
                if let Some(rs) = rsum {
                    let zb = _mm512_loadu_si512(t.zb.add(16 * v).cast());
                    r = _mm512_sub_epi32(r, _mm512_mullo_epi32(rs, zb));
                }
                let p = t.c.add(i * t.ldc + 16 * v);
                if !t.first {
                    r = _mm512_add_epi32(r, _mm512_maskz_loadu_epi32(mask, p));
                } else if !t.colterm.is_null() {
                    r = _mm512_add_epi32(r, _mm512_loadu_si512(t.colterm.add(16 * v).cast()));
                }
                _mm512_mask_storeu_epi32(p, mask, r);
            }
        }
    }
}

/// The store stage of [`vnni512`] for a tile whose sums are final ([`Tile::rq`]): the
/// zero-point terms, the partial sums of earlier depth blocks (C, padded to whole vectors),
/// the bias, the requantization and a store of bytes, in registers. Inlined into the tile and
/// unrolled by [`unrolled!`] (`acc` is only ever indexed by constants).
///
/// # Safety
/// As [`vnni512`], with `t.rq` pointing to the driver's live `TileRequant`, and (after the
/// first depth block) C's rows holding `16 * NV` sums at the tile.
#[inline(always)]
unsafe fn store_requant<const MR: usize, const NV: usize>(t: &Tile, acc: &[[__m512i; NV]; MR]) {
    // Everything read from the tile's description and its tables up front: a byte store may
    // alias anything, and each one made the compiler read them again.
    // SAFETY: a non-null `rq` points to the driver's live `TileRequant`; the row tables hold
    // `MR` rows (caller).
    let (rq, radd, rsum) = unsafe {
        let mut radd = [0i32; MR];
        let mut rsum = [0i32; MR];
        for i in 0..MR {
            if !t.rowadd.is_null() {
                radd[i] = *t.rowadd.add(i);
            }
            if !t.rowsum.is_null() {
                rsum[i] = *t.rowsum.add(i);
            }
        }
        (&*t.rq, radd, rsum)
    };
    let (out, ldo, c, ldc, first, nr) = (rq.out, rq.ldo, t.c, t.ldc, t.first, t.nr);
    let (lo, hi) = (_mm512_set1_ps(rq.lo), _mm512_set1_ps(rq.hi));
    let magic = _mm512_set1_ps(12_582_912.0 + rq.zp as f32);
    let (row_terms, per_column_zb) = (!t.rowadd.is_null(), !t.rowsum.is_null());
    unrolled!(v < NV, [0 1 2], {
        let lanes = nr.saturating_sub(16 * v).min(16);
        if lanes > 0 {
            let mask: __mmask16 = if lanes == 16 {
                0xFFFF
            } else {
                (1u16 << lanes) - 1
            };
            // SAFETY: the tables cover the tile's columns (lanes past them masked off), the
            // column ones `16 * NV` columns; C's rows hold `16 * NV` sums at the tile
            // (caller); the bytes of row i < mr, columns < nr, lie in the caller's tile of
            // the output.
            unsafe {
                // The bias, and on the first depth block the column terms (later ones find
                // them in C's partial sums).
                let mut col = _mm512_maskz_loadu_epi32(mask, rq.bias.add(16 * v).cast());
                if first && !t.colterm.is_null() {
                    col = _mm512_add_epi32(col, _mm512_loadu_si512(t.colterm.add(16 * v).cast()));
                }
                let mult = _mm512_maskz_loadu_ps(mask, rq.mult.add(16 * v));
                let zb = if per_column_zb {
                    _mm512_loadu_si512(t.zb.add(16 * v).cast())
                } else {
                    _mm512_setzero_si512()
                };
                unrolled!(i < MR, [0 1 2 3 4 5 6 7], {
                    let mut r = _mm512_add_epi32(acc[i][v], col);
                    if row_terms {
                        r = _mm512_add_epi32(r, _mm512_set1_epi32(radd[i]));
                    }
                    if per_column_zb {
                        let rs = _mm512_set1_epi32(rsum[i]);
                        r = _mm512_sub_epi32(r, _mm512_mullo_epi32(rs, zb));
                    }
                    if !first {
                        r = _mm512_add_epi32(r, _mm512_loadu_si512(c.add(i * ldc + 16 * v).cast()));
                    }
                    let q = _mm512_cvtepi32_epi8(requant_avx512(r, mult, lo, hi, magic));
                    let o = out.add(i * ldo + 16 * v);
                    // A whole vector unmasked: masked byte stores filled the store queue (the
                    // driver's next stores waited on them).
                    if lanes == 16 {
                        _mm_storeu_si128(o.cast(), q);
                    } else {
                        _mm_mask_storeu_epi8(o.cast(), mask, q);
                    }
                });
            }
        }
    });
}

/// The AVX-VNNI `MR x 8 NV` tile.
///
/// # Safety
/// As [`tile_avxvnni`] with `mr == MR` and `nv == NV`.
#[target_feature(enable = "avx2,avxvnni")]
unsafe fn vnni256<const MR: usize, const NV: usize>(t: &Tile) {
    let mut acc = [[_mm256_setzero_si256(); NV]; MR];
    let (mut a, mut b) = (t.a, t.b);
    for _ in 0..t.groups {
        // SAFETY: as in `vnni512`, with `8 * NV` lanes of B.
        unsafe {
            let mut bv = [_mm256_setzero_si256(); NV];
            for (v, y) in bv.iter_mut().enumerate() {
                *y = _mm256_loadu_si256(b.add(32 * v).cast());
            }
            for (i, row) in acc.iter_mut().enumerate() {
                let x = _mm256_set1_epi32(a_lane(a, i));
                for (s, y) in row.iter_mut().zip(&bv) {
                    *s = _mm256_dpbusd_avx_epi32(*s, x, *y);
                }
            }
            a = a.add(4 * MR);
            b = b.add(32 * NV);
        }
    }
    // SAFETY: forwarded from the caller.
    unsafe { store_ymm(t, &acc) }
}

/// The AVX2 `MR x 8 NV` tile on the i16 layout.
///
/// # Safety
/// As [`tile_avx2`] with `mr == MR` and `nv == NV`.
#[target_feature(enable = "avx2")]
unsafe fn madd256<const MR: usize, const NV: usize>(t: &Tile) {
    let mut acc = [[_mm256_setzero_si256(); NV]; MR];
    let (mut a, mut b) = (t.a, t.b);
    for _ in 0..t.groups {
        // SAFETY: as in `vnni256`.
        unsafe {
            let mut bv = [_mm256_setzero_si256(); NV];
            for (v, y) in bv.iter_mut().enumerate() {
                *y = _mm256_loadu_si256(b.add(32 * v).cast());
            }
            for (i, row) in acc.iter_mut().enumerate() {
                // Two i16 of A against two of B per lane, summed into i32: both are in
                // -255..=255, so the pair sum (<= 2 * 255^2) cannot saturate.
                let x = _mm256_set1_epi32(a_lane(a, i));
                for (s, y) in row.iter_mut().zip(&bv) {
                    *s = _mm256_add_epi32(*s, _mm256_madd_epi16(x, *y));
                }
            }
            a = a.add(4 * MR);
            b = b.add(32 * NV);
        }
    }
    // SAFETY: forwarded from the caller.
    unsafe { store_ymm(t, &acc) }
}

/// The ymm epilogue: zero-point terms (VNNI layout), then C overwritten or accumulated into.
///
/// # Safety
/// As the tile functions: the tables cover `MR` rows and `8 * NV` columns, C's tile is
/// `MR x t.nr`.
#[target_feature(enable = "avx2")]
#[inline]
unsafe fn store_ymm<const MR: usize, const NV: usize>(t: &Tile, acc: &[[__m256i; NV]; MR]) {
    let idx = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
    for (i, row) in acc.iter().enumerate() {
        // SAFETY: the tables hold `MR` rows (caller).
        let (radd, rsum) = unsafe {
            (
                if t.rowadd.is_null() {
                    0
                } else {
                    *t.rowadd.add(i)
                },
                (!t.rowsum.is_null()).then(|| _mm256_set1_epi32(*t.rowsum.add(i))),
            )
        };
        let radd = _mm256_set1_epi32(radd);
        for (v, &s) in row.iter().enumerate() {
            let lanes = t.nr.saturating_sub(8 * v).min(8);
            if lanes == 0 {
                break;
            }
            let mask = _mm256_cmpgt_epi32(_mm256_set1_epi32(lanes as i32), idx);
            // SAFETY: full vectors lie in the tile; partial ones go through the mask (lanes
            // < `lanes` only); the tables cover `8 * NV` columns.
            unsafe {
                let mut r = _mm256_add_epi32(s, radd);
                if let Some(rs) = rsum {
                    let zb = _mm256_loadu_si256(t.zb.add(8 * v).cast());
                    r = _mm256_sub_epi32(r, _mm256_mullo_epi32(rs, zb));
                }
                let p = t.c.add(i * t.ldc + 8 * v);
                if !t.first {
                    let old = if lanes == 8 {
                        _mm256_loadu_si256(p.cast())
                    } else {
                        _mm256_maskload_epi32(p, mask)
                    };
                    r = _mm256_add_epi32(r, old);
                } else if !t.colterm.is_null() {
                    r = _mm256_add_epi32(r, _mm256_loadu_si256(t.colterm.add(8 * v).cast()));
                }
                if lanes == 8 {
                    _mm256_storeu_si256(p.cast(), r);
                } else {
                    _mm256_maskstore_epi32(p, mask, r);
                }
            }
        }
    }
}

/// Packs the leading groups of up to 8 rows (`rows`: each row's slice of the depth block)
/// into lanes: row `i`'s lane of group `q` at byte `(q * stride + i) * 4` of `out`
/// (`stride >= rows.len()`: the rows of an A micro-panel, or 8 columns of a transposed B
/// micro-panel of `stride` columns). 8 groups at a time, as many as rows and `out` hold; for
/// the VNNI layout adds each row's sum of packed bytes to `sums`. Returns the number of
/// groups packed (0 without AVX2).
pub(super) fn pack_lanes(
    rows: &[&[u8]],
    mode: AMode,
    out: &mut [u8],
    stride: usize,
    sums: &mut [i32],
) -> usize {
    let h = rows.len();
    if h == 0 || h > 8 || h > stride || sums.len() < h {
        return 0;
    }
    if !std::arch::is_x86_feature_detected!("avx2") {
        return 0;
    }
    // Bytes of a row per 8 groups.
    let step = 8 * mode.group();
    let len = rows.iter().map(|r| r.len()).min().unwrap_or(0);
    // Groups whose `h` lanes fit in `out`.
    let fit = match (out.len() / 4).checked_sub(h) {
        Some(rest) => rest / stride + 1,
        None => 0,
    };
    let blocks = (len / step).min(fit / 8);
    // SAFETY: the CPU has AVX2; each row has `step * blocks` readable bytes, and the lanes of
    // the `8 * blocks <= fit` groups lie in `out`.
    unsafe {
        match mode {
            AMode::Vnni { flip } => {
                pack_avx2::<false>(rows, blocks, flip, false, 0, out, stride, sums)
            }
            AMode::I16 { signed, zp } => {
                pack_avx2::<true>(rows, blocks, 0, signed, zp, out, stride, sums)
            }
        }
    }
    blocks * 8
}

/// [`pack_lanes`] for the VNNI layout (`I16 == false`: bytes xored with `flip`) or the i16
/// one (`I16`: bytes widened, as i8 when `signed`, minus `zp`).
///
/// # Safety
/// The CPU has AVX2; `1 <= rows.len() <= min(8, stride)`; every row holds `blocks` steps (32
/// bytes for VNNI, 16 for i16); `out` holds the lanes of `8 * blocks` groups at `stride`.
#[target_feature(enable = "avx2")]
#[allow(clippy::too_many_arguments)]
unsafe fn pack_avx2<const I16: bool>(
    rows: &[&[u8]],
    blocks: usize,
    flip: u8,
    signed: bool,
    zp: i16,
    out: &mut [u8],
    stride: usize,
    sums: &mut [i32],
) {
    let h = rows.len();
    let out = out.as_mut_ptr();
    let vflip = _mm256_set1_epi8(flip as i8);
    let vzp = _mm256_set1_epi16(zp);
    let zero = _mm256_setzero_si256();
    // Stores of fewer than 8 rows write only their `h` lanes.
    let mask = _mm256_cmpgt_epi32(
        _mm256_set1_epi32(h as i32),
        _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7),
    );
    let mut acc = [zero; 8];
    for blk in 0..blocks {
        // Row i's lanes for groups 8 blk .. 8 blk + 8 (one dword each); missing rows zero.
        let mut r = [zero; 8];
        for (i, (d, row)) in r.iter_mut().zip(rows).enumerate() {
            // SAFETY: each row holds `blocks` steps (caller).
            unsafe {
                if I16 {
                    let v = _mm_loadu_si128(row.as_ptr().add(16 * blk).cast());
                    let w = if signed {
                        _mm256_cvtepi8_epi16(v)
                    } else {
                        _mm256_cvtepu8_epi16(v)
                    };
                    *d = _mm256_sub_epi16(w, vzp);
                } else {
                    let v = _mm256_loadu_si256(row.as_ptr().add(32 * blk).cast());
                    *d = _mm256_xor_si256(v, vflip);
                    // Sums of 8 bytes in each u64 lane.
                    acc[i] = _mm256_add_epi64(acc[i], _mm256_sad_epu8(*d, zero));
                }
            }
        }
        // 8 x 8 dword transpose: row pairs, then quads, then 128-bit halves.
        let t0 = _mm256_unpacklo_epi32(r[0], r[1]); // rows 0, 1: g0 g1 | g4 g5
        let t1 = _mm256_unpackhi_epi32(r[0], r[1]); // g2 g3 | g6 g7
        let t2 = _mm256_unpacklo_epi32(r[2], r[3]);
        let t3 = _mm256_unpackhi_epi32(r[2], r[3]);
        let t4 = _mm256_unpacklo_epi32(r[4], r[5]);
        let t5 = _mm256_unpackhi_epi32(r[4], r[5]);
        let t6 = _mm256_unpacklo_epi32(r[6], r[7]);
        let t7 = _mm256_unpackhi_epi32(r[6], r[7]);
        let u0 = _mm256_unpacklo_epi64(t0, t2); // rows 0-3: g0 | g4
        let u1 = _mm256_unpackhi_epi64(t0, t2); // g1 | g5
        let u2 = _mm256_unpacklo_epi64(t1, t3); // g2 | g6
        let u3 = _mm256_unpackhi_epi64(t1, t3); // g3 | g7
        let u4 = _mm256_unpacklo_epi64(t4, t6); // rows 4-7
        let u5 = _mm256_unpackhi_epi64(t4, t6);
        let u6 = _mm256_unpacklo_epi64(t5, t7);
        let u7 = _mm256_unpackhi_epi64(t5, t7);
        let g = [
            _mm256_permute2x128_si256::<0x20>(u0, u4),
            _mm256_permute2x128_si256::<0x20>(u1, u5),
            _mm256_permute2x128_si256::<0x20>(u2, u6),
            _mm256_permute2x128_si256::<0x20>(u3, u7),
            _mm256_permute2x128_si256::<0x31>(u0, u4),
            _mm256_permute2x128_si256::<0x31>(u1, u5),
            _mm256_permute2x128_si256::<0x31>(u2, u6),
            _mm256_permute2x128_si256::<0x31>(u3, u7),
        ];
        for (q, v) in g.iter().enumerate() {
            // SAFETY: group 8 blk + q: `4 * h` bytes at `4 * stride * (8 blk + q)`, in `out`
            // (caller); a partial store writes lanes `< h` only.
            unsafe {
                let p = out.add(4 * stride * (8 * blk + q));
                if h == 8 {
                    _mm256_storeu_si256(p.cast(), *v);
                } else {
                    _mm256_maskstore_epi32(p.cast(), mask, *v);
                }
            }
        }
    }
    if !I16 {
        for (s, v) in sums.iter_mut().zip(acc) {
            let mut lanes = [0u64; 4];
            // SAFETY: 32 bytes into a 32-byte array.
            unsafe { _mm256_storeu_si256(lanes.as_mut_ptr().cast(), v) };
            *s = s.wrapping_add(lanes.iter().sum::<u64>() as i32);
        }
    }
}

//! The blocked driver of [`super::gemm_rows`]: loops over row blocks of A (packed per block
//! and depth block), B's packed micro-panels and A's micro-panels, calling the kernel's tile
//! function on each register tile.

use super::pack::{self, AMode, AlignedBytes};
use super::{requant, ByteC, Int8Kernel, IntA, IntC, PackedB, Requant};
use std::ops::Range;

/// Most rows of A packed per block, over all kernels (`Geometry::mc`).
pub(super) const MAX_MC: usize = 192;

/// Where the product goes.
pub(super) enum Dest<'a> {
    /// The i32 sums, into C.
    Sums(IntC<'a>),
    /// Requantized bytes, into C. A product of several depth blocks keeps its partial sums
    /// in a row block of sums; after a tile's last depth block the AVX-512 VNNI kernel
    /// requantizes it in registers, and the other kernels store it (to a scratch tile, or
    /// that row block) and [`requant::tile`] turns it into bytes.
    Requant(ByteC<'a>, &'a Requant<'a>),
}

/// i32 of the scratch tile a requantized product's tiles are stored to before their
/// requantization (at least `mr * nr` of every kernel: 8 x 48).
const SCRATCH_TILE: usize = 8 * 48;

/// The scratch tile, on a cache line: its rows (`nr` i32, a multiple of 8) then start on a
/// vector boundary, and no vector store of the kernel or load of the requantization
/// straddles two lines.
#[repr(C, align(64))]
struct ScratchTile([i32; SCRATCH_TILE]);

/// One register tile's work for a kernel (pointers into packed buffers and C).
pub(super) struct Tile {
    /// k groups in this depth block.
    pub groups: usize,
    /// A micro-panel: `groups` x `mr` lanes; or, when `lda` is not 0, A itself: row `i`'s
    /// lanes at `a + i * lda`, one after another.
    pub a: *const u8,
    /// 0 for a packed micro-panel, else A's row stride (read in place).
    pub lda: usize,
    /// B micro-panel: `groups` x (`nv` vectors) lanes.
    pub b: *const u8,
    /// Tile's top-left element of C, and C's row stride.
    pub c: *mut i32,
    pub ldc: usize,
    /// Columns to store (<= the micro-panel width).
    pub nr: usize,
    /// First depth block: C is overwritten (else accumulated into).
    pub first: bool,
    /// VNNI only, or null: per-column values added (on the first depth block only).
    pub colterm: *const i32,
    /// VNNI only, or null: per-row values added (`-Σa * zb` for a uniform zero point).
    pub rowadd: *const i32,
    /// VNNI only, or null (both): `rowsum[i] * zb[j]` is subtracted (per-column zero points).
    pub rowsum: *const i32,
    pub zb: *const i32,
    /// AVX-512 VNNI only, or null: the tile's sums are final (its last depth block) and go
    /// to bytes, requantized in registers ([`TileRequant`]); C is read (after the first depth
    /// block: whole vectors) but not written.
    pub rq: *const TileRequant,
}

/// Where and how a tile with [`Tile::rq`] stores its requantized bytes.
pub(super) struct TileRequant {
    /// The tile's top-left byte, and the row stride.
    pub out: *mut u8,
    pub ldo: usize,
    /// The tables from the tile's first column (read masked to the tile's columns).
    pub bias: *const i32,
    pub mult: *const f32,
    pub zp: i32,
    pub lo: f32,
    pub hi: f32,
}

/// A kernel's tile function: computes `t` with `mr` rows and `nv` vectors of columns;
/// returns false for a shape it has no instance for.
type TileFn = unsafe fn(t: &Tile, mr: usize, nv: usize) -> bool;

fn tile_fn(kind: Int8Kernel) -> TileFn {
    match kind {
        #[cfg(target_arch = "x86_64")]
        Int8Kernel::Avx512Vnni => super::x86::tile_avx512vnni,
        #[cfg(target_arch = "x86_64")]
        Int8Kernel::AvxVnni => super::x86::tile_avxvnni,
        #[cfg(target_arch = "x86_64")]
        Int8Kernel::Avx2 => super::x86::tile_avx2,
        _ => super::portable::tile_portable,
    }
}

/// The blocked product for rows `rows` (non-empty) and columns `cols` (non-empty, from a
/// micro-panel's first column to one's first column or `n`), `k > 0`.
///
/// # Safety
/// As [`super::gemm_rows`], with A, C and `rows` checked and the kernel available.
pub(super) unsafe fn drive(
    a: &IntA<'_>,
    rows: Range<usize>,
    cols: Range<usize>,
    p: &PackedB,
    dest: Dest<'_>,
) -> Result<(), String> {
    let g = p.kind.geometry();
    let group = g.group();
    let k = p.k;
    let kc = p.kc;
    let mc_max = g.mc.min(MAX_MC).min(rows.len());

    // Per row of the block: sums of packed A (VNNI), and `-Σa * zb` for a uniform zb.
    let mut rowsum = [0i32; MAX_MC];
    let mut rowadd = [0i32; MAX_MC];
    // VNNI: the shifted A zero point (i8 A is packed as A + 128), and the per-column term
    // `za * (k * zb - Σb)` it contributes; none when it is zero.
    let za = if a.signed { a.zp + 128 } else { a.zp };
    let colterm = if g.vnni && za != 0 {
        let mut v = super::try_zeros(p.width, "column terms")?;
        for (t, &s) in v.iter_mut().zip(&p.kzb_minus_sum) {
            *t = za.wrapping_mul(s);
        }
        v
    } else {
        Vec::new()
    };
    // u8 A with B's zero point 0 and whole groups needs neither the sign flip nor row sums
    // nor a zero-padded tail: the AVX-512 VNNI kernel reads it in place, and the packing pass
    // (a fifth of a quantized ResNet-50's time, measured) is skipped.
    let in_place = p.kind.reads_a_in_place()
        && !a.signed
        && p.zb_uniform == Some(0)
        && k.is_multiple_of(group)
        && kc.is_multiple_of(group);
    let a_size = if in_place {
        0
    } else {
        mc_max * kc.div_ceil(group) * 4
    };
    let mut a_buf = AlignedBytes::zeroed(a_size, "packed A")?;
    let a_mode = if g.vnni {
        AMode::Vnni {
            flip: if a.signed { 0x80 } else { 0 },
        }
    } else {
        // Checked to be in -128..=255.
        AMode::I16 {
            signed: a.signed,
            zp: a.zp as i16,
        }
    };
    let tile = tile_fn(p.kind);
    // Requantized: the sums of a product of several depth blocks wait for their last block in
    // a row block of sums (`mc x width`: rows padded as B's panels are, so that the AVX-512
    // kernel reads them back as whole vectors); those of one depth block need none.
    let requant = matches!(dest, Dest::Requant(..));
    let sums_len = if requant && k > kc {
        mc_max * p.width
    } else {
        0
    };
    // Aligned as the scratch tile is (rows of `width`, a multiple of 16 i32).
    let mut block_sums = AlignedBytes::zeroed(4 * sums_len, "a row block of sums")?;
    // The AVX-512 VNNI kernel requantizes in registers, and stores 16-byte masked vectors
    // (VL: every CPU with AVX-512 VNNI has it, checked anyway); the other kernels' tiles are
    // requantized from the sums they store.
    #[cfg(target_arch = "x86_64")]
    let avx512 =
        p.kind == Int8Kernel::Avx512Vnni && std::arch::is_x86_feature_detected!("avx512vl");
    #[cfg(not(target_arch = "x86_64"))]
    let avx512 = false;
    // Only where a kernel stores a single depth block's sums to requantize them (not on the
    // i32 path, nor for the in-register kernel, whose C is then not touched).
    let mut scratch = if requant && sums_len == 0 && !avx512 {
        Some(ScratchTile([0; SCRATCH_TILE]))
    } else {
        None
    };
    if scratch.is_some() && g.mr * g.nr > SCRATCH_TILE {
        return Err(format!(
            "int8 gemm: internal error: {:?} tiles exceed the scratch tile",
            p.kind
        ));
    }
    let null = std::ptr::null::<i32>();
    let mut ic = rows.start;
    while ic < rows.end {
        let mc = mc_max.min(rows.end - ic);
        for pc in (0..k).step_by(kc) {
            let kcb = kc.min(k - pc);
            let groups = kcb.div_ceil(group);
            let src = pack::ABlock {
                a: a.a,
                lda: a.lda,
                rows: ic..ic + mc,
                pc,
                kc: kcb,
                mr: g.mr,
            };
            if !in_place {
                pack::pack_a(&src, a_mode, a_buf.bytes_mut(), &mut rowsum[..mc]);
            }
            if let (true, Some(zb)) = (g.vnni, p.zb_uniform) {
                for (r, &s) in rowadd.iter_mut().zip(&rowsum).take(mc) {
                    *r = s.wrapping_mul(zb).wrapping_neg();
                }
            }
            // Where block `pc` of B starts (earlier blocks are all `kc` deep).
            let b_block = pc / group * p.width * 4;
            for j0 in cols.clone().step_by(g.nr) {
                let nr = g.nr.min(cols.end - j0);
                let nv = nr.div_ceil(g.lanes);
                let b_panel = p.data.ptr().wrapping_add(b_block + j0 * groups * 4);
                // The layout's invariants, checked once per micro-panel (cheap): the kernel
                // reads `groups x nv * lanes` lanes of B and `nv * lanes` table columns.
                let cols = nv * g.lanes;
                if b_block + (j0 + cols) * groups * 4 > p.data.len()
                    || j0 + cols > p.width
                    || (g.vnni && p.zb.len() < j0 + cols)
                    || mc.div_ceil(g.mr) * g.mr > MAX_MC
                    || (!in_place && mc * groups * 4 > a_buf.len())
                {
                    return Err(format!(
                        "int8 gemm: internal error: bad layout for {:?}",
                        p.kind
                    ));
                }
                let colterm = if pc == 0 && !colterm.is_empty() {
                    colterm[j0..].as_ptr()
                } else {
                    null
                };
                for r0 in (0..mc).step_by(g.mr) {
                    let mr = g.mr.min(mc - r0);
                    let (rowadd, rowsum, zb) = match (g.vnni, p.zb_uniform) {
                        (false, _) | (true, Some(0)) => (null, null, null),
                        (true, Some(_)) => (rowadd[r0..].as_ptr(), null, null),
                        (true, None) => (null, rowsum[r0..].as_ptr(), p.zb[j0..].as_ptr()),
                    };
                    let (a_ptr, lda) = if in_place {
                        // Rows ic + r0 .. + mr, depth pc .. pc + kcb: inside A (checked by
                        // the caller for all m rows and k columns).
                        (a.a.as_ptr().wrapping_add((ic + r0) * a.lda + pc), a.lda)
                    } else {
                        (a_buf.ptr().wrapping_add(r0 * groups * 4), 0)
                    };
                    // Where the tile's sums go: C, the row block of sums, or the scratch.
                    let (c_ptr, ldc) = match &dest {
                        // SAFETY: (ic + r0, j0) lies in C (rows < m and j0 < n, checked).
                        Dest::Sums(c) => (unsafe { c.ptr.add((ic + r0) * c.ldc + j0) }, c.ldc),
                        Dest::Requant(..) if sums_len == 0 => (
                            scratch
                                .as_mut()
                                .map_or(std::ptr::null_mut(), |s| s.0.as_mut_ptr()),
                            g.nr,
                        ),
                        // SAFETY: (r0, j0) lies in the `mc_max x width` row block of i32
                        // (r0 < mc, j0 < n <= width; 64-byte aligned).
                        Dest::Requant(..) => (
                            unsafe {
                                block_sums
                                    .bytes_mut()
                                    .as_mut_ptr()
                                    .cast::<i32>()
                                    .add(r0 * p.width + j0)
                            },
                            p.width,
                        ),
                    };
                    // The AVX-512 kernel requantizes the tile's final sums in registers,
                    // as MLAS's symmetric convolution kernels do: stored and requantized
                    // from L1 afterwards (a pass over 16 columns at a time), its 1x1 layers
                    // of 16-32 channels spent more time there than in the multiply-adds.
                    let last = pc + kcb == k;
                    let in_registers = match (&dest, last && avx512) {
                        (Dest::Requant(out, rq), true) => Some(TileRequant {
                            // SAFETY: (ic + r0, j0) lies in C's checked rows.
                            out: unsafe { out.ptr.add((ic + r0) * out.ldc + j0) },
                            ldo: out.ldc,
                            bias: rq.bias[j0..].as_ptr(),
                            mult: rq.mult[j0..].as_ptr(),
                            zp: rq.zp,
                            lo: rq.lo,
                            hi: rq.hi,
                        }),
                        _ => None,
                    };
                    let t = Tile {
                        rq: in_registers
                            .as_ref()
                            .map_or(std::ptr::null(), |r| r as *const TileRequant),
                        groups,
                        a: a_ptr,
                        lda,
                        b: b_panel,
                        c: c_ptr,
                        ldc,
                        nr,
                        first: pc == 0,
                        colterm,
                        rowadd,
                        rowsum,
                        zb,
                    };
                    // SAFETY: the A micro-panel holds `groups x mr` lanes and the B one
                    // `groups x nv * lanes` (packed above, and by `pack_b_with` for this
                    // kernel and `kc`); the row tables hold `mr` rows from `r0` and the
                    // column ones `width - j0 >= nv * lanes` columns; the `mr x nr` tile of C
                    // lies in C and in this call's rows; the kernel is available (checked).
                    if !unsafe { tile(&t, mr, nv) } {
                        return Err(format!(
                            "int8 gemm: internal error: no {mr} x {nv} tile for {:?}",
                            p.kind
                        ));
                    }
                    if let (Dest::Requant(out, rq), true, None) = (&dest, last, &in_registers) {
                        // SAFETY: the tile's `mr x nr` sums are final at `c_ptr` (`ldc`
                        // apart); its bytes (ic + r0.., j0..) lie in C's checked rows, which
                        // this call has to itself; j0 + nr <= n, the tables' length
                        // (checked by the caller).
                        unsafe {
                            requant::tile(
                                c_ptr,
                                ldc,
                                mr,
                                nr,
                                out.ptr.add((ic + r0) * out.ldc + j0),
                                out.ldc,
                                rq,
                                j0,
                            )
                        };
                    }
                }
            }
        }
        ic += mc;
    }
    Ok(())
}

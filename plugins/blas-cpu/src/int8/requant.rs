//! The requantizing output stage of [`super::gemm_block_requant`]: a register tile's final i32
//! sums, just stored to L1 by the kernel, turned into bytes. Fused here rather than run by the
//! operator over an i32 C afterwards: MobileNetV2's 1x1 layers (16-32 input channels) spent
//! more time storing, reloading (from L2) and requantizing their sums than multiplying them.
//! Every form computes `opreg_sdk::numeric::requant_byte`, bit for bit.

use super::Requant;
use opreg_sdk::numeric::requant_byte;

/// One row: `out[j] = requant_byte(src[j] + bias[j], mult[j], ..)` for the columns of `out`.
pub(super) fn row(src: &[i32], rq: &Requant<'_>, out: &mut [u8]) {
    for (((o, &s), &b), &m) in out.iter_mut().zip(src).zip(rq.bias).zip(rq.mult) {
        *o = requant_byte(s.wrapping_add(b), m, rq.zp, rq.lo, rq.hi);
    }
}

/// The `mr x nr` tile of sums at `src` (row stride `lds`) requantized into the tile at `dst`
/// (row stride `ldd`), columns `j0..j0 + nr` of `rq`'s tables: for the kernels that do not
/// requantize in registers (all but AVX-512 VNNI's, which uses [`requant_avx512`]).
///
/// # Safety
/// `src` holds `mr` rows of `nr` sums `lds` apart, `dst` `mr` writable rows of `nr` bytes
/// `ldd` apart that nothing else accesses during the call; `j0 + nr <= n` (the tables'
/// length).
#[allow(clippy::too_many_arguments)]
pub(super) unsafe fn tile(
    src: *const i32,
    lds: usize,
    mr: usize,
    nr: usize,
    dst: *mut u8,
    ldd: usize,
    rq: &Requant<'_>,
    j0: usize,
) {
    let tables = Requant {
        bias: &rq.bias[j0..j0 + nr],
        mult: &rq.mult[j0..j0 + nr],
        ..*rq
    };
    for i in 0..mr {
        // SAFETY: rows i < mr of both tiles, `nr` elements each (caller).
        let (s, d) = unsafe {
            (
                std::slice::from_raw_parts(src.add(i * lds), nr),
                std::slice::from_raw_parts_mut(dst.add(i * ldd), nr),
            )
        };
        row(s, &tables, d);
    }
}

/// 16 final sums (bias included) requantized, each result in its lane's low byte:
/// `requant_byte` lane by lane. `_mm512_max_ps(p, lo)` is its `if p > lo { p } else { lo }`
/// (for a NaN or an equal `p`, `vmaxps` returns its second operand, `lo`),
/// `_mm512_min_ps(p, hi)` its upper clamp; a narrowing of each lane to its low byte
/// (`vpmovdb`) is `to_bits() as u8`. `magic` is `1.5 * 2^23 + zp`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
#[inline]
pub(super) fn requant_avx512(
    sums: std::arch::x86_64::__m512i,
    mult: std::arch::x86_64::__m512,
    lo: std::arch::x86_64::__m512,
    hi: std::arch::x86_64::__m512,
    magic: std::arch::x86_64::__m512,
) -> std::arch::x86_64::__m512i {
    use std::arch::x86_64::*;
    let p = _mm512_mul_ps(_mm512_cvtepi32_ps(sums), mult);
    let p = _mm512_min_ps(_mm512_max_ps(p, lo), hi);
    _mm512_castps_si512(_mm512_add_ps(p, magic))
}

//! SIMD helpers that several plugins' kernels need (x86-64 only).

#[cfg(target_arch = "x86_64")]
pub use x86::transpose16;

#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::x86_64::*;

    /// The 16x16 matrix `r` (a row per register) transposed (AVX-512F shuffles only).
    /// Inlined: called out of line, the registers went through memory.
    ///
    /// # Safety
    /// The CPU has AVX-512F (callers compiled for it may call it safely).
    #[target_feature(enable = "avx512f")]
    #[inline]
    pub fn transpose16(r: [__m512; 16]) -> [__m512; 16] {
        let mut t = [_mm512_setzero_ps(); 16];
        for i in 0..8 {
            t[2 * i] = _mm512_unpacklo_ps(r[2 * i], r[2 * i + 1]);
            t[2 * i + 1] = _mm512_unpackhi_ps(r[2 * i], r[2 * i + 1]);
        }
        // u[4g + k]: in each 128-bit lane l, column 4l + k of rows 4g..4g + 4.
        let mut u = [_mm512_setzero_ps(); 16];
        for g in 0..4 {
            let d = |i: usize| _mm512_castps_pd(t[4 * g + i]);
            u[4 * g] = _mm512_castpd_ps(_mm512_unpacklo_pd(d(0), d(2)));
            u[4 * g + 1] = _mm512_castpd_ps(_mm512_unpackhi_pd(d(0), d(2)));
            u[4 * g + 2] = _mm512_castpd_ps(_mm512_unpacklo_pd(d(1), d(3)));
            u[4 * g + 3] = _mm512_castpd_ps(_mm512_unpackhi_pd(d(1), d(3)));
        }
        let mut v = [_mm512_setzero_ps(); 16];
        for h in 0..2 {
            for k in 0..4 {
                let (a, b) = (u[8 * h + k], u[8 * h + 4 + k]);
                v[8 * h + k] = _mm512_shuffle_f32x4::<0x88>(a, b);
                v[8 * h + 4 + k] = _mm512_shuffle_f32x4::<0xdd>(a, b);
            }
        }
        let mut out = [_mm512_setzero_ps(); 16];
        for k in 0..8 {
            out[k] = _mm512_shuffle_f32x4::<0x88>(v[k], v[8 + k]);
            out[8 + k] = _mm512_shuffle_f32x4::<0xdd>(v[k], v[8 + k]);
        }
        out
    }
}

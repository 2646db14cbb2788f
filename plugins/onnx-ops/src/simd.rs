//! Loops the plugin's baseline (x86-64 with SSE2) vectorizes only narrowly, compiled again for
//! AVX-512 (F, BW, VL) and for AVX2 (with FMA) and picked at run time ([`simd_fn!`]): the requantizing
//! epilogues and the per-tensor (de)quantization of the integer operators, where AVX-512
//! narrows wide lanes to bytes in one instruction.

use crate::util::{round_even_narrow_f32, round_saturate_byte};

/// Whether this CPU has AVX-512 F, BW and VL.
#[cfg(target_arch = "x86_64")]
pub(crate) fn has_avx512() -> bool {
    std::arch::is_x86_feature_detected!("avx512f")
        && std::arch::is_x86_feature_detected!("avx512bw")
        && std::arch::is_x86_feature_detected!("avx512vl")
}

/// No AVX-512 off x86-64 (so that callers need no `cfg` of their own).
#[cfg(not(target_arch = "x86_64"))]
pub(crate) fn has_avx512() -> bool {
    false
}

/// Whether this CPU has AVX2 and FMA (every x86-64 of the last decade; the AVX2 kernels'
/// baseline where AVX-512 is missing).
#[cfg(target_arch = "x86_64")]
pub(crate) fn has_avx2_fma() -> bool {
    std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma")
}

/// No AVX2 off x86-64.
#[cfg(not(target_arch = "x86_64"))]
pub(crate) fn has_avx2_fma() -> bool {
    false
}

/// `fn name(args) { body }` whose body (safe code) is compiled three times: for AVX-512, for
/// AVX2 with FMA and for the baseline (where `mul_add` is a library call); each call runs the best copy this CPU has (the features are
/// detected once and cached by std). The function may be generic over one type
/// (`fn name<T: Bound>(...)`, each instantiation compiled three times) and return a value.
macro_rules! simd_fn {
    ($(#[$m:meta])* $vis:vis fn $name:ident $(<$T:ident: $bound:path>)? ($($arg:ident: $ty:ty),* $(,)?) $(-> $ret:ty)? $body:block) => {
        $(#[$m])*
        $vis fn $name $(<$T: $bound>)? ($($arg: $ty),*) $(-> $ret)? {
            #[inline(always)]
            fn body $(<$T: $bound>)? ($($arg: $ty),*) $(-> $ret)? $body
            #[cfg(target_arch = "x86_64")]
            {
                #[target_feature(enable = "avx512f,avx512bw,avx512vl")]
                unsafe fn avx512 $(<$T: $bound>)? ($($arg: $ty),*) $(-> $ret)? {
                    body $(::<$T>)? ($($arg),*)
                }
                #[target_feature(enable = "avx2,fma")]
                unsafe fn avx2 $(<$T: $bound>)? ($($arg: $ty),*) $(-> $ret)? {
                    body $(::<$T>)? ($($arg),*)
                }
                if $crate::simd::has_avx512() {
                    // SAFETY: the CPU has these features (checked); the body is safe code.
                    return unsafe { avx512 $(::<$T>)? ($($arg),*) };
                }
                if std::arch::is_x86_feature_detected!("avx2")
                    && std::arch::is_x86_feature_detected!("fma")
                {
                    // SAFETY: the CPU has AVX2 and FMA (checked); the body is safe code.
                    return unsafe { avx2 $(::<$T>)? ($($arg),*) };
                }
            }
            body $(::<$T>)? ($($arg),*)
        }
    };
}
pub(crate) use simd_fn;

/// QLinearConv's requantization of one sum (the SDK's, shared with the BLAS backend's fused
/// requantizing output stage so that both give the same bytes).
pub(crate) use opreg_sdk::numeric::requant_byte;

/// `out[i] = requant_byte(src[i] + bias[i], mult[i], zp, lo, hi)` over one run of channels,
/// in fixed blocks of 16 (one AVX-512 vector each, whatever the run's length: a generic loop
/// vectorized 64 wide would leave a 16-channel layer to its scalar remainder). A run that is
/// not a multiple of 16 ends with a block overlapping the one before (24 = 0..16, 8..24):
/// the overlap is computed twice, to the same bytes.
#[inline(always)]
fn requant_run(src: &[i32], bias: &[i32], mult: &[f32], zp: i32, lo: f32, hi: f32, out: &mut [u8]) {
    const V: usize = 16;
    let n = out.len().min(src.len()).min(bias.len()).min(mult.len());
    if n < V {
        for i in 0..n {
            out[i] = requant_byte(src[i].wrapping_add(bias[i]), mult[i], zp, lo, hi);
        }
        return;
    }
    let mut i = 0;
    while i < n {
        let j = i.min(n - V);
        let (Some(s), Some(b), Some(m), Some(o)) = (
            src[j..].first_chunk::<V>(),
            bias[j..].first_chunk::<V>(),
            mult[j..].first_chunk::<V>(),
            out[j..].first_chunk_mut::<V>(),
        ) else {
            return;
        };
        for k in 0..V {
            o[k] = requant_byte(s[k].wrapping_add(b[k]), m[k], zp, lo, hi);
        }
        i += V;
    }
}

simd_fn! {
    /// `out[i] = requant_byte(src[i] + bias[i % m], mult[i % m], zp, lo, hi)` (the sum
    /// wrapping as i32; `m = bias.len()`): the requantizing epilogue of the integer
    /// convolution over a block of positions, each a run of `m` output channels
    /// (position-major in `src` and `out`; one position is a block of one). One call per block
    /// rather than per position: the call and its feature check cost as much as 16 channels'
    /// requantization.
    pub fn requantize_rows(
        src: &[i32],
        bias: &[i32],
        mult: &[f32],
        zp: i32,
        bounds: (f32, f32),
        out: &mut [u8],
    ) {
        let m = bias.len().min(mult.len());
        if m == 0 {
            return;
        }
        for (s, o) in src.chunks_exact(m).zip(out.chunks_exact_mut(m)) {
            requant_run(s, bias, mult, zp, bounds.0, bounds.1, o);
        }
    }
}

simd_fn! {
    /// [`requantize_rows`] for one channel's run: one multiplier, the bias already in `src`.
    pub fn requantize_channel(src: &[i32], mult: f32, zp: i32, lo: f32, hi: f32, out: &mut [u8]) {
        for (o, &v) in out.iter_mut().zip(src) {
            *o = requant_byte(v, mult, zp, lo, hi);
        }
    }
}

simd_fn! {
    /// `out[i] = round_saturate_byte(round(xs[i] / s) + z, lo, hi)`, the quotient rounded in
    /// f32 (QuantizeLinear's per-tensor loop).
    pub fn quantize(xs: &[f32], s: f32, z: f64, lo: f64, hi: f64, out: &mut [u8]) {
        if z.abs() <= 256.0 && z.fract() == 0.0 && lo.abs() <= 256.0 && hi.abs() <= 256.0 {
            // An integral zero point and byte bounds: the rounded quotient (within 2^22) plus
            // the zero point is exact in f32, so the steps stay in f32 (16 lanes, not 8):
            // the same bytes, NaN to 0 as `round_saturate_byte`.
            const MAGIC: f32 = 12_582_912.0; // 1.5 * 2^23
            let (z, lo, hi) = (z as f32, lo as f32, hi as f32);
            for (o, &v) in out.iter_mut().zip(xs) {
                let q = round_even_narrow_f32(v / s) + z;
                let q = if q.is_nan() { 0.0 } else { q };
                let q = if q > lo { q } else { lo };
                let q = if q < hi { q } else { hi };
                *o = (q + MAGIC).to_bits() as u8;
            }
            return;
        }
        for (o, &v) in out.iter_mut().zip(xs) {
            let q = f64::from(round_even_narrow_f32(v / s));
            *o = round_saturate_byte(q + z, lo, hi);
        }
    }
}

/// `out[i] = (xs[i] - z) * s` (DequantizeLinear's per-tensor loop), for the 8-bit types.
pub trait Dequantize: Sized {
    fn dequantize(xs: &[Self], s: f32, z: f32, out: &mut [f32]);
}

#[inline(always)]
fn dequantize_body<T: Copy + Into<f32>>(xs: &[T], s: f32, z: f32, out: &mut [f32]) {
    for (o, &v) in out.iter_mut().zip(xs) {
        *o = (v.into() - z) * s;
    }
}

simd_fn! {
    fn dequantize_u8(xs: &[u8], s: f32, z: f32, out: &mut [f32]) {
        dequantize_body(xs, s, z, out)
    }
}

simd_fn! {
    fn dequantize_i8(xs: &[i8], s: f32, z: f32, out: &mut [f32]) {
        dequantize_body(xs, s, z, out)
    }
}

impl Dequantize for u8 {
    fn dequantize(xs: &[u8], s: f32, z: f32, out: &mut [f32]) {
        dequantize_u8(xs, s, z, out)
    }
}

impl Dequantize for i8 {
    fn dequantize(xs: &[i8], s: f32, z: f32, out: &mut [f32]) {
        dequantize_i8(xs, s, z, out)
    }
}

/// QLinearAdd's loop for one 8-bit type (`SIGNED`: i8), each operand's and the output's
/// `[scale, zero point]` given: `out[i] = saturate(round_even(x * ra + (y * rb + fixed)))`
/// with `ra = sa / sc`, `rb = sb / sc` and `fixed = zc - (ra * za + rb * zb)`, two fused
/// multiply-adds in f32.
///
/// This is ONNX Runtime's arithmetic (MLAS `MlasQLinearAddKernel`; the operator is its own).
/// The unfused graph's steps (`(x - za) * sa + (y - zb) * sb`, divided by `sc`) gave the same
/// bytes but for rare ties and took three times as long: `vdivps` bound the loop (ResNet-50's
/// 56x56x256 join 0.15 ms against ONNX Runtime's 0.05). A NaN (a zero or infinite scale)
/// gives the type's minimum, as MLAS's conversion and saturating packs do.
#[inline(always)]
fn qlinear_add_body<const SIGNED: bool>(
    xs: &[u8],
    ys: &[u8],
    a: [f32; 2],
    b: [f32; 2],
    c: [f32; 2],
    out: &mut [u8],
) {
    let value = |v: u8| {
        if SIGNED {
            f32::from(v as i8)
        } else {
            f32::from(v)
        }
    };
    let (lo, hi): (f32, f32) = if SIGNED {
        (-128.0, 127.0)
    } else {
        (0.0, 255.0)
    };
    let (ra, rb) = (a[0] / c[0], b[0] / c[0]);
    let fixed = c[1] - (ra * a[1] + rb * b[1]);
    // 1.5 * 2^23: the clamped value plus this is rounded once, half to even, to an f32 whose
    // low mantissa bits hold it in two's complement.
    const MAGIC: f32 = 12_582_912.0;
    for ((o, &x), &y) in out.iter_mut().zip(xs).zip(ys) {
        let v = value(x).mul_add(ra, value(y).mul_add(rb, fixed));
        let v = if v > lo { v } else { lo };
        let v = if v < hi { v } else { hi };
        *o = (v + MAGIC).to_bits() as u8;
    }
}

simd_fn! {
    /// [`qlinear_add_body`] for bytes of one 8-bit type (`signed`: i8).
    pub fn qlinear_add(
        xs: &[u8],
        ys: &[u8],
        signed: bool,
        a: [f32; 2],
        b: [f32; 2],
        c: [f32; 2],
        out: &mut [u8],
    ) {
        if signed {
            qlinear_add_body::<true>(xs, ys, a, b, c, out)
        } else {
            qlinear_add_body::<false>(xs, ys, a, b, c, out)
        }
    }
}

/// `e^x` in 16 lanes: [`exp32`](opreg_sdk::numeric::exp32)'s range reduction and polynomial
/// with fused multiply-adds, and the power of two applied by `vscalefps` (one rounding, as
/// `exp32`'s two exact products and a last one). About 15 instructions per vector where the
/// scalar function, compiled in a loop, took twice as many (its clamp, separate products and
/// sums, the powers of two built in integer lanes): `Exp` over 64 Ki values ran at 2.6x ONNX
/// Runtime's vectorized one, a row Softmax (8x12x128x128) at 2.8x. Within 2 ulp, as
/// `exp32`; the values may differ from it by an ulp (the fused roundings), as ONNX Runtime's
/// differ between its kernels. Saturates as `exp32`: +inf past 88.7, 0 below -104; NaN stays.
///
/// # Safety
/// The CPU has AVX-512 F.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
#[inline]
pub(crate) unsafe fn exp32_avx512(x: std::arch::x86_64::__m512) -> std::arch::x86_64::__m512 {
    use opreg_sdk::numeric::exp32_parts::{HIGHEST, LN2_HI, LN2_LO, LOWEST, P};
    use std::arch::x86_64::*;
    const SHIFT: f32 = 12_582_912.0;
    // `clamp`, keeping a NaN: `max(a, b)` is `a > b ? a : b`, so a NaN `x` in the second
    // operand comes through both.
    let x = _mm512_min_ps(
        _mm512_set1_ps(HIGHEST),
        _mm512_max_ps(_mm512_set1_ps(LOWEST), x),
    );
    let shift = _mm512_set1_ps(SHIFT);
    // n = round(x / ln 2) through the shift, r = x - n ln 2 in two parts.
    let n = _mm512_sub_ps(
        _mm512_fmadd_ps(x, _mm512_set1_ps(std::f32::consts::LOG2_E), shift),
        shift,
    );
    let r = _mm512_fnmadd_ps(n, _mm512_set1_ps(LN2_HI), x);
    let r = _mm512_fnmadd_ps(n, _mm512_set1_ps(LN2_LO), r);
    let mut p = _mm512_set1_ps(P[0]);
    for c in &P[1..] {
        p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(*c));
    }
    // p r^2 + r + 1, then times 2^n (n in [-150, 128]: 0 or +inf at the ends).
    let y = _mm512_add_ps(
        _mm512_fmadd_ps(_mm512_mul_ps(p, r), r, r),
        _mm512_set1_ps(1.0),
    );
    _mm512_scalef_ps(y, n)
}

/// `y[i] = f(x[i])` over the shorter of the two, 16 lanes at a time, the last vector masked
/// (its lanes past the end read as 0 and not stored).
///
/// # Safety
/// The CPU has AVX-512 F.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
#[inline]
unsafe fn each_avx512(
    x: &[f32],
    y: &mut [f32],
    f: impl Fn(std::arch::x86_64::__m512) -> std::arch::x86_64::__m512,
) {
    use std::arch::x86_64::*;
    let n = x.len().min(y.len());
    let mut i = 0;
    while i < n {
        let mask = lanes_mask(n - i);
        // SAFETY: masked to the `n - i` elements left in both slices.
        unsafe {
            let v = _mm512_maskz_loadu_ps(mask, x.as_ptr().add(i));
            _mm512_mask_storeu_ps(y.as_mut_ptr().add(i), mask, f(v));
        }
        i += 16;
    }
}

/// `y[i] = exp32(x[i])` ([`exp32_avx512`]) over the shorter of the two.
///
/// # Safety
/// The CPU has AVX-512 F.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
pub(crate) unsafe fn exp32_slice_avx512(x: &[f32], y: &mut [f32]) {
    // SAFETY: AVX-512 F (caller); the closure inherits this function's target features.
    let exp = |v| unsafe { exp32_avx512(v) };
    // SAFETY: AVX-512 F (caller).
    unsafe { each_avx512(x, y, exp) }
}

/// `y[i] = sigmoid(x[i])` as [`Real::sigmoid`](opreg_sdk::numeric::Real::sigmoid) computes it
/// (`s = 1 / (1 + e^-|x|)`, and `e^-|x| s` for a negative sign: no overflow either side), the
/// exponential by [`exp32_avx512`]. The loop of `sigmoid` per element ran at 1.5x ONNX
/// Runtime's Sigmoid (a SiLU's, 64 Ki values).
///
/// # Safety
/// The CPU has AVX-512 F.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
pub(crate) unsafe fn sigmoid_slice_avx512(x: &[f32], y: &mut [f32]) {
    use std::arch::x86_64::*;
    let sign = _mm512_set1_epi32(i32::MIN);
    let one = _mm512_set1_ps(1.0);
    let sigmoid = |v: __m512| {
        // -|v|: the sign bit set.
        let neg = _mm512_castsi512_ps(_mm512_or_si512(_mm512_castps_si512(v), sign));
        // SAFETY: AVX-512 F (caller).
        let e = unsafe { exp32_avx512(neg) };
        let s = _mm512_div_ps(one, _mm512_add_ps(one, e));
        // Lanes whose sign bit is set take e * s.
        let negative = _mm512_test_epi32_mask(_mm512_castps_si512(v), sign);
        _mm512_mask_mul_ps(s, negative, e, s)
    };
    // SAFETY: AVX-512 F (caller).
    unsafe { each_avx512(x, y, sigmoid) }
}

/// `y[i] = tanh(x[i])` as [`tanh32`](opreg_sdk::numeric::tanh32) computes it (its odd
/// polynomial below |x| = 0.625, `1 - 2 / (e^2|x| + 1)` above, the sign put back), with fused
/// multiply-adds and [`exp32_avx512`]: within 2 ulp. The loop of `tanh32` per element ran at
/// 1.04x ONNX Runtime's Tanh (50 chained over 64 Ki values; 0.75x this way).
///
/// # Safety
/// The CPU has AVX-512 F.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
pub(crate) unsafe fn tanh_slice_avx512(x: &[f32], y: &mut [f32]) {
    use opreg_sdk::numeric::{TANH32_SMALL, TANH32_SMALL_BELOW};
    use std::arch::x86_64::*;
    let sign = _mm512_set1_epi32(i32::MIN);
    let (one, two) = (_mm512_set1_ps(1.0), _mm512_set1_ps(2.0));
    let tanh = |x: __m512| {
        let v = _mm512_castps_si512(x);
        let a = _mm512_castsi512_ps(_mm512_andnot_si512(sign, v));
        let z = _mm512_mul_ps(a, a);
        let mut p = _mm512_set1_ps(TANH32_SMALL[0]);
        for c in &TANH32_SMALL[1..] {
            p = _mm512_fmadd_ps(p, z, _mm512_set1_ps(*c));
        }
        let small = _mm512_fmadd_ps(_mm512_mul_ps(p, z), a, a);
        // SAFETY: AVX-512 F (caller).
        let e = unsafe { exp32_avx512(_mm512_mul_ps(two, a)) };
        let large = _mm512_sub_ps(one, _mm512_div_ps(two, _mm512_add_ps(e, one)));
        // Below the switch: the polynomial (a NaN compares false and stays NaN above).
        let below = _mm512_cmp_ps_mask::<_CMP_LT_OQ>(a, _mm512_set1_ps(TANH32_SMALL_BELOW));
        let r = _mm512_mask_blend_ps(below, large, small);
        // x's sign on the (non-negative) result.
        _mm512_castsi512_ps(_mm512_or_si512(
            _mm512_castps_si512(r),
            _mm512_and_si512(v, sign),
        ))
    };
    // SAFETY: AVX-512 F (caller).
    unsafe { each_avx512(x, y, tanh) }
}

/// The mask of the first `min(left, 16)` lanes.
#[cfg(target_arch = "x86_64")]
#[inline]
pub(crate) fn lanes_mask(left: usize) -> u16 {
    if left >= 16 {
        u16::MAX
    } else {
        ((1u32 << left) - 1) as u16
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The vector Tanh and Sigmoid are within a few ulp of the f64 functions over a dense
    /// sweep (Tanh's switch from its polynomial at 0.625 included), keep the sign of zero and
    /// NaN, and saturate as the scalar ones; tails leave the lanes past their end alone.
    #[cfg(target_arch = "x86_64")]
    #[test]
    fn tanh_and_sigmoid_avx512_are_within_a_few_ulp() {
        if !has_avx512() {
            eprintln!("skipped: no AVX-512 on this CPU");
            return;
        }
        let mut xs: Vec<f32> = (-400_000..=400_000).map(|i| i as f32 * 2.5e-4).collect();
        xs.extend((-1000..1000).map(|i| i as f32 * 0.13));
        xs.extend([
            0.625f32.next_down(),
            0.625,
            -0.625,
            1e-30,
            -1e-30,
            1e-40,
            9.0,
            20.0,
        ]);
        xs.extend([
            f32::INFINITY,
            f32::NEG_INFINITY,
            0.0,
            -0.0,
            f32::NAN,
            200.0,
            -200.0,
        ]);
        type Slice = unsafe fn(&[f32], &mut [f32]);
        type Exact = fn(f64) -> f64;
        let cases: [(&str, Slice, Exact, f32); 2] = [
            ("tanh", tanh_slice_avx512, f64::tanh, 3.0),
            (
                "sigmoid",
                sigmoid_slice_avx512,
                |v| 1.0 / (1.0 + (-v).exp()),
                3.0,
            ),
        ];
        for (name, f, exact, ulps) in cases {
            let mut ys = vec![0.0f32; xs.len()];
            // SAFETY: AVX-512 checked above.
            unsafe { f(&xs, &mut ys) };
            for (&x, &y) in xs.iter().zip(&ys) {
                let want = exact(f64::from(x));
                if x.is_nan() {
                    assert!(y.is_nan(), "{name}(NaN) = {y}");
                    continue;
                }
                let w = want as f32;
                let ulp = (w.abs().max(f32::MIN_POSITIVE) * f32::EPSILON).max(1e-45);
                assert!(
                    (f64::from(y) - want).abs() <= f64::from(ulps * ulp),
                    "{name}({x:e}) = {y:e}, want {want:e}"
                );
                if x == 0.0 && name == "tanh" {
                    assert_eq!(y.to_bits(), x.to_bits(), "tanh keeps the zero's sign");
                }
            }
            for len in 0..20 {
                let mut out = [-7.0f32; 24];
                // SAFETY: AVX-512 checked above.
                unsafe { f(&xs[5000..5000 + len], &mut out[..len]) };
                assert!(
                    out[len..].iter().all(|&v| v == -7.0),
                    "{name} wrote past {len}"
                );
                assert_eq!(&out[..len], &ys[5000..5000 + len], "{name} tail of {len}");
            }
        }
    }

    /// The vector exponential is within 2 ulp of e^x over the range where it is neither 0
    /// nor infinite, exact at the special values and past both clamps, and within an ulp of
    /// the scalar `exp32`; slices of every tail length leave the lanes past their end alone.
    #[cfg(target_arch = "x86_64")]
    #[test]
    fn exp32_avx512_is_within_2_ulp_and_saturates_as_exp32() {
        if !has_avx512() {
            eprintln!("skipped: no AVX-512 on this CPU");
            return;
        }
        let mut xs: Vec<f32> = (-2_200_000..=2_000_000)
            .map(|i| i as f32 * 5.1e-5)
            .collect();
        xs.extend([
            f32::NAN,
            -f32::NAN,
            f32::INFINITY,
            f32::NEG_INFINITY,
            0.0,
            -0.0,
            88.72,
            88.73,
            89.0,
            1e30,
            -103.9,
            -104.0,
            -1e30,
            f32::MIN_POSITIVE,
            -f32::MIN_POSITIVE,
        ]);
        let mut ys = vec![0.0f32; xs.len()];
        // SAFETY: AVX-512 checked above.
        unsafe { exp32_slice_avx512(&xs, &mut ys) };
        let mut worst = 0f64;
        for (&x, &y) in xs.iter().zip(&ys) {
            let scalar = opreg_sdk::numeric::exp32(x);
            let want = f64::from(x).exp();
            if x.is_nan() {
                assert!(y.is_nan(), "exp({x}) = {y}");
                continue;
            }
            if want >= f64::from(f32::MIN_POSITIVE) && want < f64::from(f32::MAX) {
                // In ulps of the exact result's binade.
                let ulp = 2f64.powi(want.log2().floor() as i32 - 23);
                worst = worst.max((f64::from(y) - want).abs() / ulp);
                assert!(
                    (f64::from(y) - f64::from(scalar)).abs() <= ulp,
                    "exp({x:e}) = {y:e}, exp32 gives {scalar:e}"
                );
            } else {
                // Subnormal, zero or infinite: as the scalar function.
                assert!(
                    y == scalar || (f64::from(y) - f64::from(scalar)).abs() <= 2f64.powi(-149),
                    "exp({x:e}) = {y:e}, exp32 gives {scalar:e}"
                );
            }
        }
        assert!(worst <= 2.0, "worst error {worst} ulp");
        for len in 0..40 {
            let mut out = [-7.0f32; 48];
            // SAFETY: AVX-512 checked above.
            unsafe { exp32_slice_avx512(&xs[1000..1000 + len], &mut out[..len]) };
            assert!(out[len..].iter().all(|&v| v == -7.0), "wrote past {len}");
            assert_eq!(&out[..len], &ys[1000..1000 + len], "tail of {len}");
        }
    }

    /// QuantizeLinear's loop gives the general formula's bytes (`x / s` rounded half to even
    /// in f32, then the zero point added and saturated in f64, NaN to 0): ties, values a hair
    /// either side, infinities, NaN, u8 and i8, zero points at both ends, and a zero point
    /// that is not integral (the f64 loop).
    #[test]
    fn quantize_gives_the_general_formulas_bytes() {
        let mut xs: Vec<f32> = (-3000..3000).map(|i| i as f32 * 0.25).collect();
        xs.extend((-3000..3000).map(|i| (i as f32 * 0.25).next_up()));
        xs.extend((-3000..3000).map(|i| (i as f32 * 0.25).next_down()));
        xs.extend([
            f32::NAN,
            f32::INFINITY,
            f32::NEG_INFINITY,
            1e30,
            -1e30,
            0.0,
            -0.0,
        ]);
        for (s, z, lo, hi) in [
            (0.5f32, 0.0, 0.0, 255.0),
            (0.5, 255.0, 0.0, 255.0),
            (0.1, 17.0, 0.0, 255.0),
            (0.5, -128.0, -128.0, 127.0),
            (0.03, 5.0, -128.0, 127.0),
            (0.5, 3.5, 0.0, 255.0),
        ] {
            let mut out = vec![0u8; xs.len()];
            quantize(&xs, s, z, lo, hi, &mut out);
            for (&x, &o) in xs.iter().zip(&out) {
                let want = round_saturate_byte(f64::from(round_even_narrow_f32(x / s)) + z, lo, hi);
                assert_eq!(o, want, "x {x} s {s} z {z} bounds {lo}..{hi}");
            }
        }
    }

    /// ONNX Runtime's steps, one value at a time (the ratios, the folded zero points, two
    /// fused multiply-adds, rounded half to even and saturated in f64; NaN to the minimum).
    fn qlinear_add_reference(
        x: f32,
        y: f32,
        a: [f32; 2],
        b: [f32; 2],
        c: [f32; 2],
        signed: bool,
    ) -> u8 {
        let (ra, rb) = (a[0] / c[0], b[0] / c[0]);
        let fixed = c[1] - (ra * a[1] + rb * b[1]);
        let v = f64::from(x.mul_add(ra, y.mul_add(rb, fixed)));
        let (lo, hi) = if signed {
            (-128.0, 127.0)
        } else {
            (0.0, 255.0)
        };
        let q = if v.is_nan() {
            lo
        } else {
            v.round_ties_even().clamp(lo, hi)
        };
        if signed {
            q as i8 as u8
        } else {
            q as u8
        }
    }

    #[test]
    fn qlinear_add_gives_onnx_runtimes_bytes_for_every_operand_pair() {
        let bytes: Vec<u8> = (0..=255).collect();
        // Scales with exact halves among the quotients, odd zero points, a tiny output scale
        // (saturation) and a large one.
        let cases = [
            ([0.5, 3.0], [0.25, 128.0], [0.5, 7.0]),
            ([0.02, 0.0], [0.03, 10.0], [0.04, 128.0]),
            ([1.0, 255.0], [1.0, 0.0], [1e-3, 0.0]),
            ([0.1, -3.0], [0.07, 5.0], [0.3, -9.0]),
            ([1e5, 1.0], [1e5, 2.0], [7.0, 100.0]),
            // A zero output scale: infinite ratios, NaN or infinite sums.
            ([0.5, 3.0], [0.25, 1.0], [0.0, 7.0]),
        ];
        for (a, b, c) in cases {
            for signed in [false, true] {
                let value = |v: u8| {
                    if signed {
                        f32::from(v as i8)
                    } else {
                        f32::from(v)
                    }
                };
                for &x in &bytes {
                    let xs = vec![x; 256];
                    let mut out = vec![0u8; 256];
                    qlinear_add(&xs, &bytes, signed, a, b, c, &mut out);
                    for (&y, &o) in bytes.iter().zip(&out) {
                        let want = qlinear_add_reference(value(x), value(y), a, b, c, signed);
                        assert_eq!(
                            o, want,
                            "x {x} y {y} a {a:?} b {b:?} c {c:?} signed {signed}"
                        );
                    }
                }
            }
        }
    }

    /// The requantizing loops against the formula one value at a time: the f32 product (as
    /// MLAS), the zero point added in f64 and rounded half to even (as the ONNX reference),
    /// saturated; a NaN product to the lower bound. Ties, their neighbours, sums past 2^24, huge, infinite and NaN
    /// products, u8 and i8 bounds.
    #[test]
    fn requantize_gives_the_formulas_bytes() {
        let mut sums: Vec<i32> = (-3000..3000).collect();
        sums.extend([
            i32::MIN,
            i32::MAX,
            (1 << 24) + 1,
            -(1 << 24) - 3,
            123_456_789,
        ]);
        let mults = [
            0.5f32,
            0.25,
            1.0 / 3.0,
            0.0125,
            0.5f32.next_up(),
            0.5f32.next_down(),
            1e-9,
            3e30,
            0.0,
            f32::INFINITY,
            f32::NAN,
        ];
        for mult in mults {
            for (zp, lo, hi) in [
                (0, 0, 255),
                (17, 0, 255),
                (255, 0, 255),
                (-128, -128, 127),
                (5, -128, 127),
            ] {
                let (plo, phi) = ((lo - zp) as f32, (hi - zp) as f32);
                let bias: Vec<i32> = sums.iter().map(|&s| (s & 7) - 3).collect();
                let m = vec![mult; sums.len()];
                let mut out = vec![0u8; sums.len()];
                requantize_rows(&sums, &bias, &m, zp, (plo, phi), &mut out);
                // The same sums as rows of 7, 24 and 32 channels (shorter than a vector, a
                // last vector overlapping, whole vectors).
                let mut rows7 = vec![0u8; sums.len()];
                let mut rows24 = vec![0u8; sums.len()];
                let mut rows32 = vec![0u8; sums.len()];
                requantize_rows(&sums, &bias[..7], &m[..7], zp, (plo, phi), &mut rows7);
                requantize_rows(&sums, &bias[..32], &m[..32], zp, (plo, phi), &mut rows32);
                requantize_rows(&sums, &bias[..24], &m[..24], zp, (plo, phi), &mut rows24);
                let mut channel = vec![0u8; sums.len()];
                let biased: Vec<i32> = sums
                    .iter()
                    .zip(&bias)
                    .map(|(&s, &b)| s.wrapping_add(b))
                    .collect();
                requantize_channel(&biased, mult, zp, plo, phi, &mut channel);
                // The formula for one biased sum.
                let formula = |acc: i32| {
                    let p = acc as f32 * mult;
                    if p.is_nan() {
                        lo as u8
                    } else {
                        let (z, lo, hi) = (f64::from(zp), f64::from(lo), f64::from(hi));
                        round_saturate_byte(f64::from(p) + z, lo, hi)
                    }
                };
                for (i, &acc) in biased.iter().enumerate() {
                    let want = formula(acc);
                    assert_eq!(out[i], want, "acc {acc} mult {mult} zp {zp}");
                    assert_eq!(
                        requant_byte(acc, mult, zp, plo, phi),
                        want,
                        "acc {acc} mult {mult} zp {zp}"
                    );
                    assert_eq!(channel[i], want, "acc {acc} mult {mult} zp {zp}");
                    // A last partial row is left alone.
                    for (width, got) in [(7, &rows7), (24, &rows24), (32, &rows32)] {
                        let want = if i < sums.len() / width * width {
                            formula(sums[i].wrapping_add(bias[i % width]))
                        } else {
                            0
                        };
                        assert_eq!(got[i], want, "rows of {width}: acc {} mult {mult}", sums[i]);
                    }
                }
            }
        }
        // Exact halves round to even: 5 * 0.5 = 2.5 -> 2, 7 * 0.5 = 3.5 -> 4.
        assert_eq!(requant_byte(5, 0.5, 0, 0.0, 255.0), 2);
        assert_eq!(requant_byte(7, 0.5, 0, 0.0, 255.0), 4);
        assert_eq!(requant_byte(-5, 0.5, 0, -128.0, 127.0) as i8, -2);
        // The zero point joins before the rounding: -16.5 + 17 = 0.5 -> 0 (not -16 + 17).
        assert_eq!(requant_byte(-33, 0.5, 17, -17.0, 238.0), 0);
    }
}

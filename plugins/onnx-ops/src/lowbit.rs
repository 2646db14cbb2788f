//! Scalar conversions for the 8-, 4- and 2-bit ONNX types, which the SDK holds unpacked, one
//! element per byte: the float8 codes (`F8E4M3FN`, `F8E4M3FNUZ`, `F8E5M2`, `F8E5M2FNUZ`,
//! `F8E8M0`), the float4 code (`F4E2M1`, low 4 bits) and the small integers (`U4`, `U2`:
//! `0..=15` / `0..=3`; `I4`, `I2`: sign-extended `i8`).
//!
//! The conversions match the ONNX reference implementation (onnx 1.23, which casts with
//! `ml_dtypes`) bit for bit:
//! * f32 -> float8 / float4 rounds to nearest even. `saturate` clamps overflow and ±Inf to
//!   ±max; without it overflow is Inf (E5M2) or NaN (the finite-only types). Float4 has no
//!   Inf/NaN and always saturates; NaN becomes the zero code with the opposite sign
//!   (`ml_dtypes`' choice). FNUZ types have no negative zero and one NaN (`0x80`).
//! * f32 -> E8M0 keeps the exponent only, rounded by `round_mode` (`up`, `down`, `nearest`),
//!   as `onnx.numpy_helper.to_float8e8m0` does; the sign is dropped.
//! * float -> 4-/2-bit integers truncates toward zero and wraps (a C cast through `int32`:
//!   NaN, ±Inf and values outside `i32` give 0); integers wrap.
//!
//! Wider floats go through f32 first (`ml_dtypes` casts f64 that way too).

use opreg_sdk::DType;

/// True for the types this module converts.
pub(crate) fn is_lowbit(d: DType) -> bool {
    is_lowbit_float(d) || is_lowbit_int(d)
}

/// The 8- and 4-bit float types (every one with a code decoded by [`decode`]).
pub(crate) fn is_lowbit_float(d: DType) -> bool {
    matches!(
        d,
        DType::F8E4M3FN
            | DType::F8E4M3FNUZ
            | DType::F8E5M2
            | DType::F8E5M2FNUZ
            | DType::F8E8M0
            | DType::F4E2M1
    )
}

/// The 4- and 2-bit integer types.
pub(crate) fn is_lowbit_int(d: DType) -> bool {
    matches!(d, DType::U4 | DType::I4 | DType::U2 | DType::I2)
}

/// `(min, max)` of a 4- or 2-bit integer type.
pub(crate) fn int_range(d: DType) -> Option<(i32, i32)> {
    match d {
        DType::U4 => Some((0, 15)),
        DType::I4 => Some((-8, 7)),
        DType::U2 => Some((0, 3)),
        DType::I2 => Some((-2, 1)),
        _ => None,
    }
}

/// `round_mode` of `Cast` to float8e8m0.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum RoundMode {
    Up,
    Down,
    Nearest,
}

impl RoundMode {
    pub(crate) fn parse(s: &str) -> Option<Self> {
        match s {
            "up" => Some(RoundMode::Up),
            "down" => Some(RoundMode::Down),
            "nearest" => Some(RoundMode::Nearest),
            _ => None,
        }
    }
}

/// How a small float format treats its top codes.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Special {
    /// IEEE-like: the top exponent holds Inf (mantissa 0) and NaNs (E5M2).
    Ieee,
    /// Finite only; the all-ones magnitude is NaN (E4M3FN).
    Fn,
    /// Finite only, no negative zero: `0x80` is the one NaN (E4M3FNUZ, E5M2FNUZ).
    Fnuz,
    /// Finite only, no NaN at all (E2M1).
    None,
}

#[derive(Clone, Copy)]
struct Fmt {
    mbits: u32,
    bias: i32,
    /// The largest finite magnitude code.
    max: u8,
    /// The sign bit.
    sign: u8,
    special: Special,
}

fn fmt(d: DType) -> Option<Fmt> {
    let f = |mbits, bias, max, sign, special| {
        Some(Fmt {
            mbits,
            bias,
            max,
            sign,
            special,
        })
    };
    match d {
        DType::F8E4M3FN => f(3, 7, 0x7E, 0x80, Special::Fn),
        DType::F8E4M3FNUZ => f(3, 8, 0x7F, 0x80, Special::Fnuz),
        DType::F8E5M2 => f(2, 15, 0x7B, 0x80, Special::Ieee),
        DType::F8E5M2FNUZ => f(2, 16, 0x7F, 0x80, Special::Fnuz),
        DType::F4E2M1 => f(1, 1, 0x7, 0x8, Special::None),
        _ => None,
    }
}

/// 2^e as f64 (exact for the exponents used here).
fn pow2(e: i32) -> f64 {
    f64::from_bits(((e + 1023) as u64) << 52)
}

/// Encodes `x` as a float8 (not E8M0) or float4 code; `saturate` as in `Cast`.
/// Other types give 0.
pub(crate) fn encode_float(d: DType, x: f32, saturate: bool) -> u8 {
    let Some(f) = fmt(d) else { return 0 };
    let neg = x.is_sign_negative();
    let sign = if neg { f.sign } else { 0 };
    let overflow = || -> u8 {
        if saturate || f.special == Special::None {
            f.max | sign
        } else {
            match f.special {
                Special::Ieee => (f.max + 1) | sign,
                Special::Fn => 0x7F | sign,
                _ => 0x80,
            }
        }
    };
    if x.is_nan() {
        return match f.special {
            Special::Ieee => 0x7E | sign,
            Special::Fn => 0x7F | sign,
            Special::Fnuz => 0x80,
            Special::None => f.sign ^ sign,
        };
    }
    if x.is_infinite() {
        return overflow();
    }
    let a = f64::from(x.abs());
    let emin = 1 - f.bias;
    // Exponent of the quantum: the spacing of representable values around `a`.
    let e = if a >= pow2(emin) {
        ((x.abs().to_bits() >> 23) as i32) - 127
    } else {
        emin
    };
    let mut qe = e - f.mbits as i32;
    let mut r = (a * pow2(-qe)).round_ties_even();
    let one = f64::from(1u32 << f.mbits);
    if r >= 2.0 * one {
        r /= 2.0;
        qe += 1;
    }
    let mag = if r == 0.0 {
        0
    } else if r < one {
        r as u32 // subnormal: exponent field 0
    } else {
        let ef = qe + f.mbits as i32 + f.bias;
        if ef >= 1 << (8 - f.sign.leading_zeros() - 1 - f.mbits) {
            return overflow();
        }
        ((ef as u32) << f.mbits) | (r - one) as u32
    };
    if mag > u32::from(f.max) {
        return overflow();
    }
    let mag = mag as u8;
    if mag == 0 && f.special == Special::Fnuz {
        0
    } else {
        mag | sign
    }
}

/// The value of a float8 / float4 code (or of a small integer's byte) as `f32`.
pub(crate) fn decode(d: DType, code: u8) -> f32 {
    if d == DType::F8E8M0 {
        return match code {
            0xFF => f32::NAN,
            0 => f32::from_bits(1 << 22),
            c => f32::from_bits(u32::from(c) << 23),
        };
    }
    if let Some(v) = decode_int(d, code) {
        return v as f32;
    }
    let Some(f) = fmt(d) else { return 0.0 };
    let code = code & (f.sign | (f.sign - 1));
    let neg = code & f.sign != 0;
    let mag = code & !f.sign;
    let nan = if neg { -f32::NAN } else { f32::NAN };
    match f.special {
        Special::Ieee if mag > f.max + 1 => return nan,
        Special::Ieee if mag == f.max + 1 => {
            return if neg {
                f32::NEG_INFINITY
            } else {
                f32::INFINITY
            }
        }
        Special::Fn if mag == 0x7F => return nan,
        Special::Fnuz if code == 0x80 => return -f32::NAN,
        _ => {}
    }
    let ef = i32::from(mag >> f.mbits);
    let m = f64::from(mag & ((1 << f.mbits) - 1));
    let v = if ef == 0 {
        m * pow2(1 - f.bias - f.mbits as i32)
    } else {
        (m + pow2(f.mbits as i32)) * pow2(ef - f.bias - f.mbits as i32)
    };
    let v = v as f32;
    if neg {
        -v
    } else {
        v
    }
}

/// The value of a 4- or 2-bit integer byte (low bits; the rest is ignored).
pub(crate) fn decode_int(d: DType, code: u8) -> Option<i32> {
    match d {
        DType::U4 => Some(i32::from(code & 0xF)),
        DType::U2 => Some(i32::from(code & 0x3)),
        DType::I4 => Some(i32::from(((code << 4) as i8) >> 4)),
        DType::I2 => Some(i32::from(((code << 6) as i8) >> 6)),
        _ => None,
    }
}

/// Stores integer `v` in a 4- or 2-bit integer type, wrapping (keeps the low bits).
pub(crate) fn wrap_int(d: DType, v: i128) -> u8 {
    let b = v as u8;
    match d {
        DType::U4 => b & 0xF,
        DType::U2 => b & 0x3,
        DType::I4 => ((b << 4) as i8 >> 4) as u8,
        DType::I2 => ((b << 6) as i8 >> 6) as u8,
        _ => b,
    }
}

/// Stores integer `v` in a 4- or 2-bit integer type, clamping it to the type's range.
pub(crate) fn saturate_int(d: DType, v: i64) -> u8 {
    let (lo, hi) = int_range(d).unwrap_or((0, 0));
    wrap_int(d, i128::from(v.clamp(i64::from(lo), i64::from(hi))))
}

/// Float to a 4- or 2-bit integer type, as a C cast through `int32` then wrapping: truncates
/// toward zero; NaN, ±Inf and values outside `i32` give 0.
pub(crate) fn float_to_int(d: DType, x: f64) -> u8 {
    let t = x.trunc();
    if (-2_147_483_648.0..2_147_483_648.0).contains(&t) {
        wrap_int(d, t as i128)
    } else {
        0
    }
}

/// f32 to float8e8m0 (`Cast` with `saturate` and `round_mode`), as
/// `onnx.numpy_helper.to_float8e8m0`.
pub(crate) fn encode_e8m0(x: f32, saturate: bool, mode: RoundMode) -> u8 {
    let bits = x.to_bits();
    let exp = (bits >> 23) & 0xFF;
    if exp == 0xFF {
        return 0xFF;
    }
    let up = match mode {
        RoundMode::Down => false,
        RoundMode::Up => bits & 0x7F_FFFF != 0,
        RoundMode::Nearest => {
            let g = bits & 0x40_0000 != 0;
            let r = bits & 0x20_0000 != 0;
            let s = bits & 0x1F_FFFF != 0;
            g && (r || s || exp > 0)
        }
    };
    if up && !(saturate && exp == 0xFE) {
        (exp + 1) as u8
    } else {
        exp as u8
    }
}

/// Any float to any float8 / float4 type (E8M0 with `round_mode`).
pub(crate) fn encode(d: DType, x: f32, saturate: bool, mode: RoundMode) -> u8 {
    if d == DType::F8E8M0 {
        encode_e8m0(x, saturate, mode)
    } else {
        encode_float(d, x, saturate)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const F8: [DType; 4] = [
        DType::F8E4M3FN,
        DType::F8E4M3FNUZ,
        DType::F8E5M2,
        DType::F8E5M2FNUZ,
    ];

    /// FNV-1a 64 over the codes.
    fn fnv(codes: impl Iterator<Item = u8>) -> u64 {
        codes.fold(0xcbf2_9ce4_8422_2325, |h, b| {
            (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
        })
    }

    /// The f32 bits of every code's value (NaN as 0x7FC00000 | sign), from ml_dtypes 0.5.4.
    fn decode_hash(d: DType, n: u32) -> u64 {
        fnv((0..n).flat_map(|c| {
            let v = decode(d, c as u8);
            let b = if v.is_nan() {
                0x7FC0_0000 | (v.to_bits() & 0x8000_0000)
            } else {
                v.to_bits()
            };
            b.to_le_bytes()
        }))
    }

    #[test]
    fn decode_matches_ml_dtypes() {
        // Computed in Python:
        // fnv(b''.join(np.float32(v).tobytes() for v in np.arange(n, dtype=np.uint8)
        //      .view(ml_dtypes.<type>).astype(np.float32))), NaNs normalised as above.
        let want = [
            (DType::F8E4M3FN, 256, 0xdad2_59c5_0f75_7625u64),
            (DType::F8E4M3FNUZ, 256, 0x10b5_2e16_89fa_0f98),
            (DType::F8E5M2, 256, 0xa4c9_f019_470b_0385),
            (DType::F8E5M2FNUZ, 256, 0x5bcf_a8ed_cce2_bf98),
            (DType::F8E8M0, 256, 0x6d2c_8b41_c3f0_e5a5),
            (DType::F4E2M1, 16, 0x2403_bb76_b85d_fea5),
        ];
        for (d, n, h) in want {
            assert_eq!(decode_hash(d, n), h, "{d}");
        }
    }

    #[test]
    fn decode_known_values() {
        assert_eq!(decode(DType::F8E4M3FN, 0x7E), 448.0);
        assert!(decode(DType::F8E4M3FN, 0x7F).is_nan());
        assert_eq!(decode(DType::F8E4M3FN, 0x01), 2f32.powi(-9));
        assert_eq!(decode(DType::F8E4M3FNUZ, 0x7F), 240.0);
        assert!(decode(DType::F8E4M3FNUZ, 0x80).is_nan());
        assert_eq!(decode(DType::F8E5M2, 0x7B), 57344.0);
        assert_eq!(decode(DType::F8E5M2, 0xFC), f32::NEG_INFINITY);
        assert_eq!(decode(DType::F8E5M2FNUZ, 0x7F), 57344.0);
        assert_eq!(decode(DType::F8E8M0, 127), 1.0);
        assert_eq!(decode(DType::F8E8M0, 0), 2f32.powi(-127));
        let f4: Vec<f32> = (0..16).map(|c| decode(DType::F4E2M1, c)).collect();
        assert_eq!(
            f4,
            [
                0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0,
                -6.0
            ]
        );
        let i4: Vec<i32> = (0..16u8)
            .map(|c| decode_int(DType::I4, wrap_int(DType::I4, i128::from(c))).unwrap())
            .collect();
        assert_eq!(i4, [0, 1, 2, 3, 4, 5, 6, 7, -8, -7, -6, -5, -4, -3, -2, -1]);
        assert_eq!(wrap_int(DType::I2, -3), 1);
        assert_eq!(wrap_int(DType::I2, 2), (-2i8) as u8);
        assert_eq!(wrap_int(DType::U2, -3), 1);
        assert_eq!(saturate_int(DType::I4, -30), (-8i8) as u8);
        assert_eq!(saturate_int(DType::U4, 40), 15);
    }

    /// Every code round-trips through f32 (except the non-canonical NaNs and, for FNUZ /
    /// E4M3FN, the codes that are NaN).
    #[test]
    fn codes_round_trip() {
        for d in F8.into_iter().chain([DType::F4E2M1]) {
            let n = if d == DType::F4E2M1 { 16 } else { 256 };
            for c in 0..n {
                let c = c as u8;
                let v = decode(d, c);
                if v.is_nan() {
                    continue;
                }
                for sat in [false, true] {
                    let back = encode_float(d, v, sat);
                    let want = if v.is_infinite() && sat {
                        fmt(d).unwrap().max | (c & 0x80)
                    } else {
                        c
                    };
                    assert_eq!(back, want, "{d} code {c:#x} value {v} saturate {sat}");
                }
            }
        }
        for c in 0..255u8 {
            let v = decode(DType::F8E8M0, c);
            for mode in [RoundMode::Up, RoundMode::Down, RoundMode::Nearest] {
                // 2^-127 is an f32 subnormal, with a fraction: `up` rounds it to 2^-126.
                let want = if c == 0 && mode == RoundMode::Up {
                    1
                } else {
                    c
                };
                assert_eq!(encode_e8m0(v, true, mode), want);
            }
        }
    }

    /// Every f16 value (as f32) encoded to each float8 / float4 type, both saturate modes,
    /// hashed and compared with ml_dtypes:
    /// `fnv(onnx.numpy_helper.saturate_cast(x, t).view(np.uint8))` (saturate) and
    /// `fnv(x.astype(t).view(np.uint8))` with `x = np.arange(65536, dtype=np.uint16)
    /// .view(np.float16).astype(np.float32)`.
    #[test]
    fn encode_all_f16_matches_ml_dtypes() {
        let xs: Vec<f32> = (0..=u16::MAX)
            .map(|b| opreg_sdk::half::f16::from_bits(b).to_f32())
            .collect();
        let want = [
            (
                DType::F8E4M3FN,
                0x2d72_4a81_49ff_1225u64,
                0xbd57_1fcb_cd35_1aa5u64,
            ),
            (
                DType::F8E4M3FNUZ,
                0xd671_61fa_988d_e225,
                0x5baa_f26b_4d46_d9a5,
            ),
            (DType::F8E5M2, 0x1e3e_cb6c_5c7e_6f25, 0xbd84_6ad2_7363_4325),
            (
                DType::F8E5M2FNUZ,
                0xf78b_d6e1_3c6c_f725,
                0xf336_d4e1_e12e_dda5,
            ),
            (DType::F4E2M1, 0x93e6_0c1e_f55c_cd25, 0x93e6_0c1e_f55c_cd25),
        ];
        let mut bad = vec![];
        for (d, sat, nosat) in want {
            let hs = fnv(xs.iter().map(|&x| encode_float(d, x, true)));
            let hn = fnv(xs.iter().map(|&x| encode_float(d, x, false)));
            if hs != sat || hn != nosat {
                bad.push(format!("{d}: saturate {hs:#x}, no saturate {hn:#x}"));
            }
        }
        assert!(bad.is_empty(), "{}", bad.join("\n"));
    }

    /// f32 values over the whole range (every 4099th bit pattern, both signs, NaNs and
    /// subnormals included), hashed as above with `x` the sweep.
    #[test]
    fn encode_f32_sweep_matches_ml_dtypes() {
        let xs = f32_sweep();
        let want = [
            (
                DType::F8E4M3FN,
                0x6dce_ff57_0c1a_6babu64,
                0x9681_cc4a_0f7d_2cc8u64,
            ),
            (
                DType::F8E4M3FNUZ,
                0x1dea_8f37_c52b_aba9,
                0x5c88_382c_f9c0_1ad1,
            ),
            (DType::F8E5M2, 0x520e_810b_345f_5a06, 0x97b5_7910_fcba_9c76),
            (
                DType::F8E5M2FNUZ,
                0xa622_bdff_20d6_53df,
                0x2d48_006f_8680_8bbf,
            ),
            (DType::F4E2M1, 0x27bd_81da_95ca_1825, 0x27bd_81da_95ca_1825),
        ];
        let mut bad = vec![];
        for (d, sat, nosat) in want {
            let hs = fnv(xs.iter().map(|&x| encode_float(d, x, true)));
            let hn = fnv(xs.iter().map(|&x| encode_float(d, x, false)));
            if hs != sat || hn != nosat {
                bad.push(format!("{d}: saturate {hs:#x}, no saturate {hn:#x}"));
            }
        }
        assert!(bad.is_empty(), "{}", bad.join("\n"));
    }

    /// Every 4099th f32 bit pattern.
    fn f32_sweep() -> Vec<f32> {
        (0..=u32::MAX / 4099)
            .map(|k| f32::from_bits(k * 4099))
            .collect()
    }

    /// E8M0 over the same f32 sweep, every mode, with and without saturation, against
    /// `onnx.numpy_helper.to_float8e8m0`.
    #[test]
    fn encode_e8m0_matches_onnx() {
        let xs = f32_sweep();
        let mut got = vec![];
        for mode in [RoundMode::Up, RoundMode::Down, RoundMode::Nearest] {
            for sat in [true, false] {
                got.push(fnv(xs.iter().map(|&x| encode_e8m0(x, sat, mode))));
            }
        }
        let want: [u64; 6] = [
            0xfd4e_57cc_af3d_45d1,
            0x2e7b_aad4_97c1_8e5a,
            0xc6b4_dead_916c_82b7,
            0xc6b4_dead_916c_82b7,
            0xae21_70b5_7d15_26ba,
            0x912a_602f_ccd5_9b35,
        ];
        assert_eq!(got, want, "{got:#x?}");
    }

    #[test]
    fn float_to_small_int_wraps_like_ml_dtypes() {
        // x.astype(ml_dtypes.int4) etc.
        let xs = [
            f64::NAN,
            f64::INFINITY,
            1e6,
            7.5,
            8.5,
            -8.6,
            3.5,
            -2.5,
            17.0,
            -9.0,
            2f64.powi(30) + 5.0,
            2f64.powi(32) + 5.0,
        ];
        let i4: Vec<i32> = xs
            .iter()
            .map(|&x| decode_int(DType::I4, float_to_int(DType::I4, x)).unwrap())
            .collect();
        assert_eq!(i4, [0, 0, 0, 7, -8, -8, 3, -2, 1, 7, 5, 0]);
        let u2: Vec<i32> = xs
            .iter()
            .map(|&x| decode_int(DType::U2, float_to_int(DType::U2, x)).unwrap())
            .collect();
        assert_eq!(u2, [0, 0, 0, 3, 0, 0, 3, 2, 1, 3, 1, 0]);
    }

    #[test]
    fn encode_known_values() {
        // From ml_dtypes: [nan, -nan, inf, -inf, 1e6, -1e6, 464, 465, -0, 1e-30, -1e-30,
        // 7.5, 8.5, -8.6, 2.5, 3.5, -2.5, 17, -9, 0.3].astype(t) (no saturation).
        let xs: [f32; 20] = [
            f32::NAN,
            -f32::NAN,
            f32::INFINITY,
            f32::NEG_INFINITY,
            1e6,
            -1e6,
            464.0,
            465.0,
            -0.0,
            1e-30,
            -1e-30,
            7.5,
            8.5,
            -8.6,
            2.5,
            3.5,
            -2.5,
            17.0,
            -9.0,
            0.3,
        ];
        let want: [(DType, [u8; 20]); 5] = [
            (
                DType::F8E4M3FN,
                [
                    127, 255, 127, 255, 127, 255, 126, 127, 128, 0, 128, 79, 80, 209, 66, 70, 194,
                    88, 209, 42,
                ],
            ),
            (
                DType::F8E4M3FNUZ,
                [
                    128, 128, 128, 128, 128, 128, 128, 128, 0, 0, 0, 87, 88, 217, 74, 78, 202, 96,
                    217, 50,
                ],
            ),
            (
                DType::F8E5M2,
                [
                    126, 254, 124, 252, 124, 252, 95, 95, 128, 0, 128, 72, 72, 200, 65, 67, 193,
                    76, 200, 53,
                ],
            ),
            (
                DType::F8E5M2FNUZ,
                [
                    128, 128, 128, 128, 128, 128, 99, 99, 0, 0, 0, 76, 76, 204, 69, 71, 197, 80,
                    204, 57,
                ],
            ),
            (
                DType::F4E2M1,
                [
                    8, 0, 7, 15, 7, 15, 7, 7, 8, 0, 8, 7, 7, 15, 4, 6, 12, 7, 15, 1,
                ],
            ),
        ];
        for (d, codes) in want {
            let got: Vec<u8> = xs.iter().map(|&x| encode_float(d, x, false)).collect();
            assert_eq!(got, codes, "{d}");
        }
    }
}

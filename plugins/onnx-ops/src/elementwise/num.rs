//! Element traits for the elementwise kernels: every tensor type ([`Num`]), the types
//! arithmetic runs in ([`Arith`]), the float compute types ([`Real`]) and integer bit
//! operations ([`Bits`]). f16 and bf16 compute in f32.

use opreg_sdk::half::{bf16, f16};
use opreg_sdk::{DType, Element};
use std::ops::{Add, Div, Mul, Neg, Sub};

/// A `bool` tensor element: one byte, 0 or 1 (any non-zero byte reads as true).
#[repr(transparent)]
#[derive(Clone, Copy, Default, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Bool(pub u8);

// SAFETY: one byte with alignment 1 and no invalid bit pattern, exactly the layout of the
// host's `Bool` tensors.
unsafe impl Element for Bool {
    const DTYPE: DType = DType::Bool;
}

impl Bool {
    pub fn new(b: bool) -> Self {
        Bool(b as u8)
    }
    pub fn get(self) -> bool {
        self.0 != 0
    }
}

/// Every non-string tensor element type.
pub trait Num: Element + PartialOrd + Default {
    const IS_FLOAT: bool;
    /// `numeric_limits<T>::lowest()` and `max()`.
    const LOWEST: Self;
    const MAX: Self;
    /// The type arithmetic runs in.
    type C: Copy + PartialOrd + Send + Sync + 'static;
    fn load(self) -> Self::C;
    fn store(c: Self::C) -> Self;
    /// Exact for floats (f64 rounds only f64 itself, i.e. not at all).
    fn to_f64(self) -> f64;
    /// Rounds to nearest for floats; saturates and truncates toward zero for integers.
    fn from_f64(v: f64) -> Self;
    /// Exact for integers and bool.
    fn to_i128(self) -> i128;
    /// Wraps (C conversion) for integers.
    fn from_i128(v: i128) -> Self;
}

macro_rules! num_int {
    ($($t:ty),*) => {$(
        impl Num for $t {
            const IS_FLOAT: bool = false;
            const LOWEST: Self = <$t>::MIN;
            const MAX: Self = <$t>::MAX;
            type C = $t;
            fn load(self) -> $t { self }
            fn store(c: $t) -> Self { c }
            fn to_f64(self) -> f64 { self as f64 }
            fn from_f64(v: f64) -> Self { v as $t }
            fn to_i128(self) -> i128 { self as i128 }
            fn from_i128(v: i128) -> Self { v as $t }
        }
    )*};
}
num_int!(u8, i8, u16, i16, u32, i32, u64, i64);

macro_rules! num_float {
    ($($t:ty),*) => {$(
        impl Num for $t {
            const IS_FLOAT: bool = true;
            const LOWEST: Self = <$t>::MIN;
            const MAX: Self = <$t>::MAX;
            type C = $t;
            fn load(self) -> $t { self }
            fn store(c: $t) -> Self { c }
            fn to_f64(self) -> f64 { self as f64 }
            fn from_f64(v: f64) -> Self { v as $t }
            fn to_i128(self) -> i128 { self as i128 }
            fn from_i128(v: i128) -> Self { v as $t }
        }
    )*};
}
num_float!(f32, f64);

macro_rules! num_half {
    ($($t:ty),*) => {$(
        impl Num for $t {
            const IS_FLOAT: bool = true;
            const LOWEST: Self = <$t>::MIN;
            const MAX: Self = <$t>::MAX;
            type C = f32;
            fn load(self) -> f32 { self.to_f32() }
            fn store(c: f32) -> Self { <$t>::from_f32(c) }
            fn to_f64(self) -> f64 { <$t>::to_f64(self) }
            fn from_f64(v: f64) -> Self { <$t>::from_f64(v) }
            fn to_i128(self) -> i128 { <$t>::to_f64(self) as i128 }
            fn from_i128(v: i128) -> Self { <$t>::from_f64(v as f64) }
        }
    )*};
}
num_half!(f16, bf16);

impl Num for Bool {
    const IS_FLOAT: bool = false;
    const LOWEST: Self = Bool(0);
    const MAX: Self = Bool(1);
    type C = bool;
    fn load(self) -> bool {
        self.get()
    }
    fn store(c: bool) -> Self {
        Bool::new(c)
    }
    fn to_f64(self) -> f64 {
        f64::from(u8::from(self.get()))
    }
    fn from_f64(v: f64) -> Self {
        Bool::new(v != 0.0)
    }
    fn to_i128(self) -> i128 {
        i128::from(self.get())
    }
    fn from_i128(v: i128) -> Self {
        Bool::new(v != 0)
    }
}

/// Arithmetic in a compute type (every integer type, f32, f64). Integer operations wrap;
/// callers reject zero divisors before calling `div`, `modulo` or `fmod` on integers.
pub trait Arith: Copy + PartialOrd + Send + Sync + 'static {
    const ZERO: Self;
    const ONE: Self;
    fn add(self, o: Self) -> Self;
    fn sub(self, o: Self) -> Self;
    fn mul(self, o: Self) -> Self;
    /// Integer division truncates toward zero (as in C).
    fn div(self, o: Self) -> Self;
    /// Remainder with the sign of the divisor (Python's `%`).
    fn modulo(self, o: Self) -> Self;
    /// Remainder with the sign of the dividend (C's `fmod`, `%`).
    fn fmod(self, o: Self) -> Self;
    fn abs(self) -> Self;
    fn neg(self) -> Self;
    /// -1, 0 or 1 (NaN stays NaN).
    fn sign(self) -> Self;
    fn is_nan(self) -> bool;
    fn from_f64c(v: f64) -> Self;
}

macro_rules! arith_int {
    ($signed:tt: $($t:ty),*) => {$(
        impl Arith for $t {
            const ZERO: Self = 0;
            const ONE: Self = 1;
            fn add(self, o: Self) -> Self { self.wrapping_add(o) }
            fn sub(self, o: Self) -> Self { self.wrapping_sub(o) }
            fn mul(self, o: Self) -> Self { self.wrapping_mul(o) }
            fn div(self, o: Self) -> Self { self.wrapping_div(o) }
            fn modulo(self, o: Self) -> Self {
                let r = self.wrapping_rem(o);
                arith_int!(@fix $signed, r, o)
            }
            fn fmod(self, o: Self) -> Self { self.wrapping_rem(o) }
            fn abs(self) -> Self { arith_int!(@abs $signed, self) }
            fn neg(self) -> Self { self.wrapping_neg() }
            fn sign(self) -> Self { arith_int!(@sign $signed, self) }
            fn is_nan(self) -> bool { false }
            fn from_f64c(v: f64) -> Self { v as $t }
        }
    )*};
    (@fix signed, $r:ident, $o:ident) => {
        if $r != 0 && (($r < 0) != ($o < 0)) { $r.wrapping_add($o) } else { $r }
    };
    (@fix unsigned, $r:ident, $o:ident) => { $r };
    (@abs signed, $v:ident) => { $v.wrapping_abs() };
    (@abs unsigned, $v:ident) => { $v };
    (@sign signed, $v:ident) => { $v.signum() };
    (@sign unsigned, $v:ident) => { Self::from($v != 0) };
}
arith_int!(signed: i8, i16, i32, i64);
arith_int!(unsigned: u8, u16, u32, u64);

macro_rules! arith_float {
    ($($t:ty),*) => {$(
        impl Arith for $t {
            const ZERO: Self = 0.0;
            const ONE: Self = 1.0;
            fn add(self, o: Self) -> Self { self + o }
            fn sub(self, o: Self) -> Self { self - o }
            fn mul(self, o: Self) -> Self { self * o }
            fn div(self, o: Self) -> Self { self / o }
            fn modulo(self, o: Self) -> Self {
                let r = self % o;
                if r != 0.0 && ((r < 0.0) != (o < 0.0)) { r + o } else { r }
            }
            fn fmod(self, o: Self) -> Self { self % o }
            fn abs(self) -> Self { <$t>::abs(self) }
            fn neg(self) -> Self { -self }
            fn sign(self) -> Self {
                if self > 0.0 { 1.0 } else if self < 0.0 { -1.0 } else { self }
            }
            fn is_nan(self) -> bool { <$t>::is_nan(self) }
            fn from_f64c(v: f64) -> Self { v as $t }
        }
    )*};
}
arith_float!(f32, f64);

/// The float compute types: f32 (also for f16 and bf16) and f64.
pub trait Real:
    Arith
    + Add<Output = Self>
    + Sub<Output = Self>
    + Mul<Output = Self>
    + Div<Output = Self>
    + Neg<Output = Self>
{
    fn exp(self) -> Self;
    fn exp_m1(self) -> Self;
    fn ln(self) -> Self;
    fn ln_1p(self) -> Self;
    fn sqrt(self) -> Self;
    fn tanh(self) -> Self;
    fn sin(self) -> Self;
    fn cos(self) -> Self;
    fn tan(self) -> Self;
    fn asin(self) -> Self;
    fn acos(self) -> Self;
    fn atan(self) -> Self;
    fn sinh(self) -> Self;
    fn cosh(self) -> Self;
    fn asinh(self) -> Self;
    fn acosh(self) -> Self;
    fn atanh(self) -> Self;
    fn floor(self) -> Self;
    fn ceil(self) -> Self;
    fn round_ties_even(self) -> Self;
    fn is_infinite(self) -> bool;
    fn is_sign_positive(self) -> bool;
    fn erf(self) -> Self;
}

macro_rules! real {
    ($t:ty, $erf:expr) => {
        impl Real for $t {
            fn exp(self) -> Self {
                <$t>::exp(self)
            }
            fn exp_m1(self) -> Self {
                <$t>::exp_m1(self)
            }
            fn ln(self) -> Self {
                <$t>::ln(self)
            }
            fn ln_1p(self) -> Self {
                <$t>::ln_1p(self)
            }
            fn sqrt(self) -> Self {
                <$t>::sqrt(self)
            }
            fn tanh(self) -> Self {
                <$t>::tanh(self)
            }
            fn sin(self) -> Self {
                <$t>::sin(self)
            }
            fn cos(self) -> Self {
                <$t>::cos(self)
            }
            fn tan(self) -> Self {
                <$t>::tan(self)
            }
            fn asin(self) -> Self {
                <$t>::asin(self)
            }
            fn acos(self) -> Self {
                <$t>::acos(self)
            }
            fn atan(self) -> Self {
                <$t>::atan(self)
            }
            fn sinh(self) -> Self {
                <$t>::sinh(self)
            }
            fn cosh(self) -> Self {
                <$t>::cosh(self)
            }
            fn asinh(self) -> Self {
                <$t>::asinh(self)
            }
            fn acosh(self) -> Self {
                <$t>::acosh(self)
            }
            fn atanh(self) -> Self {
                <$t>::atanh(self)
            }
            fn floor(self) -> Self {
                <$t>::floor(self)
            }
            fn ceil(self) -> Self {
                <$t>::ceil(self)
            }
            fn round_ties_even(self) -> Self {
                <$t>::round_ties_even(self)
            }
            fn is_infinite(self) -> bool {
                <$t>::is_infinite(self)
            }
            fn is_sign_positive(self) -> bool {
                <$t>::is_sign_positive(self)
            }
            fn erf(self) -> Self {
                $erf(self)
            }
        }
    };
}
real!(f32, |v: f32| erf64(f64::from(v)) as f32);
real!(f64, erf64);

/// Ratios of consecutive terms of the erf series, without the `x^2`: `2 / (2n + 3)`.
const ERF_SERIES: [f64; 64] = {
    let mut c = [0.0; 64];
    let mut n = 0;
    while n < 64 {
        c[n] = 2.0 / (2 * n + 3) as f64;
        n += 1;
    }
    c
};

/// The error function in f64 (relative error within a few ulps).
///
/// For |x| < 2.5: erf(x) = 2/sqrt(pi) * exp(-x^2) * sum_n 2^n x^(2n+1) / (1*3*...*(2n+1)),
/// a series of positive terms (no cancellation). Beyond: erf(x) = 1 - erfc(x), with erfc from
/// its continued fraction, evaluated bottom-up (32 levels are exact to well below an ulp of
/// erf there).
pub fn erf64(x: f64) -> f64 {
    const FRAC_2_SQRT_PI: f64 = std::f64::consts::FRAC_2_SQRT_PI;
    if x.is_nan() {
        return x;
    }
    let a = x.abs();
    if a >= 6.0 {
        // erfc(6) < 2.2e-17: below half an ulp of 1.
        return x.signum();
    }
    let x2 = a * a;
    let r = if a < 2.5 {
        let mut term = a;
        let mut sum = a;
        for &c in &ERF_SERIES {
            term *= x2 * c;
            sum += term;
            if term <= sum * 1e-17 {
                break;
            }
        }
        FRAC_2_SQRT_PI * (-x2).exp() * sum
    } else {
        // erfc(a) = exp(-a^2)/sqrt(pi) / (a + (1/2)/(a + 1/(a + (3/2)/(a + 2/(a + ...)))))
        let mut f = a;
        for k in (1..=32).rev() {
            f = a + (k as f64 / 2.0) / f;
        }
        1.0 - FRAC_2_SQRT_PI / 2.0 * (-x2).exp() / f
    };
    if x < 0.0 {
        -r
    } else {
        r
    }
}

/// Integer bit operations.
pub trait Bits: Copy + Send + Sync + 'static {
    fn and(self, o: Self) -> Self;
    fn or(self, o: Self) -> Self;
    fn xor(self, o: Self) -> Self;
    fn not(self) -> Self;
    /// Shifts by `n` bits (arithmetic right shift when signed); a negative `n` or one of at
    /// least the width gives the sign fill (0, or -1 for a right shift of a negative value).
    fn shl(self, n: Self) -> Self;
    fn shr(self, n: Self) -> Self;
}

macro_rules! bits {
    ($($t:ty),*) => {$(
        impl Bits for $t {
            fn and(self, o: Self) -> Self { self & o }
            fn or(self, o: Self) -> Self { self | o }
            fn xor(self, o: Self) -> Self { self ^ o }
            fn not(self) -> Self { !self }
            fn shl(self, n: Self) -> Self {
                u32::try_from(n).ok().and_then(|n| self.checked_shl(n)).unwrap_or(0)
            }
            fn shr(self, n: Self) -> Self {
                // Out-of-range amounts leave only the sign fill (-1 or 0; 0 when unsigned).
                let fill = if <$t>::MIN == 0 { 0 } else { self >> (<$t>::BITS - 1) };
                u32::try_from(n).ok().and_then(|n| self.checked_shr(n)).unwrap_or(fill)
            }
        }
    )*};
}
bits!(u8, i8, u16, i16, u32, i32, u64, i64);

/// Converts one element as ONNX `Cast` does: floats to integers truncate toward zero
/// (saturating), integers wrap, anything non-zero is true.
#[inline]
pub fn convert<S: Num, D: Num>(v: S) -> D {
    if S::IS_FLOAT {
        D::from_f64(v.to_f64())
    } else {
        D::from_i128(v.to_i128())
    }
}

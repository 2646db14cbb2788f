//! One numeric vocabulary for kernel authors: dtype lists, a dispatch macro and a trait tower.
//!
//! - **dtype lists** ([`FLOATS`], [`INTEGERS`], [`SIGNED`], [`UNSIGNED`], [`NUMERIC`], [`ALL`],
//!   ...) for type constraints, so that "the floats" mean the same four types in every plugin;
//! - **[`dispatch!`](crate::dispatch)**: a runtime [`DType`] to a Rust type, once per call,
//!   for one of those families (or an explicit list of dtypes);
//! - **traits**, from the widest to the narrowest:
//!   - [`Scalar`]: every non-string element ([`Bool`], the integers, f16, bf16, f32, f64), with
//!     its compute type (f16 and bf16 compute in f32), its reduction accumulator and the
//!     conversions ONNX `Cast` uses;
//!   - [`Arith`]: the types arithmetic runs in (every integer type, f32, f64): integer
//!     operations wrap, as C's do;
//!   - [`Num`]: elements with arithmetic (integers and floats, not bool);
//!   - [`Real`]: the float compute types (f32, f64) with their math functions;
//!   - [`Float`]: float elements (f16, bf16, f32, f64), computed in a [`Real`];
//!   - [`Bits`]: integer bit operations.
//!
//! ```
//! use opreg_sdk::numeric::{Float, Real, Scalar};
//! use opreg_sdk::prelude::*;
//!
//! /// Sum of exponentials, computed in f32 for f16 / bf16 / f32 and in f64 for f64.
//! fn sum_exp<T: Float>(x: &[T]) -> f64 {
//!     x.iter().map(|v| v.load().exp().to_f64()).sum()
//! }
//!
//! fn run(x: &TensorView<'_>) -> Result<f64, PluginError> {
//!     opreg_sdk::dispatch!(x.dtype, FLOATS, |T| Ok(sum_exp(x.as_slice::<T>()?)),
//!         other => Err(PluginError::unimplemented(format!("SumExp: {other} is not supported"))))
//! }
//! # let _ = run;
//! ```

use crate::dtype::{DType, Element};
use half::{bf16, f16};
use std::ops::{Add, AddAssign, Div, Mul, Neg, Sub};

// ---------------------------------------------------------------------------------------------
// dtype lists

/// The float types: f16, bf16, f32, f64 (ONNX's `tensor(float16)`, `tensor(bfloat16)`,
/// `tensor(float)`, `tensor(double)`).
pub const FLOATS: &[DType] = &[DType::F16, DType::BF16, DType::F32, DType::F64];

/// The float types without f64: f16, bf16, f32. For operators whose ONNX schema (or whose
/// implementation, e.g. a BLAS path) stops at single precision: quantization, attention.
pub const FLOATS_TO_F32: &[DType] = &[DType::F16, DType::BF16, DType::F32];

/// The signed integers: i8, i16, i32, i64.
pub const SIGNED: &[DType] = &[DType::I8, DType::I16, DType::I32, DType::I64];

/// The unsigned integers: u8, u16, u32, u64.
pub const UNSIGNED: &[DType] = &[DType::U8, DType::U16, DType::U32, DType::U64];

/// Every integer type, 8 to 64 bits, signed and unsigned.
pub const INTEGERS: &[DType] = DType::ALL.split_at(9).0.split_at(1).1;

/// The signed integers and the floats: the types with a negation (`Neg`, `Abs` of a signed
/// value).
pub const SIGNED_AND_FLOATS: &[DType] = &[
    DType::I8,
    DType::I16,
    DType::I32,
    DType::I64,
    DType::F16,
    DType::BF16,
    DType::F32,
    DType::F64,
];

/// Every integer and float type: [`INTEGERS`] then [`FLOATS`] (ONNX's "all numeric types").
pub const NUMERIC: &[DType] = DType::ALL.split_at(13).0.split_at(1).1;

/// Just bool, for logical operators and masks.
pub const BOOL: &[DType] = &[DType::Bool];

/// Every non-string tensor type: bool then [`NUMERIC`] (ONNX's "all numeric types and bool";
/// the types [`Scalar`] is implemented for).
pub const ALL: &[DType] = DType::ALL.split_at(13).0;

/// [`ALL`] and strings: the types equality and selection (`Equal`, `Where`) accept.
pub const ALL_AND_STRING: &[DType] = DType::ALL.split_at(14).0;

/// The index types ONNX operators take for axes, sizes and positions: i32, i64.
pub const INDICES: &[DType] = &[DType::I32, DType::I64];

// ---------------------------------------------------------------------------------------------
// dispatch

/// Runs a body generic over the element type of a runtime [`DType`].
///
/// `dispatch!(dtype, FAMILY, |T| body, other => fallback)` matches `dtype` against the types
/// of `FAMILY` and evaluates `body` with the type alias `T` bound to the Rust element type;
/// any other dtype is bound to the pattern `other` and gives `fallback` (so that each operator
/// words and classifies its own error, or matches more types there).
///
/// `FAMILY` is the name of one of this module's lists: `FLOATS`, `FLOATS_TO_F32`, `SIGNED`,
/// `UNSIGNED`, `INTEGERS`, `SIGNED_AND_FLOATS`, `NUMERIC`, `ALL`; or an explicit list of dtype
/// names, e.g. `[F32, F64, I32, I64, Bool]`. `Bool` binds [`numeric::Bool`](Bool); f16 and bf16
/// bind [`half::f16`] and [`half::bf16`].
///
/// Dispatch once per call, outside the loops: the body is compiled once per type.
///
/// ```
/// use opreg_sdk::numeric::Scalar;
/// use opreg_sdk::prelude::*;
///
/// fn first_as_f64(x: &TensorView<'_>) -> Result<f64, PluginError> {
///     opreg_sdk::dispatch!(x.dtype, NUMERIC, |T| {
///         let xs = x.as_slice::<T>()?;
///         Ok(xs.first().map_or(0.0, |v| v.to_f64()))
///     }, other => Err(PluginError::unimplemented(format!("First: {other} is not supported"))))
/// }
///
/// fn is_small_int(dtype: DType) -> bool {
///     opreg_sdk::dispatch!(dtype, [U8, I8], |T| std::mem::size_of::<T>() == 1, _ => false)
/// }
/// # let _ = first_as_f64;
/// assert!(is_small_int(DType::I8) && !is_small_int(DType::F32));
/// ```
#[macro_export]
macro_rules! dispatch {
    // The Rust element type of a dtype name (internal).
    (@ty Bool) => { $crate::numeric::Bool };
    (@ty U8) => { u8 };
    (@ty I8) => { i8 };
    (@ty U16) => { u16 };
    (@ty I16) => { i16 };
    (@ty U32) => { u32 };
    (@ty I32) => { i32 };
    (@ty U64) => { u64 };
    (@ty I64) => { i64 };
    (@ty F16) => { $crate::half::f16 };
    (@ty BF16) => { $crate::half::bf16 };
    (@ty F32) => { f32 };
    (@ty F64) => { f64 };
    // Families: the lists of this module, by name.
    ($dtype:expr, FLOATS, $($rest:tt)+) => {
        $crate::dispatch!($dtype, [F16, BF16, F32, F64], $($rest)+)
    };
    ($dtype:expr, FLOATS_TO_F32, $($rest:tt)+) => {
        $crate::dispatch!($dtype, [F16, BF16, F32], $($rest)+)
    };
    ($dtype:expr, SIGNED, $($rest:tt)+) => {
        $crate::dispatch!($dtype, [I8, I16, I32, I64], $($rest)+)
    };
    ($dtype:expr, UNSIGNED, $($rest:tt)+) => {
        $crate::dispatch!($dtype, [U8, U16, U32, U64], $($rest)+)
    };
    ($dtype:expr, INTEGERS, $($rest:tt)+) => {
        $crate::dispatch!($dtype, [U8, I8, U16, I16, U32, I32, U64, I64], $($rest)+)
    };
    ($dtype:expr, SIGNED_AND_FLOATS, $($rest:tt)+) => {
        $crate::dispatch!($dtype, [I8, I16, I32, I64, F16, BF16, F32, F64], $($rest)+)
    };
    ($dtype:expr, NUMERIC, $($rest:tt)+) => {
        $crate::dispatch!($dtype,
            [U8, I8, U16, I16, U32, I32, U64, I64, F16, BF16, F32, F64], $($rest)+)
    };
    ($dtype:expr, ALL, $($rest:tt)+) => {
        $crate::dispatch!($dtype,
            [Bool, U8, I8, U16, I16, U32, I32, U64, I64, F16, BF16, F32, F64], $($rest)+)
    };
    // An explicit list of dtype names.
    ($dtype:expr, [$($d:ident),+ $(,)?], |$t:ident| $body:expr, $other:pat => $fallback:expr $(,)?) => {
        match $dtype {
            $($crate::DType::$d => {
                #[allow(dead_code)]
                type $t = $crate::dispatch!(@ty $d);
                $body
            })+
            $other => $fallback,
        }
    };
}

// ---------------------------------------------------------------------------------------------
// Bool

/// A `bool` tensor element: one byte, 0 or 1 (any non-zero byte reads as true).
#[repr(transparent)]
#[derive(Clone, Copy, Default, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Bool(pub u8);

// SAFETY: one byte with alignment 1 and no invalid bit pattern, exactly the layout of the
// host's `Bool` tensors.
unsafe impl Element for Bool {
    const DTYPE: DType = DType::Bool;
}

impl Bool {
    /// `b` as a tensor element.
    #[inline]
    pub fn new(b: bool) -> Self {
        Bool(b as u8)
    }
    /// Whether the element is true (non-zero).
    #[inline]
    pub fn get(self) -> bool {
        self.0 != 0
    }
}

// ---------------------------------------------------------------------------------------------
// Scalar

/// Every non-string tensor element type: [`Bool`], the integers, f16, bf16, f32, f64.
pub trait Scalar: Element + PartialOrd + Default + std::fmt::Debug {
    /// True for f16, bf16, f32, f64.
    const IS_FLOAT: bool;
    /// The lowest finite value (`numeric_limits<T>::lowest()`; `false` for bool).
    const LOWEST: Self;
    /// The highest finite value (`numeric_limits<T>::max()`; `true` for bool).
    const MAX: Self;
    /// The type arithmetic on this element runs in: the type itself, but f32 for f16 and bf16
    /// and `bool` for [`Bool`].
    type Compute: Copy + PartialOrd + Send + Sync + 'static;
    /// The type reductions (sums, products, extrema) accumulate in: the compute type for
    /// floats, i64 for the signed integers and bool (0 or 1), u64 for the unsigned integers.
    /// Integer accumulators wrap; a result stored back wraps as a C cast does.
    type Wide: Arith;
    /// The element in its compute type (exact).
    fn load(self) -> Self::Compute;
    /// A compute value as the element (rounds to nearest for f16 and bf16).
    fn store(c: Self::Compute) -> Self;
    /// The element in its accumulator type (exact).
    fn widen(self) -> Self::Wide;
    /// An accumulator value as the element (wrapping for integers, non-zero is true for bool,
    /// rounding to nearest for floats).
    fn narrow(w: Self::Wide) -> Self;
    /// The element as f64: exact for floats and for integers up to 2^53.
    fn to_f64(self) -> f64;
    /// Rounds to nearest for floats; saturates and truncates toward zero for integers (Rust's
    /// `as`); non-zero is true for bool.
    fn from_f64(v: f64) -> Self;
    /// Exact for integers and bool; floats truncate toward zero (saturating).
    fn to_i128(self) -> i128;
    /// Wraps (C conversion) for integers; non-zero is true for bool.
    fn from_i128(v: i128) -> Self;
}

macro_rules! scalar_int {
    ($($t:ty => $w:ty),*) => {$(
        impl Scalar for $t {
            const IS_FLOAT: bool = false;
            const LOWEST: Self = <$t>::MIN;
            const MAX: Self = <$t>::MAX;
            type Compute = $t;
            type Wide = $w;
            #[inline]
            fn load(self) -> $t { self }
            #[inline]
            fn store(c: $t) -> Self { c }
            #[inline]
            fn widen(self) -> $w { self as $w }
            #[inline]
            fn narrow(w: $w) -> Self { w as $t }
            #[inline]
            fn to_f64(self) -> f64 { self as f64 }
            #[inline]
            fn from_f64(v: f64) -> Self { v as $t }
            #[inline]
            fn to_i128(self) -> i128 { self as i128 }
            #[inline]
            fn from_i128(v: i128) -> Self { v as $t }
        }
    )*};
}
scalar_int!(u8 => u64, u16 => u64, u32 => u64, u64 => u64,
    i8 => i64, i16 => i64, i32 => i64, i64 => i64);

macro_rules! scalar_float {
    ($($t:ty),*) => {$(
        impl Scalar for $t {
            const IS_FLOAT: bool = true;
            const LOWEST: Self = <$t>::MIN;
            const MAX: Self = <$t>::MAX;
            type Compute = $t;
            type Wide = $t;
            #[inline]
            fn load(self) -> $t { self }
            #[inline]
            fn store(c: $t) -> Self { c }
            #[inline]
            fn widen(self) -> $t { self }
            #[inline]
            fn narrow(w: $t) -> Self { w }
            #[inline]
            fn to_f64(self) -> f64 { self as f64 }
            #[inline]
            fn from_f64(v: f64) -> Self { v as $t }
            #[inline]
            fn to_i128(self) -> i128 { self as i128 }
            #[inline]
            fn from_i128(v: i128) -> Self { v as $t }
        }
    )*};
}
scalar_float!(f32, f64);

/// f64 -> bf16 through f32, as numpy's `ml_dtypes` (Eigen) converts. `half`'s own
/// `bf16::from_f64` (2.7) loses the bits below the rounding bit for some values: the f32
/// `0x116e8006` (1.881434e-28) widened to f64 came back as bf16 `0x116e`, not the nearest
/// `0x116f` (9 of 200 000 spread f32 bit patterns), so a Cast from f32 rounded wrong.
#[inline]
fn bf16_from_f64(v: f64) -> bf16 {
    bf16::from_f32(v as f32)
}

// f16 and bf16 compute in f32: widening is exact, storing rounds once.
macro_rules! scalar_half {
    ($($t:ty => $from_f64:path),*) => {$(
        impl Scalar for $t {
            const IS_FLOAT: bool = true;
            const LOWEST: Self = <$t>::MIN;
            const MAX: Self = <$t>::MAX;
            type Compute = f32;
            type Wide = f32;
            #[inline]
            fn load(self) -> f32 { self.to_f32() }
            #[inline]
            fn store(c: f32) -> Self { <$t>::from_f32(c) }
            #[inline]
            fn widen(self) -> f32 { self.to_f32() }
            #[inline]
            fn narrow(w: f32) -> Self { <$t>::from_f32(w) }
            #[inline]
            fn to_f64(self) -> f64 { <$t>::to_f64(self) }
            #[inline]
            fn from_f64(v: f64) -> Self { $from_f64(v) }
            #[inline]
            fn to_i128(self) -> i128 { <$t>::to_f64(self) as i128 }
            #[inline]
            fn from_i128(v: i128) -> Self { $from_f64(v as f64) }
        }
    )*};
}
scalar_half!(f16 => f16::from_f64, bf16 => bf16_from_f64);

impl Scalar for Bool {
    const IS_FLOAT: bool = false;
    const LOWEST: Self = Bool(0);
    const MAX: Self = Bool(1);
    type Compute = bool;
    type Wide = i64;
    #[inline]
    fn load(self) -> bool {
        self.get()
    }
    #[inline]
    fn store(c: bool) -> Self {
        Bool::new(c)
    }
    #[inline]
    fn widen(self) -> i64 {
        i64::from(self.get())
    }
    #[inline]
    fn narrow(w: i64) -> Self {
        Bool::new(w != 0)
    }
    #[inline]
    fn to_f64(self) -> f64 {
        f64::from(u8::from(self.get()))
    }
    #[inline]
    fn from_f64(v: f64) -> Self {
        Bool::new(v != 0.0)
    }
    #[inline]
    fn to_i128(self) -> i128 {
        i128::from(self.get())
    }
    #[inline]
    fn from_i128(v: i128) -> Self {
        Bool::new(v != 0)
    }
}

/// Converts one element as ONNX `Cast` does: floats to integers truncate toward zero
/// (saturating), integers wrap, anything non-zero is true.
#[inline]
pub fn convert<S: Scalar, D: Scalar>(v: S) -> D {
    if S::IS_FLOAT {
        D::from_f64(v.to_f64())
    } else {
        D::from_i128(v.to_i128())
    }
}

// ---------------------------------------------------------------------------------------------
// Arith

/// Arithmetic in a compute type (every integer type, f32, f64). Integer operations wrap;
/// callers reject zero divisors before calling `div`, `modulo` or `fmod` on integers.
pub trait Arith: Scalar<Compute = Self> {
    /// 0.
    const ZERO: Self;
    /// 1.
    const ONE: Self;
    /// `self + o`.
    fn add(self, o: Self) -> Self;
    /// `self - o`.
    fn sub(self, o: Self) -> Self;
    /// `self * o`.
    fn mul(self, o: Self) -> Self;
    /// `self / o`; integer division truncates toward zero (as in C).
    fn div(self, o: Self) -> Self;
    /// Remainder with the sign of the divisor (Python's `%`).
    fn modulo(self, o: Self) -> Self;
    /// Remainder with the sign of the dividend (C's `fmod`, `%`).
    fn fmod(self, o: Self) -> Self;
    /// `|self|` (wrapping for the lowest signed integer).
    fn abs(self) -> Self;
    /// `-self` (wrapping for integers).
    fn neg(self) -> Self;
    /// -1, 0 or 1 (NaN stays NaN, and ±0.0 keeps its sign).
    fn sign(self) -> Self;
    /// True only for a float NaN.
    fn is_nan(self) -> bool;
}

macro_rules! arith_int {
    ($signed:tt: $($t:ty),*) => {$(
        impl Arith for $t {
            const ZERO: Self = 0;
            const ONE: Self = 1;
            #[inline]
            fn add(self, o: Self) -> Self { self.wrapping_add(o) }
            #[inline]
            fn sub(self, o: Self) -> Self { self.wrapping_sub(o) }
            #[inline]
            fn mul(self, o: Self) -> Self { self.wrapping_mul(o) }
            #[inline]
            fn div(self, o: Self) -> Self { self.wrapping_div(o) }
            #[inline]
            fn modulo(self, o: Self) -> Self {
                let r = self.wrapping_rem(o);
                arith_int!(@fix $signed, r, o)
            }
            #[inline]
            fn fmod(self, o: Self) -> Self { self.wrapping_rem(o) }
            #[inline]
            fn abs(self) -> Self { arith_int!(@abs $signed, self) }
            #[inline]
            fn neg(self) -> Self { self.wrapping_neg() }
            #[inline]
            fn sign(self) -> Self { arith_int!(@sign $signed, self) }
            #[inline]
            fn is_nan(self) -> bool { false }
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
            #[inline]
            fn add(self, o: Self) -> Self { self + o }
            #[inline]
            fn sub(self, o: Self) -> Self { self - o }
            #[inline]
            fn mul(self, o: Self) -> Self { self * o }
            #[inline]
            fn div(self, o: Self) -> Self { self / o }
            #[inline]
            fn modulo(self, o: Self) -> Self {
                let r = self % o;
                if r != 0.0 && ((r < 0.0) != (o < 0.0)) { r + o } else { r }
            }
            #[inline]
            fn fmod(self, o: Self) -> Self { self % o }
            #[inline]
            fn abs(self) -> Self { <$t>::abs(self) }
            #[inline]
            fn neg(self) -> Self { -self }
            #[inline]
            fn sign(self) -> Self {
                if self > 0.0 { 1.0 } else if self < 0.0 { -1.0 } else { self }
            }
            #[inline]
            fn is_nan(self) -> bool { <$t>::is_nan(self) }
        }
    )*};
}
arith_float!(f32, f64);

// ---------------------------------------------------------------------------------------------
// Num, Float

/// A tensor element with arithmetic: the integers and the floats (not bool). Its compute type
/// is an [`Arith`].
pub trait Num: Scalar<Compute: Arith> {}

impl<T: Scalar<Compute: Arith>> Num for T {}

/// A float tensor element (f16, bf16, f32, f64), computed in a [`Real`] (f32 for f16 and bf16).
pub trait Float: Num<Compute: Real> {}

impl<T: Num<Compute: Real>> Float for T {}

// ---------------------------------------------------------------------------------------------
// Real

/// The float compute types, f32 and f64, with their operators and math functions (each one the
/// standard library's, except [`erf`](Real::erf) and [`exp_fast`](Real::exp_fast)).
pub trait Real:
    Arith
    + Add<Output = Self>
    + Sub<Output = Self>
    + Mul<Output = Self>
    + Div<Output = Self>
    + Neg<Output = Self>
    + AddAssign
{
    /// −∞.
    const NEG_INFINITY: Self;
    /// `v` as this type (rounded to nearest).
    #[inline]
    fn from_usize(v: usize) -> Self {
        Self::from_f64(v as f64)
    }
    /// `e^self`.
    fn exp(self) -> Self;
    /// `e^self - 1`, accurate near 0.
    fn exp_m1(self) -> Self;
    /// Natural logarithm.
    fn ln(self) -> Self;
    /// `ln(1 + self)`, accurate near 0.
    fn ln_1p(self) -> Self;
    /// Square root.
    fn sqrt(self) -> Self;
    /// `self^p`.
    fn powf(self, p: Self) -> Self;
    /// Hyperbolic tangent.
    fn tanh(self) -> Self;
    /// Sine.
    fn sin(self) -> Self;
    /// Cosine.
    fn cos(self) -> Self;
    /// Tangent.
    fn tan(self) -> Self;
    /// Arcsine.
    fn asin(self) -> Self;
    /// Arccosine.
    fn acos(self) -> Self;
    /// Arctangent.
    fn atan(self) -> Self;
    /// Hyperbolic sine.
    fn sinh(self) -> Self;
    /// Hyperbolic cosine.
    fn cosh(self) -> Self;
    /// Inverse hyperbolic sine.
    fn asinh(self) -> Self;
    /// Inverse hyperbolic cosine.
    fn acosh(self) -> Self;
    /// Inverse hyperbolic tangent.
    fn atanh(self) -> Self;
    /// Largest integer not above.
    fn floor(self) -> Self;
    /// Smallest integer not below.
    fn ceil(self) -> Self;
    /// Nearest integer, ties to even.
    fn round_ties_even(self) -> Self;
    /// ±∞.
    fn is_infinite(self) -> bool;
    /// Sign bit clear (+0.0, +∞ and positive NaNs included).
    fn is_sign_positive(self) -> bool;
    /// The error function: [`erf64`] for f64; for f32 (and the f16/bf16 computed in it)
    /// [`erf32`], within 5e-7 of the exact value.
    fn erf(self) -> Self;
    /// `e^self` for activations and normalizations, where a loop over a slice should
    /// vectorize: [`exp32`] for f32 (within 2 ulp), [`exp`](Real::exp) for f64.
    /// (A default, so that adding it broke no implementation outside this crate.)
    fn exp_fast(self) -> Self {
        self.exp()
    }
    /// The logistic function `1 / (1 + e^-self)`, without overflow for either sign; through
    /// [`exp_fast`](Real::exp_fast), with no branch on the sign.
    #[inline]
    fn sigmoid(self) -> Self {
        let e = (-Arith::abs(self)).exp_fast();
        let s = Self::ONE / (Self::ONE + e);
        if self.is_sign_positive() {
            s
        } else {
            e * s
        }
    }
}

macro_rules! real {
    ($t:ty, $erf:expr, $exp_fast:expr) => {
        impl Real for $t {
            const NEG_INFINITY: Self = <$t>::NEG_INFINITY;
            #[inline]
            fn exp(self) -> Self {
                <$t>::exp(self)
            }
            #[inline]
            fn exp_m1(self) -> Self {
                <$t>::exp_m1(self)
            }
            #[inline]
            fn ln(self) -> Self {
                <$t>::ln(self)
            }
            #[inline]
            fn ln_1p(self) -> Self {
                <$t>::ln_1p(self)
            }
            #[inline]
            fn sqrt(self) -> Self {
                <$t>::sqrt(self)
            }
            #[inline]
            fn powf(self, p: Self) -> Self {
                <$t>::powf(self, p)
            }
            #[inline]
            fn tanh(self) -> Self {
                <$t>::tanh(self)
            }
            #[inline]
            fn sin(self) -> Self {
                <$t>::sin(self)
            }
            #[inline]
            fn cos(self) -> Self {
                <$t>::cos(self)
            }
            #[inline]
            fn tan(self) -> Self {
                <$t>::tan(self)
            }
            #[inline]
            fn asin(self) -> Self {
                <$t>::asin(self)
            }
            #[inline]
            fn acos(self) -> Self {
                <$t>::acos(self)
            }
            #[inline]
            fn atan(self) -> Self {
                <$t>::atan(self)
            }
            #[inline]
            fn sinh(self) -> Self {
                <$t>::sinh(self)
            }
            #[inline]
            fn cosh(self) -> Self {
                <$t>::cosh(self)
            }
            #[inline]
            fn asinh(self) -> Self {
                <$t>::asinh(self)
            }
            #[inline]
            fn acosh(self) -> Self {
                <$t>::acosh(self)
            }
            #[inline]
            fn atanh(self) -> Self {
                <$t>::atanh(self)
            }
            #[inline]
            fn floor(self) -> Self {
                <$t>::floor(self)
            }
            #[inline]
            fn ceil(self) -> Self {
                <$t>::ceil(self)
            }
            #[inline]
            fn round_ties_even(self) -> Self {
                <$t>::round_ties_even(self)
            }
            #[inline]
            fn is_infinite(self) -> bool {
                <$t>::is_infinite(self)
            }
            #[inline]
            fn is_sign_positive(self) -> bool {
                <$t>::is_sign_positive(self)
            }
            #[inline]
            fn erf(self) -> Self {
                $erf(self)
            }
            #[inline]
            fn exp_fast(self) -> Self {
                $exp_fast(self)
            }
        }
    };
}
real!(f32, erf32, exp32);
real!(f64, erf64, f64::exp);

/// The bounds [`requant_byte`] clamps to for a byte output (`signed`: i8, else u8) with zero
/// point `zp`: the type's range less the zero point, exact in f32 (saturating for a zero point
/// outside the type, which then clamps every value to one end).
pub fn requant_bounds(signed: bool, zp: i32) -> (f32, f32) {
    let (lo, hi): (i32, i32) = if signed { (-128, 127) } else { (0, 255) };
    (lo.saturating_sub(zp) as f32, hi.saturating_sub(zp) as f32)
}

/// The requantization of one integer sum (QLinearConv's and QLinearMatMul's, the bias in
/// it): `round_even(acc * mult + zp)` with the product clamped to `[lo, hi]` (the output's
/// bounds less the zero point), as its byte (an i8 result as its two's-complement byte). The
/// output stage of [`GemmArgs::REQUANT_MULTIPLIER`](crate::blas::GemmArgs::REQUANT_MULTIPLIER).
///
/// The product in f32 as ONNX Runtime's MLAS computes it (`MlasRequantizeOutput`: the sum
/// converted to f32, one f32 product), 16 lanes per instruction where an f64 product had 8
/// (the requantization took twice the VNNI product's time on MobileNetV2's 1x1 layers).
/// The zero point is added before the rounding, as the ONNX reference does (MLAS adds it
/// after, which differs at exact halves with an odd zero point). The reference's product is
/// f64; the two differ only where the product lies within a relative 2^-24 of a half (or
/// the sum exceeds 2^24), which no ONNX node case has. A NaN product (an infinite
/// multiplier times 0) gives the lower bound, as MLAS's `max` does.
#[inline(always)]
pub fn requant_byte(acc: i32, mult: f32, zp: i32, lo: f32, hi: f32) -> u8 {
    // 1.5 * 2^23 plus the zero point (an exact integer): the clamped product (within 2^9)
    // plus this is rounded once, half to even, to an f32 whose low mantissa bits hold
    // `round_even(product + zp)` in two's complement.
    let magic = 12_582_912.0 + zp as f32;
    let p = acc as f32 * mult;
    let p = if p > lo { p } else { lo };
    let p = if p < hi { p } else { hi };
    (p + magic).to_bits() as u8
}

/// The constants of [`exp32`], for vector forms of it that must agree with it (a plugin's
/// intrinsics): `x` clamped to [`LOWEST`](exp32_parts::LOWEST)..=[`HIGHEST`](exp32_parts::HIGHEST),
/// `n = round(x log2 e)`, `r = x - n LN2_HI - n LN2_LO`, `e^x = 2^n (1 + r + r^2 p(r))` with `p`
/// the polynomial [`P`](exp32_parts::P) (highest degree first).
pub mod exp32_parts {
    /// ln 2's leading bits, so that `n * LN2_HI` is exact for the n that occur.
    pub const LN2_HI: f32 = 0.693_359_4;
    /// ln 2 less [`LN2_HI`].
    pub const LN2_LO: f32 = -2.121_944_4e-4;
    /// Cephes' `expf` coefficients, highest degree first.
    pub const P: [f32; 6] = [
        1.987_569_1e-4,
        1.398_199_9e-3,
        8.333_452e-3,
        4.166_579_6e-2,
        1.666_666_5e-1,
        // Cephes' 5.0000001201e-1, which rounds to 0.5 in f32.
        0.5,
    ];
    /// The clamp's ends: they keep n in [-150, 128] (+∞ above 88.72, 0 below -104).
    pub const LOWEST: f32 = -104.0;
    /// See [`LOWEST`].
    pub const HIGHEST: f32 = 89.0;
}

/// `e^x` in f32, branch-free so that a loop over a slice vectorizes: Cephes' `expf` (`x = n ln2 +
/// r` with |r| <= ln2/2, a degree-6 polynomial for `e^r`), scaled by `2^n` as two exact powers
/// of two built from exponent bits, so results down into the subnormals come out right. Within
/// 2 ulp for normal results; +∞ past 88.72, 0 below -104; NaN stays NaN.
#[inline]
pub fn exp32(x: f32) -> f32 {
    use exp32_parts::{HIGHEST, LN2_HI, LN2_LO, LOWEST, P};
    // `clamp` keeps a NaN; the bounds keep n in [-150, 128], where both halves of 2^n are normal.
    let x = x.clamp(LOWEST, HIGHEST);
    // Round to nearest by adding 1.5 * 2^23 (SSE2 has no rounding instruction, and `round`
    // would be a call per element): the integer then sits in the low mantissa bits.
    const SHIFT: f32 = 12_582_912.0;
    let t = x * std::f32::consts::LOG2_E + SHIFT;
    let n = t - SHIFT;
    let r = x - n * LN2_HI - n * LN2_LO;
    let p = P[1..].iter().fold(P[0], |acc, &c| acc * r + c);
    let y = p * r * r + r + 1.0;
    // For a NaN the bits are garbage, and y is NaN anyway.
    let n = (t.to_bits() as i32).wrapping_sub(SHIFT.to_bits() as i32);
    let half = n >> 1;
    let pow2 = |e: i32| f32::from_bits((e.wrapping_add(127) as u32) << 23);
    y * pow2(half) * pow2(n - half)
}

/// [`tanh32`]'s odd polynomial for |x| below [`TANH32_SMALL_BELOW`]: `tanh x = x + x z p(z)`
/// with `z = x^2` and `p` these coefficients, highest degree first (Cephes' `tanhf`). Public
/// for vector forms of `tanh32` that must agree with it.
pub const TANH32_SMALL: [f32; 5] = [
    -5.704_988_7e-3,
    2.063_909e-2,
    -5.373_971_6e-2,
    1.333_144_2e-1,
    -3.333_328e-1,
];
/// Where [`tanh32`] switches from its polynomial to `1 - 2 / (e^2|x| + 1)`.
pub const TANH32_SMALL_BELOW: f32 = 0.625;

/// `tanh x` in f32, branch-free so that a loop over a slice vectorizes: Cephes' `tanhf`, an odd
/// polynomial below |x| = 0.625 (no cancellation near 0) and `1 - 2 / (e^2|x| + 1)` above
/// (through [`exp32`], which saturates to +∞ past 44: the result is then exactly ±1). Both are
/// computed and one is selected. Within 2 ulp; NaN stays NaN.
#[inline]
pub fn tanh32(x: f32) -> f32 {
    // On |x|, the sign put back at the end (so tanh -0 = -0).
    let a = x.abs();
    let z = a * a;
    let p = TANH32_SMALL[1..]
        .iter()
        .fold(TANH32_SMALL[0], |acc, &c| acc * z + c);
    let small = p * z * a + a;
    let large = 1.0 - 2.0 / (exp32(2.0 * a) + 1.0);
    (if a < TANH32_SMALL_BELOW { small } else { large }).copysign(x)
}

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

/// The error function in f32: `x P(x^2) / Q(x^2)` on `x` clamped to [-4, 4] (beyond, erf
/// rounds to ±1 in f32), the rational approximation of Eigen and XLA. Within 5e-7 absolute
/// and 3e-7 relative of the exact value; NaN stays NaN.
///
/// Why not [`erf64`] rounded: its series costs tens of nanoseconds per element, which made
/// `Erf` 40 % of a BERT encoder (the exported GELU); this is branch-free, so a loop over a
/// slice vectorizes, at a few ulps.
#[inline]
pub fn erf32(x: f32) -> f32 {
    const ALPHA: [f32; 7] = [
        -1.609_603_3e-2,
        -2.954_6e-3,
        -7.349_906_3e-4,
        -5.692_506_4e-5,
        -2.101_024e-6,
        2.770_681_4e-8,
        -2.726_142_3e-10,
    ];
    const BETA: [f32; 5] = [
        -1.426_473_9e-2,
        -7.373_329e-3,
        -1.682_827e-3,
        -2.133_740_6e-4,
        -1.456_607_2e-5,
    ];
    // `clamp` keeps a NaN (min/max would not).
    let x = x.clamp(-4.0, 4.0);
    let x2 = x * x;
    let p = ALPHA[..6]
        .iter()
        .rev()
        .fold(ALPHA[6], |acc, &c| acc * x2 + c);
    let q = BETA[..4].iter().rev().fold(BETA[4], |acc, &c| acc * x2 + c);
    // The approximation overshoots 1 by up to 4e-7 near |x| = 3.2, and from 3.9 on (erfc below
    // 3.5e-8) the exact erf rounds to ±1 where it stays short of it.
    let r = (x * p / q).clamp(-1.0, 1.0);
    if x.abs() >= 3.9 {
        x.signum()
    } else {
        r
    }
}

// ---------------------------------------------------------------------------------------------
// Bits

/// Integer bit operations.
pub trait Bits: Copy + Send + Sync + 'static {
    /// `self & o`.
    fn and(self, o: Self) -> Self;
    /// `self | o`.
    fn or(self, o: Self) -> Self;
    /// `self ^ o`.
    fn xor(self, o: Self) -> Self;
    /// `!self`.
    fn not(self) -> Self;
    /// Shifts left by `n` bits; a negative `n` or one of at least the width gives 0.
    fn shl(self, n: Self) -> Self;
    /// Shifts right by `n` bits (arithmetic when signed); a negative `n` or one of at least
    /// the width gives the sign fill (0, or -1 for a negative value).
    fn shr(self, n: Self) -> Self;
}

macro_rules! bits {
    ($($t:ty),*) => {$(
        impl Bits for $t {
            #[inline]
            fn and(self, o: Self) -> Self { self & o }
            #[inline]
            fn or(self, o: Self) -> Self { self | o }
            #[inline]
            fn xor(self, o: Self) -> Self { self ^ o }
            #[inline]
            fn not(self) -> Self { !self }
            #[inline]
            fn shl(self, n: Self) -> Self {
                u32::try_from(n).ok().and_then(|n| self.checked_shl(n)).unwrap_or(0)
            }
            #[inline]
            fn shr(self, n: Self) -> Self {
                // Out-of-range amounts leave only the sign fill (-1 or 0; 0 when unsigned).
                let fill = if <$t>::MIN == 0 { 0 } else { self >> (<$t>::BITS - 1) };
                u32::try_from(n).ok().and_then(|n| self.checked_shr(n)).unwrap_or(fill)
            }
        }
    )*};
}
bits!(u8, i8, u16, i16, u32, i32, u64, i64);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exp32_is_within_2_ulp_and_saturates() {
        let mut worst = 0f64;
        for i in -2_000_000..=1_800_000 {
            let x = i as f32 * 4.9e-5;
            let (got, want) = (f64::from(exp32(x)), f64::from(x).exp());
            if want >= f64::from(f32::MIN_POSITIVE) {
                // In ulps of the exact result's binade.
                let ulp = 2f64.powi(want.log2().floor() as i32 - 23);
                worst = worst.max((got - want).abs() / ulp);
            } else {
                assert!((got - want).abs() <= 2f64.powi(-149), "exp32({x}) = {got}");
            }
        }
        assert!(worst <= 2.0, "worst error {worst} ulp");
        assert_eq!(exp32(0.0), 1.0);
        assert_eq!(exp32(88.8), f32::INFINITY);
        assert_eq!(exp32(f32::INFINITY), f32::INFINITY);
        assert_eq!(exp32(f32::NEG_INFINITY), 0.0);
        assert!(exp32(f32::NAN).is_nan());
        for x in [-1e3f32, -20.0, -1.0, 0.0, 1.0, 20.0, 1e3] {
            let want = 1.0 / (1.0 + (-f64::from(x)).exp());
            assert!(
                (f64::from(Real::sigmoid(x)) - want).abs() <= 3e-7 * want,
                "{x}"
            );
        }
    }

    #[test]
    fn tanh32_is_within_2_ulp_and_saturates() {
        let mut worst = 0f64;
        for i in -1_000_000..=1_000_000 {
            let x = i as f32 * 1.2e-5;
            let (got, want) = (f64::from(tanh32(x)), f64::from(x).tanh());
            if x != 0.0 {
                let ulp = 2f64.powi(want.abs().log2().floor() as i32 - 23);
                worst = worst.max((got - want).abs() / ulp);
            }
        }
        assert!(worst <= 2.0, "worst error {worst} ulp");
        // Tiny arguments: tanh x = x.
        assert_eq!(tanh32(1e-30), 1e-30);
        assert_eq!(tanh32(-0.0).to_bits(), (-0.0f32).to_bits());
        assert_eq!((tanh32(50.0), tanh32(-1e30)), (1.0, -1.0));
        assert_eq!(
            (tanh32(f32::INFINITY), tanh32(f32::NEG_INFINITY)),
            (1.0, -1.0)
        );
        assert!(tanh32(f32::NAN).is_nan());
    }

    #[test]
    fn erf32_is_within_its_bound_of_erf64() {
        let (mut worst_abs, mut worst_rel) = (0f64, 0f64);
        for i in -1_200_000..=1_200_000 {
            let x = i as f32 * 5e-6;
            let (got, want) = (f64::from(erf32(x)), erf64(f64::from(x)));
            assert!(got.abs() <= 1.0, "erf32({x}) = {got}");
            worst_abs = worst_abs.max((got - want).abs());
            if x.abs() < 0.5 && x != 0.0 {
                worst_rel = worst_rel.max((got - want).abs() / want.abs());
            }
        }
        assert!(worst_abs < 5e-7, "worst absolute error {worst_abs}");
        assert!(worst_rel < 3e-7, "worst relative error {worst_rel}");
        let slope = f64::from(erf32(1e-30) / 1e-30);
        assert!(
            (slope - std::f64::consts::FRAC_2_SQRT_PI).abs() < 2e-7,
            "{slope}"
        );
        assert_eq!(
            (erf32(f32::INFINITY), erf32(f32::NEG_INFINITY), erf32(0.0)),
            (1.0, -1.0, 0.0)
        );
        assert!(erf32(f32::NAN).is_nan());
    }

    /// The dtypes `dispatch!` binds for a family, in its order.
    fn bound(family: &[DType]) -> Vec<DType> {
        family
            .iter()
            .filter_map(|&d| crate::dispatch!(d, ALL, |T| Some(T::DTYPE), _ => None))
            .collect()
    }

    #[test]
    fn lists_are_consistent() {
        let cat = |a: &[DType], b: &[DType]| [a, b].concat();
        assert_eq!(cat(INTEGERS, FLOATS), NUMERIC);
        assert_eq!(cat(BOOL, NUMERIC), ALL);
        assert_eq!(cat(ALL, &[DType::String]), ALL_AND_STRING);
        assert_eq!(cat(SIGNED, FLOATS), SIGNED_AND_FLOATS);
        let mut ints = cat(SIGNED, UNSIGNED);
        ints.sort();
        let mut want = INTEGERS.to_vec();
        want.sort();
        assert_eq!(ints, want);
        assert!(FLOATS.iter().all(|d| d.is_float()));
        assert!(FLOATS_TO_F32.iter().all(|d| FLOATS.contains(d)));
        assert_eq!(ALL, &DType::ALL[..13]);
        // Every element of ALL has a Rust type, and that type names the same dtype.
        assert_eq!(bound(ALL), ALL);
    }

    #[test]
    fn dispatch_families_bind_exactly_their_list() {
        macro_rules! check {
            ($($fam:ident),*) => {$(
                let got: Vec<DType> = ALL_AND_STRING
                    .iter()
                    .filter_map(|&d| crate::dispatch!(d, $fam, |T| Some(T::DTYPE), _ => None))
                    .collect();
                assert_eq!(got, $fam, stringify!($fam));
            )*};
        }
        check!(
            FLOATS,
            FLOATS_TO_F32,
            SIGNED,
            UNSIGNED,
            INTEGERS,
            SIGNED_AND_FLOATS,
            NUMERIC,
            ALL
        );
        let r: Result<(), String> =
            crate::dispatch!(DType::String, NUMERIC, |T| Ok(()), other => Err(other.to_string()));
        assert_eq!(r, Err("BYTES".to_string()));
    }

    #[test]
    fn half_precision_computes_in_f32() {
        let x = f16::from_f32(1.5);
        assert_eq!(x.load(), 1.5f32);
        assert_eq!(f16::store(1.0 / 3.0), f16::from_f32(1.0 / 3.0));
        assert_eq!(bf16::narrow(2.5), bf16::from_f32(2.5));
        // An f32 rounds to bf16 the same way whether it comes as f32 or widened to f64 (where
        // `half`'s own `bf16::from_f64` drops the sticky bits).
        for bits in [0x116e_8006u32, 0x2e92_8004, 0x4bb6_8002, 0xf37a_8002] {
            let x = f32::from_bits(bits);
            assert_eq!(
                <bf16 as Scalar>::from_f64(f64::from(x)).to_bits(),
                bf16::from_f32(x).to_bits(),
                "{bits:#x}"
            );
        }
        // A NaN stored from f32 is the type's own NaN.
        assert_eq!(f16::store(f32::NAN).to_bits(), f16::NAN.to_bits());
        assert_eq!(bf16::store(f32::NAN).to_bits(), bf16::NAN.to_bits());
    }

    #[test]
    fn conversions_follow_cast() {
        assert_eq!(convert::<f32, i8>(-3.9), -3);
        assert_eq!(convert::<f32, u8>(300.0), 255);
        assert_eq!(convert::<i32, u8>(300), 44);
        assert_eq!(convert::<f64, Bool>(0.5), Bool(1));
        assert_eq!(convert::<Bool, f32>(Bool(1)), 1.0);
        assert_eq!(i32::narrow(i64::from(i32::MAX) + 1), i32::MIN);
        assert_eq!(Bool::narrow(2), Bool(1));
        assert_eq!(u8::widen(200), 200u64);
    }

    #[test]
    fn integer_arithmetic_wraps_and_floors() {
        assert_eq!(Arith::abs(i8::MIN), i8::MIN);
        assert_eq!(Arith::modulo(-7i32, 3), 2);
        assert_eq!(Arith::fmod(-7i32, 3), -1);
        assert_eq!(Arith::modulo(-7.0f64, 3.0), 2.0);
        assert_eq!(Arith::sign(-0.0f32).to_bits(), (-0.0f32).to_bits());
        assert_eq!(7u8.sign(), 1);
        assert_eq!(Bits::shr(-8i16, 20), -1);
        assert_eq!(Bits::shl(1u32, 40), 0);
    }

    #[test]
    fn erf_is_accurate() {
        assert_eq!(erf64(0.0), 0.0);
        assert!((erf64(1.0) - 0.842_700_792_949_714_9).abs() < 1e-15);
        assert!((erf64(-3.0) + 0.999_977_909_503_001_4).abs() < 1e-15);
        assert_eq!(Real::erf(10.0f32), 1.0);
    }
}

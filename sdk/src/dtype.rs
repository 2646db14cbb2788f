//! Element types of tensors.

use abi_stable::{std_types::RString, StableAbi};
use half::{bf16, f16};

/// The element type of a tensor: ONNX's `TensorProto.DataType` code.
///
/// An open code, not a Rust enum, so that the ABI can grow: a type added later (by ONNX or by
/// opreg) is a new constant, and a plugin built before it keeps loading. A code a plugin or the
/// wire does not know is refused where it is used (`UNIMPLEMENTED`), never at load. Match on
/// the constants and keep a `_` arm.
///
/// Sub-byte types (`U4`, `I4`, `F4E2M1`, `U2`, `I2`) are held **unpacked, one element per
/// byte** in tensors that cross the ABI (ONNX's packed form is unpacked at import): kernels
/// index them like bytes, and the wire carries them the same way. This is part of ABI 1.0.
#[repr(transparent)]
#[derive(StableAbi, Copy, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct DType(pub i32);

#[allow(non_upper_case_globals)]
impl DType {
    /// No type (ONNX `UNDEFINED`, 0): what [`KernelFactory::infer`](crate::KernelFactory::infer)
    /// reads for an input whose type is not known statically (ABI 1.1).
    pub const UNDEFINED: DType = DType(0);
    /// `f32` (ONNX `FLOAT`, 1).
    pub const F32: DType = DType(1);
    /// `u8` (2).
    pub const U8: DType = DType(2);
    /// `i8` (3).
    pub const I8: DType = DType(3);
    /// `u16` (4).
    pub const U16: DType = DType(4);
    /// `i16` (5).
    pub const I16: DType = DType(5);
    /// `i32` (6).
    pub const I32: DType = DType(6);
    /// `i64` (7).
    pub const I64: DType = DType(7);
    /// UTF-8 (or arbitrary byte) strings; each element is an [`RString`] (8).
    pub const String: DType = DType(8);
    /// `bool`, one byte, 0 or 1 (9).
    pub const Bool: DType = DType(9);
    /// IEEE 754 half precision ([`half::f16`]) (10).
    pub const F16: DType = DType(10);
    /// `f64` (11).
    pub const F64: DType = DType(11);
    /// `u32` (12).
    pub const U32: DType = DType(12);
    /// `u64` (13).
    pub const U64: DType = DType(13);
    /// Two `f32`, real then imaginary (14).
    pub const C64: DType = DType(14);
    /// Two `f64`, real then imaginary (15).
    pub const C128: DType = DType(15);
    /// bfloat16 ([`half::bf16`]) (16).
    pub const BF16: DType = DType(16);
    /// 8-bit float E4M3, finite only (`float8e4m3fn`); one byte per element, the raw code (17).
    pub const F8E4M3FN: DType = DType(17);
    /// 8-bit float E4M3, no negative zero (`float8e4m3fnuz`); the raw code (18).
    pub const F8E4M3FNUZ: DType = DType(18);
    /// 8-bit float E5M2 (`float8e5m2`); the raw code (19).
    pub const F8E5M2: DType = DType(19);
    /// 8-bit float E5M2, no negative zero (`float8e5m2fnuz`); the raw code (20).
    pub const F8E5M2FNUZ: DType = DType(20);
    /// 4-bit unsigned integer, held unpacked: one byte per element, 0..=15 (21).
    pub const U4: DType = DType(21);
    /// 4-bit signed integer, held unpacked as an `i8` in -8..=7 (22).
    pub const I4: DType = DType(22);
    /// 4-bit float E2M1 (`float4e2m1`), held unpacked: the 4-bit code in one byte (23).
    pub const F4E2M1: DType = DType(23);
    /// 8-bit exponent-only scale (`float8e8m0`); the raw code (24).
    pub const F8E8M0: DType = DType(24);
    /// 2-bit unsigned integer, held unpacked: one byte per element, 0..=3 (25).
    pub const U2: DType = DType(25);
    /// 2-bit signed integer, held unpacked as an `i8` in -2..=1 (26).
    pub const I2: DType = DType(26);

    /// Every dtype this SDK knows.
    pub const ALL: [DType; 26] = [
        DType::Bool,
        DType::U8,
        DType::I8,
        DType::U16,
        DType::I16,
        DType::U32,
        DType::I32,
        DType::U64,
        DType::I64,
        DType::F16,
        DType::BF16,
        DType::F32,
        DType::F64,
        DType::String,
        DType::F8E4M3FN,
        DType::F8E4M3FNUZ,
        DType::F8E5M2,
        DType::F8E5M2FNUZ,
        DType::U4,
        DType::I4,
        DType::F4E2M1,
        DType::F8E8M0,
        DType::U2,
        DType::I2,
        DType::C64,
        DType::C128,
    ];

    /// Whether this SDK knows the code (a newer plugin or client may send one it does not).
    pub fn is_known(self) -> bool {
        DType::ALL.contains(&self)
    }

    /// Size of one element in bytes (for `String`, the size of one [`RString`] header; 0 for a
    /// code this SDK does not know). Sub-byte types are held unpacked, one element per byte.
    pub const fn size(self) -> usize {
        match self {
            DType::Bool | DType::U8 | DType::I8 => 1,
            DType::F8E4M3FN
            | DType::F8E4M3FNUZ
            | DType::F8E5M2
            | DType::F8E5M2FNUZ
            | DType::F8E8M0 => 1,
            DType::U4 | DType::I4 | DType::F4E2M1 | DType::U2 | DType::I2 => 1,
            DType::U16 | DType::I16 | DType::F16 | DType::BF16 => 2,
            DType::U32 | DType::I32 | DType::F32 => 4,
            DType::U64 | DType::I64 | DType::F64 | DType::C64 => 8,
            DType::C128 => 16,
            DType::String => std::mem::size_of::<RString>(),
            _ => 0,
        }
    }

    /// The KServe v2 / Open Inference Protocol name (`FP32`, `INT64`, `BYTES`, ...).
    pub const fn kserve_name(self) -> &'static str {
        match self {
            DType::Bool => "BOOL",
            DType::U8 => "UINT8",
            DType::I8 => "INT8",
            DType::U16 => "UINT16",
            DType::I16 => "INT16",
            DType::U32 => "UINT32",
            DType::I32 => "INT32",
            DType::U64 => "UINT64",
            DType::I64 => "INT64",
            DType::F16 => "FP16",
            DType::BF16 => "BF16",
            DType::F32 => "FP32",
            DType::F64 => "FP64",
            DType::String => "BYTES",
            // Not in the KServe v2 protocol: opreg's names, one byte per element on the wire.
            DType::F8E4M3FN => "FP8E4M3FN",
            DType::F8E4M3FNUZ => "FP8E4M3FNUZ",
            DType::F8E5M2 => "FP8E5M2",
            DType::F8E5M2FNUZ => "FP8E5M2FNUZ",
            DType::U4 => "UINT4",
            DType::I4 => "INT4",
            DType::F4E2M1 => "FP4E2M1",
            DType::F8E8M0 => "FP8E8M0",
            DType::U2 => "UINT2",
            DType::I2 => "INT2",
            DType::C64 => "COMPLEX64",
            DType::C128 => "COMPLEX128",
            _ => "UNKNOWN",
        }
    }

    /// Parses a KServe v2 datatype name (or one of opreg's names for types the protocol lacks).
    pub fn from_kserve_name(name: &str) -> Option<DType> {
        DType::ALL.into_iter().find(|d| d.kserve_name() == name)
    }

    /// The `TensorProto.DataType` code ONNX uses for this type (the code itself).
    pub const fn onnx_code(self) -> i32 {
        self.0
    }

    /// Bits per element in ONNX's packed storage (`raw_data`) for sub-byte types.
    pub const fn packed_bits(self) -> Option<u32> {
        match self {
            DType::U4 | DType::I4 | DType::F4E2M1 => Some(4),
            DType::U2 | DType::I2 => Some(2),
            _ => None,
        }
    }

    /// The dtype of an ONNX `TensorProto.DataType` code, if this SDK knows it.
    pub fn from_onnx_code(code: i32) -> Option<DType> {
        Some(DType(code)).filter(|d| d.is_known())
    }

    /// True for f16, bf16, f32, f64.
    pub const fn is_float(self) -> bool {
        matches!(self, DType::F16 | DType::BF16 | DType::F32 | DType::F64)
    }
}

impl std::fmt::Display for DType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.is_known() {
            f.write_str(self.kserve_name())
        } else {
            write!(f, "dtype {}", self.0)
        }
    }
}

impl std::fmt::Debug for DType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        std::fmt::Display::fmt(self, f)
    }
}

/// The dtype constants as plain names, for `use opreg_sdk::dtype::names::*` where a match or a
/// type list spells many of them (what `use DType::*` was for an enum).
#[allow(non_upper_case_globals)]
pub mod names {
    use super::DType;
    /// [`DType::F32`].
    pub const F32: DType = DType::F32;
    /// [`DType::U8`].
    pub const U8: DType = DType::U8;
    /// [`DType::I8`].
    pub const I8: DType = DType::I8;
    /// [`DType::U16`].
    pub const U16: DType = DType::U16;
    /// [`DType::I16`].
    pub const I16: DType = DType::I16;
    /// [`DType::I32`].
    pub const I32: DType = DType::I32;
    /// [`DType::I64`].
    pub const I64: DType = DType::I64;
    /// [`DType::String`].
    pub const String: DType = DType::String;
    /// [`DType::Bool`].
    pub const Bool: DType = DType::Bool;
    /// [`DType::F16`].
    pub const F16: DType = DType::F16;
    /// [`DType::F64`].
    pub const F64: DType = DType::F64;
    /// [`DType::U32`].
    pub const U32: DType = DType::U32;
    /// [`DType::U64`].
    pub const U64: DType = DType::U64;
    /// [`DType::C64`].
    pub const C64: DType = DType::C64;
    /// [`DType::C128`].
    pub const C128: DType = DType::C128;
    /// [`DType::BF16`].
    pub const BF16: DType = DType::BF16;
    /// [`DType::F8E4M3FN`].
    pub const F8E4M3FN: DType = DType::F8E4M3FN;
    /// [`DType::F8E4M3FNUZ`].
    pub const F8E4M3FNUZ: DType = DType::F8E4M3FNUZ;
    /// [`DType::F8E5M2`].
    pub const F8E5M2: DType = DType::F8E5M2;
    /// [`DType::F8E5M2FNUZ`].
    pub const F8E5M2FNUZ: DType = DType::F8E5M2FNUZ;
    /// [`DType::U4`].
    pub const U4: DType = DType::U4;
    /// [`DType::I4`].
    pub const I4: DType = DType::I4;
    /// [`DType::F4E2M1`].
    pub const F4E2M1: DType = DType::F4E2M1;
    /// [`DType::F8E8M0`].
    pub const F8E8M0: DType = DType::F8E8M0;
    /// [`DType::U2`].
    pub const U2: DType = DType::U2;
    /// [`DType::I2`].
    pub const I2: DType = DType::I2;
}

/// A Rust type that is the element of a tensor of one [`DType`].
///
/// # Safety
/// `Self` must have the size, alignment and bit validity of the dtype's elements, so that a
/// tensor's bytes may be reinterpreted as `[Self]`.
pub unsafe trait Element: Copy + Send + Sync + 'static {
    /// The dtype whose elements are `Self`.
    const DTYPE: DType;
}

macro_rules! element {
    ($($t:ty => $d:ident),* $(,)?) => {
        $(unsafe impl Element for $t { const DTYPE: DType = DType::$d; })*
    };
}
element!(u8 => U8, i8 => I8, u16 => U16, i16 => I16, u32 => U32, i32 => I32, u64 => U64,
    i64 => I64, f16 => F16, bf16 => BF16, f32 => F32, f64 => F64);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_and_codes_round_trip() {
        for d in DType::ALL {
            assert_eq!(DType::from_kserve_name(d.kserve_name()), Some(d));
            assert_eq!(DType::from_onnx_code(d.onnx_code()), Some(d));
        }
        assert_eq!(DType::from_kserve_name("FP8"), None);
        assert_eq!(DType::from_onnx_code(99), None);
        // A code from a newer SDK travels and is named, not a crash.
        let future = DType(40);
        assert!(!future.is_known());
        assert_eq!(future.size(), 0);
        assert_eq!(future.to_string(), "dtype 40");
        assert_eq!(DType::from_onnx_code(14), Some(DType::C64));
        assert_eq!(DType::C128.size(), 16);
    }

    #[test]
    fn sizes_match_rust_types() {
        assert_eq!(DType::F16.size(), std::mem::size_of::<f16>());
        assert_eq!(DType::BF16.size(), std::mem::size_of::<bf16>());
        assert_eq!(DType::I64.size(), std::mem::size_of::<i64>());
        assert_eq!(DType::Bool.size(), std::mem::size_of::<bool>());
    }
}

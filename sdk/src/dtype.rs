//! Element types of tensors.

use abi_stable::{std_types::RString, StableAbi};
use half::{bf16, f16};

/// The element type of a tensor. The discriminants are part of the ABI: never reorder.
#[repr(u8)]
#[derive(StableAbi, Copy, Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum DType {
    /// `bool`, one byte, 0 or 1.
    Bool = 0,
    /// `u8`.
    U8 = 1,
    /// `i8`.
    I8 = 2,
    /// `u16`.
    U16 = 3,
    /// `i16`.
    I16 = 4,
    /// `u32`.
    U32 = 5,
    /// `i32`.
    I32 = 6,
    /// `u64`.
    U64 = 7,
    /// `i64`.
    I64 = 8,
    /// IEEE 754 half precision ([`half::f16`]).
    F16 = 9,
    /// bfloat16 ([`half::bf16`]).
    BF16 = 10,
    /// `f32`.
    F32 = 11,
    /// `f64`.
    F64 = 12,
    /// UTF-8 (or arbitrary byte) strings; each element is an [`RString`].
    String = 13,
    /// 8-bit float E4M3, finite only (`float8e4m3fn`); one byte per element, the raw code.
    F8E4M3FN = 14,
    /// 8-bit float E4M3, no negative zero (`float8e4m3fnuz`); the raw code.
    F8E4M3FNUZ = 15,
    /// 8-bit float E5M2 (`float8e5m2`); the raw code.
    F8E5M2 = 16,
    /// 8-bit float E5M2, no negative zero (`float8e5m2fnuz`); the raw code.
    F8E5M2FNUZ = 17,
    /// 4-bit unsigned integer, held unpacked: one byte per element, 0..=15.
    U4 = 18,
    /// 4-bit signed integer, held unpacked as an `i8` in -8..=7.
    I4 = 19,
    /// 4-bit float E2M1 (`float4e2m1`), held unpacked: the 4-bit code in one byte.
    F4E2M1 = 20,
    /// 8-bit exponent-only scale (`float8e8m0`); the raw code.
    F8E8M0 = 21,
    /// 2-bit unsigned integer, held unpacked: one byte per element, 0..=3.
    U2 = 22,
    /// 2-bit signed integer, held unpacked as an `i8` in -2..=1.
    I2 = 23,
}

impl DType {
    /// Every dtype, in discriminant order.
    pub const ALL: [DType; 24] = [
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
    ];

    /// Size of one element in bytes (for `String`, the size of one [`RString`] header).
    /// Sub-byte types are held unpacked, one element per byte.
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
            DType::U64 | DType::I64 | DType::F64 => 8,
            DType::String => std::mem::size_of::<RString>(),
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
        }
    }

    /// Parses a KServe v2 datatype name.
    pub fn from_kserve_name(name: &str) -> Option<DType> {
        DType::ALL.into_iter().find(|d| d.kserve_name() == name)
    }

    /// The `TensorProto.DataType` code ONNX uses for this type.
    pub const fn onnx_code(self) -> i32 {
        match self {
            DType::F32 => 1,
            DType::U8 => 2,
            DType::I8 => 3,
            DType::U16 => 4,
            DType::I16 => 5,
            DType::I32 => 6,
            DType::I64 => 7,
            DType::String => 8,
            DType::Bool => 9,
            DType::F16 => 10,
            DType::F64 => 11,
            DType::U32 => 12,
            DType::U64 => 13,
            DType::BF16 => 16,
            DType::F8E4M3FN => 17,
            DType::F8E4M3FNUZ => 18,
            DType::F8E5M2 => 19,
            DType::F8E5M2FNUZ => 20,
            DType::U4 => 21,
            DType::I4 => 22,
            DType::F4E2M1 => 23,
            DType::F8E8M0 => 24,
            DType::U2 => 25,
            DType::I2 => 26,
        }
    }

    /// Bits per element in ONNX's packed storage (`raw_data`) for sub-byte types.
    pub const fn packed_bits(self) -> Option<u32> {
        match self {
            DType::U4 | DType::I4 | DType::F4E2M1 => Some(4),
            DType::U2 | DType::I2 => Some(2),
            _ => None,
        }
    }

    /// The dtype of an ONNX `TensorProto.DataType` code, if opreg supports it.
    pub fn from_onnx_code(code: i32) -> Option<DType> {
        DType::ALL.into_iter().find(|d| d.onnx_code() == code)
    }

    /// True for f16, bf16, f32, f64.
    pub const fn is_float(self) -> bool {
        matches!(self, DType::F16 | DType::BF16 | DType::F32 | DType::F64)
    }
}

impl std::fmt::Display for DType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.kserve_name())
    }
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
    }

    #[test]
    fn sizes_match_rust_types() {
        assert_eq!(DType::F16.size(), std::mem::size_of::<f16>());
        assert_eq!(DType::BF16.size(), std::mem::size_of::<bf16>());
        assert_eq!(DType::I64.size(), std::mem::size_of::<i64>());
        assert_eq!(DType::Bool.size(), std::mem::size_of::<bool>());
    }
}

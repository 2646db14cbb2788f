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
}

impl DType {
    /// Every dtype, in discriminant order.
    pub const ALL: [DType; 14] = [
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
    ];

    /// Size of one element in bytes (for `String`, the size of one [`RString`] header).
    pub const fn size(self) -> usize {
        match self {
            DType::Bool | DType::U8 | DType::I8 => 1,
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
        assert_eq!(DType::from_onnx_code(17), None);
    }

    #[test]
    fn sizes_match_rust_types() {
        assert_eq!(DType::F16.size(), std::mem::size_of::<f16>());
        assert_eq!(DType::BF16.size(), std::mem::size_of::<bf16>());
        assert_eq!(DType::I64.size(), std::mem::size_of::<i64>());
        assert_eq!(DType::Bool.size(), std::mem::size_of::<bool>());
    }
}

//! Tensors on the wire: KServe datatype names and raw byte contents.

// Request and model data reach this module: no unchecked index or slice.
#![deny(clippy::indexing_slicing)]

use opreg_sdk::{host::HostTensor, DType};
use std::sync::Arc;
use tonic::Status;

/// Largest tensor a request may carry, in elements (guards the shape product).
const MAX_ELEMENTS: u64 = 1 << 34;

/// Parses a KServe datatype name for the tensor `name`.
pub fn dtype(name: &str, datatype: &str) -> Result<DType, Status> {
    DType::from_kserve_name(datatype).ok_or_else(|| {
        Status::invalid_argument(format!("tensor '{name}': unknown datatype '{datatype}'"))
    })
}

/// Largest rank a request may carry (ONNX Runtime's limit is lower still).
const MAX_RANK: usize = 64;

/// Checks a wire shape and turns it into dimensions. Every dimension is bounded on its own
/// too: a zero-size tensor such as `[0, 2^40]` holds no data, but kernels size state by its
/// other dimensions.
pub fn shape(name: &str, dims: &[i64]) -> Result<Vec<usize>, Status> {
    if dims.len() > MAX_RANK {
        return Err(Status::invalid_argument(format!(
            "tensor '{name}': rank {} is more than {MAX_RANK}",
            dims.len()
        )));
    }
    let mut total: u64 = 1;
    let mut out = Vec::with_capacity(dims.len());
    for &d in dims {
        if d < 0 {
            return Err(Status::invalid_argument(format!(
                "tensor '{name}': negative dimension in shape {dims:?}"
            )));
        }
        if d as u64 > MAX_ELEMENTS {
            return Err(Status::invalid_argument(format!(
                "tensor '{name}': dimension {d} in shape {dims:?} is too large"
            )));
        }
        total = total.saturating_mul(d as u64);
        out.push(d as usize);
    }
    if total > MAX_ELEMENTS {
        return Err(Status::invalid_argument(format!(
            "tensor '{name}': shape {dims:?} is too large"
        )));
    }
    Ok(out)
}

/// Refuses a tensor whose decoded form would take more than `max` bytes (max_tensor_bytes).
pub fn check_bytes(name: &str, dtype: DType, shape: &[usize], max: usize) -> Result<(), Status> {
    let bytes = shape
        .iter()
        .try_fold(dtype.size(), |a, &d| a.checked_mul(d));
    match bytes {
        Some(b) if b <= max => Ok(()),
        _ => Err(Status::resource_exhausted(format!(
            "tensor '{name}': {dtype} of shape {shape:?} is larger than the limit of {max} bytes per tensor (max_tensor_bytes)"
        ))),
    }
}

/// Decodes raw contents: row-major little-endian; BYTES elements are a 4-byte little-endian
/// length followed by the bytes.
pub fn from_raw(
    name: &str,
    dtype: DType,
    shape: &[usize],
    raw: &[u8],
) -> Result<HostTensor, Status> {
    let numel = shape
        .iter()
        .try_fold(1usize, |a, &d| a.checked_mul(d))
        .ok_or_else(|| {
            Status::invalid_argument(format!("tensor '{name}': shape {shape:?} is too large"))
        })?;
    if dtype == DType::String {
        // Each element takes at least its 4-byte length: the contents bound the count, the
        // shape does not (it comes from the client too).
        let mut items = Vec::with_capacity(numel.min(raw.len() / 4));
        let mut rest = raw;
        while !rest.is_empty() {
            let Some((len, tail)) = rest.split_first_chunk::<4>() else {
                return Err(Status::invalid_argument(format!(
                    "tensor '{name}': truncated BYTES element length"
                )));
            };
            let len = u32::from_le_bytes(*len) as usize;
            let Some((item, tail)) = tail.split_at_checked(len) else {
                return Err(Status::invalid_argument(format!(
                    "tensor '{name}': BYTES element overruns the contents"
                )));
            };
            items.push(item);
            rest = tail;
        }
        if items.len() != numel {
            return Err(Status::invalid_argument(format!(
                "tensor '{name}': shape {shape:?} needs {numel} BYTES elements, got {}",
                items.len()
            )));
        }
        return HostTensor::from_strings(shape, &items)
            .map_err(|e| Status::invalid_argument(format!("tensor '{name}': {}", e.message)));
    }
    let want = numel.saturating_mul(dtype.size());
    if raw.len() != want {
        return Err(Status::invalid_argument(format!(
            "tensor '{name}': {dtype} of shape {shape:?} needs {want} bytes, got {}",
            raw.len()
        )));
    }
    HostTensor::from_bytes(dtype, shape, raw)
        .map_err(|e| Status::invalid_argument(format!("tensor '{name}': {}", e.message)))
}

/// Decodes typed contents (`InferTensorContents`) into raw bytes of `dtype`. FP16 and BF16
/// have no typed form: they travel only as raw bytes.
pub fn typed_to_raw(
    name: &str,
    dtype: DType,
    numel: usize,
    c: &opreg_proto::inference::InferTensorContents,
) -> Result<Vec<u8>, Status> {
    let count = |n: usize| -> Result<(), Status> {
        if n == numel {
            Ok(())
        } else {
            Err(Status::invalid_argument(format!(
                "tensor '{name}': shape needs {numel} elements, contents hold {n}"
            )))
        }
    };
    let out: Vec<u8> = match dtype {
        DType::F32 => {
            count(c.fp32_contents.len())?;
            c.fp32_contents
                .iter()
                .flat_map(|v| v.to_le_bytes())
                .collect()
        }
        DType::F64 => {
            count(c.fp64_contents.len())?;
            c.fp64_contents
                .iter()
                .flat_map(|v| v.to_le_bytes())
                .collect()
        }
        DType::I64 => {
            count(c.int64_contents.len())?;
            c.int64_contents
                .iter()
                .flat_map(|v| v.to_le_bytes())
                .collect()
        }
        DType::U64 => {
            count(c.uint64_contents.len())?;
            c.uint64_contents
                .iter()
                .flat_map(|v| v.to_le_bytes())
                .collect()
        }
        DType::I32 | DType::I16 | DType::I8 => {
            count(c.int_contents.len())?;
            let size = dtype.size();
            c.int_contents
                .iter()
                .flat_map(|v| v.to_le_bytes().into_iter().take(size))
                .collect()
        }
        DType::U32 | DType::U16 | DType::U8 => {
            count(c.uint_contents.len())?;
            let size = dtype.size();
            c.uint_contents
                .iter()
                .flat_map(|v| v.to_le_bytes().into_iter().take(size))
                .collect()
        }
        DType::Bool => {
            count(c.bool_contents.len())?;
            c.bool_contents.iter().map(|&b| b as u8).collect()
        }
        DType::String => {
            count(c.bytes_contents.len())?;
            let mut out = Vec::new();
            for b in &c.bytes_contents {
                out.extend_from_slice(&(b.len() as u32).to_le_bytes());
                out.extend_from_slice(b);
            }
            out
        }
        _ => {
            return Err(Status::invalid_argument(format!(
                "tensor '{name}': {dtype} travels only in raw_input_contents"
            )));
        }
    };
    Ok(out)
}

/// A response's raw contents of an output: the tensor's own bytes, shared (no copy: a 600 KB
/// image-sized output was copied once here and once more by the encoder), except for strings,
/// which are encoded (see [`to_raw`]).
pub fn shared_raw(t: &Arc<HostTensor>) -> prost::bytes::Bytes {
    /// Owns the output while the response holds its bytes.
    struct Raw(Arc<HostTensor>);
    impl AsRef<[u8]> for Raw {
        fn as_ref(&self) -> &[u8] {
            self.0.bytes()
        }
    }
    if t.dtype() == DType::String {
        return to_raw(t).into();
    }
    prost::bytes::Bytes::from_owner(Raw(t.clone()))
}

/// Encodes a tensor as raw contents (inverse of [`from_raw`]).
pub fn to_raw(t: &HostTensor) -> Vec<u8> {
    if t.dtype() != DType::String {
        return t.bytes().to_vec();
    }
    let mut out = Vec::new();
    for s in t.strings() {
        let b = s.as_bytes();
        out.extend_from_slice(&(b.len() as u32).to_le_bytes());
        out.extend_from_slice(b);
    }
    out
}

#[cfg(test)]
#[allow(clippy::indexing_slicing)]
mod tests {
    use super::*;

    #[test]
    fn raw_round_trip_and_length_checks() {
        let bytes: Vec<u8> = [1.5f32, -2.0]
            .iter()
            .flat_map(|v| v.to_le_bytes())
            .collect();
        let t = from_raw("x", DType::F32, &[2], &bytes).expect("decode");
        assert_eq!(to_raw(&t), bytes);
        let t = Arc::new(t);
        assert_eq!(shared_raw(&t).as_ref(), bytes.as_slice());
        let err = from_raw("x", DType::F32, &[3], &bytes).expect_err("short");
        assert!(
            err.message().contains("tensor 'x'") && err.message().contains("needs 12 bytes"),
            "{}",
            err.message()
        );
    }

    #[test]
    fn bytes_elements_are_length_prefixed() {
        let mut raw = Vec::new();
        for s in ["ab", "", "xyz"] {
            raw.extend_from_slice(&(s.len() as u32).to_le_bytes());
            raw.extend_from_slice(s.as_bytes());
        }
        let t = from_raw("s", DType::String, &[3], &raw).expect("decode");
        assert_eq!(
            t.strings().iter().map(|s| s.as_str()).collect::<Vec<_>>(),
            ["ab", "", "xyz"]
        );
        assert_eq!(to_raw(&t), raw);
        assert_eq!(shared_raw(&Arc::new(t)).as_ref(), raw.as_slice());
        assert!(from_raw("s", DType::String, &[2], &raw).is_err());
        assert!(from_raw("s", DType::String, &[3], &raw[..raw.len() - 1]).is_err());
    }

    #[test]
    fn lying_bytes_shapes_fail_without_reserving_for_the_shape() {
        // 4 bytes of contents claiming 2^34 elements: refused, nothing sized by the shape.
        let err = from_raw("s", DType::String, &[1 << 34], &[0, 0, 0, 0]).expect_err("lie");
        assert!(
            err.message().contains("needs 17179869184 BYTES elements"),
            "{}",
            err.message()
        );
        let err = check_bytes("x", DType::F32, &[1 << 20, 1 << 10], 1 << 30).expect_err("4 GiB");
        assert_eq!(err.code(), tonic::Code::ResourceExhausted);
        assert!(check_bytes("x", DType::F32, &[1 << 20], 1 << 30).is_ok());
    }

    #[test]
    fn shapes_are_checked() {
        assert!(shape("x", &[2, -1]).is_err());
        assert!(shape("x", &[1 << 20, 1 << 20]).is_err());
        // Zero elements, but a dimension no kernel could size state by.
        assert!(shape("x", &[0, 1 << 40, 1]).is_err());
        assert!(shape("x", &[1; 65]).is_err());
        assert_eq!(shape("x", &[2, 3]).expect("ok"), vec![2, 3]);
    }
}

//! Fallible allocation for sizes that come from data.
//!
//! A model or a request chooses shapes, pads, batch sizes and trip counts. Memory sized by
//! them must be reserved with `try_reserve`, so that a size too large for the machine fails
//! one call with [`ErrorCode::ResourceExhausted`] instead of aborting the process (Rust's
//! infallible allocation aborts on failure; no `catch_unwind` can stop that).

use crate::{ErrorCode, PluginError};

/// The element count of `dims`: 0 when any dimension is 0 (whatever the others), `None` when
/// the product overflows.
pub fn numel(dims: &[usize]) -> Option<usize> {
    if dims.contains(&0) {
        return Some(0);
    }
    dims.iter().try_fold(1usize, |a, &d| a.checked_mul(d))
}

/// The element count `dims` multiply to, or a `ResourceExhausted` error on overflow.
pub fn checked_numel(dims: &[usize]) -> Result<usize, PluginError> {
    numel(dims).ok_or_else(|| too_large(format!("shape {dims:?} overflows the address space")))
}

/// A vector of `len` copies of `value`, reserved fallibly.
pub fn try_vec<T: Clone>(len: usize, value: T) -> Result<Vec<T>, PluginError> {
    let mut v = try_with_capacity(len)?;
    v.resize(len, value);
    Ok(v)
}

/// An empty vector with room for `len` elements, reserved fallibly.
pub fn try_with_capacity<T>(len: usize) -> Result<Vec<T>, PluginError> {
    let mut v = Vec::new();
    v.try_reserve_exact(len).map_err(|_| {
        too_large(format!(
            "cannot allocate {len} elements of {} bytes",
            std::mem::size_of::<T>()
        ))
    })?;
    Ok(v)
}

/// Reserves room for `additional` more elements in `v`, fallibly.
pub fn try_reserve<T>(v: &mut Vec<T>, additional: usize) -> Result<(), PluginError> {
    v.try_reserve(additional).map_err(|_| {
        too_large(format!(
            "cannot allocate {additional} more elements of {} bytes",
            std::mem::size_of::<T>()
        ))
    })
}

fn too_large(message: String) -> PluginError {
    PluginError::new(ErrorCode::ResourceExhausted, message)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[cfg(feature = "host")]
    #[test]
    fn an_unknown_dtype_is_refused_not_allocated_as_zero_bytes() {
        let e = crate::host::HostTensor::zeroed(crate::DType(99), &[4]).expect_err("unknown");
        assert_eq!(e.code, ErrorCode::Unimplemented);
        assert!(e.message.contains("dtype 99"), "{}", e.message);
    }

    #[test]
    fn huge_sizes_fail_the_call_instead_of_aborting() {
        let e = try_vec(1usize << 62, 0f32).expect_err("2^62 floats cannot exist");
        assert_eq!(e.code, ErrorCode::ResourceExhausted);
        assert!(checked_numel(&[1 << 40, 1 << 40]).is_err());
        assert_eq!(checked_numel(&[0, 1 << 40]).expect("zero"), 0);
        // Empty whatever the order of its dimensions.
        assert_eq!(checked_numel(&[1 << 40, 1 << 40, 0]).expect("zero"), 0);
        assert_eq!(
            crate::tensor::contiguous_strides(&[0, 1 << 32, 1 << 32]),
            [isize::MAX, 1 << 32, 1]
        );
        let v = try_vec(3, 7u8).expect("small");
        assert_eq!(v, [7, 7, 7]);
        let mut w: Vec<u64> = Vec::new();
        assert!(try_reserve(&mut w, usize::MAX / 4).is_err());
    }
}

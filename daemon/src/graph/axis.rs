//! Moving whole slabs of a tensor along one axis, for what the runtime itself does with
//! values: Scan slicing its inputs and stacking its outputs, Loop stacking scan outputs, and
//! the sequence operators splitting and joining tensors. Elements are copied as bytes (or
//! strings), one implementation for every element type.

// Request data reaches this module: no unchecked index or slice.
#![deny(clippy::indexing_slicing)]

use opreg_sdk::{host::HostTensor, DType};
use std::sync::Arc;

/// Extents before and after `axis`, saturating: only an empty tensor's products can overflow,
/// and no element of it is read.
fn outer_inner(shape: &[usize], axis: usize) -> (usize, usize) {
    let prod = |d: &[usize]| d.iter().fold(1usize, |a, &b| a.saturating_mul(b));
    (
        prod(shape.get(..axis).unwrap_or(&[])),
        prod(shape.get(axis + 1..).unwrap_or(&[])),
    )
}

/// Elements `start..start + len` along `axis`; `keep` keeps the axis (with extent `len`),
/// else it is removed (then `len` is 1).
pub(super) fn slice(
    t: &HostTensor,
    axis: usize,
    start: usize,
    len: usize,
    keep: bool,
) -> Result<HostTensor, String> {
    let shape = t.shape();
    let extent = *shape.get(axis).ok_or("axis out of range")?;
    if start.checked_add(len).is_none_or(|end| end > extent) {
        return Err(format!("{start}..{} is past extent {extent}", start + len));
    }
    let (outer, inner) = outer_inner(shape, axis);
    let mut out_shape = shape.to_vec();
    if keep {
        if let Some(d) = out_shape.get_mut(axis) {
            *d = len;
        }
    } else {
        out_shape.remove(axis);
    }
    let err = |e: opreg_sdk::PluginError| e.message.to_string();
    if t.dtype() == DType::String {
        let s = t.strings();
        let mut items: Vec<&[u8]> = Vec::new();
        for o in 0..outer {
            let from = (o * extent + start) * inner;
            let part = s
                .get(from..from + len * inner)
                .ok_or("slice out of range")?;
            items.extend(part.iter().map(|x| x.as_bytes()));
        }
        return HostTensor::from_strings(&out_shape, &items).map_err(err);
    }
    let size = t.dtype().size();
    let mut out = opreg_sdk::alloc::try_with_capacity(outer * len * inner * size).map_err(err)?;
    for o in 0..outer {
        let from = (o * extent + start) * inner * size;
        let part = t
            .bytes()
            .get(from..from + len * inner * size)
            .ok_or("slice out of range")?;
        out.extend_from_slice(part);
    }
    HostTensor::from_bytes(t.dtype(), &out_shape, &out).map_err(err)
}

/// Joins `items` along `axis`, or stacks them along a new `axis` (`new_axis`); every other
/// dimension and the element type must agree. At least one item.
pub(super) fn concat(
    items: &[Arc<HostTensor>],
    axis: usize,
    new_axis: bool,
) -> Result<HostTensor, String> {
    let first = items.first().ok_or("nothing to join")?;
    // Stacking is concatenation of the items with a unit axis inserted.
    let shape_of = |t: &HostTensor| -> Vec<usize> {
        let mut v = t.shape().to_vec();
        if new_axis && axis <= v.len() {
            v.insert(axis, 1);
        }
        v
    };
    let base = shape_of(first);
    if axis >= base.len() {
        return Err(format!(
            "axis {axis} is out of range for rank {}",
            base.len()
        ));
    }
    let mut total = 0usize;
    for t in items {
        let sh = shape_of(t);
        let same_elsewhere = sh.len() == base.len()
            && sh
                .iter()
                .zip(&base)
                .enumerate()
                .all(|(d, (a, b))| d == axis || a == b);
        if !same_elsewhere || t.dtype() != first.dtype() {
            return Err(format!(
                "tensors {:?} and {:?} ({} and {}) cannot be joined on axis {axis}",
                first.shape(),
                t.shape(),
                first.dtype(),
                t.dtype()
            ));
        }
        total = total
            .checked_add(sh.get(axis).copied().unwrap_or(0))
            .ok_or("the joined extent overflows")?;
    }
    let (outer, inner) = outer_inner(&base, axis);
    let mut out_shape = base.clone();
    if let Some(d) = out_shape.get_mut(axis) {
        *d = total;
    }
    let err = |e: opreg_sdk::PluginError| e.message.to_string();
    if first.dtype() == DType::String {
        let mut all: Vec<&[u8]> = Vec::new();
        for o in 0..outer {
            for t in items {
                let n = shape_of(t).get(axis).copied().unwrap_or(0) * inner;
                let part = t.strings().get(o * n..(o + 1) * n).unwrap_or(&[]);
                all.extend(part.iter().map(|x| x.as_bytes()));
            }
        }
        return HostTensor::from_strings(&out_shape, &all).map_err(err);
    }
    let size = first.dtype().size();
    let bytes = [outer, total, inner, size]
        .iter()
        .try_fold(1usize, |a, &b| a.checked_mul(b))
        .ok_or("the joined tensor's size overflows")?;
    let mut out = opreg_sdk::alloc::try_with_capacity(bytes).map_err(err)?;
    for o in 0..outer {
        for t in items {
            let n = shape_of(t).get(axis).copied().unwrap_or(0) * inner * size;
            out.extend_from_slice(t.bytes().get(o * n..(o + 1) * n).unwrap_or(&[]));
        }
    }
    HostTensor::from_bytes(first.dtype(), &out_shape, &out).map_err(err)
}

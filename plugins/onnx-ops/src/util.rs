//! Helpers shared by the operator families: broadcasting, axes, strided walks, optional
//! inputs, the plain-function kernel factory.

use crate::quant::fill;
use opreg_sdk::numeric::Scalar;
use opreg_sdk::{
    half::{bf16, f16},
    prelude::*,
};
use std::borrow::Cow;

/// Scratch buffers shared by the tasks of one parallel loop: a task takes a free one (the
/// host lends a new one only while all are held, so at most one per thread) and returns it
/// when done. A loop of many small tasks (the blocks of a channels-last integer product: 66
/// for a 112x112 image) then works in a few cache-warm buffers; a `scratch_reused` per task
/// would hold a distinct buffer per task until the call ends, cold in cache (and past the
/// host pool's buffer count, allocated and zeroed on every call).
pub(crate) struct TaskScratch<'c, 'h, T: Element> {
    ctx: &'c KernelContext<'h>,
    len: usize,
    free: std::sync::Mutex<Vec<&'c mut [T]>>,
}

impl<'c, 'h, T: Element> TaskScratch<'c, 'h, T> {
    /// Buffers of `len` elements from `ctx`'s reused scratch (contents left from earlier use).
    pub(crate) fn new(ctx: &'c KernelContext<'h>, len: usize) -> Self {
        Self {
            ctx,
            len,
            free: std::sync::Mutex::new(Vec::new()),
        }
    }

    /// A buffer held by the calling task alone until the guard drops.
    pub(crate) fn take(&self) -> Result<Lent<'_, 'c, 'h, T>, PluginError> {
        let held = self.free.lock().ok().and_then(|mut v| v.pop());
        let buf = match held {
            Some(b) => b,
            None => self.ctx.scratch_reused::<T>(self.len)?,
        };
        Ok(Lent {
            owner: self,
            buf: Some(buf),
        })
    }
}

/// A [`TaskScratch`] buffer, returned to it on drop.
pub(crate) struct Lent<'s, 'c, 'h, T: Element> {
    owner: &'s TaskScratch<'c, 'h, T>,
    buf: Option<&'c mut [T]>,
}

impl<T: Element> std::ops::Deref for Lent<'_, '_, '_, T> {
    type Target = [T];
    fn deref(&self) -> &[T] {
        self.buf.as_deref().unwrap_or(&[])
    }
}

impl<T: Element> std::ops::DerefMut for Lent<'_, '_, '_, T> {
    fn deref_mut(&mut self) -> &mut [T] {
        self.buf.as_deref_mut().unwrap_or(&mut [])
    }
}

impl<T: Element> Drop for Lent<'_, '_, '_, T> {
    fn drop(&mut self) {
        if let (Some(buf), Ok(mut free)) = (self.buf.take(), self.owner.free.lock()) {
            free.push(buf);
        }
    }
}

/// The error of an operator asked for an element type it has no kernel for (the fallback arm
/// of its `opreg_sdk::dispatch!`).
pub(crate) fn not_implemented_for(op: impl std::fmt::Display, dtype: DType) -> PluginError {
    PluginError::unimplemented(format!("{op} is not implemented for {dtype}"))
}

/// The elements of a float tensor (f32, f64, f16, bf16) as `f32`, borrowed when already f32.
/// `None` for other element types: callers word and classify that error themselves.
pub fn floats_as_f32<'a>(t: &TensorView<'a>) -> Option<Result<Cow<'a, [f32]>, PluginError>> {
    Some(match t.dtype {
        DType::F32 => t.as_slice::<f32>().map(Cow::Borrowed),
        DType::F64 => t
            .as_slice::<f64>()
            .map(|s| Cow::Owned(s.iter().map(|&v| v as f32).collect())),
        DType::F16 => t
            .as_slice::<f16>()
            .map(|s| Cow::Owned(s.iter().map(|v| v.to_f32()).collect())),
        DType::BF16 => t
            .as_slice::<bf16>()
            .map(|s| Cow::Owned(s.iter().map(|v| v.to_f32()).collect())),
        _ => return None,
    })
}

/// The elements of a float tensor (f32, f64, f16, bf16) widened to `f64`; `None` for other
/// element types, as in [`floats_as_f32`].
pub fn floats_as_f64(t: &TensorView<'_>) -> Option<Result<Vec<f64>, PluginError>> {
    Some(match t.dtype {
        DType::F32 => t
            .as_slice::<f32>()
            .map(|s| s.iter().map(|&v| v as f64).collect()),
        DType::F64 => t.as_slice::<f64>().map(|s| s.to_vec()),
        DType::F16 => t
            .as_slice::<f16>()
            .map(|s| s.iter().map(|v| v.to_f64()).collect()),
        DType::BF16 => t
            .as_slice::<bf16>()
            .map(|s| s.iter().map(|v| v.to_f64()).collect()),
        _ => return None,
    })
}

/// The elements of a float tensor as `f64`.
pub(crate) fn read_f64(t: &TensorView<'_>, what: &str) -> Result<Vec<f64>, PluginError> {
    floats_as_f64(t).unwrap_or_else(|| {
        Err(PluginError::unimplemented(format!(
            "{what}: element type {} is not supported",
            t.dtype
        )))
    })
}

/// Allocates output `index` of `dtype` from `f64` values, converted as [`Scalar::from_f64`]
/// does (`as` casts for integer types, rounding to nearest for floats).
pub(crate) fn fill_from_f64<F>(
    ctx: &KernelContext<'_>,
    index: usize,
    dtype: DType,
    shape: &[usize],
    f: F,
) -> Result<(), PluginError>
where
    F: Fn(usize) -> f64 + Sync,
{
    opreg_sdk::dispatch!(dtype, NUMERIC, |T| fill::<T, _>(ctx, index, shape, |i| T::from_f64(f(i))),
        other => Err(PluginError::unimplemented(format!("output type {other} is not supported"))))
}

/// A scalar integer input (`axis`, `size`, `dft_length`).
pub(crate) fn scalar_i64(t: &TensorView<'_>, op: &str, name: &str) -> Result<i64, PluginError> {
    let v = t.to_i64s()?;
    if v.len() != 1 {
        return Err(PluginError::invalid(format!(
            "{op}: input '{name}' must be a scalar, got shape {:?}",
            t.shape()
        )));
    }
    Ok(v[0])
}

/// A kernel factory as a plain function, registrable once per schema version.
pub(crate) type Factory = fn(&NodeInfo<'_>) -> Result<Box<dyn Kernel>, PluginError>;

/// Input `i`, or `None` when the node leaves it out (absent, or past the end of the list).
pub fn optional<'a, 'b>(inputs: &'b [TensorView<'a>], i: usize) -> Option<&'b TensorView<'a>> {
    inputs.get(i).filter(|t| !t.is_absent())
}

/// Required input `i` of `op` (named `name` in the operator's schema), or an error naming it
/// when the node leaves it out (absent, or past the end of the list). Kernels take their
/// required inputs through it (or [`required`]) rather than by indexing, which would panic on
/// a node with too few inputs.
pub fn input<'a>(
    op: &str,
    inputs: &[TensorView<'a>],
    i: usize,
    name: &str,
) -> Result<TensorView<'a>, PluginError> {
    match inputs.get(i) {
        Some(t) if !t.is_absent() => Ok(*t),
        _ => Err(PluginError::invalid(format!(
            "{op}: required input {i} '{name}' is missing"
        ))),
    }
}

/// The leading required inputs `names` of `op` (positions `0..N`), as [`input`] takes each.
pub fn required<'a, const N: usize>(
    op: &str,
    inputs: &[TensorView<'a>],
    names: [&str; N],
) -> Result<[TensorView<'a>; N], PluginError> {
    let mut out = [TensorView::absent(); N];
    for (i, (slot, name)) in out.iter_mut().zip(names).enumerate() {
        *slot = input(op, inputs, i, name)?;
    }
    Ok(out)
}

/// Checks that `op` has at least `min` inputs and that none of them is left out: for
/// variadic operators, whose inputs are all required.
pub fn all_present(op: &str, inputs: &[TensorView<'_>], min: usize) -> Result<(), PluginError> {
    if inputs.len() < min {
        return Err(PluginError::invalid(format!(
            "{op}: the node has {} inputs, at least {min} required",
            inputs.len()
        )));
    }
    match inputs.iter().position(|t| t.is_absent()) {
        Some(i) => Err(PluginError::invalid(format!(
            "{op}: input {i} is missing (every input is required)"
        ))),
        None => Ok(()),
    }
}

/// Element strides of a contiguous row-major tensor of `shape`. They saturate: only an empty
/// tensor's strides can overflow, and no element of it is ever addressed.
pub fn row_major_strides(shape: &[usize]) -> Vec<usize> {
    let mut st = vec![1usize; shape.len()];
    for d in (0..shape.len().saturating_sub(1)).rev() {
        st[d] = st[d + 1].saturating_mul(shape[d + 1]);
    }
    st
}

/// The product of some of a tensor's extents, saturating. It is exact whenever the tensor
/// has elements, and 0 whenever one of `dims` is 0; it saturates only when the tensor is
/// empty through another dimension (data-given shapes such as `[0, 2^40, 2^40]`), where a
/// plain product would overflow.
pub fn product_sat(dims: &[usize]) -> usize {
    if dims.contains(&0) {
        return 0;
    }
    dims.iter().fold(1usize, |a, &d| a.saturating_mul(d))
}

/// The element count of `dims`: 0 when one of them is 0 (however large the others), else
/// their product, or a `ResourceExhausted` error when it overflows. Use it to size buffers
/// from data-given extents (see `opreg_sdk::alloc`).
pub fn numel(dims: &[usize]) -> Result<usize, PluginError> {
    if dims.contains(&0) {
        return Ok(0);
    }
    opreg_sdk::alloc::checked_numel(dims)
}

/// The numpy-style broadcast of `shapes` (ONNX multidirectional broadcasting).
pub fn broadcast_shapes(shapes: &[&[usize]]) -> Result<Vec<usize>, PluginError> {
    let rank = shapes.iter().map(|s| s.len()).max().unwrap_or(0);
    let mut out = vec![1usize; rank];
    for s in shapes {
        for (i, &d) in s.iter().enumerate() {
            let o = &mut out[rank - s.len() + i];
            if *o == 1 {
                *o = d;
            } else if d != 1 && d != *o {
                return Err(PluginError::invalid(format!(
                    "shapes {shapes:?} do not broadcast"
                )));
            }
        }
    }
    Ok(out)
}

/// Element strides of a contiguous tensor of `shape` read as if broadcast to `out`
/// (right-aligned; broadcast dimensions get stride 0). `out.len() >= shape.len()`.
pub fn broadcast_strides(shape: &[usize], out: &[usize]) -> Vec<usize> {
    let mut strides = vec![0usize; out.len()];
    let mut acc = 1usize;
    let off = out.len() - shape.len();
    for i in (0..shape.len()).rev() {
        strides[off + i] = if shape[i] == 1 { 0 } else { acc };
        // Saturating, as in `row_major_strides`.
        acc = acc.saturating_mul(shape[i]);
    }
    strides
}

/// An axis attribute in `[-rank, rank)` as an index in `[0, rank)`.
pub fn normalize_axis(axis: i64, rank: usize) -> Result<usize, PluginError> {
    let r = rank as i64;
    if axis < -r || axis >= r {
        return Err(PluginError::invalid(format!(
            "axis {axis} out of range for rank {rank}"
        )));
    }
    Ok(if axis < 0 {
        (axis + r) as usize
    } else {
        axis as usize
    })
}

/// Calls `f(offset)` for every element of `shape` in row-major order, where `offset` is the
/// element's position under `strides` (e.g. from [`broadcast_strides`]). Starts at the linear
/// index `start` and visits `len` elements, so parallel chunks can walk their own range.
pub fn walk_offsets(
    shape: &[usize],
    strides: &[usize],
    start: usize,
    len: usize,
    mut f: impl FnMut(usize),
) {
    let rank = shape.len();
    if rank == 0 {
        if len > 0 {
            f(0);
        }
        return;
    }
    // Decompose `start` into a multi-index.
    let mut idx = vec![0usize; rank];
    let mut rem = start;
    for d in (0..rank).rev() {
        idx[d] = rem % shape[d].max(1);
        rem /= shape[d].max(1);
    }
    let mut off: usize = idx.iter().zip(strides).map(|(i, s)| i * s).sum();
    let inner = shape[rank - 1];
    let inner_stride = strides[rank - 1];
    let mut left = len;
    while left > 0 {
        // Run along the innermost dimension.
        let run = (inner - idx[rank - 1]).min(left);
        for k in 0..run {
            f(off + k * inner_stride);
        }
        left -= run;
        if left == 0 {
            break;
        }
        off += run * inner_stride;
        idx[rank - 1] += run;
        // Carry.
        let mut d = rank - 1;
        while idx[d] == shape[d] {
            off -= idx[d] * strides[d];
            idx[d] = 0;
            if d == 0 {
                return;
            }
            d -= 1;
            idx[d] += 1;
            off += strides[d];
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A parallel loop of many tasks through [`TaskScratch`]: each task holds its buffer
    /// alone (what it wrote is still there after the others ran), and the loop uses at most
    /// one buffer per thread, not one per task.
    #[test]
    fn task_scratch_lends_each_task_its_own_buffer_and_reuses_them() {
        use opreg_sdk::testkit::{run_kernel_opt, NodeSpec};
        struct Probe;
        impl Kernel for Probe {
            fn compute(
                &self,
                ctx: &KernelContext<'_>,
                _: &[TensorView<'_>],
            ) -> Result<(), PluginError> {
                let scratch = TaskScratch::<u64>::new(ctx, 512);
                let seen = std::sync::Mutex::new(std::collections::HashSet::new());
                ctx.parallel_for(300, 1, |r| {
                    let mut buf = scratch.take()?;
                    buf.fill(r.start as u64);
                    let mut x = 0u64;
                    for i in 0..2000u64 {
                        x = std::hint::black_box(x.wrapping_add(i));
                    }
                    if buf.len() != 512 || buf.iter().any(|&v| v != r.start as u64) {
                        return Err(PluginError::internal("a buffer was shared by two tasks"));
                    }
                    if let Ok(mut s) = seen.lock() {
                        s.insert(buf.as_ptr() as usize);
                    }
                    Ok(())
                })?;
                let buffers = seen.lock().map(|s| s.len()).unwrap_or(0);
                let out = ctx.output_slice::<i64>(0, &[2])?;
                out.copy_from_slice(&[buffers as i64, ctx.num_threads() as i64]);
                Ok(())
            }
        }
        fn factory(_: &NodeInfo<'_>) -> Result<Box<dyn Kernel>, PluginError> {
            Ok(Box::new(Probe))
        }
        let out = run_kernel_opt(factory as Factory, &NodeSpec::onnx("Probe", 1), &[], None)
            .expect("runs");
        let v = out[0].to_vec::<i64>().expect("i64");
        assert!(v[0] >= 1 && v[0] <= v[1].max(1), "{v:?}");
    }

    #[test]
    fn broadcasting() {
        assert_eq!(
            broadcast_shapes(&[&[2, 1, 3], &[4, 1]]).expect("ok"),
            vec![2, 4, 3]
        );
        assert!(broadcast_shapes(&[&[2, 3], &[4, 3]]).is_err());
        assert_eq!(broadcast_strides(&[4, 1], &[2, 4, 3]), vec![0, 1, 0]);
    }

    #[test]
    fn walks_match_naive_indexing() {
        let shape = [2, 3, 4];
        let strides = broadcast_strides(&[3, 1], &shape);
        let mut all = Vec::new();
        walk_offsets(&shape, &strides, 0, 24, |o| all.push(o));
        let naive: Vec<usize> = (0..24).map(|i| (i / 4) % 3).collect();
        assert_eq!(all, naive);
        // A chunk starting mid-way sees the same offsets.
        let mut part = Vec::new();
        walk_offsets(&shape, &strides, 5, 11, |o| part.push(o));
        assert_eq!(part, naive[5..16].to_vec());
    }
}

/// Shorthands shared by the families' unit tests.
#[cfg(test)]
pub(crate) mod testing {
    use super::Factory;

    /// Asserts `got` equals `want` element by element within `tol`.
    pub fn close(got: &[f32], want: &[f32], tol: f32) {
        assert_eq!(got.len(), want.len(), "{got:?} vs {want:?}");
        for (g, w) in got.iter().zip(want) {
            assert!((g - w).abs() <= tol, "{got:?} vs {want:?}");
        }
    }
    use opreg_sdk::{
        host::HostTensor,
        kernel::{FfiKernelBox, FfiKernelFactoryBox},
        prelude::*,
        testkit::{run_kernel_opt, NodeSpec},
        Element, KernelFactory,
    };

    /// Asserts `got` matches `want` elementwise within `tol * (1 + |want|)`.
    pub(crate) fn assert_close(got: &[f32], want: &[f32], tol: f32) {
        assert_eq!(got.len(), want.len());
        for (i, (x, y)) in got.iter().zip(want).enumerate() {
            assert!((x - y).abs() <= tol * (1.0 + y.abs()), "at {i}: {x} vs {y}");
        }
    }

    pub(crate) fn t<T: Element>(shape: &[usize], v: &[T]) -> HostTensor {
        HostTensor::from_vec(shape, v).expect("tensor")
    }

    /// Runs `f` on `inputs` (`None` for a left-out input) without a BLAS backend.
    pub(crate) fn run(
        f: Factory,
        node: NodeSpec,
        inputs: &[Option<&HostTensor>],
    ) -> Result<Vec<HostTensor>, PluginError> {
        run_kernel_opt(f, &node, inputs, None)
    }

    /// A factory taken back out of the registration table, so a test runs exactly what the
    /// host would resolve (opset ranges and type constraints included).
    pub(crate) struct Registered(pub FfiKernelFactoryBox);
    struct RegisteredKernel(FfiKernelBox);

    impl KernelFactory for Registered {
        fn instantiate(&self, node: &NodeInfo<'_>) -> Result<Box<dyn Kernel>, PluginError> {
            Ok(Box::new(RegisteredKernel(
                self.0.instantiate(node.as_ffi()).into_result()?,
            )))
        }
    }

    /// A registered factory shared by many runs (the test kit takes its factory by value).
    pub(crate) struct Shared(pub std::sync::Arc<FfiKernelFactoryBox>);

    impl KernelFactory for Shared {
        fn instantiate(&self, node: &NodeInfo<'_>) -> Result<Box<dyn Kernel>, PluginError> {
            Ok(Box::new(RegisteredKernel(
                self.0.instantiate(node.as_ffi()).into_result()?,
            )))
        }
    }

    impl Kernel for RegisteredKernel {
        fn compute(
            &self,
            ctx: &KernelContext<'_>,
            inputs: &[TensorView<'_>],
        ) -> Result<(), PluginError> {
            self.0.compute(ctx, inputs.into()).into_result()
        }
    }
}

/// `x` rounded to the nearest integer, ties to even, for a value that is then saturated to a
/// narrow integer type (8 or 16 bits): what `round_ties_even` gives there, without its libm
/// call. On the x86-64 baseline (no SSE4.1 `roundss`) `round_ties_even` is an out-of-line
/// `rintf` call per element — measured as the largest single cost of requantizing a
/// convolution's output. Adding and subtracting 1.5·2^23 makes the FPU round in its default
/// mode (to nearest, ties to even), and vectorizes. Values are first clamped to ±2^22, where
/// the trick is exact; beyond, any narrow type saturates anyway. NaN stays NaN.
#[inline(always)]
pub fn round_even_narrow_f32(x: f32) -> f32 {
    const MAGIC: f32 = 12_582_912.0; // 1.5 * 2^23
    const LIMIT: f32 = 4_194_304.0; // 2^22
    (x.clamp(-LIMIT, LIMIT) + MAGIC) - MAGIC
}

/// [`round_even_narrow_f32`] for f64 (exact within ±2^51).
#[inline(always)]
pub fn round_even_narrow_f64(x: f64) -> f64 {
    const MAGIC: f64 = 6_755_399_441_055_744.0; // 1.5 * 2^52
    const LIMIT: f64 = 2_251_799_813_685_248.0; // 2^51
    (x.clamp(-LIMIT, LIMIT) + MAGIC) - MAGIC
}

#[cfg(test)]
mod rounding_tests {
    use super::*;

    #[test]
    fn narrow_rounding_matches_round_ties_even() {
        let mut xs: Vec<f32> = vec![
            0.5,
            1.5,
            2.5,
            -0.5,
            -1.5,
            -2.5,
            0.49999997,
            254.5,
            255.5,
            -128.5,
            127.5,
            1e9,
            -1e9,
            f32::INFINITY,
            f32::NEG_INFINITY,
            0.0,
            -0.0,
            3.7,
            -3.7,
        ];
        xs.extend((0..20_000).map(|i| (i as f32 - 10_000.0) * 0.037_5));
        for &x in &xs {
            let want = x.round_ties_even().clamp(-4_194_304.0, 4_194_304.0);
            assert_eq!(round_even_narrow_f32(x), want, "{x}");
            let w64 = (x as f64)
                .round_ties_even()
                .clamp(-2_251_799_813_685_248.0, 2_251_799_813_685_248.0);
            assert_eq!(round_even_narrow_f64(x as f64), w64, "{x}");
        }
        assert!(round_even_narrow_f32(f32::NAN).is_nan());
        assert_eq!(round_even_narrow_f32(f32::NAN) as u8, 0);
    }
}

/// The byte of `x` rounded (ties to even) and saturated to `[lo, hi]` (integer bounds of an
/// 8-bit type: 0..=255 or -128..=127, the byte then read as that type): what
/// `x.round_ties_even() as u8` / `as i8` gives, NaN included (0). Clamped first, then rounded
/// by adding 1.5·2^52: the sum's low mantissa bits are the integer in two's complement. No
/// libm call and no saturating cast, so requantizing loops vectorize.
#[inline(always)]
pub fn round_saturate_byte(x: f64, lo: f64, hi: f64) -> u8 {
    const MAGIC: f64 = 6_755_399_441_055_744.0; // 1.5 * 2^52
    let x = if x.is_nan() { 0.0 } else { x };
    (x.max(lo).min(hi) + MAGIC).to_bits() as u8
}

#[cfg(test)]
mod byte_tests {
    use super::*;

    #[test]
    fn bytes_match_rounding_then_saturating() {
        for i in -4000..4000 {
            let x = i as f64 * 0.125 - 0.0625 * (i % 3) as f64;
            let r = x.round_ties_even();
            assert_eq!(
                round_saturate_byte(x, 0.0, 255.0),
                r.clamp(0.0, 255.0) as u8,
                "{x}"
            );
            assert_eq!(
                round_saturate_byte(x, -128.0, 127.0) as i8,
                r.clamp(-128.0, 127.0) as i8,
                "{x}"
            );
        }
        assert_eq!(round_saturate_byte(f64::NAN, 0.0, 255.0), 0);
        assert_eq!(round_saturate_byte(f64::INFINITY, -128.0, 127.0) as i8, 127);
        assert_eq!(round_saturate_byte(2.5, 0.0, 255.0), 2);
        assert_eq!(round_saturate_byte(-2.5, -128.0, 127.0) as i8, -2);
    }
}

//! Type-generic element moves shared by the shape family: element types as raw byte arrays
//! (one implementation for every fixed-size dtype) or strings, strided walks with signed
//! strides, parallel copies, and small scalar helpers.

use opreg_sdk::abi_stable::std_types::RString;
use opreg_sdk::half::{bf16, f16};
use opreg_sdk::prelude::*;

/// Elements per parallel task for plain copies.
pub(crate) const GRAIN: usize = 1 << 15;

/// An element moved as a whole: `[u8; N]` for fixed-size dtypes, `RString` for strings.
pub(crate) trait Elem: Clone + Send + Sync + 'static {
    /// The element whose bytes are all zero (the empty string for strings).
    fn zero() -> Self;
    /// The elements of a contiguous host tensor.
    fn slice<'a>(v: &TensorView<'a>) -> Result<&'a [Self], PluginError>;
    /// The elements of a host output.
    fn slice_mut(v: TensorViewMut<'_>) -> Result<&mut [Self], PluginError>;
    /// The element whose little-endian bytes are `bytes` (`None` for strings).
    fn from_le(bytes: &[u8]) -> Option<Self>;
}

impl<const N: usize> Elem for [u8; N] {
    fn zero() -> Self {
        [0; N]
    }

    fn slice<'a>(v: &TensorView<'a>) -> Result<&'a [Self], PluginError> {
        if v.dtype == DType::String || v.dtype.size() != N {
            return Err(PluginError::internal(format!(
                "{} tensor read with {N}-byte elements",
                v.dtype
            )));
        }
        let b = v.as_bytes()?;
        // SAFETY: `[u8; N]` has size N and alignment 1; `b` holds `len / N` whole elements.
        Ok(unsafe { std::slice::from_raw_parts(b.as_ptr().cast::<[u8; N]>(), b.len() / N) })
    }

    fn slice_mut(v: TensorViewMut<'_>) -> Result<&mut [Self], PluginError> {
        if v.dtype == DType::String || v.dtype.size() != N {
            return Err(PluginError::internal(format!(
                "{} output written with {N}-byte elements",
                v.dtype
            )));
        }
        let b = v.into_bytes()?;
        let len = b.len() / N;
        // SAFETY: as in `slice`; exclusive borrow carried over.
        Ok(unsafe { std::slice::from_raw_parts_mut(b.as_mut_ptr().cast::<[u8; N]>(), len) })
    }

    fn from_le(bytes: &[u8]) -> Option<Self> {
        bytes.try_into().ok()
    }
}

impl Elem for RString {
    fn zero() -> Self {
        RString::new()
    }

    fn slice<'a>(v: &TensorView<'a>) -> Result<&'a [Self], PluginError> {
        v.as_strings()
    }

    fn slice_mut(v: TensorViewMut<'_>) -> Result<&mut [Self], PluginError> {
        v.into_strings()
    }

    fn from_le(_: &[u8]) -> Option<Self> {
        None
    }
}

/// Calls the generic function `f::<T>(args)` with the [`Elem`] type matching `dtype`.
macro_rules! by_elem {
    ($dtype:expr, $f:ident ( $($a:expr),* $(,)? )) => {
        match $dtype {
            DType::String => $f::<opreg_sdk::abi_stable::std_types::RString>($($a),*),
            d => match d.size() {
                1 => $f::<[u8; 1]>($($a),*),
                2 => $f::<[u8; 2]>($($a),*),
                4 => $f::<[u8; 4]>($($a),*),
                8 => $f::<[u8; 8]>($($a),*),
                n => Err(PluginError::unimplemented(format!("elements of {n} bytes"))),
            },
        }
    };
}
pub(crate) use by_elem;

/// The little-endian bytes of `v` converted to `dtype` (as a C cast would).
pub(crate) fn scalar_bytes(dtype: DType, v: f64) -> Result<Vec<u8>, PluginError> {
    Ok(match dtype {
        DType::Bool => vec![(v != 0.0) as u8],
        DType::U8 => (v as u8).to_le_bytes().to_vec(),
        DType::I8 => (v as i8).to_le_bytes().to_vec(),
        DType::U16 => (v as u16).to_le_bytes().to_vec(),
        DType::I16 => (v as i16).to_le_bytes().to_vec(),
        DType::U32 => (v as u32).to_le_bytes().to_vec(),
        DType::I32 => (v as i32).to_le_bytes().to_vec(),
        DType::U64 => (v as u64).to_le_bytes().to_vec(),
        DType::I64 => (v as i64).to_le_bytes().to_vec(),
        DType::F16 => f16::from_f64(v).to_le_bytes().to_vec(),
        DType::BF16 => bf16::from_f64(v).to_le_bytes().to_vec(),
        DType::F32 => (v as f32).to_le_bytes().to_vec(),
        DType::F64 => v.to_le_bytes().to_vec(),
        DType::String => {
            return Err(PluginError::unimplemented(
                "a numeric value converted to a string",
            ))
        }
        other => {
            return Err(PluginError::unimplemented(format!(
                "a numeric value converted to {other}"
            )))
        }
    })
}

/// True when the element's bytes are not zero in `dtype` (`-0.0` is zero).
pub(crate) fn is_nonzero(dtype: DType, b: &[u8]) -> bool {
    match (dtype.is_float(), b.split_last()) {
        (true, Some((last, rest))) => last & 0x7f != 0 || rest.iter().any(|&x| x != 0),
        _ => b.iter().any(|&x| x != 0),
    }
}

/// The elements of an integer (or, truncated, float / bool) tensor as `i64`.
pub(crate) fn ints_of(v: &TensorView<'_>, what: &str) -> Result<Vec<i64>, PluginError> {
    let err = |e: PluginError| PluginError::invalid(format!("{what}: {}", e.message));
    match v.dtype {
        DType::F32 => Ok(v
            .as_slice::<f32>()
            .map_err(err)?
            .iter()
            .map(|&x| x as i64)
            .collect()),
        DType::F64 => Ok(v
            .as_slice::<f64>()
            .map_err(err)?
            .iter()
            .map(|&x| x as i64)
            .collect()),
        DType::F16 => Ok(v
            .as_slice::<f16>()
            .map_err(err)?
            .iter()
            .map(|x| x.to_f64() as i64)
            .collect()),
        DType::BF16 => Ok(v
            .as_slice::<bf16>()
            .map_err(err)?
            .iter()
            .map(|x| x.to_f64() as i64)
            .collect()),
        DType::Bool => Ok(v
            .as_bytes()
            .map_err(err)?
            .iter()
            .map(|&x| x as i64)
            .collect()),
        _ => v.to_i64s().map_err(err),
    }
}

/// One integer from a scalar (or one-element) tensor.
pub(crate) fn scalar_int(v: &TensorView<'_>, what: &str) -> Result<i64, PluginError> {
    let vals = ints_of(v, what)?;
    match vals.as_slice() {
        [x] => Ok(*x),
        _ => Err(PluginError::invalid(format!(
            "{what} must hold one value, has shape {:?}",
            v.shape()
        ))),
    }
}

pub(crate) use crate::util::optional;

/// Input `i`, which the operator requires.
pub(crate) fn input<'a, 'b>(
    inputs: &'b [TensorView<'a>],
    i: usize,
    op: &str,
) -> Result<&'b TensorView<'a>, PluginError> {
    optional(inputs, i).ok_or_else(|| PluginError::invalid(format!("{op}: input {i} is missing")))
}

/// Output `index` for a kernel that writes every element of it: not zeroed first (see
/// `KernelContext::output_to_overwrite`), but for strings, whose slots must hold strings.
pub(crate) fn output_written<'a>(
    ctx: &'a KernelContext<'_>,
    index: usize,
    dtype: DType,
    shape: &[usize],
) -> Result<TensorViewMut<'a>, PluginError> {
    if dtype == DType::String {
        ctx.output(index, dtype, shape)
    } else {
        ctx.output_to_overwrite(index, dtype, shape)
    }
}

/// Row-major strides, in elements. They saturate: only an empty tensor's strides overflow,
/// and none of its elements is addressed.
pub(crate) fn strides_of(shape: &[usize]) -> Vec<isize> {
    let mut s = vec![0isize; shape.len()];
    let mut acc = 1isize;
    for d in (0..shape.len()).rev() {
        s[d] = acc;
        acc = acc.saturating_mul(shape[d].try_into().unwrap_or(isize::MAX));
    }
    s
}

/// Drops size-1 dimensions and merges dimensions that are contiguous in the source.
fn coalesce(shape: &[usize], strides: &[isize]) -> (Vec<usize>, Vec<isize>) {
    let mut sh: Vec<usize> = Vec::with_capacity(shape.len());
    let mut st: Vec<isize> = Vec::with_capacity(shape.len());
    for (&d, &s) in shape.iter().zip(strides) {
        if d == 1 {
            continue;
        }
        if let (Some(ld), Some(ls)) = (sh.last_mut(), st.last_mut()) {
            // Checked and saturating: an empty tensor's extents may be huge.
            if s.checked_mul(d as isize) == Some(*ls) {
                *ld = ld.saturating_mul(d);
                *ls = s;
                continue;
            }
        }
        sh.push(d);
        st.push(s);
    }
    (sh, st)
}

/// Walks `len` elements of `shape` in row-major order from linear index `start`, calling
/// `f(offset, run, stride)` for each run along the innermost dimension: the run's elements
/// sit at `offset + k * stride` for `k < run`. Offsets are `base + sum(idx * strides)`.
pub(crate) fn walk_runs(
    shape: &[usize],
    strides: &[isize],
    base: isize,
    start: usize,
    len: usize,
    mut f: impl FnMut(isize, usize, isize),
) {
    let rank = shape.len();
    if len == 0 {
        return;
    }
    if rank == 0 {
        f(base, 1, 0);
        return;
    }
    let mut idx = vec![0usize; rank];
    let mut rem = start;
    for d in (0..rank).rev() {
        let n = shape[d].max(1);
        idx[d] = rem % n;
        rem /= n;
    }
    let mut off = base
        + idx
            .iter()
            .zip(strides)
            .map(|(&i, &s)| i as isize * s)
            .sum::<isize>();
    let inner = shape[rank - 1];
    let inner_stride = strides[rank - 1];
    let mut left = len;
    loop {
        let run = (inner - idx[rank - 1]).min(left);
        f(off, run, inner_stride);
        left -= run;
        if left == 0 {
            return;
        }
        off += run as isize * inner_stride;
        idx[rank - 1] += run;
        let mut d = rank - 1;
        while idx[d] == shape[d] {
            off -= idx[d] as isize * strides[d];
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

/// Like [`walk_runs`], one call per element.
pub(crate) fn walk_elems(
    shape: &[usize],
    strides: &[isize],
    base: isize,
    start: usize,
    len: usize,
    mut f: impl FnMut(isize),
) {
    walk_runs(shape, strides, base, start, len, |off, run, stride| {
        for k in 0..run {
            f(off + k as isize * stride);
        }
    });
}

/// `dst[i] = src[base + sum(idx(i) * strides)]` where `idx(i)` is the multi-index of `i` in
/// `shape` (row-major), in parallel.
pub(crate) fn strided_copy<T: Elem>(
    ctx: &KernelContext<'_>,
    src: &[T],
    dst: &mut [T],
    shape: &[usize],
    strides: &[isize],
    base: isize,
) -> Result<(), PluginError> {
    let (shape, strides) = coalesce(shape, strides);
    let r = shape.len();
    if r >= 2 && strides[r - 2] == 1 && strides[r - 1] != 1 && strides[r - 1] != 0 {
        return blocked_copy(ctx, src, dst, &shape, &strides, base);
    }
    ctx.parallel_chunks(dst, GRAIN, |start, chunk| {
        let mut pos = 0;
        walk_runs(
            &shape,
            &strides,
            base,
            start,
            chunk.len(),
            |off, run, stride| {
                let out = &mut chunk[pos..pos + run];
                let off = off as usize;
                match stride {
                    1 => out.clone_from_slice(&src[off..off + run]),
                    0 => out.fill(src[off].clone()),
                    _ => {
                        for (k, o) in out.iter_mut().enumerate() {
                            *o = src[(off as isize + k as isize * stride) as usize].clone();
                        }
                    }
                }
                pos += run;
            },
        );
    })
}

/// Side of the square tiles of [`blocked_copy`].
const TILE: usize = 32;

/// [`strided_copy`] when the last two output dimensions read the source transposed (the
/// second-to-last has source stride 1): copies square tiles so that both the reads (down a
/// tile's columns) and the writes (along its rows) stay within a few cache lines.
fn blocked_copy<T: Elem>(
    ctx: &KernelContext<'_>,
    src: &[T],
    dst: &mut [T],
    shape: &[usize],
    strides: &[isize],
    base: isize,
) -> Result<(), PluginError> {
    let r = shape.len();
    let (rows, cols) = (shape[r - 2], shape[r - 1]);
    let col_stride = strides[r - 1];
    let (outer_shape, outer_strides) = (&shape[..r - 2], &strides[..r - 2]);
    if dst.is_empty() {
        return Ok(());
    }
    // Chunks of whole rows, a multiple of the tile height where possible.
    let grain = cols * (GRAIN / cols).max(TILE).next_multiple_of(TILE);
    ctx.parallel_chunks(dst, grain, |start, chunk| {
        let first = start / cols;
        let nrows = chunk.len() / cols;
        let mut buf: Vec<T> = Vec::with_capacity(TILE * TILE);
        let mut g = 0;
        while g < nrows {
            // A group of up to TILE rows of one matrix (one outer index).
            let row = first + g;
            let (o, i0) = (row / rows, row % rows);
            let n = (rows - i0).min(TILE).min(nrows - g);
            let mut rem = o;
            let mut off = base;
            for d in (0..r - 2).rev() {
                off += (rem % outer_shape[d]) as isize * outer_strides[d];
                rem /= outer_shape[d];
            }
            let off = off + i0 as isize;
            let out = &mut chunk[g * cols..(g + n) * cols];
            for j0 in (0..cols).step_by(TILE) {
                let j1 = (j0 + TILE).min(cols);
                if bytes::tile(src, out, cols, off, col_stride, n, j0..j1)
                    || words::tile(src, out, cols, off, col_stride, n, j0..j1)
                {
                    continue;
                }
                // Gather the tile's source rows (contiguous reads) into a small buffer, then
                // write whole output row segments: no long-strided accesses to either side.
                buf.clear();
                for j in j0..j1 {
                    let s = (off + j as isize * col_stride) as usize;
                    buf.extend_from_slice(&src[s..s + n]);
                }
                for i in 0..n {
                    let row = &mut out[i * cols + j0..i * cols + j1];
                    for (jj, o) in row.iter_mut().enumerate() {
                        *o = buf[jj * n + i].clone();
                    }
                }
            }
            g += n;
        }
    })
}

/// The tile `out[i * cols + j] = src[off + j * col_stride + i]` (`i < n`, `j` in `js`) of
/// [`bytes`] and [`words`]: `off` and the stride as offsets where the last element it reads
/// and the last it writes lie inside `src` and `out` (their lengths); `None` otherwise.
fn tile_inside(
    (src_len, out_len): (usize, usize),
    cols: usize,
    (off, col_stride): (isize, isize),
    n: usize,
    js: &std::ops::Range<usize>,
) -> Option<(usize, usize)> {
    let (off, stride) = (
        usize::try_from(off).ok()?,
        usize::try_from(col_stride).ok()?,
    );
    let src_end = (js.end.checked_sub(1)?)
        .checked_mul(stride)?
        .checked_add(off)?
        .checked_add(n)?;
    let out_end = (n.checked_sub(1)?).checked_mul(cols)?.checked_add(js.end)?;
    (src_end <= src_len && out_end <= out_len).then_some((off, stride))
}

/// Calls `block(i0, j0)` for every `b x b` block of a tile of `n` rows and the columns `js`
/// (both whole multiples of `b`), row blocks outermost.
fn each_block(
    n: usize,
    js: &std::ops::Range<usize>,
    b: usize,
    mut block: impl FnMut(usize, usize),
) {
    for i0 in (0..n).step_by(b) {
        for j0 in js.clone().step_by(b) {
            block(i0, j0);
        }
    }
}

/// [`blocked_copy`]'s tiles of four-byte elements (f32, i32: NCHW <-> NHWC, attention's head
/// transposes) in 8 x 8 blocks of AVX register transposes: the element-wise loop (a gather
/// into a buffer, then a scatter) took 3.4x ONNX Runtime's time on 8x64x56x56 to NHWC.
mod words {
    use super::Elem;
    use std::any::TypeId;

    /// Copies the tile `out[i * cols + j] = src[off + j * col_stride + i]` (`i < n`, `j` in
    /// `js`) when `T` is four bytes, the CPU has AVX and the tile is whole 8 x 8 blocks inside
    /// both sides; `false` (nothing written) otherwise.
    pub(super) fn tile<T: Elem>(
        src: &[T],
        out: &mut [T],
        cols: usize,
        off: isize,
        col_stride: isize,
        n: usize,
        js: std::ops::Range<usize>,
    ) -> bool {
        #[cfg(target_arch = "x86_64")]
        {
            if TypeId::of::<T>() != TypeId::of::<[u8; 4]>()
                || !n.is_multiple_of(8)
                || !js.len().is_multiple_of(8)
                || off < 0
                || col_stride < 8
                || !std::arch::is_x86_feature_detected!("avx")
            {
                return false;
            }
            let Some((off, stride)) =
                super::tile_inside((src.len(), out.len()), cols, (off, col_stride), n, &js)
            else {
                return false;
            };
            // SAFETY: T is `[u8; 4]` (four bytes, checked by TypeId), moved as f32 bit patterns
            // with unaligned loads and stores (no arithmetic: NaN payloads are kept).
            let (sp, op) = (src.as_ptr().cast::<f32>(), out.as_mut_ptr().cast::<f32>());
            super::each_block(n, &js, 8, |i0, j0| {
                // SAFETY: the block reads `src[off + j * stride + i0 ..][..8]` for `j < js.end`
                // and writes `out[i * cols + j0 ..][..8]` for `i < n`: inside both (checked
                // above); the CPU has AVX (checked).
                unsafe {
                    transpose8(
                        sp.add(off + j0 * stride + i0),
                        stride,
                        op.add(i0 * cols + j0),
                        cols,
                    )
                };
            });
            true
        }
        #[cfg(not(target_arch = "x86_64"))]
        {
            let _ = (src, out, cols, off, col_stride, n, js);
            false
        }
    }

    /// `dst[i * dst_stride + k] = src[k * src_stride + i]` for an 8 x 8 block.
    ///
    /// # Safety
    /// The 8 rows of 8 floats at `src + k * src_stride` are readable and those at
    /// `dst + i * dst_stride` writable; the CPU has AVX.
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx")]
    unsafe fn transpose8(src: *const f32, src_stride: usize, dst: *mut f32, dst_stride: usize) {
        use std::arch::x86_64::*;
        // SAFETY: (caller) every row read and written lies inside its slice.
        unsafe {
            let r: [__m256; 8] = std::array::from_fn(|k| _mm256_loadu_ps(src.add(k * src_stride)));
            let t0 = _mm256_unpacklo_ps(r[0], r[1]);
            let t1 = _mm256_unpackhi_ps(r[0], r[1]);
            let t2 = _mm256_unpacklo_ps(r[2], r[3]);
            let t3 = _mm256_unpackhi_ps(r[2], r[3]);
            let t4 = _mm256_unpacklo_ps(r[4], r[5]);
            let t5 = _mm256_unpackhi_ps(r[4], r[5]);
            let t6 = _mm256_unpacklo_ps(r[6], r[7]);
            let t7 = _mm256_unpackhi_ps(r[6], r[7]);
            let u0 = _mm256_shuffle_ps::<0x44>(t0, t2);
            let u1 = _mm256_shuffle_ps::<0xEE>(t0, t2);
            let u2 = _mm256_shuffle_ps::<0x44>(t1, t3);
            let u3 = _mm256_shuffle_ps::<0xEE>(t1, t3);
            let u4 = _mm256_shuffle_ps::<0x44>(t4, t6);
            let u5 = _mm256_shuffle_ps::<0xEE>(t4, t6);
            let u6 = _mm256_shuffle_ps::<0x44>(t5, t7);
            let u7 = _mm256_shuffle_ps::<0xEE>(t5, t7);
            let o = [
                _mm256_permute2f128_ps::<0x20>(u0, u4),
                _mm256_permute2f128_ps::<0x20>(u1, u5),
                _mm256_permute2f128_ps::<0x20>(u2, u6),
                _mm256_permute2f128_ps::<0x20>(u3, u7),
                _mm256_permute2f128_ps::<0x31>(u0, u4),
                _mm256_permute2f128_ps::<0x31>(u1, u5),
                _mm256_permute2f128_ps::<0x31>(u2, u6),
                _mm256_permute2f128_ps::<0x31>(u3, u7),
            ];
            for (i, v) in o.iter().enumerate() {
                _mm256_storeu_ps(dst.add(i * dst_stride), *v);
            }
        }
    }
}

/// [`blocked_copy`]'s tiles of one-byte elements (the integer models' layout changes) in
/// 16 x 16 blocks of SSE2 byte interleaves: the element-wise loop moves about a byte per
/// cycle (a u8 NHWC -> NCHW of 1.2 MB took 0.55 ms at 2 threads, ONNX Runtime 0.06 ms).
mod bytes {
    use super::Elem;
    use std::any::TypeId;

    /// Copies the tile `out[i * cols + j] = src[off + j * col_stride + i]` (`i < n`, `j` in
    /// `js`) when `T` is a byte and the tile is whole 16 x 16 blocks, or 16 x 3 blocks of an
    /// output three wide, inside both sides; `false` (nothing written) otherwise.
    pub(super) fn tile<T: Elem>(
        src: &[T],
        out: &mut [T],
        cols: usize,
        off: isize,
        col_stride: isize,
        n: usize,
        js: std::ops::Range<usize>,
    ) -> bool {
        #[cfg(target_arch = "x86_64")]
        {
            if TypeId::of::<T>() != TypeId::of::<[u8; 1]>() {
                return false;
            }
            // Three columns in all: an RGB image to channels-last (a quantized CNN's input).
            let rgb = cols == 3 && js == (0..3) && std::arch::is_x86_feature_detected!("ssse3");
            if !n.is_multiple_of(16)
                || !(rgb || js.len().is_multiple_of(16))
                || off < 0
                || col_stride < 16
            {
                return false;
            }
            let Some((off, stride)) =
                super::tile_inside((src.len(), out.len()), cols, (off, col_stride), n, &js)
            else {
                return false;
            };
            // SAFETY: T is `[u8; 1]` (same size and alignment as u8, checked by TypeId).
            let (sp, op) = (src.as_ptr().cast::<u8>(), out.as_mut_ptr().cast::<u8>());
            if rgb {
                for i0 in (0..n).step_by(16) {
                    // SAFETY: rows 0..3 read `src[off + j * stride + i0 ..][..16]` and the
                    // 16 output rows are `out[i0 * 3 ..][..48]`: inside both (checked above);
                    // the CPU has SSSE3 (checked).
                    unsafe { interleave3(sp.add(off + i0), stride, op.add(i0 * 3)) };
                }
                return true;
            }
            super::each_block(n, &js, 16, |i0, j0| {
                // SAFETY: the block's rows read `src[off + j * stride + i0 ..][..16]` for
                // `j < js.end`, and write `out[i * cols + j0 ..][..16]` for `i < n`: inside
                // both (checked above).
                unsafe {
                    transpose16(
                        sp.add(off + j0 * stride + i0),
                        stride,
                        op.add(i0 * cols + j0),
                        cols,
                    )
                };
            });
            true
        }
        #[cfg(not(target_arch = "x86_64"))]
        {
            let _ = (src, out, cols, off, col_stride, n, js);
            false
        }
    }

    /// `pshufb` masks of [`interleave3`]: for output vector `v` and source row `c`, the byte
    /// of row `c` at each output byte whose channel is `c` (`0x80`, a zero, elsewhere).
    #[cfg(target_arch = "x86_64")]
    const RGB: [[[i8; 16]; 3]; 3] = {
        let mut m = [[[-128i8; 16]; 3]; 3];
        let mut k = 0;
        while k < 48 {
            m[k / 16][k % 3][k % 16] = (k / 3) as i8;
            k += 1;
        }
        m
    };

    /// `out[3 i + c] = src[c * ld_src + i]` for `i < 16`, `c < 3`: three rows interleaved
    /// into 48 bytes by byte shuffles.
    ///
    /// # Safety
    /// The three rows of 16 bytes are readable, the 48 output bytes writable; the CPU has
    /// SSSE3.
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "ssse3")]
    unsafe fn interleave3(src: *const u8, ld_src: usize, out: *mut u8) {
        use std::arch::x86_64::*;
        // SAFETY: per the contract.
        unsafe {
            let r = [
                _mm_loadu_si128(src.cast()),
                _mm_loadu_si128(src.add(ld_src).cast()),
                _mm_loadu_si128(src.add(2 * ld_src).cast()),
            ];
            for (v, masks) in RGB.iter().enumerate() {
                let mut o = _mm_setzero_si128();
                for (row, m) in r.iter().zip(masks) {
                    let m = _mm_loadu_si128(m.as_ptr().cast());
                    o = _mm_or_si128(o, _mm_shuffle_epi8(*row, m));
                }
                _mm_storeu_si128(out.add(16 * v).cast(), o);
            }
        }
    }

    /// `out[i * ld_out + j] = src[j * ld_src + i]` for `i, j < 16`: four rounds of pairing
    /// rows `k` and `k + 8` byte by byte (a perfect shuffle each; four make the transpose).
    ///
    /// # Safety
    /// The 16 rows of 16 bytes either side are readable / writable.
    #[cfg(target_arch = "x86_64")]
    unsafe fn transpose16(src: *const u8, ld_src: usize, out: *mut u8, ld_out: usize) {
        use std::arch::x86_64::*;
        let mut r = [_mm_setzero_si128(); 16];
        for (j, v) in r.iter_mut().enumerate() {
            // SAFETY: row j of the block (caller).
            *v = unsafe { _mm_loadu_si128(src.add(j * ld_src).cast()) };
        }
        for _ in 0..4 {
            let mut next = [_mm_setzero_si128(); 16];
            for k in 0..8 {
                next[2 * k] = _mm_unpacklo_epi8(r[k], r[k + 8]);
                next[2 * k + 1] = _mm_unpackhi_epi8(r[k], r[k + 8]);
            }
            r = next;
        }
        for (i, v) in r.iter().enumerate() {
            // SAFETY: row i of the output block (caller).
            unsafe { _mm_storeu_si128(out.add(i * ld_out).cast(), *v) };
        }
    }
}

/// `dst = src`, in parallel.
pub(crate) fn copy_all<T: Elem>(
    ctx: &KernelContext<'_>,
    src: &[T],
    dst: &mut [T],
) -> Result<(), PluginError> {
    if src.len() != dst.len() {
        return Err(PluginError::internal(format!(
            "copy of {} elements into {}",
            src.len(),
            dst.len()
        )));
    }
    ctx.parallel_chunks(dst, GRAIN, |start, chunk| {
        chunk.clone_from_slice(&src[start..start + chunk.len()]);
    })
}

/// Calls `f(unit_index, unit)` for each `unit`-sized piece of `dst`, in parallel.
pub(crate) fn par_units<T: Send>(
    ctx: &KernelContext<'_>,
    dst: &mut [T],
    unit: usize,
    f: impl Fn(usize, &mut [T]) + Sync,
) -> Result<(), PluginError> {
    if unit == 0 || dst.is_empty() {
        return Ok(());
    }
    let per = (GRAIN / unit).max(1);
    ctx.parallel_chunks(dst, per * unit, |start, chunk| {
        for (k, u) in chunk.chunks_mut(unit).enumerate() {
            f(start / unit + k, u);
        }
    })
}

/// `dst` as runs of `unit` elements, run `o` copied from `src(o)` (at least `unit` long), in
/// tasks of [`GRAIN`] elements whatever the runs' length: one run of a batch-1 tensor (a
/// channel Split) is still copied by every thread.
pub(crate) fn par_runs<'a, T: Clone + Send + Sync + 'a>(
    ctx: &KernelContext<'_>,
    dst: &mut [T],
    unit: usize,
    src: impl Fn(usize) -> &'a [T] + Sync,
) -> Result<(), PluginError> {
    if unit == 0 || dst.is_empty() {
        return Ok(());
    }
    ctx.parallel_chunks(dst, GRAIN, |start, chunk| {
        let mut done = 0;
        while done < chunk.len() {
            let pos = start + done;
            let (o, off) = (pos / unit, pos % unit);
            let take = (unit - off).min(chunk.len() - done);
            chunk[done..done + take].clone_from_slice(&src(o)[off..off + take]);
            done += take;
        }
    })
}

/// Output 0 with `x`'s elements under a new shape.
pub(crate) fn copy_reshaped(
    ctx: &KernelContext<'_>,
    x: &TensorView<'_>,
    shape: &[usize],
) -> Result<(), PluginError> {
    fn run<T: Elem>(
        ctx: &KernelContext<'_>,
        x: &TensorView<'_>,
        shape: &[usize],
    ) -> Result<(), PluginError> {
        let src = T::slice(x)?;
        // Every element copied.
        let dst = T::slice_mut(output_written(ctx, 0, x.dtype, shape)?)?;
        copy_all(ctx, src, dst)
    }
    // Saturating: a product past usize cannot match X's length anyway.
    let n = crate::util::product_sat(shape);
    if n != x.len() {
        return Err(PluginError::invalid(format!(
            "cannot reshape {:?} ({} elements) to {shape:?} ({n} elements)",
            x.shape(),
            x.len()
        )));
    }
    by_elem!(x.dtype, run(ctx, x, shape))
}

/// Output 0: `x` read through `strides` (in elements of `x`) from `base`, with `shape`.
pub(crate) fn copy_strided(
    ctx: &KernelContext<'_>,
    x: &TensorView<'_>,
    shape: &[usize],
    strides: &[isize],
    base: isize,
) -> Result<(), PluginError> {
    fn run<T: Elem>(
        ctx: &KernelContext<'_>,
        x: &TensorView<'_>,
        shape: &[usize],
        strides: &[isize],
        base: isize,
    ) -> Result<(), PluginError> {
        let src = T::slice(x)?;
        // Every element read through the strides.
        let dst = T::slice_mut(output_written(ctx, 0, x.dtype, shape)?)?;
        strided_copy(ctx, src, dst, shape, strides, base)
    }
    by_elem!(x.dtype, run(ctx, x, shape, strides, base))
}

/// Output 0 as `x` reshaped to `shape`, transposed by `perm`, then reshaped to `out_shape`.
pub(crate) fn copy_permuted(
    ctx: &KernelContext<'_>,
    x: &TensorView<'_>,
    shape: &[usize],
    perm: &[usize],
    out_shape: &[usize],
) -> Result<(), PluginError> {
    let st = strides_of(shape);
    let pshape: Vec<usize> = perm.iter().map(|&p| shape[p]).collect();
    let pstrides: Vec<isize> = perm.iter().map(|&p| st[p]).collect();
    fn run<T: Elem>(
        ctx: &KernelContext<'_>,
        x: &TensorView<'_>,
        pshape: &[usize],
        pstrides: &[isize],
        out_shape: &[usize],
    ) -> Result<(), PluginError> {
        let src = T::slice(x)?;
        // Every element read through the permuted strides.
        let dst = T::slice_mut(output_written(ctx, 0, x.dtype, out_shape)?)?;
        strided_copy(ctx, src, dst, pshape, pstrides, 0)
    }
    by_elem!(x.dtype, run(ctx, x, &pshape, &pstrides, out_shape))
}

/// Registers a kernel built by `make` from the node.
pub(crate) fn reg<K: Kernel>(
    r: &mut Registrar,
    desc: KernelDesc,
    make: impl Fn(&NodeInfo<'_>) -> Result<K, PluginError> + Send + Sync + 'static,
) {
    r.kernel(
        desc,
        move |node: &NodeInfo<'_>| -> Result<Box<dyn Kernel>, PluginError> {
            Ok(Box::new(make(node)?))
        },
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn walks_signed_strides_and_coalesces() {
        let mut v = Vec::new();
        walk_elems(&[2, 3], &[-3, 1], 3, 0, 6, |o| v.push(o));
        assert_eq!(v, vec![3, 4, 5, 0, 1, 2]);
        let mut w = Vec::new();
        walk_elems(&[2, 3], &[-3, 1], 3, 2, 3, |o| w.push(o));
        assert_eq!(w, vec![5, 0, 1]);
        assert_eq!(
            coalesce(&[2, 1, 3, 4], &[12, 99, 4, 1]),
            (vec![24], vec![1])
        );
        assert_eq!(coalesce(&[2, 3], &[1, 2]), (vec![2, 3], vec![1, 2]));
    }

    #[test]
    fn nonzero_treats_negative_zero_as_zero() {
        assert!(!is_nonzero(DType::F32, &(-0.0f32).to_le_bytes()));
        assert!(is_nonzero(DType::F32, &(1e-40f32).to_le_bytes()));
        assert!(is_nonzero(DType::I32, &(i32::MIN).to_le_bytes()));
    }
}

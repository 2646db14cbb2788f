//! MaxPool over channels-last data (`[N, H, W, C]`, 2-D windows): `com.microsoft::NhwcMaxPool`
//! (ONNX Runtime's contrib operator) for 8-bit data, so that a quantized CNN's max pool sits
//! between channels-last convolutions without a transpose on either side, and
//! `opreg::MaxPoolNhwc` for f32, where the `nhwc-conv` pass carries a network's first pool
//! (ResNet's 3x3/2 after the stem) between channels-last convolutions.
//!
//! Channels-last, every tap of a window is a contiguous run of the pixel's channels, so a 3x3
//! window is nine vector maxima per 16 channels, whatever the stride (ONNX Runtime pools in its
//! NCHWc layout for the same reason). The NCHW pool of a stride-2 window first splits each row
//! into even and odd columns with permutes: ResNet-18's 64x112x112 pool took 0.09 ms there at
//! batch 1 and 1.5 ms at batch 8, 0.04 and 0.68 ms here (ONNX Runtime's NCHWc pool at batch 8:
//! 0.57 ms).
//!
//! The result is the NCHW `MaxPool`'s to the bit: a window's first tap (row-major order) starts
//! the maximum and a later tap replaces it only when greater, so a NaN first tap stays, a
//! later NaN is passed over, and of equal maxima (`-0`, `+0`) the first wins. The maximum
//! commutes with the monotonic (de)quantization, so pooling the bytes equals ONNX's QDQ
//! MaxPool.

use crate::nn::{Geometry, WindowAttrs};
use crate::util::{input, Factory};
use opreg_sdk::{alloc::checked_numel, prelude::*, OPEN_END};

/// The 8-bit operator (ONNX Runtime's name and domain).
const OP_Q8: &str = "NhwcMaxPool";
/// The f32 operator (opreg's: ONNX Runtime's `NhwcMaxPool` takes 8-bit data only).
const OP_F32: &str = "MaxPoolNhwc";

struct NhwcMaxPool {
    attrs: WindowAttrs,
    op: &'static str,
}

impl Kernel for NhwcMaxPool {
    fn compute(
        &self,
        ctx: &KernelContext<'_>,
        inputs: &[TensorView<'_>],
    ) -> Result<(), PluginError> {
        let op = self.op;
        let x = input(op, inputs, 0, "x")?;
        let &[n, ih, iw, c] = x.shape() else {
            return Err(PluginError::invalid(format!(
                "{op}: x must be 4-D [N, H, W, C], got {:?}",
                x.shape()
            )));
        };
        let g = self.attrs.resolve(op, &[ih, iw], None)?;
        let [oh_n, ow_n] = [g.out[0], g.out[1]];
        // Extents from the request and the model: multiplied checked.
        let row = checked_numel(&[ow_n, c])?;
        let image = checked_numel(&[ih, iw, c])?;
        let total = checked_numel(&[n, image])?;
        let dims = Dims {
            ih,
            iw,
            c,
            oh_n,
            image,
        };
        let max_row = match x.dtype {
            DType::F32 => None,
            DType::U8 => Some(max_row_u8 as MaxRow<u8>),
            DType::I8 => Some(max_row_i8 as MaxRow<u8>),
            other => {
                return Err(PluginError::unimplemented(format!(
                    "{op}: no kernel for {other:?}"
                )))
            }
        };
        // Every element is written (`max_row`).
        let out = ctx.output_to_overwrite(0, x.dtype, &[n, oh_n, ow_n, c])?;
        let shape = (dims, &g, total, row);
        match max_row {
            None => rows(
                ctx,
                op,
                x.as_slice::<f32>()?,
                out.into_slice()?,
                shape,
                max_row_f32,
            ),
            Some(max_row) => rows(ctx, op, x.as_bytes()?, out.into_bytes()?, shape, max_row),
        }
    }
}

/// One output row's loop for an element type (see [`max_row`]).
type MaxRow<T> = fn(&[T], &RowTaps<'_>, bool, &mut [T]);

/// Every row of `out` (`[N, OH, OW, C]`) from `x` by `max_row`, spread over the threads; `x`
/// must hold `total` values.
fn rows<T: Copy + Send + Sync>(
    ctx: &KernelContext<'_>,
    op: &str,
    x: &[T],
    out: &mut [T],
    (dims, g, total, row): (Dims, &Geometry, usize, usize),
    max_row: MaxRow<T>,
) -> Result<(), PluginError> {
    if out.is_empty() || row == 0 {
        return Ok(());
    }
    if x.len() < total {
        return Err(PluginError::invalid(format!(
            "{op}: x is shorter than its shape"
        )));
    }
    // Rows of at least 8192 values per task: a task per row of a 7x7 map would cost more in
    // hand-offs than its maxima.
    let grain = row * 8192usize.div_ceil(row);
    ctx.parallel_chunks(out, grain, |start, chunk| {
        for (k, orow) in chunk.chunks_mut(row).enumerate() {
            dims.row(x, g, start / row + k, orow, max_row);
        }
    })
}

/// The extents an output row is found by.
#[derive(Clone, Copy)]
struct Dims {
    ih: usize,
    iw: usize,
    c: usize,
    oh_n: usize,
    /// `ih * iw * c` (checked by the caller).
    image: usize,
}

/// The taps of one output row: the input rows its windows cover (offsets of whole rows
/// within the image, at most [`MAX_ROWS`]) and the column geometry.
struct RowTaps<'a> {
    rows: &'a [usize],
    iw: usize,
    c: usize,
    g: &'a Geometry,
}

/// Window rows held on the stack per pass: a taller window (no CNN pools past 7x7) runs in
/// passes of this many rows, the maxima carried between them in the output row.
const MAX_ROWS: usize = 16;

impl Dims {
    /// Output row `r` (image `r / oh_n`, row `r % oh_n`) of `x` into `orow`, by `max_row`
    /// over the window rows inside the image.
    fn row<T: Copy>(self, x: &[T], g: &Geometry, r: usize, orow: &mut [T], max_row: MaxRow<T>) {
        let Dims {
            ih,
            iw,
            c,
            oh_n,
            image,
        } = self;
        let (bn, oh) = (r / oh_n.max(1), r % oh_n.max(1));
        // Always there (the caller checked x's length); were it not, every pixel gets the
        // empty window's value, so that the output is written whole either way.
        let img = x.get(bn * image..(bn + 1) * image).unwrap_or(&[]);
        let mut rows = [0usize; MAX_ROWS];
        let mut len = 0;
        let mut first = true;
        for kh in 0..g.kernel[0] {
            let y = (oh * g.strides[0] + kh * g.dilations[0]).wrapping_sub(g.pad_begin[0]);
            if y >= ih {
                continue;
            }
            rows[len] = y * iw * c;
            len += 1;
            if len == MAX_ROWS {
                max_row(
                    img,
                    &RowTaps {
                        rows: &rows,
                        iw,
                        c,
                        g,
                    },
                    first,
                    orow,
                );
                (len, first) = (0, false);
            }
        }
        if len > 0 || first {
            let taps = RowTaps {
                rows: &rows[..len],
                iw,
                c,
                g,
            };
            max_row(img, &taps, first, orow);
        }
    }
}

/// The loop of every element type: each output pixel of `orow` the maximum over its window's
/// taps in `x` (one image), `v > m ? v : m` in row-major tap order from the first tap when
/// `fresh`, else from what `orow` holds (a window taller than [`MAX_ROWS`] rows, in parts);
/// `orow` holds the pixels from output column `first` on.
/// A window with no tap inside the image yields `low` (ONNX pads MaxPool with -inf).
#[inline(always)]
fn max_row<T: Copy>(
    x: &[T],
    taps: &RowTaps<'_>,
    fresh: bool,
    (low, gt): (T, impl Fn(T, T) -> bool),
    (orow, first): (&mut [T], usize),
) {
    let RowTaps { rows, iw, c, g } = *taps;
    for (ow, pixel) in orow.chunks_exact_mut(c).enumerate() {
        let ow = first + ow;
        let mut started = !fresh;
        for &row in rows {
            for kw in 0..g.kernel[1] {
                let xx = (ow * g.strides[1] + kw * g.dilations[1]).wrapping_sub(g.pad_begin[1]);
                if xx >= iw {
                    continue;
                }
                let at = row + xx * c;
                let Some(src) = x.get(at..at + c) else {
                    continue;
                };
                if started {
                    for (m, &v) in pixel.iter_mut().zip(src) {
                        // `maxps(v, m)` where T is f32.
                        *m = if gt(v, *m) { v } else { *m };
                    }
                } else {
                    pixel.copy_from_slice(src);
                    started = true;
                }
            }
        }
        if !started {
            pixel.fill(low);
        }
    }
}

/// [`max_row`] over f32: the pixels whose windows lie wholly inside the row's columns with
/// AVX-512 or AVX ([`x86::interior`], [`x86::interior_avx`]), the others (pads, a ceil-mode
/// edge) by the loop.
fn max_row_f32(x: &[f32], taps: &RowTaps<'_>, fresh: bool, orow: &mut [f32]) {
    let RowTaps { rows, iw, c, g } = *taps;
    let ow_n = orow.len() / c.max(1);
    let (s1, d1, k1, p1) = (g.strides[1], g.dilations[1], g.kernel[1], g.pad_begin[1]);
    // The first output column whose window starts inside the row, and the end of those whose
    // window ends inside it.
    let lo = p1.div_ceil(s1.max(1)).min(ow_n);
    let span = (k1.max(1) - 1).saturating_mul(d1).saturating_add(1);
    let hi = iw
        .saturating_add(p1)
        .checked_sub(span)
        .map_or(0, |last| last / s1.max(1) + 1)
        .clamp(lo, ow_n);
    #[cfg(target_arch = "x86_64")]
    if let (true, Some(avx512)) = (fresh && hi > lo && !rows.is_empty(), super::fast_loops()) {
        let mut rel = [0usize; x86::MAX_TAPS];
        let mut n = 0;
        for &row in rows {
            for kw in 0..k1 {
                if let Some(r) = rel.get_mut(n) {
                    *r = row - rows[0] + kw * d1 * c;
                }
                n += 1;
            }
        }
        if (1..=x86::MAX_TAPS).contains(&n) {
            let (head, rest) = orow.split_at_mut(lo * c);
            let (mid, tail) = rest.split_at_mut((hi - lo) * c);
            max_row_any_f32(x, taps, fresh, head, 0);
            // The first tap of output column `ow` (inside the row: `ow >= lo`).
            let start = |ow: usize| rows[0] + (ow * s1 - p1) * c;
            let at = (start(lo), s1 * c);
            // SAFETY: AVX-512 F or AVX (checked); `interior` checks each window against x.
            unsafe {
                if avx512 {
                    x86::interior(x, at, &rel[..n], c, mid)
                } else {
                    x86::interior_avx(x, at, &rel[..n], c, mid)
                }
            };
            max_row_any_f32(x, taps, fresh, tail, hi);
            return;
        }
    }
    max_row_any_f32(x, taps, fresh, orow, 0)
}

crate::simd::simd_fn! {
    /// [`max_row`] over f32, the pixels from column `first` on.
    fn max_row_any_f32(x: &[f32], taps: &RowTaps<'_>, fresh: bool, orow: &mut [f32], first: usize) {
        max_row(x, taps, fresh, (f32::NEG_INFINITY, |v, m| v > m), (orow, first))
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::x86_64::*;

    /// Taps per window at most for [`interior`] (a 7x7 window).
    pub(super) const MAX_TAPS: usize = 49;

    /// `out`'s pixels (`c` channels each) with the offset in x of each one's first tap,
    /// `None` where its window (`rel` from there, `c` floats each) would leave x: checked,
    /// though the callers' ranges keep them inside, as the loads are not.
    fn windows<'a>(
        x_len: usize,
        (start, step): (usize, usize),
        rel: &[usize],
        c: usize,
        out: &'a mut [f32],
    ) -> impl Iterator<Item = (Option<usize>, &'a mut [f32])> {
        let reach = rel.iter().max().copied().unwrap_or(0) + c;
        out.chunks_exact_mut(c.max(1))
            .enumerate()
            .map(move |(i, pixel)| {
                let at = i.checked_mul(step).and_then(|o| o.checked_add(start));
                let at = at.filter(|a| a.checked_add(reach).is_some_and(|e| e <= x_len));
                (at, pixel)
            })
    }

    /// `out`'s pixels (`c` channels each), pixel `i`'s window the taps at `x[start + i * step
    /// + rel[t]..][..c]`, `rel[0] = 0` the first: `m = tap 0`, then `m = maxps(tap, m)` per
    /// tap in order (the NCHW loop's order and NaN rule). The caller's ranges keep every
    /// window inside `x`; a pixel whose window would not be is written NaN, not left stale.
    ///
    /// # Safety
    /// The CPU has AVX-512 F.
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn interior(
        x: &[f32],
        (start, step): (usize, usize),
        rel: &[usize],
        c: usize,
        out: &mut [f32],
    ) {
        let Some(later) = rel.get(1..).filter(|_| !rel.is_empty()) else {
            out.fill(f32::NAN);
            return;
        };
        for (at, pixel) in windows(x.len(), (start, step), rel, c, out) {
            let Some(at) = at else {
                pixel.fill(f32::NAN);
                continue;
            };
            let p = x.as_ptr().add(at);
            let o = pixel.as_mut_ptr();
            let mut ch = 0;
            // Four registers of channels at a time: four independent chains of maxima.
            while ch + 64 <= c {
                let q = p.add(ch);
                let mut m = [
                    _mm512_loadu_ps(q),
                    _mm512_loadu_ps(q.add(16)),
                    _mm512_loadu_ps(q.add(32)),
                    _mm512_loadu_ps(q.add(48)),
                ];
                for &r in later {
                    let t = q.add(r);
                    for (k, mk) in m.iter_mut().enumerate() {
                        *mk = _mm512_max_ps(_mm512_loadu_ps(t.add(16 * k)), *mk);
                    }
                }
                for (k, mk) in m.iter().enumerate() {
                    _mm512_storeu_ps(o.add(ch + 16 * k), *mk);
                }
                ch += 64;
            }
            while ch < c {
                let lanes = (c - ch).min(16);
                let mask = ((1u32 << lanes) - 1) as __mmask16;
                let q = p.add(ch);
                let mut m = _mm512_maskz_loadu_ps(mask, q);
                for &r in later {
                    m = _mm512_max_ps(_mm512_maskz_loadu_ps(mask, q.add(r)), m);
                }
                _mm512_mask_storeu_ps(o.add(ch), mask, m);
                ch += lanes;
            }
        }
    }

    /// [`interior`] in AVX registers of 8 channels (the same maxima in the same order, so
    /// the same bits); the channels past the last whole register one by one. Without it an
    /// AVX2 CPU pooled every pixel through the generic loop: ResNet-50's 64x112x112 pool took
    /// 0.45 ms at two threads (Zen 3) against ONNX Runtime's 0.11.
    ///
    /// # Safety
    /// The CPU has AVX.
    #[target_feature(enable = "avx")]
    pub(super) unsafe fn interior_avx(
        x: &[f32],
        (start, step): (usize, usize),
        rel: &[usize],
        c: usize,
        out: &mut [f32],
    ) {
        let Some(later) = rel.get(1..).filter(|_| !rel.is_empty()) else {
            out.fill(f32::NAN);
            return;
        };
        for (at, pixel) in windows(x.len(), (start, step), rel, c, out) {
            let Some(at) = at else {
                pixel.fill(f32::NAN);
                continue;
            };
            // SAFETY (block): every tap's `c` floats from `at` lie in x (checked above), and
            // the pixel's `c` in `out`.
            unsafe {
                let p = x.as_ptr().add(at);
                let o = pixel.as_mut_ptr();
                let mut ch = 0;
                // Four registers of channels at a time: four independent chains of maxima.
                while ch + 32 <= c {
                    let q = p.add(ch);
                    let mut m = [
                        _mm256_loadu_ps(q),
                        _mm256_loadu_ps(q.add(8)),
                        _mm256_loadu_ps(q.add(16)),
                        _mm256_loadu_ps(q.add(24)),
                    ];
                    for &r in later {
                        let t = q.add(r);
                        for (k, mk) in m.iter_mut().enumerate() {
                            *mk = _mm256_max_ps(_mm256_loadu_ps(t.add(8 * k)), *mk);
                        }
                    }
                    for (k, mk) in m.iter().enumerate() {
                        _mm256_storeu_ps(o.add(ch + 8 * k), *mk);
                    }
                    ch += 32;
                }
                while ch + 8 <= c {
                    let q = p.add(ch);
                    let mut m = _mm256_loadu_ps(q);
                    for &r in later {
                        m = _mm256_max_ps(_mm256_loadu_ps(q.add(r)), m);
                    }
                    _mm256_storeu_ps(o.add(ch), m);
                    ch += 8;
                }
                for ch in ch..c {
                    // `maxps(v, m)`: v > m ? v : m.
                    let mut m = *p.add(ch);
                    for &r in later {
                        let v = *p.add(ch + r);
                        m = if v > m { v } else { m };
                    }
                    *o.add(ch) = m;
                }
            }
        }
    }
}

crate::simd::simd_fn! {
    /// [`max_row`] over u8.
    fn max_row_u8(x: &[u8], taps: &RowTaps<'_>, fresh: bool, orow: &mut [u8]) {
        max_row(x, taps, fresh, (0, |v, m| v > m), (orow, 0))
    }
}

crate::simd::simd_fn! {
    /// [`max_row`] over i8, held as bytes.
    fn max_row_i8(x: &[u8], taps: &RowTaps<'_>, fresh: bool, orow: &mut [u8]) {
        max_row(x, taps, fresh, (0x80, |v: u8, m: u8| (v as i8) > (m as i8)), (orow, 0))
    }
}

fn factory(op: &'static str, node: &NodeInfo<'_>) -> Result<Box<dyn Kernel>, PluginError> {
    let attrs = WindowAttrs::from_node(node)?;
    if attrs.kernel_shape.as_ref().map(Vec::len) != Some(2) {
        return Err(PluginError::invalid(format!(
            "{op}: attribute 'kernel_shape' must give the 2 spatial extents"
        )));
    }
    Ok(Box::new(NhwcMaxPool { attrs, op }))
}

fn q8_factory(node: &NodeInfo<'_>) -> Result<Box<dyn Kernel>, PluginError> {
    factory(OP_Q8, node)
}

fn f32_factory(node: &NodeInfo<'_>) -> Result<Box<dyn Kernel>, PluginError> {
    factory(OP_F32, node)
}

pub(super) fn register(r: &mut Registrar) {
    r.kernel(
        KernelDesc::new("com.microsoft", OP_Q8, 1, OPEN_END)
            .constraint("T", &[DType::U8, DType::I8])
            .inputs(&["T"])
            .outputs(&["T"]),
        q8_factory as Factory,
    );
    r.kernel(
        KernelDesc::new("opreg", OP_F32, 1, OPEN_END)
            .constraint("T", &[DType::F32])
            .inputs(&["T"])
            .outputs(&["T"]),
        f32_factory as Factory,
    );
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::util::testing::t;
    use opreg_sdk::{
        host::HostTensor,
        testkit::{run_kernel, NodeSpec},
    };

    /// `com.microsoft::NhwcMaxPool` over u8 and i8: the maximum of each window's bytes in the
    /// type's order, padding ignored, strides, dilations and ceil mode, against a direct loop.
    #[test]
    fn nhwc_max_pool_takes_each_windows_maximum() {
        let (n, h, w, c) = (2, 7, 6, 5);
        let xb: Vec<u8> = (0..n * h * w * c)
            .map(|i| ((i as u32).wrapping_mul(2654435761) >> 13) as u8)
            .collect();
        // (kernel, strides, pads [top, left, bottom, right], dilations, ceil mode)
        type Case = ([usize; 2], [usize; 2], [usize; 4], [usize; 2], bool);
        let cases: [Case; 3] = [
            ([3, 3], [2, 2], [1, 1, 1, 1], [1, 1], false),
            ([2, 3], [1, 2], [0, 1, 0, 0], [2, 1], true),
            ([1, 1], [3, 3], [0, 0, 0, 0], [1, 1], false),
        ];
        for (k, (ks, st, pads, dil, ceil)) in cases.into_iter().enumerate() {
            for signed in [false, true] {
                let out_extent = |d: usize| {
                    let span = [h, w][d] + pads[d] + pads[d + 2] - (ks[d] - 1) * dil[d] - 1;
                    if ceil {
                        span.div_ceil(st[d]) + 1
                    } else {
                        span / st[d] + 1
                    }
                };
                let (oh, ow) = (out_extent(0), out_extent(1));
                let value = |b: u8| {
                    if signed {
                        i32::from(b as i8)
                    } else {
                        i32::from(b)
                    }
                };
                let mut want = Vec::new();
                for b in 0..n {
                    for y in 0..oh {
                        for xx in 0..ow {
                            for ch in 0..c {
                                let mut best: Option<u8> = None;
                                for a in 0..ks[0] {
                                    for e in 0..ks[1] {
                                        let iy =
                                            (y * st[0] + a * dil[0]) as isize - pads[0] as isize;
                                        let ix =
                                            (xx * st[1] + e * dil[1]) as isize - pads[1] as isize;
                                        if iy < 0 || ix < 0 || iy >= h as isize || ix >= w as isize
                                        {
                                            continue;
                                        }
                                        let v =
                                            xb[((b * h + iy as usize) * w + ix as usize) * c + ch];
                                        if best.is_none_or(|m| value(v) > value(m)) {
                                            best = Some(v);
                                        }
                                    }
                                }
                                want.push(best.expect("every window has a tap inside"));
                            }
                        }
                    }
                }
                let x = if signed {
                    t(
                        &[n, h, w, c],
                        &xb.iter().map(|&v| v as i8).collect::<Vec<_>>(),
                    )
                } else {
                    t(&[n, h, w, c], &xb)
                };
                let node = NodeSpec::onnx("NhwcMaxPool", 1)
                    .domain("com.microsoft")
                    .attr(
                        "kernel_shape",
                        AttrValue::Ints(ks.map(|v| v as i64).to_vec()),
                    )
                    .attr("strides", AttrValue::Ints(st.map(|v| v as i64).to_vec()))
                    .attr("pads", AttrValue::Ints(pads.map(|v| v as i64).to_vec()))
                    .attr("dilations", AttrValue::Ints(dil.map(|v| v as i64).to_vec()))
                    .attr("ceil_mode", AttrValue::Int(i64::from(ceil)));
                let got =
                    run_kernel(q8_factory, &node, &[&x], None).unwrap_or_else(|e| panic!("{e:?}"));
                assert_eq!(got[0].shape(), &[n, oh, ow, c], "case {k}");
                assert_eq!(got[0].bytes(), want, "case {k}, signed {signed}");
            }
        }
    }

    /// `opreg::MaxPoolNhwc` over f32 gives the NCHW MaxPool's direct loop's bits (its
    /// indices output asked for, which keeps it on that loop), turned channels-last: NaN first
    /// taps and later ones, ties of -0 and +0, -inf, pads, strides, dilations, ceil mode, a
    /// window taller than the rows held at once, and channel counts through the vector path's
    /// whole and masked registers.
    #[test]
    fn f32_channels_last_max_pool_gives_the_nchw_pools_bits() {
        let ints = |v: &[usize]| AttrValue::Ints(v.iter().map(|&x| x as i64).collect());
        // (kernel, strides, dilations, pads [top, left, bottom, right], ceil mode)
        type Case = ([usize; 2], [usize; 2], [usize; 2], [usize; 4], bool);
        let cases: [Case; 8] = [
            ([3, 3], [2, 2], [1, 1], [1, 1, 1, 1], false),
            ([3, 3], [2, 2], [1, 1], [0, 0, 0, 0], true),
            ([2, 2], [2, 2], [1, 1], [0, 0, 0, 0], false),
            ([3, 3], [1, 1], [1, 1], [1, 1, 1, 1], false),
            ([2, 4], [1, 3], [1, 1], [1, 2, 0, 3], true),
            ([3, 2], [2, 2], [1, 2], [1, 1, 0, 0], false),
            ([7, 7], [1, 1], [1, 1], [3, 3, 3, 3], false),
            // 17 rows: two passes over the window rows, the maxima carried between them.
            ([17, 1], [1, 1], [1, 1], [8, 0, 8, 0], false),
        ];
        // Each with the best interior loop and, where the CPU has AVX-512, the AVX one too.
        let runs = 1 + usize::from(crate::simd::has_avx512());
        for ((n, c, h, w), avx) in [(2, 20, 9, 13), (1, 64, 12, 11), (1, 3, 18, 5)]
            .into_iter()
            .flat_map(|case| [(case, false), (case, true)].into_iter().take(runs))
        {
            super::super::TEST_AVX.set(avx);
            // NCHW values: ties of -0 and +0, NaN and -inf sprinkled.
            let mut x: Vec<f32> = (0..n * c * h * w)
                .map(|i| ((i * 29 % 31) as f32 - 15.0) / 4.0)
                .map(|v| if v.abs() < 1.0 { 0.0 } else { v })
                .collect();
            for (i, v) in x.iter_mut().enumerate() {
                match i % 13 {
                    3 => *v = -0.0,
                    7 => *v = f32::NAN,
                    _ if i % 41 == 5 => *v = f32::NEG_INFINITY,
                    _ => {}
                }
            }
            let turn = |v: &[f32], (c, hw): (usize, usize)| {
                let mut out = vec![0.0f32; v.len()];
                for b in 0..n {
                    for ch in 0..c {
                        for p in 0..hw {
                            out[(b * hw + p) * c + ch] = v[(b * c + ch) * hw + p];
                        }
                    }
                }
                out
            };
            let nchw = HostTensor::from_vec(&[n, c, h, w], &x).expect("x");
            let nhwc = HostTensor::from_vec(&[n, h, w, c], &turn(&x, (c, h * w))).expect("x");
            for (k, st, dil, pads, ceil) in cases {
                let attrs = |spec: NodeSpec| {
                    spec.attr("kernel_shape", ints(&k))
                        .attr("strides", ints(&st))
                        .attr("dilations", ints(&dil))
                        .attr("pads", ints(&pads))
                        .attr("ceil_mode", AttrValue::Int(ceil as i64))
                };
                let direct = run_kernel(
                    super::super::max_pool_factory,
                    &attrs(NodeSpec::onnx("MaxPool", 19)).outputs(2),
                    &[&nchw],
                    None,
                )
                .expect("direct");
                let &[_, _, oh, ow] = direct[0].shape() else {
                    panic!("{:?}", direct[0].shape());
                };
                let want = turn(&direct[0].to_vec::<f32>().expect("f32"), (c, oh * ow));
                let spec = attrs(NodeSpec::onnx(OP_F32, 1).domain("opreg"));
                let got = run_kernel(f32_factory, &spec, &[&nhwc], None).expect("nhwc");
                assert_eq!(got[0].shape(), &[n, oh, ow, c], "{k:?} {st:?}");
                let bits = |v: &[f32]| v.iter().map(|f| f.to_bits()).collect::<Vec<_>>();
                assert_eq!(
                    bits(&got[0].to_vec::<f32>().expect("f32")),
                    bits(&want),
                    "c {c}: {k:?} {st:?} {dil:?} {pads:?} ceil {ceil} avx {avx}"
                );
            }
        }
        super::super::TEST_AVX.set(false);
        // No images beside a 2^40 extent: an empty output, nothing read or allocated; an
        // empty row refused (the window does not fit), as a 2^40-wide output (not allocated).
        let spec = NodeSpec::onnx(OP_F32, 1)
            .domain("opreg")
            .attr("kernel_shape", ints(&[1, 1]));
        for (xs, ok) in [
            ([0, 3, 3, 1usize << 40], true),
            ([1, 1, 1 << 40, 0], true),
            ([1, 0, 3, 1 << 40], false),
        ] {
            let x = HostTensor::from_vec(&xs, &[] as &[f32]).expect("x");
            let got = run_kernel(f32_factory, &spec, &[&x], None);
            assert_eq!(got.is_ok(), ok, "{xs:?}: {:?}", got.as_ref().err());
            if let Ok(y) = got {
                assert_eq!(y[0].shape(), &xs[..]);
            }
        }
        let wide = spec.attr("pads", ints(&[0, 0, 0, 1 << 40]));
        let x = HostTensor::from_vec(&[1, 1, 1, 16], &[0.0f32; 16]).expect("x");
        assert!(run_kernel(f32_factory, &wide, &[&x], None).is_err());
    }
}

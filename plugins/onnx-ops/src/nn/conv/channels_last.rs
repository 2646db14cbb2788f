//! The zero-padded, channels-last copy of an NCHW image that the direct and depthwise
//! convolutions read (`copy[(row * cols + col) * stride + channel]`: every tap of an output
//! pixel reads one contiguous run of channels, whatever the stride and dilation), and the
//! 16x16 (AVX2: 8x8) register transposes that make it and turn their tiles back to NCHW.

use crate::nn::Geometry;

/// The copy's geometry: the padded rows and columns a 2-D window's outputs read.
#[derive(Clone)]
pub(super) struct ChannelsLast {
    pub(super) cols: usize,
    /// Channels copied, and the floats between one pixel's and the next's (at least `c`; a
    /// whole number of 16-lane registers for the depthwise loop, whose lanes past `c` are
    /// never stored).
    pub(super) c: usize,
    pub(super) stride: usize,
    /// Input extents.
    ih: usize,
    iw: usize,
    /// Leading pads.
    pt: usize,
    pl: usize,
    /// Floats in the copy.
    pub(super) len: usize,
    /// Whether the image is channels-last (`ih x iw x c`) rather than NCHW.
    pub(super) nhwc: bool,
    /// Floats between one pixel's channels and the next's in a channels-last image: `c`, or
    /// the image's whole channel count where the copy takes one block of its channels (the
    /// direct kernel copies 16 at a time; the caller offsets the image to the block's first).
    pub(super) pixel_step: usize,
}

impl ChannelsLast {
    /// The copy for the outputs of `g` (2-D, non-empty) over an image of `c` channels of `ih
    /// x iw`. `None` where it would overflow or be much larger than the image (huge pads or
    /// dilations): the general paths size nothing by the padding.
    pub(super) fn new(
        g: &Geometry,
        (c, ih, iw): (usize, usize, usize),
        stride: usize,
    ) -> Option<ChannelsLast> {
        let span = |o: usize, s: usize, k: usize, d: usize| {
            o.checked_sub(1)?
                .checked_mul(s.max(1))?
                .checked_add(k.checked_sub(1)?.checked_mul(d.max(1))?)?
                .checked_add(1)
        };
        let rows = span(g.out[0], g.strides[0], g.kernel[0], g.dilations[0])?;
        let cols = span(g.out[1], g.strides[1], g.kernel[1], g.dilations[1])?;
        let image = c.checked_mul(ih)?.checked_mul(iw)?;
        let len = rows.checked_mul(cols)?.checked_mul(stride.max(c))?;
        (len <= 2 * image + (1 << 16)).then_some(ChannelsLast {
            cols,
            c,
            stride: stride.max(c),
            ih,
            iw,
            pt: g.pad_begin[0],
            pl: g.pad_begin[1],
            len,
            nhwc: false,
            pixel_step: c,
        })
    }

    /// The same copy of fewer channels (`c` at most [`stride`](Self::stride)): the last,
    /// partial block of a copy made block by block.
    pub(super) fn with_channels(&self, c: usize) -> ChannelsLast {
        ChannelsLast {
            c: c.min(self.stride),
            ..self.clone()
        }
    }

    /// Floats per padded row.
    pub(super) fn row_len(&self) -> usize {
        self.cols * self.stride
    }

    /// Padded row `r` of the copy (`row_len` values) from the image `x` (`c x ih x iw`, or
    /// `ih x iw x c` when [`nhwc`](Self::nhwc), pixels [`pixel_step`](Self::pixel_step)
    /// apart):
    /// input row `r - pt`, column `q` of it input column `q - pl`, channel-minor; zero
    /// elsewhere (so `dst` may hold anything before; the lanes past `c` of each pixel are
    /// left as they were).
    pub(super) fn fill(&self, x: &[f32], r: usize, dst: &mut [f32]) {
        let (c, ih, iw, stride) = (self.c, self.ih, self.iw, self.stride);
        let Some(iy) = r.checked_sub(self.pt).filter(|&iy| iy < ih) else {
            dst.fill(0.0);
            return;
        };
        // Columns q whose input column q - pl lies in 0..iw: `lo..hi`, input columns from 0
        // (`lo` is the pad itself unless the pad covers every column, then nothing is read).
        let lo = self.pl.min(self.cols);
        let hi = (iw + self.pl).clamp(lo, self.cols);
        dst[..lo * stride].fill(0.0);
        dst[hi * stride..].fill(0.0);
        let run = hi - lo;
        if self.nhwc {
            // Channels-last already: each pixel's channels copied as they lie.
            let step = self.pixel_step.max(c);
            if step != c {
                // One block of a wider image's channels: `c` of every `step`.
                // (The caller's operand check covers the image: every pixel has its `c`.)
                let src = x.get(iy * iw * step..).unwrap_or_default();
                let pixels = dst[lo * stride..hi * stride]
                    .chunks_exact_mut(stride)
                    .zip(src.chunks(step));
                if c == 16 {
                    // The direct kernel's whole blocks: one fixed-size move per pixel (a
                    // `copy_from_slice` of a run-time length is a call to memcpy per pixel,
                    // which made the copy cost as much as the 3x3 layer's taps).
                    for (d, s) in pixels {
                        if let (Some(d), Some(s)) = (d.first_chunk_mut::<16>(), s.first_chunk()) {
                            *d = *s;
                        }
                    }
                } else {
                    for (d, s) in pixels {
                        if let Some(s) = s.get(..c) {
                            d[..c].copy_from_slice(s);
                        }
                    }
                }
                return;
            }
            let src = &x[iy * iw * c..][..run * c];
            if stride == c {
                dst[lo * c..hi * c].copy_from_slice(src);
            } else {
                for (d, s) in dst[lo * stride..hi * stride]
                    .chunks_exact_mut(stride)
                    .zip(src.chunks_exact(c.max(1)))
                {
                    d[..c].copy_from_slice(s);
                }
            }
            return;
        }
        // Blocks of 16 (AVX2: 8) channels x as many columns turned in registers; the
        // channels past the last whole block one by one.
        #[cfg(target_arch = "x86_64")]
        let whole = if run == 0 {
            0
        } else if crate::simd::has_avx512() {
            // SAFETY: the CPU has AVX-512; the blocks' reads and writes are bounds-checked
            // slices.
            unsafe {
                x86::fill_blocks(
                    x,
                    (c, ih, iw),
                    stride,
                    iy,
                    run,
                    &mut dst[lo * stride..hi * stride],
                )
            }
        } else if crate::simd::has_avx2_fma() {
            // SAFETY: the CPU has AVX2; as above.
            unsafe {
                x86::fill_blocks8(
                    x,
                    (c, ih, iw),
                    stride,
                    iy,
                    run,
                    &mut dst[lo * stride..hi * stride],
                )
            }
        } else {
            0
        };
        #[cfg(not(target_arch = "x86_64"))]
        let whole = 0;
        for ic in whole..c {
            let src = &x[(ic * ih + iy) * iw..][..run];
            for (v, d) in src
                .iter()
                .zip(dst[lo * stride + ic..].iter_mut().step_by(stride))
            {
                *d = *v;
            }
        }
    }
}

#[cfg(target_arch = "x86_64")]
pub(super) mod x86 {
    use std::arch::x86_64::*;

    pub(in crate::nn::conv) use opreg_sdk::simd::transpose16;

    /// Copies the whole blocks of 16 channels of input row `iy` (columns `0..run` of each
    /// channel's row in `x`) channels-last into `dst` (`run` pixels of `stride` values), 16
    /// columns at a time; returns the channels copied.
    ///
    /// # Safety
    /// The CPU has AVX-512 F.
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn fill_blocks(
        x: &[f32],
        (c, ih, iw): (usize, usize, usize),
        stride: usize,
        iy: usize,
        run: usize,
        dst: &mut [f32],
    ) -> usize {
        let whole = c / 16 * 16;
        if dst.len() < run * stride || stride < c {
            return 0;
        }
        for ic0 in (0..whole).step_by(16) {
            for ix0 in (0..run).step_by(16) {
                let n = (run - ix0).min(16);
                let mask = ((1u32 << n) - 1) as u16;
                let mut rows = [_mm512_setzero_ps(); 16];
                for (i, r) in rows.iter_mut().enumerate() {
                    let src = &x[((ic0 + i) * ih + iy) * iw + ix0..][..n];
                    *r = _mm512_maskz_loadu_ps(mask, src.as_ptr());
                }
                let cols = transpose16(rows);
                for (j, col) in cols.iter().take(n).enumerate() {
                    let d = &mut dst[(ix0 + j) * stride + ic0..][..16];
                    _mm512_storeu_ps(d.as_mut_ptr(), *col);
                }
            }
        }
        whole
    }

    /// The 8x8 matrix `r` (a row per register) transposed (AVX shuffles). Inlined, as
    /// [`transpose16`].
    ///
    /// # Safety
    /// The CPU has AVX (callers compiled for AVX2 may call it safely).
    #[target_feature(enable = "avx")]
    #[inline]
    pub(in crate::nn::conv) fn transpose8(r: [__m256; 8]) -> [__m256; 8] {
        // t[2i], t[2i + 1]: rows 2i and 2i + 1 interleaved (columns 0, 1, 4, 5 and 2, 3, 6, 7).
        let mut t = [_mm256_setzero_ps(); 8];
        for i in 0..4 {
            t[2 * i] = _mm256_unpacklo_ps(r[2 * i], r[2 * i + 1]);
            t[2 * i + 1] = _mm256_unpackhi_ps(r[2 * i], r[2 * i + 1]);
        }
        // u[4g + k]: in each 128-bit half h, column 4h + k of rows 4g..4g + 4.
        let mut u = [_mm256_setzero_ps(); 8];
        for g in 0..2 {
            let (a, b) = (t[4 * g], t[4 * g + 2]);
            let (c, d) = (t[4 * g + 1], t[4 * g + 3]);
            u[4 * g] = _mm256_shuffle_ps::<0x44>(a, b);
            u[4 * g + 1] = _mm256_shuffle_ps::<0xee>(a, b);
            u[4 * g + 2] = _mm256_shuffle_ps::<0x44>(c, d);
            u[4 * g + 3] = _mm256_shuffle_ps::<0xee>(c, d);
        }
        let mut out = [_mm256_setzero_ps(); 8];
        for k in 0..4 {
            out[k] = _mm256_permute2f128_ps::<0x20>(u[k], u[4 + k]);
            out[4 + k] = _mm256_permute2f128_ps::<0x31>(u[k], u[4 + k]);
        }
        out
    }

    /// The first `out.len()` (at most 8) lanes of `v` into `out`: whole, or by halves,
    /// pairs and one. (`maskstore` is microcoded on AMD's cores: the direct convolution's
    /// stores of 6-pixel runs took 7 % of a 3x3 layer that way.)
    #[target_feature(enable = "avx2,fma")]
    pub(in crate::nn::conv) fn store_first(out: &mut [f32], v: __m256) {
        let n = out.len().min(8);
        if n == 8 {
            // SAFETY: `out` holds 8 floats.
            unsafe { _mm256_storeu_ps(out.as_mut_ptr(), v) };
            return;
        }
        let (mut rest, mut at) = (_mm256_castps256_ps128(v), 0);
        // SAFETY: each store writes lanes `at..at + k` of `out`, `at + k <= n`.
        unsafe {
            if n >= 4 {
                _mm_storeu_ps(out.as_mut_ptr(), rest);
                rest = _mm256_extractf128_ps::<1>(v);
                at = 4;
            }
            if n - at >= 2 {
                _mm_storel_epi64(out.as_mut_ptr().add(at).cast(), _mm_castps_si128(rest));
                rest = _mm_movehl_ps(rest, rest);
                at += 2;
            }
            if n > at {
                _mm_store_ss(out.as_mut_ptr().add(at), rest);
            }
        }
    }

    /// [`fill_blocks`] with AVX2: blocks of 8 channels x 8 columns.
    ///
    /// # Safety
    /// The CPU has AVX2.
    #[target_feature(enable = "avx2")]
    pub(super) unsafe fn fill_blocks8(
        x: &[f32],
        (c, ih, iw): (usize, usize, usize),
        stride: usize,
        iy: usize,
        run: usize,
        dst: &mut [f32],
    ) -> usize {
        let whole = c / 8 * 8;
        if dst.len() < run * stride || stride < c {
            return 0;
        }
        for ic0 in (0..whole).step_by(8) {
            let mut ix0 = 0;
            while ix0 + 8 <= run {
                let mut rows = [_mm256_setzero_ps(); 8];
                for (i, r) in rows.iter_mut().enumerate() {
                    let src = &x[((ic0 + i) * ih + iy) * iw + ix0..][..8];
                    *r = _mm256_loadu_ps(src.as_ptr());
                }
                for (j, col) in transpose8(rows).iter().enumerate() {
                    let d = &mut dst[(ix0 + j) * stride + ic0..][..8];
                    _mm256_storeu_ps(d.as_mut_ptr(), *col);
                }
                ix0 += 8;
            }
            // The last columns (fewer than 8) one by one.
            for ix in ix0..run {
                for i in 0..8 {
                    dst[ix * stride + ic0 + i] = x[((ic0 + i) * ih + iy) * iw + ix];
                }
            }
        }
        whole
    }
}

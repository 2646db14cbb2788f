//! Channels-last QLinearConv with few input channels (an image network's first layer: 3
//! channels, 3x3 or 7x7), computed directly with AVX-512 VNNI.
//!
//! Through the general path such a layer gathers a column of `c * kh * kw` bytes per output
//! position (27 for MobileNetV2's first layer), packs it again into the gemm's VNNI layout
//! (measured: `pack_row` took longer than the product) and multiplies it in one shallow
//! block. Here a kernel row's `kw * c` bytes, contiguous in channels-last x, are read in
//! place as groups of 4 (a row's bytes padded to a multiple of 4 meet zero weights, so what
//! the padding reads does not matter), each group broadcast and multiplied into 16 output
//! channels per register with `vpdpbusd` (u8 x s8, 4 products per lane); the sums are
//! requantized in registers and stored. A window reaching into the padding gathers its bytes
//! first, the zero point in the padding.
//!
//! `vpdpbusd` multiplies unsigned bytes by signed ones: x is read as u8 (i8 x is flipped by
//! its sign bit, `x + 128`), W must be i8 with zero points 0 (symmetric weights, what QDQ
//! quantizers write for Conv); `Σ (x - zx) * w = Σ u * w - zu * Σ w` with `u`, `zu` the
//! unsigned bytes, the second term folded into the bias once per call.

use super::depthwise::{Requant, LANES};
use super::Geometry;
use opreg_sdk::{alloc::try_vec, prelude::*};

/// At most this many input channels: with more, each position's column is deep enough for
/// the gemm.
pub(super) const MAX_CHANNELS: usize = 4;
/// Output blocks of 16 channels whose sums are held in registers at a time.
const BLOCKS: usize = 4;
/// Bytes of the stack buffer a window reaching into the padding is gathered into: 7 kernel
/// rows of 7 x 4 channels fit.
const GATHERED: usize = 256;

/// A convolution's i8 weights in the layout the loop reads, prepared once (at load when
/// they are constant): per kernel row `kh`, group `g` of 4 of the row's `kw * c` bytes (in x's
/// channels-last order, `kx * c + ci`, zero past the row's end) and block of 16 output
/// channels, the 16 x 4 bytes one `vpdpbusd` takes; and per output channel the sum of its
/// weights.
#[derive(Clone)]
pub(super) struct Packed {
    w: Vec<u8>,
    sums: Vec<i32>,
    m: usize,
    c: usize,
    kh: usize,
    kw: usize,
    /// Groups of 4 bytes per kernel row.
    groups: usize,
    /// Blocks of 16 output channels.
    blocks: usize,
}

impl Packed {
    /// From W `[m, c, kh, kw]` (i8 as bytes), `None` where this loop does not apply (more
    /// than [`MAX_CHANNELS`] input channels, an empty kernel).
    pub(super) fn new(w: &[u8], m: usize, c: usize, kh: usize, kw: usize) -> Option<Packed> {
        if !(1..=MAX_CHANNELS).contains(&c) || kh == 0 || kw == 0 || m == 0 {
            return None;
        }
        let row = kw.checked_mul(c)?;
        let groups = row.div_ceil(4);
        // A window's bytes gathered on the stack where it reaches into the padding.
        if kh.checked_mul(groups * 4)? > GATHERED {
            return None;
        }
        let blocks = m.div_ceil(LANES);
        let len = kh
            .checked_mul(groups)?
            .checked_mul(blocks)?
            .checked_mul(LANES * 4)?;
        if w.len() < m.checked_mul(c * kh * kw)? {
            return None;
        }
        let mut packed = try_vec(len, 0u8).ok()?;
        let mut sums = try_vec(blocks * LANES, 0i32).ok()?;
        for oc in 0..m {
            for ci in 0..c {
                for y in 0..kh {
                    for x in 0..kw {
                        let v = w[((oc * c + ci) * kh + y) * kw + x];
                        let j = x * c + ci;
                        let (g, b) = (j / 4, j % 4);
                        let (blk, o) = (oc / LANES, oc % LANES);
                        packed[(((y * groups + g) * blocks + blk) * LANES + o) * 4 + b] = v;
                        sums[oc] += i32::from(v as i8);
                    }
                }
            }
        }
        Some(Packed {
            w: packed,
            sums,
            m,
            c,
            kh,
            kw,
            groups,
            blocks,
        })
    }

    /// Whether these are the weights of a `[m, c, kh, kw]` W.
    pub(super) fn fits(&self, m: usize, c: usize, kh: usize, kw: usize) -> bool {
        (self.m, self.c, self.kh, self.kw) == (m, c, kh, kw)
    }
}

/// Whether this CPU runs the loop (AVX-512 F/BW/VL and VNNI).
pub(super) fn available() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        crate::simd::has_avx512() && std::arch::is_x86_feature_detected!("avx512vnni")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

impl Geometry {
    /// Whether [`run_shallow_nhwc`](Self::run_shallow_nhwc) takes this convolution: 2-D, one
    /// group, at most [`MAX_CHANNELS`] input channels, unit dilation along the width (a
    /// kernel row's bytes contiguous in x).
    pub(super) fn shallow(&self) -> bool {
        self.in_sp.len() == 2
            && self.group == 1
            && (1..=MAX_CHANNELS).contains(&self.c)
            && self.dilations[1] == 1
    }

    /// Runs a [`shallow`](Self::shallow) QLinearConv over channels-last x and out (`[n, h,
    /// w, c]` / `[n, oh, ow, m]`), x u8 or i8 (`x_signed`) with zero point `zx`, W prepared
    /// as `w`; the caller checked [`available`]. Every
    /// output byte is written.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn run_shallow_nhwc(
        &self,
        ctx: &KernelContext<'_>,
        op: &str,
        x: &[u8],
        x_signed: bool,
        zx: i32,
        w: &Packed,
        q: &Requant<'_>,
        out: &mut [u8],
    ) -> Result<(), PluginError> {
        let (c, m) = (self.c, self.m);
        let [ih, iw] = [self.in_sp[0], self.in_sp[1]];
        let [oh, ow] = [self.out_sp[0], self.out_sp[1]];
        let [kh, kw] = [self.k_sp[0], self.k_sp[1]];
        let row = ow * m;
        let rows = self.n * oh;
        if row == 0 || rows == 0 {
            return Ok(());
        }
        let image = ih * iw * c;
        if !self.shallow()
            || !w.fits(m, c, kh, kw)
            || q.bias.len() < m
            || q.mult.len() < m
            || x.len() < self.n * image
            || out.len() < rows * row
        {
            return Err(PluginError::invalid(format!(
                "{op}: x, w, B or y does not fit the convolution's shape"
            )));
        }
        // The unsigned bytes' zero point, and per output channel the bias less its share of
        // the sums (`bias - zu * Σ w`), padded with zeros to whole blocks, as the
        // multipliers are.
        let zu = if x_signed { zx + 128 } else { zx };
        let padded = w.blocks * LANES;
        let mut inner = try_vec(padded, 0i32)?;
        let mut mult = try_vec(padded, 0f32)?;
        for oc in 0..m {
            inner[oc] = q.bias[oc].wrapping_sub(zu.wrapping_mul(w.sums[oc]));
            mult[oc] = q.mult[oc];
        }
        let p = Rows {
            geo: self,
            w,
            zx: zx as u8,
            inner: &inner,
            mult: &mult,
            q,
        };
        let grain = row * 4096usize.div_ceil(row);
        ctx.parallel_chunks(&mut out[..rows * row], grain, |start, chunk| {
            for (k, orow) in chunk.chunks_mut(row).enumerate() {
                let r = start / row + k;
                let (bn, oy) = (r / oh, r % oh);
                let Some(xi) = x.get(bn * image..(bn + 1) * image) else {
                    return;
                };
                #[cfg(target_arch = "x86_64")]
                // SAFETY: the caller checked `available()`.
                unsafe {
                    x86::row(&p, x_signed, xi, oy, orow)
                };
            }
        })
    }
}

/// What one output row needs.
struct Rows<'a> {
    geo: &'a Geometry,
    w: &'a Packed,
    /// x's zero point as its byte (what the padding holds).
    zx: u8,
    /// Per output channel (padded to whole blocks): bias less the zero point's share.
    inner: &'a [i32],
    /// Per output channel (padded to whole blocks): the requantizing multiplier.
    mult: &'a [f32],
    q: &'a Requant<'a>,
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use super::super::depthwise::wide::requantize16;
    use super::{Rows, BLOCKS, GATHERED, LANES};
    use std::arch::x86_64::*;

    /// Output row `oy` of one image `x` (`[h, w, c]`) into `out` (`ow * m` bytes).
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni")]
    pub(super) fn row(p: &Rows<'_>, signed: bool, x: &[u8], oy: usize, out: &mut [u8]) {
        if signed {
            row_of::<true>(p, x, oy, out)
        } else {
            row_of::<false>(p, x, oy, out)
        }
    }

    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni")]
    fn row_of<const SIGNED: bool>(p: &Rows<'_>, x: &[u8], oy: usize, out: &mut [u8]) {
        let (g, w) = (p.geo, p.w);
        let (c, m) = (g.c, g.m);
        let [ih, iw] = [g.in_sp[0], g.in_sp[1]];
        let ow = g.out_sp[1];
        let [sh, sw] = [g.strides[0], g.strides[1]];
        let dh = g.dilations[0];
        let [ph, pw] = [g.pad_begin[0], g.pad_begin[1]];
        let seg = w.groups * 4;
        // A position's bytes, gathered where its window reaches into the padding: per kernel
        // row, `seg` bytes (the zero point in the padding).
        let mut gathered = [0u8; GATHERED];
        if w.kh * seg > GATHERED {
            // `Packed::new` refuses such kernels.
            return;
        }
        let y0 = (oy * sh).wrapping_sub(ph);
        let y_last = y0.saturating_add((w.kh - 1).saturating_mul(dh));
        let rows_inside = y0 < ih && y_last < ih;
        for (ox, dst) in out.chunks_exact_mut(m).enumerate().take(ow) {
            let x0 = (ox * sw).wrapping_sub(pw);
            // Inside: every row's segment (and the up to 3 bytes read past it) lies in x.
            let inside = rows_inside
                && x0 < iw
                && x0.saturating_add(w.kw) <= iw
                && (y_last * iw + x0) * c + seg <= x.len();
            let (src, stride): (&[u8], usize) = if inside {
                (&x[(y0 * iw + x0) * c..], dh * iw * c)
            } else {
                for (ky, part) in gathered.chunks_exact_mut(seg).take(w.kh).enumerate() {
                    part.fill(p.zx);
                    let y = y0.wrapping_add(ky * dh);
                    if y >= ih {
                        continue;
                    }
                    for kx in 0..w.kw {
                        let xx = x0.wrapping_add(kx);
                        if xx < iw {
                            let at = (y * iw + xx) * c;
                            part[kx * c..(kx + 1) * c].copy_from_slice(&x[at..at + c]);
                        }
                    }
                }
                (&gathered[..], seg)
            };
            position::<SIGNED>(p, src, stride, dst);
        }
    }

    /// One position: the window's rows at `src + ky * stride` (`groups * 4` bytes each),
    /// every block of output channels, requantized into `dst` (`m` bytes).
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni")]
    fn position<const SIGNED: bool>(p: &Rows<'_>, src: &[u8], stride: usize, dst: &mut [u8]) {
        let w = p.w;
        let m = p.geo.m;
        let flip = _mm512_set1_epi32(if SIGNED { 0x8080_8080u32 as i32 } else { 0 });
        let need = (w.kh - 1) * stride + w.groups * 4;
        if src.len() < need || w.w.len() < w.kh * w.groups * w.blocks * LANES * 4 {
            return;
        }
        let (sp, wp) = (src.as_ptr(), w.w.as_ptr());
        for b0 in (0..w.blocks).step_by(BLOCKS) {
            let nb = BLOCKS.min(w.blocks - b0);
            let mut acc = [_mm512_setzero_si512(); BLOCKS];
            for ky in 0..w.kh {
                for gi in 0..w.groups {
                    // SAFETY: `ky * stride + gi * 4 + 4 <= need <= src.len()`.
                    let bytes =
                        unsafe { sp.add(ky * stride + gi * 4).cast::<i32>().read_unaligned() };
                    let xv = _mm512_xor_si512(_mm512_set1_epi32(bytes), flip);
                    let base = ((ky * w.groups + gi) * w.blocks + b0) * LANES * 4;
                    for (k, a) in acc.iter_mut().enumerate().take(nb) {
                        // SAFETY: `base + (k + 1) * 64 <= w.len()` (the whole layout, checked).
                        let wv = unsafe { _mm512_loadu_si512(wp.add(base + k * LANES * 4).cast()) };
                        *a = _mm512_dpbusd_epi32(*a, xv, wv);
                    }
                }
            }
            for (k, &a) in acc.iter().enumerate().take(nb) {
                let c0 = (b0 + k) * LANES;
                let (Some(bias), Some(mult)) = (
                    p.inner.get(c0..).and_then(|s| s.first_chunk::<LANES>()),
                    p.mult.get(c0..).and_then(|s| s.first_chunk::<LANES>()),
                ) else {
                    return;
                };
                let bytes = requantize16(p.q, a, bias, mult);
                let n = LANES.min(m - c0);
                let mask = if n == LANES {
                    u16::MAX
                } else {
                    (1u16 << n) - 1
                };
                if let Some(d) = dst.get_mut(c0..c0 + n) {
                    // SAFETY: `d` holds the `n` bytes the mask stores.
                    unsafe { _mm_mask_storeu_epi8(d.as_mut_ptr().cast(), mask, bytes) };
                }
            }
        }
    }
}

//! `ConvInteger` and `QLinearConv`: N-D grouped convolution over zero-point-shifted integers,
//! accumulated in `i32`: im2col and the node's BLAS backend, or plain loops where the backend
//! cannot take the operands.

mod depthwise;
mod shallow;

use depthwise::{Requant, TapMajor};

use super::gemm::{bytes, zero_points, IntProduct, RequantOut};
use super::matmul::requant_multiplier;
use super::{read_f32, read_i32, Factory, Q8};
use crate::util::{input, numel, optional, product_sat, required, row_major_strides, TaskScratch};
use opreg_sdk::{
    alloc::{try_vec, try_with_capacity},
    prelude::*,
};
use std::borrow::Cow;

/// Multiply-adds per block of positions up to which [`Geometry::run_blas_nhwc`]
/// takes more than the driver's row block of positions.
const BLOCK_PRODUCT: usize = 1 << 19;

/// Convolution attributes, as read from the node.
#[derive(Clone, Debug)]
struct ConvAttrs {
    group: i64,
    auto_pad: String,
    kernel_shape: Option<Vec<i64>>,
    pads: Option<Vec<i64>>,
    strides: Option<Vec<i64>>,
    dilations: Option<Vec<i64>>,
}

impl ConvAttrs {
    fn read(node: &NodeInfo<'_>) -> Result<Self, PluginError> {
        Ok(ConvAttrs {
            group: node.int_or("group", 1)?,
            auto_pad: node.string_or("auto_pad", "NOTSET")?,
            kernel_shape: node.ints("kernel_shape")?,
            pads: node.ints("pads")?,
            strides: node.ints("strides")?,
            dilations: node.ints("dilations")?,
        })
    }
}

/// The geometry of one convolution.
#[derive(Clone, Debug, PartialEq)]
struct Geometry {
    n: usize,
    c: usize,
    m: usize,
    group: usize,
    in_sp: Vec<usize>,
    k_sp: Vec<usize>,
    out_sp: Vec<usize>,
    strides: Vec<usize>,
    dilations: Vec<usize>,
    pad_begin: Vec<usize>,
}

impl Geometry {
    fn new(op: &str, x: &[usize], w: &[usize], a: &ConvAttrs) -> Result<Self, PluginError> {
        if x.len() < 3 || w.len() != x.len() {
            return Err(PluginError::invalid(format!(
                "{op}: x {x:?} must be [N, C, D1, ...] and w {w:?} [M, C/group, k1, ...] of the same rank"
            )));
        }
        let sp = x.len() - 2;
        let (n, c, m) = (x[0], x[1], w[0]);
        if a.group < 1 {
            return Err(PluginError::invalid(format!(
                "{op}: attribute 'group' must be >= 1"
            )));
        }
        let group = a.group as usize;
        if c % group != 0 || m % group != 0 || w[1].checked_mul(group) != Some(c) {
            return Err(PluginError::invalid(format!(
                "{op}: channels do not fit group {group}: x {x:?}, w {w:?}"
            )));
        }
        let k_sp = w[2..].to_vec();
        if let Some(ks) = &a.kernel_shape {
            if ks.len() != sp || ks.iter().zip(&k_sp).any(|(&a, &b)| a as usize != b) {
                return Err(PluginError::invalid(format!(
                    "{op}: attribute 'kernel_shape' {ks:?} does not match w {w:?}"
                )));
            }
        }
        let attr = |name: &str, v: &Option<Vec<i64>>, len: usize, default: i64, min: i64| {
            let v = v.clone().unwrap_or_else(|| vec![default; len]);
            if v.len() != len || v.iter().any(|&e| e < min) {
                return Err(PluginError::invalid(format!(
                    "{op}: attribute '{name}' {v:?} must have {len} values >= {min}"
                )));
            }
            Ok(v.iter().map(|&e| e as usize).collect::<Vec<usize>>())
        };
        let strides = attr("strides", &a.strides, sp, 1, 1)?;
        let dilations = attr("dilations", &a.dilations, sp, 1, 1)?;
        let pads = attr("pads", &a.pads, 2 * sp, 0, 0)?;
        let in_sp = x[2..].to_vec();
        let mut out_sp = Vec::with_capacity(sp);
        let mut pad_begin = Vec::with_capacity(sp);
        // Attributes are arbitrary i64s: extents are checked, and window positions (from
        // minus the begin pad to the padded extent) must fit in an isize.
        let overflow = |d: usize| {
            PluginError::invalid(format!(
                "{op}: window extents on spatial dim {d} overflow (pads {pads:?}, dilations \
                 {dilations:?})"
            ))
        };
        for d in 0..sp {
            let ext = (k_sp[d].max(1) - 1)
                .checked_mul(dilations[d])
                .and_then(|e| e.checked_add(1))
                .ok_or_else(|| overflow(d))?;
            let (pb, pe) = match a.auto_pad.as_str() {
                "NOTSET" => (pads[d], pads[d + sp]),
                "VALID" => (0, 0),
                "SAME_UPPER" | "SAME_LOWER" => {
                    let out = in_sp[d].div_ceil(strides[d]);
                    let total = ((out.max(1) - 1) * strides[d])
                        .checked_add(ext)
                        .ok_or_else(|| overflow(d))?
                        .saturating_sub(in_sp[d]);
                    if a.auto_pad == "SAME_UPPER" {
                        (total / 2, total - total / 2)
                    } else {
                        (total - total / 2, total / 2)
                    }
                }
                other => {
                    return Err(PluginError::invalid(format!(
                        "{op}: attribute 'auto_pad' = '{other}' is not one of NOTSET, VALID, SAME_UPPER, SAME_LOWER"
                    )))
                }
            };
            let padded = in_sp[d]
                .checked_add(pb)
                .and_then(|v| v.checked_add(pe))
                .filter(|&v| v <= isize::MAX as usize)
                .ok_or_else(|| overflow(d))?;
            if padded < ext {
                return Err(PluginError::invalid(format!(
                    "{op}: kernel extent {ext} exceeds padded input {padded} along spatial dim {d}"
                )));
            }
            out_sp.push((padded - ext) / strides[d] + 1);
            pad_begin.push(pb);
        }
        Ok(Geometry {
            n,
            c,
            m,
            group,
            in_sp,
            k_sp,
            out_sp,
            strides,
            dilations,
            pad_begin,
        })
    }

    /// Per kernel tap (`taps` of them, row-major over the kernel): its dilated offset along
    /// each spatial dimension. Allocated fallibly: the kernel's extents come from the model.
    fn tap_offsets(&self, taps: usize) -> Result<Vec<Vec<usize>>, PluginError> {
        let mut kpos = vec![0usize; self.k_sp.len()];
        let mut koffs: Vec<Vec<usize>> = try_with_capacity(taps)?;
        for _ in 0..taps {
            koffs.push(
                kpos.iter()
                    .zip(&self.dilations)
                    .map(|(&k, &d)| k * d)
                    .collect(),
            );
            increment(&mut kpos, &self.k_sp);
        }
        Ok(koffs)
    }

    fn out_shape(&self) -> Vec<usize> {
        let mut s = vec![self.n, self.m];
        s.extend(&self.out_sp);
        s
    }

    /// The output shape channels-last: `[N, D1, ..., M]`.
    fn out_shape_nhwc(&self) -> Vec<usize> {
        let mut s = vec![self.n];
        s.extend(&self.out_sp);
        s.push(self.m);
        s
    }

    /// `out[n, m, ...] = bias[m] + sum x[n, c, ...] * w[m, c, ...]` over the group's channels.
    fn run(
        &self,
        ctx: &KernelContext<'_>,
        x: &[i32],
        w: &[i32],
        bias: Option<&[i32]>,
        out: &mut [i32],
    ) -> Result<(), PluginError> {
        let sp = self.in_sp.len();
        if out.is_empty() {
            return Ok(());
        }
        // A non-empty output: its plane multiplies exactly; X's plane is 0 or exact. The
        // kernel's extents come from W, which is empty when C is 0: checked, and the
        // per-tap table allocated fallibly.
        let plane: usize = self.out_sp.iter().product();
        let in_size = product_sat(&self.in_sp);
        let k_size = numel(&self.k_sp)?;
        let cg = self.c / self.group;
        let mg = self.m / self.group;
        let koffs = self.tap_offsets(k_size)?;
        let in_strides = row_major_strides(&self.in_sp);
        if plane == 0 {
            return Ok(());
        }
        ctx.parallel_chunks(out, plane, |start, chunk| {
            let idx = start / plane;
            let (bn, oc) = (idx / self.m, idx % self.m);
            let g = oc / mg;
            let b0 = bias.map_or(0, |b| b[oc]);
            let mut o = vec![0usize; sp];
            for v in chunk.iter_mut() {
                let mut acc = b0;
                for (kp, koff) in koffs.iter().enumerate() {
                    // Input position of this kernel tap, if inside the (unpadded) input.
                    let mut lin = 0usize;
                    let mut inside = true;
                    for d in 0..sp {
                        let p = (o[d] * self.strides[d] + koff[d]) as isize
                            - self.pad_begin[d] as isize;
                        if p < 0 || p as usize >= self.in_sp[d] {
                            inside = false;
                            break;
                        }
                        lin += p as usize * in_strides[d];
                    }
                    if !inside {
                        continue;
                    }
                    for ic in 0..cg {
                        let ch = g * cg + ic;
                        let xv = x[(bn * self.c + ch) * in_size + lin];
                        let wv = w[(oc * cg + ic) * k_size + kp];
                        acc = acc.wrapping_add(xv.wrapping_mul(wv));
                    }
                }
                *v = acc;
                increment(&mut o, &self.out_sp);
            }
        })
    }
}

/// The integer product of a convolution's columns (`m x k`) by its weights (`n x k`,
/// transposed), without its operands: the same for every group and block.
fn product_shape<'z>(
    x: &TensorView<'_>,
    w: &TensorView<'_>,
    (m, n, k): (usize, usize, usize),
    a_zp: i32,
    b_zp: &'z [i32],
) -> IntProduct<'z> {
    IntProduct {
        m,
        n,
        k,
        a: &[],
        a_type: x.dtype,
        lda: k,
        a_zp,
        b: &[],
        b_type: w.dtype,
        ldb: k,
        trans_b: true,
        b_zp,
    }
}

/// The weights (`m` output channels) in the columns' tap-major order (see `im2col`), unless
/// the node's pre-packed weights fit `shape` (reordered at load then) or there is one tap.
fn tap_major_unless_packed<'w>(
    wb: &'w [u8],
    shape: &IntProduct<'_>,
    packed: &[PackedB],
    m: usize,
    taps: usize,
) -> Result<Cow<'w, [u8]>, PluginError> {
    if taps > 1 && !packed.first().is_some_and(|p| shape.fits(p)) {
        let cg = shape.k / taps.max(1);
        Ok(Cow::Owned(tap_major(wb, m, cg, taps)?))
    } else {
        Ok(Cow::Borrowed(wb))
    }
}

/// Receives one (image, group) tile of integer products: `tmp[p * mg + j]` for output
/// position `p` and the group's output channel `j`, before any bias.
type Store<'s> = dyn FnMut(usize, usize, &[i32]) -> Result<(), PluginError> + 's;

impl Geometry {
    /// The convolution as one integer product per (image, group) through the node's BLAS:
    /// `tmp[p, j] = Σ_k col[p, k] * W_g[j, k]`, where `col` (plane x C/group * kernel taps)
    /// holds the input value under each tap, or the input's zero point where the tap falls in
    /// the padding (so it contributes 0 after the shift). Each tile goes to `store`, which
    /// writes it into the output in its own form (i32, or requantized). `Ok(false)` and
    /// nothing stored when the backend is missing or refuses the operands. `nhwc`: x is
    /// channels-last (`[N, H, W, C]`, 2-D only), and a 1x1 convolution of one group reads
    /// it as its columns without any copy.
    #[allow(clippy::too_many_arguments)]
    fn run_blas(
        &self,
        ctx: &KernelContext<'_>,
        op: &str,
        nhwc: bool,
        x: &TensorView<'_>,
        w: &TensorView<'_>,
        x_zp: Option<&TensorView<'_>>,
        w_zp: Option<&TensorView<'_>>,
        packed: &[PackedB],
        store: &mut Store<'_>,
    ) -> Result<bool, PluginError> {
        let Some((zx, zw)) = int_zero_points(op, x, w, self.m, x_zp, w_zp)? else {
            return Ok(false);
        };
        let plane: usize = self.out_sp.iter().product();
        if plane == 0 || self.m == 0 || self.n == 0 {
            return Ok(true);
        }
        let (xb, wb) = (bytes(x, op)?, bytes(w, op)?);
        let taps = numel(&self.k_sp)?;
        let (cg, mg) = (self.c / self.group, self.m / self.group);
        let kdim = cg
            .checked_mul(taps)
            .ok_or_else(|| PluginError::invalid(format!("{op}: kernel too large")))?;
        // The zero point's byte: an i8 zero point as its two's-complement bit pattern.
        let pad = zx as u8;
        let direct = nhwc && self.pointwise() && self.group == 1;
        // 2-D columns are gathered from x in HWC order (see `im2col`), so their depth runs
        // tap-major (`kh, kw, c`): the weights must run alike. Pre-packed weights were
        // reordered at load; others are reordered here, once per call.
        let hwc = self.tap_major();
        // The columns and the products come from the host's reused scratch (no allocation or
        // memset per call): the 2-D gathers write every column element, the product every
        // element of `tmp`; the general walk of other ranks writes only the taps inside x.
        let col = ctx.scratch_reused::<u8>(if direct { 0 } else { numel(&[plane, kdim])? })?;
        if !hwc {
            col.fill(pad);
        }
        let tmp = ctx.scratch_reused::<i32>(numel(&[plane, mg])?)?;
        let in_size = product_sat(&self.in_sp);
        let mut hwc_x = if hwc && !nhwc && !self.pointwise() {
            try_vec(numel(&[in_size, cg])?, 0u8)?
        } else {
            Vec::new()
        };
        // Every group's product but its operands (the same for all groups).
        let shape = product_shape(x, w, (plane, mg, kdim), zx, &zw);
        let wb = if hwc {
            tap_major_unless_packed(wb, &shape, packed, self.m, taps)?
        } else {
            Cow::Borrowed(wb)
        };
        let short = || PluginError::invalid(format!("{op}: x is shorter than its shape"));
        let image = numel(&[self.c, in_size])?;
        for bn in 0..self.n {
            for g in 0..self.group {
                let a: &[u8] = if nhwc {
                    let xi = xb.get(bn * image..(bn + 1) * image).ok_or_else(short)?;
                    if direct {
                        xi
                    } else {
                        self.gather_hwc(ctx, xi, self.c, g * cg, pad, kdim, col)?;
                        col
                    }
                } else {
                    let x0 = (bn * self.c + g * cg) * in_size;
                    let xg = xb.get(x0..x0 + cg * in_size).ok_or_else(short)?;
                    self.im2col(ctx, xg, pad, kdim, &mut hwc_x, col)?;
                    col
                };
                let zb = if zw.len() == 1 {
                    &zw[..]
                } else {
                    &zw[g * mg..(g + 1) * mg]
                };
                let product = IntProduct {
                    a,
                    b: wb.get(g * mg * kdim..).unwrap_or(&[]),
                    b_zp: zb,
                    ..shape
                };
                // Types and parameters are the same for every group: only the first product
                // can be refused, before anything is stored.
                if !product.run_packed(ctx, tmp, mg, packed.get(g))? {
                    return Ok(false);
                }
                store(bn, g, tmp)?;
            }
        }
        Ok(true)
    }

    /// Whether the columns' depth runs tap-major (`kh, kw, c`: 2-D convolutions, gathered
    /// from x in HWC order) rather than channel-major (`c, taps`: any other rank). The two
    /// agree when the kernel has one tap.
    fn tap_major(&self) -> bool {
        self.in_sp.len() == 2
    }

    /// A 1x1 convolution with unit strides and no padding: the columns are x transposed.
    fn pointwise(&self) -> bool {
        self.k_sp.iter().all(|&k| k == 1)
            && self.strides.iter().all(|&s| s == 1)
            && self.pad_begin.iter().all(|&p| p == 0)
            && self.out_sp == self.in_sp
    }

    /// The columns of one image's group `xg` (`cg` planes): row `p` holds the values under
    /// the kernel at output position `p`, `pad` in the padding. 2-D (see [`tap_major`]):
    /// `col[p, (kh * kw_n + kw) * cg + ic]`, copied as runs of `cg` channels (a run of
    /// `kw_n * cg` where the kernel row lies inside) from x transposed to HWC in `hwc_x`
    /// (`in_size x cg`; unused for a pointwise convolution, whose columns *are* x in HWC).
    /// Other ranks: `col[p, ic * taps + kp]`, element by element.
    ///
    /// [`tap_major`]: Self::tap_major
    fn im2col(
        &self,
        ctx: &KernelContext<'_>,
        xg: &[u8],
        pad: u8,
        kdim: usize,
        hwc_x: &mut [u8],
        col: &mut [u8],
    ) -> Result<(), PluginError> {
        let in_size = product_sat(&self.in_sp);
        let cg = self.c / self.group;
        let kdim = kdim.max(1);
        if self.pointwise() {
            return to_hwc(ctx, xg, cg, in_size, col);
        }
        if self.tap_major() {
            to_hwc(ctx, xg, cg, in_size, hwc_x)?;
            return self.gather_hwc(ctx, hwc_x, cg, 0, pad, kdim, col);
        }
        // Any other rank: the general walk over the kernel's taps.
        let sp = self.in_sp.len();
        let taps = numel(&self.k_sp)?;
        let in_strides = row_major_strides(&self.in_sp);
        let out_strides = row_major_strides(&self.out_sp);
        let koffs = self.tap_offsets(taps)?;
        ctx.parallel_chunks(col, kdim * 64, |start, chunk| {
            let mut o = vec![0usize; sp];
            for (r, row) in chunk.chunks_mut(kdim).enumerate() {
                let p = start / kdim + r;
                for ((od, &st), &ext) in o.iter_mut().zip(&out_strides).zip(&self.out_sp) {
                    *od = (p / st.max(1)) % ext.max(1);
                }
                for (kp, koff) in koffs.iter().enumerate() {
                    let mut lin = 0usize;
                    let mut inside = true;
                    for d in 0..sp {
                        let q = (o[d] * self.strides[d] + koff[d]) as isize
                            - self.pad_begin[d] as isize;
                        if q < 0 || q as usize >= self.in_sp[d] {
                            inside = false;
                            break;
                        }
                        lin += q as usize * in_strides[d];
                    }
                    for ic in 0..cg {
                        row[ic * taps + kp] = if inside { xg[ic * in_size + lin] } else { pad };
                    }
                }
            }
        })
    }

    /// 2-D columns gathered from `xt`, the image in HWC order with `ld` channels per
    /// position, of which the group's `cg` start at `c0`: `col[p, (kh * kw_n + kw) * cg + ic]`,
    /// copied as runs of `cg` channels (one run of `kw_n * cg` where the kernel row lies
    /// inside and the group is the whole image), `pad` in the padding.
    #[allow(clippy::too_many_arguments)]
    fn gather_hwc(
        &self,
        ctx: &KernelContext<'_>,
        xt: &[u8],
        ld: usize,
        c0: usize,
        pad: u8,
        kdim: usize,
        col: &mut [u8],
    ) -> Result<(), PluginError> {
        let cg = self.c / self.group;
        let kdim = kdim.max(1);
        let [ih, iw] = [self.in_sp[0], self.in_sp[1]];
        if xt.len() < ih * iw * ld || c0 + cg > ld {
            return Err(PluginError::invalid(
                "convolution: x is shorter than its shape",
            ));
        }
        ctx.parallel_chunks(col, kdim * 16, |start, chunk| {
            self.gather_rows(xt, ld, c0, pad, kdim, start / kdim, chunk)
        })
    }

    /// The rows of [`gather_hwc`](Self::gather_hwc)'s columns for output positions `p0..`
    /// (`col.len() / kdim` of them), on this thread. The caller checked x's length.
    #[allow(clippy::too_many_arguments)]
    fn gather_rows(
        &self,
        xt: &[u8],
        ld: usize,
        c0: usize,
        pad: u8,
        kdim: usize,
        p0: usize,
        col: &mut [u8],
    ) {
        let cg = self.c / self.group;
        let kdim = kdim.max(1);
        let [ih, iw] = [self.in_sp[0], self.in_sp[1]];
        let ow_n = self.out_sp[1].max(1);
        let [kh_n, kw_n] = [self.k_sp[0], self.k_sp[1]];
        let [sh, sw] = [self.strides[0], self.strides[1]];
        let [dh, dw] = [self.dilations[0], self.dilations[1]];
        let [ph, pw] = [self.pad_begin[0], self.pad_begin[1]];
        let run = kw_n * cg;
        let whole = ld == cg;
        for (r, row) in col.chunks_mut(kdim).enumerate() {
            let p = p0 + r;
            let (oh, ow) = (p / ow_n, p % ow_n);
            let x0 = (ow * sw).wrapping_sub(pw);
            for (kh, taps) in row.chunks_exact_mut(run.max(1)).enumerate().take(kh_n) {
                let y = (oh * sh + kh * dh).wrapping_sub(ph);
                if y >= ih {
                    taps.fill(pad);
                    continue;
                }
                let line = &xt[y * iw * ld..(y + 1) * iw * ld];
                // The whole kernel row inside the input, taps adjacent: one copy.
                if whole && dw == 1 && x0 < iw && iw - x0 >= kw_n {
                    taps.copy_from_slice(&line[x0 * cg..(x0 + kw_n) * cg]);
                    continue;
                }
                for (kw, dst) in taps.chunks_exact_mut(cg.max(1)).enumerate() {
                    let xx = x0.wrapping_add(kw * dw);
                    if xx < iw {
                        let at = xx * ld + c0;
                        dst.copy_from_slice(&line[at..at + cg]);
                    } else {
                        dst.fill(pad);
                    }
                }
            }
        }
    }

    /// A channels-last convolution of one group in blocks of output positions: per task, a
    /// block is gathered (read in place for a 1x1), multiplied and requantized while its
    /// products are in cache. One parallel section per image instead of three (gather,
    /// product, requantize: each a wake-up of the pool), and no image-sized i32 buffer.
    /// Blocks are about the product driver's row block (each streams the packed weights
    /// once), as many as a multiple of the threads. The block is requantized by `rq`: by the
    /// backend, tile by tile, where it supports
    /// `GemmArgs::REQUANT_MULTIPLIER`, else here from the block's i32 sums. `Ok(false)` and
    /// nothing written when the backend is missing or refuses the operands.
    #[allow(clippy::too_many_arguments)]
    fn run_blas_nhwc(
        &self,
        ctx: &KernelContext<'_>,
        op: &str,
        x: &TensorView<'_>,
        w: &TensorView<'_>,
        x_zp: Option<&TensorView<'_>>,
        w_zp: Option<&TensorView<'_>>,
        packed: &[PackedB],
        out: &mut [u8],
        rq: &RequantOut<'_>,
    ) -> Result<bool, PluginError> {
        let Some((zx, zw)) = int_zero_points(op, x, w, self.m, x_zp, w_zp)? else {
            return Ok(false);
        };
        let plane: usize = self.out_sp.iter().product();
        let m = self.m;
        if plane == 0 || m == 0 || self.n == 0 {
            return Ok(true);
        }
        let (xb, wb) = (bytes(x, op)?, bytes(w, op)?);
        let taps = numel(&self.k_sp)?;
        let kdim = self
            .c
            .checked_mul(taps)
            .ok_or_else(|| PluginError::invalid(format!("{op}: kernel too large")))?;
        let pad = zx as u8;
        let direct = self.pointwise();
        let image = numel(&[self.c, product_sat(&self.in_sp)])?;
        let [ih, iw] = [self.in_sp[0], self.in_sp[1]];
        if xb.len() < self.n * image || ih * iw * self.c > image || out.len() < self.n * plane * m {
            return Err(PluginError::invalid(format!(
                "{op}: x or y is shorter than its shape"
            )));
        }
        let shape = product_shape(x, w, (plane, m, kdim), zx, &zw);
        let wb = tap_major_unless_packed(wb, &shape, packed, m, taps)?;
        let whole = IntProduct { b: &wb, ..shape };
        if !whole.supported(ctx) {
            return Ok(false);
        }
        // The backend requantizes each tile as it finishes it where it can; else the block's
        // i32 sums are stored and requantized here.
        let fused = whole.supports_requant(ctx, rq);
        if fused && direct {
            // Nothing to gather and nothing to requantize here: the whole batch is one
            // product, x (`n * plane` positions of `c` channels, read in place) times the
            // weights into y, which the backend splits over the threads itself (one parallel
            // section; blocks of it here, each a nested parallel call, measured slower).
            let positions = self.n * plane;
            let product = IntProduct {
                a: xb.get(..positions * kdim).unwrap_or(&[]),
                m: positions,
                ..whole
            };
            let out = &mut out[..positions * m];
            if !product.run_requant(ctx, out, m, packed.first(), rq)? {
                return Err(PluginError::internal(format!(
                    "{op}: the backend refused a product it accepted"
                )));
            }
            return Ok(true);
        }
        let threads = ctx.num_threads().max(1);
        // Positions per block: the driver's row block (192), more where a block's product is
        // cheap (a 1x1 layer of 16-32 input channels: each block's call to the product and its
        // requantization cost more than its multiply-adds; MobileNetV2's 112x112 ones measured
        // 8-20 % faster in blocks of 384-768, ResNet-50's 64->256 ones a little slower).
        let per_row = m.saturating_mul(kdim).max(1);
        let rb = (BLOCK_PRODUCT / per_row).clamp(192, 768);
        // A pointwise convolution's images are one product: x is `n * plane` positions of `c`
        // channels, y `n * plane` of `m`. One parallel section for the batch, not one per
        // image (each a wake-up of the pool and a wait for its slowest block).
        let (images, image, plane) = if direct {
            (1, self.n * image, self.n * plane)
        } else {
            (self.n, image, plane)
        };
        let blocks = plane.div_ceil(rb).div_ceil(threads) * threads;
        let rows = plane.div_ceil(blocks).max(1);
        let failure = std::sync::Mutex::new(None);
        let tmps = TaskScratch::<i32>::new(ctx, if fused { 0 } else { numel(&[rows, m])? });
        let cols = TaskScratch::<u8>::new(ctx, if direct { 0 } else { numel(&[rows, kdim])? });
        for bn in 0..images {
            let xi = &xb[bn * image..(bn + 1) * image];
            let dst = &mut out[bn * plane * m..(bn + 1) * plane * m];
            ctx.parallel_chunks(dst, rows * m, |start, chunk| {
                let (p0, pn) = (start / m, chunk.len() / m);
                let mut block = || -> Result<(), PluginError> {
                    let (mut tmp, mut col) = (tmps.take()?, cols.take()?);
                    let a: &[u8] = if direct {
                        xi.get(p0 * kdim..(p0 + pn) * kdim).unwrap_or(&[])
                    } else {
                        let col = &mut col[..pn * kdim];
                        self.gather_rows(xi, self.c, 0, pad, kdim, p0, col);
                        col
                    };
                    let product = IntProduct { a, m: pn, ..whole };
                    let done = if fused {
                        product.run_requant(ctx, chunk, m, packed.first(), rq)?
                    } else {
                        let tmp = &mut tmp[..pn * m];
                        let done = product.run_packed(ctx, tmp, m, packed.first())?;
                        if done {
                            crate::simd::requantize_rows(
                                tmp,
                                rq.bias,
                                rq.mult,
                                rq.zp,
                                rq.bounds(),
                                chunk,
                            );
                        }
                        done
                    };
                    if !done {
                        return Err(PluginError::internal(format!(
                            "{op}: the backend refused a block of a product it accepted"
                        )));
                    }
                    Ok(())
                };
                if let Err(e) = block() {
                    if let Ok(mut f) = failure.lock() {
                        f.get_or_insert(e);
                    }
                }
            })?;
        }
        match failure.into_inner() {
            Ok(Some(e)) => Err(e),
            _ => Ok(true),
        }
    }
}

/// `xg` (`cg` planes of `in_size` values) transposed to HWC: `out[p * cg + ic] = xg[ic *
/// in_size + p]`, in 64 x 64 blocks so that both sides stay in cache.
fn to_hwc(
    ctx: &KernelContext<'_>,
    xg: &[u8],
    cg: usize,
    in_size: usize,
    out: &mut [u8],
) -> Result<(), PluginError> {
    const B: usize = 64;
    let cg = cg.max(1);
    ctx.parallel_chunks(out, cg * B, |start, chunk| {
        let p0 = start / cg;
        let rows = chunk.len() / cg;
        for c0 in (0..cg).step_by(B) {
            for ic in c0..(c0 + B).min(cg) {
                let Some(src) = xg.get(ic * in_size + p0..ic * in_size + p0 + rows) else {
                    return;
                };
                for (r, &v) in src.iter().enumerate() {
                    chunk[r * cg + ic] = v;
                }
            }
        }
    })
}

/// Convolution weights `[m, cg, taps]` reordered tap-major, `[m, taps, cg]`: the depth order
/// of 2-D columns ([`Geometry::im2col`]).
fn tap_major(w: &[u8], m: usize, cg: usize, taps: usize) -> Result<Vec<u8>, PluginError> {
    let mut out = try_vec(numel(&[m, cg, taps])?, 0u8)?;
    let per = cg * taps;
    if per == 0 {
        return Ok(out);
    }
    for (src, dst) in w.chunks_exact(per).zip(out.chunks_exact_mut(per)) {
        for (ic, channel) in src.chunks_exact(taps).enumerate() {
            for (t, &v) in channel.iter().enumerate() {
                dst[t * cg + ic] = v;
            }
        }
    }
    Ok(out)
}

/// Writes a product tile `tmp` (`plane x mg`, position-major, as the gemm leaves it) into
/// `dst` (`mg x plane`, channel-major, as NCHW wants it). For each 64 x 64 block,
/// `convert(j0, values, out)` first turns one position's run of channels `j0..` (contiguous in
/// `tmp`; per-channel constants are then contiguous too, so it vectorizes) into output
/// values, then the block of converted values is transposed into `dst`: for a requantized
/// output that moves bytes rather than i32s. Read column by column, `tmp` (megabytes for an
/// early ResNet layer) would miss the cache on every element.
fn transpose_tile<T: Copy + Default + Send>(
    ctx: &KernelContext<'_>,
    dst: &mut [T],
    tmp: &[i32],
    plane: usize,
    mg: usize,
    convert: impl Fn(usize, &[i32], &mut [T]) + Sync,
) -> Result<(), PluginError> {
    const B: usize = 64;
    let plane = plane.max(1);
    ctx.parallel_chunks(dst, plane * B, |start, chunk| {
        let j0 = start / plane;
        let rows = chunk.len() / plane;
        let mut block = [T::default(); B * B];
        for p0 in (0..plane).step_by(B) {
            let pn = B.min(plane - p0);
            for (dp, p) in (p0..p0 + pn).enumerate() {
                let Some(src) = tmp.get(p * mg + j0..p * mg + j0 + rows) else {
                    return;
                };
                convert(j0, src, &mut block[dp * B..dp * B + rows]);
            }
            for jj in 0..rows {
                let out = &mut chunk[jj * plane + p0..jj * plane + p0 + pn];
                for (dp, o) in out.iter_mut().enumerate() {
                    *o = block[dp * B + jj];
                }
            }
        }
    })
}

/// The zero points of x (a scalar) and w (one, or one per output channel of `m`) of an
/// integer convolution over u8/i8, as the BLAS and depthwise paths take them; `None` for
/// other types or zero-point shapes (the plain loops handle or refuse them).
fn int_zero_points(
    op: &str,
    x: &TensorView<'_>,
    w: &TensorView<'_>,
    m: usize,
    x_zp: Option<&TensorView<'_>>,
    w_zp: Option<&TensorView<'_>>,
) -> Result<Option<(i32, Vec<i32>)>, PluginError> {
    if !matches!(x.dtype, DType::U8 | DType::I8) || !matches!(w.dtype, DType::U8 | DType::I8) {
        return Ok(None);
    }
    Ok(
        match (
            zero_points(op, x_zp, x.dtype, 1)?,
            zero_points(op, w_zp, w.dtype, m)?,
        ) {
            (Some(zx), Some(zw)) => zx.first().map(|&zx| (zx, zw)),
            _ => None,
        },
    )
}

/// The operands of a depthwise convolution ([`Geometry::depthwise`]) the direct loop takes;
/// `None` for another convolution, which goes through im2col.
fn depthwise_operands<'a>(
    op: &str,
    geo: &Geometry,
    x: &TensorView<'a>,
    w: &TensorView<'_>,
    x_zp: Option<&TensorView<'_>>,
    w_zp: Option<&TensorView<'_>>,
    bias: Option<&'a [i32]>,
) -> Result<Option<depthwise::Depthwise<'a>>, PluginError> {
    if !geo.depthwise() {
        return Ok(None);
    }
    let Some((zx, _)) = int_zero_points(op, x, w, geo.m, x_zp, w_zp)? else {
        return Ok(None);
    };
    Ok(Some(depthwise::Depthwise {
        x: bytes(x, op)?,
        x_signed: x.dtype == DType::I8,
        x_zp: zx,
        w: shift_w(op, w, w_zp)?,
        bias,
    }))
}

/// `x` (`[n, positions, c]`, channels-last) in NCHW order (`[n, c, positions]`), fallibly.
fn nhwc_to_nchw(x: &[i32], n: usize, c: usize, positions: usize) -> Result<Vec<i32>, PluginError> {
    let mut out = try_vec(numel(&[n, c, positions])?, 0i32)?;
    if x.len() < out.len() {
        return Err(PluginError::invalid(
            "QLinearConv: x is shorter than its shape",
        ));
    }
    for (i, v) in out.iter_mut().enumerate() {
        let (bn, ch, p) = (i / (c * positions), (i / positions) % c, i % positions);
        *v = x[(bn * positions + p) * c + ch];
    }
    Ok(out)
}

/// Advances a row-major multi-index over `shape` (wrapping to zeros at the end).
fn increment(idx: &mut [usize], shape: &[usize]) {
    for d in (0..idx.len()).rev() {
        idx[d] += 1;
        if idx[d] < shape[d] {
            return;
        }
        idx[d] = 0;
    }
}

/// `x - x_zero_point` (scalar zero point only).
fn shift_x(
    op: &str,
    x: &TensorView<'_>,
    zp: Option<&TensorView<'_>>,
) -> Result<Vec<i32>, PluginError> {
    let mut xs = read_i32(x, op)?;
    if let Some(z) = zp {
        if z.dtype != x.dtype {
            return Err(PluginError::invalid(format!(
                "{op}: x_zero_point is {} but x is {}",
                z.dtype, x.dtype
            )));
        }
        let zv = read_i32(z, op)?;
        if zv.len() != 1 {
            return Err(PluginError::unimplemented(format!(
                "{op}: x_zero_point of shape {:?}: only a scalar is supported",
                z.shape()
            )));
        }
        xs.iter_mut().for_each(|v| *v -= zv[0]);
    }
    Ok(xs)
}

/// `w - w_zero_point`, the zero point a scalar or one per output channel.
fn shift_w(
    op: &str,
    w: &TensorView<'_>,
    zp: Option<&TensorView<'_>>,
) -> Result<Vec<i32>, PluginError> {
    let mut ws = read_i32(w, op)?;
    if let Some(z) = zp {
        if z.dtype != w.dtype {
            return Err(PluginError::invalid(format!(
                "{op}: w_zero_point is {} but w is {}",
                z.dtype, w.dtype
            )));
        }
        let zv = read_i32(z, op)?;
        let m = w.shape().first().copied().unwrap_or(0);
        let per = ws.len().checked_div(m).unwrap_or(0);
        if zv.len() == 1 {
            ws.iter_mut().for_each(|v| *v -= zv[0]);
        } else if z.rank() == 1 && zv.len() == m {
            for (i, v) in ws.iter_mut().enumerate() {
                *v -= zv[i / per];
            }
        } else {
            return Err(PluginError::invalid(format!(
                "{op}: w_zero_point of shape {:?} is neither a scalar nor one per output channel ({m})",
                z.shape()
            )));
        }
    }
    Ok(ws)
}

#[derive(Clone)]
struct ConvInteger(ConvAttrs);

impl Kernel for ConvInteger {
    fn compute(
        &self,
        ctx: &KernelContext<'_>,
        inputs: &[TensorView<'_>],
    ) -> Result<(), PluginError> {
        const OP: &str = "ConvInteger";
        let present = |i: usize| optional(inputs, i);
        let [x, w] = required(OP, inputs, ["x", "w"])?;
        let (x, w) = (&x, &w);
        let geo = Geometry::new(OP, x.shape(), w.shape(), &self.0)?;
        let out = ctx.output_slice::<i32>(0, &geo.out_shape())?;
        let plane: usize = geo.out_sp.iter().product();
        let mg = geo.m / geo.group;
        let mut store = |bn: usize, g: usize, tmp: &[i32]| {
            let base = (bn * geo.m + g * mg) * plane;
            let dst = &mut out[base..base + mg * plane];
            transpose_tile(ctx, dst, tmp, plane, mg, |_, src, out| {
                out.copy_from_slice(src)
            })
        };
        if let Some(d) = depthwise_operands(OP, &geo, x, w, present(2), present(3), None)? {
            return geo.run_depthwise(ctx, OP, &d, out, |_, acc, dst| dst.copy_from_slice(acc));
        }
        if geo.run_blas(
            ctx,
            OP,
            false,
            x,
            w,
            present(2),
            present(3),
            &[],
            &mut store,
        )? {
            return Ok(());
        }
        let xs = shift_x(OP, x, present(2))?;
        let ws = shift_w(OP, w, present(3))?;
        geo.run(ctx, &xs, &ws, None, out)
    }
}

#[derive(Clone)]
struct QLinearConv {
    attrs: ConvAttrs,
    /// `com.microsoft::QLinearConv`'s `channels_last`: x and y are `[N, H, W, C]` (2-D
    /// only). The layout pass gives the graph's integer convolutions this form, so that a
    /// chain of them keeps channels-last data between them instead of transposing into and
    /// out of every product.
    channels_last: bool,
    /// The weights packed once per group at model load, when they are constant.
    packed: std::sync::Arc<[PackedB]>,
    /// A depthwise convolution's constant weights, prepared at load for the channels-last
    /// loop.
    depthwise: Option<TapMajor>,
    /// A convolution's constant weights over few input channels, prepared at load for the
    /// channels-last loop of [`shallow`].
    shallow: Option<shallow::Packed>,
}

impl Kernel for QLinearConv {
    fn compute(
        &self,
        ctx: &KernelContext<'_>,
        inputs: &[TensorView<'_>],
    ) -> Result<(), PluginError> {
        const OP: &str = "QLinearConv";
        if inputs.len() < 8 {
            return Err(PluginError::invalid(format!(
                "{OP}: expects 8 or 9 inputs, got {}",
                inputs.len()
            )));
        }
        let present = |i: usize| optional(inputs, i);
        let (x, w) = (&input(OP, inputs, 0, "x")?, &input(OP, inputs, 3, "w")?);
        let nhwc = self.channels_last;
        let geo = if nhwc {
            let &[n, h, wd, c] = x.shape() else {
                return Err(PluginError::invalid(format!(
                    "{OP}: channels_last takes a 4-D x [N, H, W, C], got {:?}",
                    x.shape()
                )));
            };
            Geometry::new(OP, &[n, c, h, wd], w.shape(), &self.attrs)?
        } else {
            Geometry::new(OP, x.shape(), w.shape(), &self.attrs)?
        };
        let scalar = |i: usize, name: &str| -> Result<f32, PluginError> {
            let v = read_f32(&input(OP, inputs, i, name)?, OP)?;
            if v.len() != 1 {
                return Err(PluginError::invalid(format!(
                    "{OP}: {name} must be a scalar"
                )));
            }
            Ok(v[0])
        };
        let x_scale = scalar(1, "x_scale")?;
        let y_scale = scalar(6, "y_scale")?;
        let w_scale = read_f32(&input(OP, inputs, 4, "w_scale")?, OP)?;
        if w_scale.len() != 1 && w_scale.len() != geo.m {
            return Err(PluginError::invalid(format!(
                "{OP}: w_scale has {} elements, expected 1 or {} (one per output channel)",
                w_scale.len(),
                geo.m
            )));
        }
        // Per output channel (fallibly: `m` comes from the model): the requantizing
        // multiplier, and the bias (zeros without one) for the tiles' epilogue.
        let mut mult: Vec<f32> = try_with_capacity(geo.m)?;
        mult.extend((0..geo.m).map(|oc| {
            let ws = w_scale[if w_scale.len() == 1 { 0 } else { oc }];
            requant_multiplier(DType::F32, x_scale, ws, y_scale)
        }));
        let (out_dtype, y_zp) = match present(7) {
            Some(z) => {
                let zv = read_i32(z, OP)?;
                if zv.len() != 1 {
                    return Err(PluginError::invalid(format!(
                        "{OP}: y_zero_point must be a scalar"
                    )));
                }
                (z.dtype, zv[0])
            }
            None => (x.dtype, 0),
        };
        let zeros;
        let bias = match present(8) {
            Some(b) => {
                let bv = b.as_slice::<i32>()?;
                if bv.len() != geo.m {
                    return Err(PluginError::invalid(format!(
                        "{OP}: B has {} elements, expected {}",
                        bv.len(),
                        geo.m
                    )));
                }
                bv
            }
            None => {
                zeros = try_vec(geo.m, 0i32)?;
                &zeros[..]
            }
        };
        let shape = if nhwc {
            geo.out_shape_nhwc()
        } else {
            geo.out_shape()
        };
        let plane = product_sat(&geo.out_sp).max(1);
        // QLinearConv's output is u8 or i8 (its type constraint).
        let out = ctx
            .output_to_overwrite(0, out_dtype, &shape)?
            .into_bytes()?;
        let rq = RequantOut {
            bias,
            mult: &mult,
            zp: y_zp,
            out: out_dtype,
        };
        // Where the rounded product is clamped.
        let (lo, hi) = rq.bounds();
        let requant =
            |acc: i32, oc: usize| -> u8 { crate::simd::requant_byte(acc, mult[oc], y_zp, lo, hi) };
        // The requantization as the direct channels-last loops take it.
        let q = Requant {
            bias,
            mult: &mult,
            zp: y_zp,
            lo,
            hi,
        };
        let (xb, x_signed) = (bytes(x, OP)?, x.dtype == DType::I8);
        // Channels-last with few input channels (a first layer): directly, when W is
        // symmetric i8 and the CPU has AVX-512 VNNI.
        if nhwc && geo.shallow() && w.dtype == DType::I8 && shallow::available() {
            if let Some((zx, zw)) = int_zero_points(OP, x, w, geo.m, present(2), present(5))? {
                let [kh, kw] = [geo.k_sp[0], geo.k_sp[1]];
                let built;
                let packed = match &self.shallow {
                    Some(p) if p.fits(geo.m, geo.c, kh, kw) => Some(p),
                    _ => {
                        built = shallow::Packed::new(bytes(w, OP)?, geo.m, geo.c, kh, kw);
                        built.as_ref()
                    }
                };
                if let (Some(packed), true) = (packed, zw.iter().all(|&z| z == 0)) {
                    return geo.run_shallow_nhwc(ctx, OP, xb, x_signed, zx, packed, &q, out);
                }
            }
        }
        // Channels-last, one group: gathered, multiplied and requantized block by block.
        if nhwc
            && geo.group == 1
            && !geo.depthwise()
            && geo.run_blas_nhwc(
                ctx,
                OP,
                x,
                w,
                present(2),
                present(5),
                &self.packed,
                out,
                &rq,
            )?
        {
            return Ok(());
        }
        let mg = geo.m / geo.group;
        // Each tile of products is biased, requantized and written in place (no i32 copy of
        // the whole output, no per-element index arithmetic): transposed to NCHW, or
        // channels-last position by position.
        let mut store = |bn: usize, g: usize, tmp: &[i32]| {
            let (bias, mult) = (&bias[g * mg..(g + 1) * mg], &mult[g * mg..(g + 1) * mg]);
            let requantize = |src: &[i32], out: &mut [u8], j0: usize| {
                let n = src.len();
                crate::simd::requantize_rows(
                    src,
                    &bias[j0..j0 + n],
                    &mult[j0..j0 + n],
                    y_zp,
                    (lo, hi),
                    out,
                );
            };
            if nhwc {
                let dst = &mut out[bn * plane * geo.m..(bn + 1) * plane * geo.m];
                let m = geo.m.max(1);
                return ctx.parallel_chunks(dst, m * 64, |start, chunk| {
                    for (r, row) in chunk.chunks_exact_mut(m).enumerate() {
                        let p = start / m + r;
                        if let Some(src) = tmp.get(p * mg..(p + 1) * mg) {
                            requantize(src, &mut row[g * mg..(g + 1) * mg], 0);
                        }
                    }
                });
            }
            let base = (bn * geo.m + g * mg) * plane;
            let dst = &mut out[base..base + mg * plane];
            transpose_tile(ctx, dst, tmp, plane, mg, |j0, src, out| {
                requantize(src, out, j0)
            })
        };
        if nhwc && geo.depthwise() && geo.m == geo.c {
            if let Some((zx, _)) = int_zero_points(OP, x, w, geo.m, present(2), present(5))? {
                let taps = numel(&geo.k_sp)?;
                let shifted;
                let tap_major = match &self.depthwise {
                    Some(t) if t.fits(geo.c, taps) => t,
                    _ => {
                        shifted = TapMajor::new(&shift_w(OP, w, present(5))?, geo.c, taps)?;
                        &shifted
                    }
                };
                return geo.run_depthwise_nhwc(ctx, OP, xb, x_signed, zx, tap_major, &q, out);
            }
        }
        if !nhwc {
            if let Some(d) = depthwise_operands(OP, &geo, x, w, present(2), present(5), Some(bias))?
            {
                return geo.run_depthwise(ctx, OP, &d, out, |oc, acc, dst| {
                    // The bias is in the accumulators already.
                    crate::simd::requantize_channel(acc, mult[oc], y_zp, lo, hi, dst);
                });
            }
        }
        if geo.run_blas(
            ctx,
            OP,
            nhwc,
            x,
            w,
            present(2),
            present(5),
            &self.packed,
            &mut store,
        )? {
            return Ok(());
        }
        // Padding makes the output arbitrarily larger than x: fallible.
        let mut acc = try_vec(numel(&shape)?, 0i32)?;
        let mut xs = shift_x(OP, x, present(2))?;
        if nhwc {
            xs = nhwc_to_nchw(&xs, geo.n, geo.c, product_sat(&geo.in_sp))?;
        }
        let ws = shift_w(OP, w, present(5))?;
        geo.run(ctx, &xs, &ws, Some(bias), &mut acc)?;
        let m = geo.m.max(1);
        for (i, (v, &a)) in out.iter_mut().zip(&acc).enumerate() {
            // acc is NCHW; channels-last output is written at the transposed position.
            let oc = (i / plane) % m;
            *v = requant(a, oc);
        }
        if nhwc {
            let planar = out.to_vec();
            for (i, &v) in planar.iter().enumerate() {
                let (bn, oc, p) = (i / (plane * m), (i / plane) % m, i % plane);
                out[(bn * plane + p) * m + oc] = v;
            }
        }
        Ok(())
    }
}

pub(super) fn conv_integer_factory(node: &NodeInfo<'_>) -> Result<Box<dyn Kernel>, PluginError> {
    Ok(Box::new(ConvInteger(ConvAttrs::read(node)?)))
}

pub(super) fn qlinear_conv_factory(node: &NodeInfo<'_>) -> Result<Box<dyn Kernel>, PluginError> {
    let attrs = ConvAttrs::read(node)?;
    let packed = prepack(node, &attrs, 3, 5).unwrap_or_default().into();
    // ONNX Runtime's contrib form (`com.microsoft`), as its layout transformer writes it.
    let channels_last = node.domain == "com.microsoft" && node.int_or("channels_last", 0)? != 0;
    let depthwise = channels_last
        .then(|| depthwise_weights(node, &attrs))
        .flatten();
    let shallow = channels_last
        .then(|| shallow_weights(node, &attrs))
        .flatten();
    Ok(Box::new(QLinearConv {
        attrs,
        packed,
        channels_last,
        depthwise,
        shallow,
    }))
}

/// A one-group convolution's constant i8 weights over few input channels (zero point
/// constant zeros or absent), prepared for [`shallow`]'s loop; `None` for any other node.
fn shallow_weights(node: &NodeInfo<'_>, attrs: &ConvAttrs) -> Option<shallow::Packed> {
    let wv = node.inputs.get(3)?.constant?;
    let zero = match node.inputs.get(5) {
        Some(z) if z.present => read_i32(&z.constant?, "QLinearConv")
            .ok()?
            .iter()
            .all(|&v| v == 0),
        _ => true,
    };
    let &[m, c, kh, kw] = wv.shape() else {
        return None;
    };
    if !zero || attrs.group != 1 || wv.dtype != DType::I8 {
        return None;
    }
    shallow::Packed::new(bytes(&wv, "QLinearConv").ok()?, m, c, kh, kw)
}

/// A depthwise convolution's constant weights (`[c, 1, kh, kw]`, `group = c`; zero point
/// constant or absent), prepared for the channels-last loop; `None` for any other node.
fn depthwise_weights(node: &NodeInfo<'_>, attrs: &ConvAttrs) -> Option<TapMajor> {
    let wv = node.inputs.get(3)?.constant?;
    let zp = match node.inputs.get(5) {
        Some(z) if z.present => Some(z.constant?),
        _ => None,
    };
    let &[m, 1, kh, kw] = wv.shape() else {
        return None;
    };
    if usize::try_from(attrs.group).ok()? != m {
        return None;
    }
    let shifted = shift_w("QLinearConv", &wv, zp.as_ref()).ok()?;
    TapMajor::new(&shifted, m, kh.checked_mul(kw)?).ok()
}

/// The constant weight `inputs[w]` (zero point `inputs[w_zp]`, constant or absent) packed
/// for each group's product with the node's BLAS backend, so that runs skip packing it
/// (for ResNet-50's late 1x1 layers, packing cost more than the product). `None` when the
/// weight is not constant, its zero point varies or the backend does not pre-pack; a run
/// whose operands turn out different (another x type) packs as usual.
fn prepack(node: &NodeInfo<'_>, attrs: &ConvAttrs, w: usize, w_zp: usize) -> Option<Vec<PackedB>> {
    let x = node.inputs.first()?;
    let wv = node.inputs.get(w)?.constant?;
    let zp = match node.inputs.get(w_zp) {
        Some(z) if z.present => Some(z.constant?),
        _ => None,
    };
    let shape = wv.shape();
    let (&m, rest) = shape.split_first()?;
    let group = usize::try_from(attrs.group)
        .ok()
        .filter(|&g| g > 0 && m % g == 0)?;
    let mg = m / group;
    let kdim = rest.iter().try_fold(1usize, |a, &d| a.checked_mul(d))?;
    let zw = zero_points("QLinearConv", zp.as_ref(), wv.dtype, m).ok()??;
    let wb = bytes(&wv, "QLinearConv").ok()?;
    // 2-D convolutions take their depth tap-major (`Geometry::tap_major`).
    let reordered;
    let wb = match rest {
        &[cg, kh, kw] if kh * kw > 1 => {
            reordered = tap_major(wb, m, cg, kh * kw).ok()?;
            &reordered[..]
        }
        _ => wb,
    };
    (0..group)
        .map(|g| {
            let b_zp = if zw.len() == 1 {
                &zw[..]
            } else {
                zw.get(g * mg..(g + 1) * mg)?
            };
            IntProduct {
                m: 1,
                n: mg,
                k: kdim,
                a: &[],
                a_type: x.dtype,
                lda: kdim,
                a_zp: 0,
                b: wb.get(g * mg * kdim..)?,
                b_type: wv.dtype,
                ldb: kdim,
                trans_b: true,
                b_zp,
            }
            .pack(node)
        })
        .collect()
}

pub(super) fn register(r: &mut Registrar) {
    r.kernel(
        KernelDesc::onnx("ConvInteger", 10, OPEN_END)
            .constraint("T1", Q8)
            .constraint("T2", Q8)
            .constraint("T3", &[DType::I32])
            .inputs(&["T1", "T2", "T1", "T2"])
            .outputs(&["T3"]),
        conv_integer_factory as Factory,
    );
    // ONNX's QLinearConv, and ONNX Runtime's contrib one: the same, plus `channels_last`.
    for desc in [
        KernelDesc::onnx("QLinearConv", 10, OPEN_END),
        KernelDesc::new("com.microsoft", "QLinearConv", 1, OPEN_END),
    ] {
        r.kernel(
            desc.constraint("T1", Q8)
                .constraint("T2", Q8)
                .constraint("T3", Q8)
                .constraint("T4", &[DType::I32])
                .constraint("TS", &[DType::F32])
                .inputs(&["T1", "TS", "T1", "T2", "TS", "T2", "TS", "T3", "T4"])
                .outputs(&["T3"]),
            qlinear_conv_factory as Factory,
        );
    }
}

//! ConvTranspose: one gemm per batch and group (Wᵀ·X into columns), then col2im.

use super::{at_least_one, conv_bias, matmul::gemm_f32, register_versions, AutoPad, WindowAttrs};
use crate::util::{required, row_major_strides};
use opreg_sdk::{alloc::checked_numel, prelude::*};

#[derive(Clone)]
struct ConvTranspose {
    window: WindowAttrs,
    group: usize,
    output_padding: Option<Vec<i64>>,
    output_shape: Option<Vec<i64>>,
}

fn conv_transpose_factory(node: &NodeInfo<'_>) -> Result<Box<dyn Kernel>, PluginError> {
    let group = at_least_one(node, "ConvTranspose", "group", 1)?;
    Ok(Box::new(ConvTranspose {
        window: WindowAttrs::from_node(node)?,
        group,
        output_padding: node.ints("output_padding")?,
        output_shape: node.ints("output_shape")?,
    }))
}

/// Resolved geometry: pads may be negative when `output_shape` asks for more than the
/// natural extent.
struct Geometry {
    kernel: Vec<usize>,
    strides: Vec<usize>,
    dilations: Vec<usize>,
    pad_begin: Vec<isize>,
    out: Vec<usize>,
}

impl ConvTranspose {
    fn geometry(&self, input: &[usize], kernel: &[usize]) -> Result<Geometry, PluginError> {
        const OP: &str = "ConvTranspose";
        let s = input.len();
        let w = &self.window;
        if let Some(ks) = &w.kernel_shape {
            if ks.len() != s || ks.iter().zip(kernel).any(|(&a, &b)| a != b as i64) {
                return Err(PluginError::invalid(format!(
                    "{OP}: kernel_shape {ks:?} does not match the weights' {kernel:?}"
                )));
            }
        }
        let list = |name: &str, v: &Option<Vec<i64>>, len: usize, default: i64, min: i64| {
            let v = v.clone().unwrap_or_else(|| vec![default; len]);
            if v.len() != len {
                return Err(PluginError::invalid(format!(
                    "{OP}: attribute '{name}' has {} values, expected {len}",
                    v.len()
                )));
            }
            if let Some(bad) = v.iter().find(|&&x| x < min) {
                return Err(PluginError::invalid(format!(
                    "{OP}: attribute '{name}' has value {bad} below {min}"
                )));
            }
            Ok(v)
        };
        let strides = list("strides", &w.strides, s, 1, 1)?;
        let dilations = list("dilations", &w.dilations, s, 1, 1)?;
        let out_pad = list("output_padding", &self.output_padding, s, 0, 0)?;
        let out_shape = match &self.output_shape {
            // `output_shape` may include the N and C dimensions.
            Some(v) if v.len() == s + 2 => {
                Some(list("output_shape", &Some(v[2..].to_vec()), s, 0, 0)?)
            }
            Some(_) => Some(list("output_shape", &self.output_shape, s, 0, 0)?),
            None => None,
        };
        let same = matches!(w.auto_pad, AutoPad::SameUpper | AutoPad::SameLower);
        let pads = match (&w.pads, w.auto_pad) {
            (Some(_), AutoPad::NotSet) => Some(list("pads", &w.pads, 2 * s, 0, 0)?),
            _ if same => None,
            _ => Some(vec![0; 2 * s]),
        };
        let mut g = Geometry {
            kernel: kernel.to_vec(),
            strides: strides.iter().map(|&v| v as usize).collect(),
            dilations: dilations.iter().map(|&v| v as usize).collect(),
            pad_begin: vec![0; s],
            out: vec![0; s],
        };
        // Attributes are arbitrary i64s: the extents are computed checked, and every window
        // position (up to `natural`, less the begin pad) must fit in an isize.
        for d in 0..s {
            let overflow = || {
                PluginError::invalid(format!(
                    "{OP}: extents on spatial axis {d} overflow (strides {strides:?}, \
                     dilations {dilations:?}, pads {pads:?})"
                ))
            };
            let ek = ((kernel[d] as i64) - 1)
                .checked_mul(dilations[d])
                .and_then(|e| e.checked_add(1))
                .ok_or_else(overflow)?;
            let natural = strides[d]
                .checked_mul(input[d] as i64 - 1)
                .and_then(|v| v.checked_add(out_pad[d]))
                .and_then(|v| v.checked_add(ek))
                .ok_or_else(overflow)?;
            let (pb, out) = match &pads {
                None => {
                    let out = match &out_shape {
                        Some(o) => o[d],
                        None => (input[d] as i64)
                            .checked_mul(strides[d])
                            .ok_or_else(overflow)?,
                    };
                    let total = natural.checked_sub(out).ok_or_else(overflow)?;
                    let half = total.div_euclid(2);
                    let pb = if w.auto_pad == AutoPad::SameUpper {
                        half
                    } else {
                        total - half
                    };
                    (pb, out)
                }
                Some(p) => (
                    p[d],
                    match &out_shape {
                        Some(o) => o[d],
                        None => natural
                            .checked_sub(p[d])
                            .and_then(|v| v.checked_sub(p[s + d]))
                            .ok_or_else(overflow)?,
                    },
                ),
            };
            natural.checked_sub(pb).ok_or_else(overflow)?;
            if out < 0 {
                return Err(PluginError::invalid(format!(
                    "{OP}: output extent {out} on spatial axis {d} is negative"
                )));
            }
            g.pad_begin[d] = pb as isize;
            g.out[d] = out as usize;
        }
        Ok(g)
    }
}

impl Kernel for ConvTranspose {
    fn compute(
        &self,
        ctx: &KernelContext<'_>,
        inputs: &[TensorView<'_>],
    ) -> Result<(), PluginError> {
        let [xv, wv] = required("ConvTranspose", inputs, ["X", "W"])?;
        let (xs, ws) = (xv.shape(), wv.shape());
        if xs.len() < 3 || ws.len() != xs.len() {
            return Err(PluginError::invalid(format!(
                "ConvTranspose: X {xs:?} and W {ws:?} must have the same rank, at least 3"
            )));
        }
        let (n, c) = (xs[0], xs[1]);
        let group = self.group;
        if ws[0] != c || c % group != 0 {
            return Err(PluginError::invalid(format!(
                "ConvTranspose: W {ws:?} does not fit X {xs:?} with group {group}"
            )));
        }
        let (cg, mg) = (c / group, ws[1]);
        let m = mg.checked_mul(group).ok_or_else(|| {
            PluginError::invalid(format!(
                "ConvTranspose: W {ws:?} with group {group} gives too many output channels"
            ))
        })?;
        let g = self.geometry(&xs[2..], &ws[2..])?;
        let mut out_shape = vec![n, m];
        out_shape.extend_from_slice(&g.out);
        let bias = conv_bias::<f32>("ConvTranspose", inputs, m)?;
        let x = xv.as_slice::<f32>()?;
        let w = wv.as_slice::<f32>()?;
        let y = ctx.output_slice::<f32>(0, &out_shape)?;
        if y.is_empty() {
            return Ok(());
        }
        // Non-empty y: the output's extents multiply without overflow.
        let p_out: usize = g.out.iter().product();
        let spatial = &xs[2..];
        let s = spatial.len();
        let p_in: usize = checked_numel(spatial)?;
        let kk: usize = checked_numel(&g.kernel)?;
        // Columns scale with the kernel and X, not with the output.
        let col = ctx.scratch::<f32>(checked_numel(&[mg, kk, p_in])?)?;
        let out_strides = row_major_strides(&g.out);
        for b in 0..n {
            for gi in 0..group {
                let xg = &x[(b * c + gi * cg) * p_in..(b * c + (gi + 1) * cg) * p_in];
                let wg = &w[gi * cg * mg * kk..(gi + 1) * cg * mg * kk];
                // col (mg*kk x p_in) = Wgᵀ (stored cg x mg*kk) * Xg (cg x p_in).
                gemm_f32(
                    ctx,
                    "ConvTranspose",
                    true,
                    false,
                    mg * kk,
                    p_in,
                    cg,
                    1.0,
                    wg,
                    xg,
                    0.0,
                    col,
                    None,
                )?;
                let col = &*col;
                let yg = &mut y[(b * m + gi * mg) * p_out..(b * m + (gi + 1) * mg) * p_out];
                // col2im: each task owns whole output channel planes.
                ctx.parallel_chunks(yg, p_out, |start, plane| {
                    let oc = start / p_out;
                    if let ([ih, iw], Some(cols)) =
                        (spatial, col.get(oc * kk * p_in..(oc + 1) * kk * p_in))
                    {
                        col2im_2d(cols, plane, &g, (*ih, *iw));
                        return;
                    }
                    let mut kid = vec![0usize; s];
                    let mut iid = vec![0usize; s];
                    for r in 0..kk {
                        let mut rem = r;
                        for d in (0..s).rev() {
                            kid[d] = rem % g.kernel[d];
                            rem /= g.kernel[d];
                        }
                        let row = &col[(oc * kk + r) * p_in..(oc * kk + r + 1) * p_in];
                        iid.fill(0);
                        for &v in row {
                            let mut off = 0usize;
                            let mut valid = true;
                            for d in 0..s {
                                let pos = (iid[d] * g.strides[d] + kid[d] * g.dilations[d])
                                    as isize
                                    - g.pad_begin[d];
                                if pos < 0 || pos >= g.out[d] as isize {
                                    valid = false;
                                    break;
                                }
                                off += pos as usize * out_strides[d];
                            }
                            if valid {
                                plane[off] += v;
                            }
                            for d in (0..s).rev() {
                                iid[d] += 1;
                                if iid[d] < spatial[d] {
                                    break;
                                }
                                iid[d] = 0;
                            }
                        }
                    }
                })?;
            }
        }
        if let Some(bias) = bias {
            ctx.parallel_chunks(y, p_out, |start, plane| {
                let bv = bias[(start / p_out) % m];
                plane.iter_mut().for_each(|v| *v += bv);
            })?;
        }
        Ok(())
    }
}

/// col2im of one output channel's plane in 2-D: per tap, each input row's values added into
/// the output row they land in, over the input columns whose outputs lie inside the row
/// (worked out once per tap). The general loop worked out every value's position dimension
/// by dimension: a 2x2/2 upsampling of 8x64x28x28 ran at 5x ONNX Runtime. `cols` holds the
/// channel's `kh * kw` rows of `ih * iw` values.
fn col2im_2d(cols: &[f32], plane: &mut [f32], g: &Geometry, (ih, iw): (usize, usize)) {
    let two = |v: &[usize]| <[usize; 2]>::try_from(v).ok();
    let (Some([kh, kw]), Some([oh, ow]), Some([sh, sw]), Some([dh, dw]), Some([ph, pw])) = (
        two(&g.kernel),
        two(&g.out),
        two(&g.strides),
        two(&g.dilations),
        <[isize; 2]>::try_from(&g.pad_begin[..]).ok(),
    ) else {
        return;
    };
    let at = |i: usize, s: usize, k: usize, d: usize, p: isize| {
        (i as isize)
            .saturating_mul(s as isize)
            .saturating_add((k as isize).saturating_mul(d as isize))
            .saturating_sub(p)
    };
    for ky in 0..kh {
        for kx in 0..kw {
            let Some(rows) = cols.get((ky * kw + kx) * ih * iw..(ky * kw + kx + 1) * ih * iw)
            else {
                return;
            };
            // Input columns `lo..hi` land inside the row: 0 <= ix * sw + c < ow.
            let c = at(0, sw, kx, dw, pw);
            let lo = if c >= 0 {
                0
            } else {
                c.unsigned_abs().div_ceil(sw.max(1))
            };
            let hi = if c >= ow as isize {
                0
            } else {
                (ow as isize - c).unsigned_abs().div_ceil(sw.max(1)).min(iw)
            };
            if lo >= hi {
                continue;
            }
            let first = at(lo, sw, kx, dw, pw).unsigned_abs();
            for iy in 0..ih {
                let oy = at(iy, sh, ky, dh, ph);
                if oy < 0 || oy >= oh as isize {
                    continue;
                }
                let oy = oy.unsigned_abs();
                let (Some(orow), Some(src)) = (
                    plane.get_mut(oy * ow + first..(oy + 1) * ow),
                    rows.get(iy * iw + lo..iy * iw + hi),
                ) else {
                    continue;
                };
                if sw == 1 {
                    for (o, &v) in orow.iter_mut().zip(src) {
                        *o += v;
                    }
                } else {
                    for (o, &v) in orow.iter_mut().step_by(sw.max(1)).zip(src) {
                        *o += v;
                    }
                }
            }
        }
    }
}

pub fn register(r: &mut Registrar) {
    register_versions(
        r,
        "ConvTranspose",
        &[1, 11, 22],
        &[("T", &[DType::F32])],
        &["T", "T", "T"],
        &["T"],
        conv_transpose_factory,
    );
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::nn::testblas::NaiveBlas;
    use opreg_sdk::{
        host::HostTensor,
        testkit::{run_kernel, NodeSpec},
    };

    /// Direct 2-D transposed convolution with explicit (possibly negative) begin pads and
    /// output extents.
    #[allow(clippy::too_many_arguments)]
    fn naive(
        x: &[f32],
        [n, c, h, wd]: [usize; 4],
        w: &[f32],
        [_, mg, kh, kw]: [usize; 4],
        group: usize,
        st: [usize; 2],
        dil: [usize; 2],
        pb: [isize; 2],
        out: [usize; 2],
        bias: Option<&[f32]>,
    ) -> Vec<f32> {
        let m = mg * group;
        let cg = c / group;
        let mut y = vec![0.0f32; n * m * out[0] * out[1]];
        for b in 0..n {
            for ic in 0..c {
                let gi = ic / cg;
                for i in 0..h {
                    for j in 0..wd {
                        for oc in 0..mg {
                            for a in 0..kh {
                                for e in 0..kw {
                                    let py = (i * st[0] + a * dil[0]) as isize - pb[0];
                                    let px = (j * st[1] + e * dil[1]) as isize - pb[1];
                                    if py < 0
                                        || px < 0
                                        || py >= out[0] as isize
                                        || px >= out[1] as isize
                                    {
                                        continue;
                                    }
                                    let mo = gi * mg + oc;
                                    y[((b * m + mo) * out[0] + py as usize) * out[1]
                                        + px as usize] += x[((b * c + ic) * h + i) * wd + j]
                                        * w[((ic * mg + oc) * kh + a) * kw + e];
                                }
                            }
                        }
                    }
                }
            }
        }
        if let Some(bias) = bias {
            for (i, v) in y.iter_mut().enumerate() {
                *v += bias[(i / (out[0] * out[1])) % m];
            }
        }
        y
    }

    fn data(len: usize, seed: usize) -> Vec<f32> {
        (0..len)
            .map(|i| (((i * 31 + seed * 7) % 19) as f32 - 9.0) / 5.0)
            .collect()
    }

    fn ints(v: &[i64]) -> AttrValue {
        AttrValue::Ints(v.to_vec())
    }

    fn close(a: &[f32], b: &[f32]) {
        crate::util::testing::assert_close(a, b, 1e-4);
    }

    #[test]
    fn conv_transpose_matches_direct_loops() {
        let xs = [2usize, 4, 3, 4];
        let x = data(xs.iter().product(), 1);
        let tx = HostTensor::from_vec(&xs, &x).expect("x");
        // (group, mg, kernel, strides, dilations, pads [b0,b1,e0,e1], output_padding)
        type Case = (
            usize,
            usize,
            [usize; 2],
            [usize; 2],
            [usize; 2],
            [usize; 4],
            [usize; 2],
        );
        let cases: [Case; 4] = [
            (1, 3, [3, 3], [1, 1], [1, 1], [0, 0, 0, 0], [0, 0]),
            (1, 2, [3, 2], [2, 3], [1, 1], [1, 0, 1, 1], [1, 0]),
            (2, 2, [2, 3], [2, 1], [2, 1], [0, 1, 0, 1], [0, 0]),
            (4, 1, [3, 3], [2, 2], [1, 1], [1, 1, 1, 1], [1, 1]),
        ];
        for (group, mg, k, st, dil, pads, op) in cases {
            let ws = [4usize, mg, k[0], k[1]];
            let w = data(ws.iter().product(), 2);
            let bias = data(mg * group, 3);
            let out: Vec<usize> = (0..2)
                .map(|d| {
                    st[d] * (xs[2 + d] - 1) + op[d] + (k[d] - 1) * dil[d] + 1
                        - pads[d]
                        - pads[2 + d]
                })
                .collect();
            let want = naive(
                &x,
                xs,
                &w,
                ws,
                group,
                st,
                dil,
                [pads[0] as isize, pads[1] as isize],
                [out[0], out[1]],
                Some(&bias),
            );
            let tw = HostTensor::from_vec(&ws, &w).expect("w");
            let tb = HostTensor::from_vec(&[mg * group], &bias).expect("b");
            let to_i = |v: &[usize]| v.iter().map(|&x| x as i64).collect::<Vec<_>>();
            let node = NodeSpec::onnx("ConvTranspose", 11)
                .attr("group", AttrValue::Int(group as i64))
                .attr("strides", ints(&to_i(&st)))
                .attr("dilations", ints(&to_i(&dil)))
                .attr("pads", ints(&to_i(&pads)))
                .attr("output_padding", ints(&to_i(&op)));
            let got = run_kernel(
                conv_transpose_factory,
                &node,
                &[&tx, &tw, &tb],
                Some(Box::new(NaiveBlas)),
            )
            .expect("run");
            assert_eq!(got[0].shape(), &[2, mg * group, out[0], out[1]]);
            close(&got[0].to_vec::<f32>().expect("y"), &want);
        }
    }

    #[test]
    fn conv_transpose_output_shape_and_same() {
        let xs = [1usize, 2, 3, 3];
        let ws = [2usize, 1, 3, 3];
        let x = data(18, 4);
        let w = data(18, 5);
        let tx = HostTensor::from_vec(&xs, &x).expect("x");
        let tw = HostTensor::from_vec(&ws, &w).expect("w");
        // Natural extent with stride 2: 2*2 + 3 = 7. output_shape 6: total pad 1, SAME_UPPER
        // puts it at the end (begin 0), SAME_LOWER at the beginning. With auto_pad NOTSET and
        // no pads, pads are zero and output_shape crops at the end.
        for (auto, begin) in [("SAME_UPPER", 0isize), ("SAME_LOWER", 1), ("NOTSET", 0)] {
            let mut node = NodeSpec::onnx("ConvTranspose", 11)
                .attr("strides", ints(&[2, 2]))
                .attr("output_shape", ints(&[6, 6]));
            if auto != "NOTSET" {
                node = node.attr("auto_pad", AttrValue::String(auto.into()));
            }
            let got = run_kernel(
                conv_transpose_factory,
                &node,
                &[&tx, &tw],
                Some(Box::new(NaiveBlas)),
            )
            .expect("run");
            assert_eq!(got[0].shape(), &[1, 1, 6, 6]);
            let want = naive(
                &x,
                xs,
                &w,
                ws,
                1,
                [2, 2],
                [1, 1],
                [begin, begin],
                [6, 6],
                None,
            );
            close(&got[0].to_vec::<f32>().expect("y"), &want);
        }
        // SAME_UPPER without output_shape: out = in * stride = 6.
        let node = NodeSpec::onnx("ConvTranspose", 11)
            .attr("strides", ints(&[2, 2]))
            .attr("auto_pad", AttrValue::String("SAME_UPPER".into()));
        let got = run_kernel(
            conv_transpose_factory,
            &node,
            &[&tx, &tw],
            Some(Box::new(NaiveBlas)),
        )
        .expect("run");
        assert_eq!(got[0].shape(), &[1, 1, 6, 6]);
        // 1-D against the 2-D result with a unit height.
        let x1 = data(2 * 5, 6);
        let w1 = data(2 * 3 * 3, 7);
        let t1 = HostTensor::from_vec(&[1, 2, 5], &x1).expect("x");
        let tw1 = HostTensor::from_vec(&[2, 3, 3], &w1).expect("w");
        let node = NodeSpec::onnx("ConvTranspose", 11).attr("strides", ints(&[2]));
        let got = run_kernel(
            conv_transpose_factory,
            &node,
            &[&t1, &tw1],
            Some(Box::new(NaiveBlas)),
        )
        .expect("run");
        assert_eq!(got[0].shape(), &[1, 3, 11]);
        let want = naive(
            &x1,
            [1, 2, 1, 5],
            &w1,
            [2, 3, 1, 3],
            1,
            [1, 2],
            [1, 1],
            [0, 0],
            [1, 11],
            None,
        );
        close(&got[0].to_vec::<f32>().expect("y"), &want);
    }

    /// Strides and pads whose window arithmetic overflows i64 are invalid, not a panic.
    #[test]
    fn conv_transpose_overflowing_attributes_are_invalid() {
        let x = HostTensor::from_vec(&[1, 1, 3], &[1.0f32, 2.0, 3.0]).expect("x");
        let w = HostTensor::from_vec(&[1, 1, 2], &[1.0f32, 1.0]).expect("w");
        for (name, v) in [
            ("strides", vec![i64::MAX]),
            ("dilations", vec![i64::MAX]),
            ("pads", vec![i64::MAX, i64::MAX]),
            ("output_padding", vec![i64::MAX]),
        ] {
            let node = NodeSpec::onnx("ConvTranspose", 11).attr(name, ints(&v));
            let e = run_kernel(
                conv_transpose_factory,
                &node,
                &[&x, &w],
                Some(Box::new(NaiveBlas)),
            )
            .expect_err(name);
            assert_eq!(e.code, ErrorCode::InvalidArgument, "{name}: {}", e.message);
        }
    }
}

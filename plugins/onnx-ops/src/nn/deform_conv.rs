//! DeformConv (2-D): each kernel tap samples X bilinearly (zeros outside) at its position
//! moved by the learned offset, scaled by the optional mask, then weighted as in Conv.
//! Computed in f64; the output grid is the offset's spatial shape.

use super::{not_implemented_for, optional, register_versions, Float, Scalar, FLOATS};
use crate::util::{input, required};
use opreg_sdk::{alloc::checked_numel, prelude::*};

#[derive(Clone)]
struct DeformConv {
    strides: Option<Vec<i64>>,
    pads: Option<Vec<i64>>,
    dilations: Option<Vec<i64>>,
    group: usize,
    offset_group: usize,
}

fn deform_conv_factory(node: &NodeInfo<'_>) -> Result<Box<dyn Kernel>, PluginError> {
    let positive = |name: &str| -> Result<usize, PluginError> {
        let v = node.int_or(name, 1)?;
        if v < 1 {
            return Err(PluginError::invalid(format!(
                "DeformConv: attribute '{name}' must be positive, got {v}"
            )));
        }
        Ok(v as usize)
    };
    Ok(Box::new(DeformConv {
        strides: node.ints("strides")?,
        pads: node.ints("pads")?,
        dilations: node.ints("dilations")?,
        group: positive("group")?,
        offset_group: positive("offset_group")?,
    }))
}

/// `x` (an `ih` x `iw` plane) at fractional (`h`, `w`), bilinear, zero outside.
fn bilinear(x: &[f64], ih: usize, iw: usize, h: f64, w: f64) -> f64 {
    let (h0, w0) = (h.floor(), w.floor());
    let (dh, dw) = (h - h0, w - w0);
    let at = |r: f64, c: f64| -> f64 {
        // Negated, so that a NaN position (from a NaN offset) reads as outside too.
        if !(r >= 0.0 && c >= 0.0 && r < ih as f64 && c < iw as f64) {
            0.0
        } else {
            x[r as usize * iw + c as usize]
        }
    };
    at(h0, w0) * (1.0 - dh) * (1.0 - dw)
        + at(h0, w0 + 1.0) * (1.0 - dh) * dw
        + at(h0 + 1.0, w0) * dh * (1.0 - dw)
        + at(h0 + 1.0, w0 + 1.0) * dh * dw
}

impl DeformConv {
    fn run<T: Float>(
        &self,
        ctx: &KernelContext<'_>,
        inputs: &[TensorView<'_>],
    ) -> Result<(), PluginError> {
        const OP: &str = "DeformConv";
        let [xv, wv, ov] = required(OP, inputs, ["X", "W", "offset"])?;
        let (xs, ws, os) = (xv.shape(), wv.shape(), ov.shape());
        if xs.len() != 4 || ws.len() != 4 || os.len() != 4 {
            return Err(PluginError::invalid(format!(
                "{OP}: only 2-D is supported; X {xs:?}, W {ws:?} and offset {os:?} must be 4-D"
            )));
        }
        let (n, ic, ih, iw) = (xs[0], xs[1], xs[2], xs[3]);
        let (oc, icg, kh, kw) = (ws[0], ws[1], ws[2], ws[3]);
        let (oh, ow) = (os[2], os[3]);
        let (group, og) = (self.group, self.offset_group);
        if icg.checked_mul(group) != Some(ic) || oc % group != 0 || ic % og != 0 {
            return Err(PluginError::invalid(format!(
                "{OP}: W {ws:?} does not fit X {xs:?} with group {group} and offset_group {og}"
            )));
        }
        // An empty W may have huge kernel extents: checked products.
        let taps = checked_numel(&[kh, kw])?;
        let offset_channels = checked_numel(&[og, taps, 2])?;
        if os[0] != n || os[1] != offset_channels {
            return Err(PluginError::invalid(format!(
                "{OP}: offset {os:?} must be [{n}, {offset_channels}, oH, oW]"
            )));
        }
        let two = |name: &str, v: &Option<Vec<i64>>, len: usize, default: i64| match v {
            None => Ok(vec![default; len]),
            Some(v) if v.len() == len => Ok(v.clone()),
            Some(v) => Err(PluginError::invalid(format!(
                "{OP}: attribute '{name}' has {} values, expected {len}",
                v.len()
            ))),
        };
        let strides = two("strides", &self.strides, 2, 1)?;
        let dil = two("dilations", &self.dilations, 2, 1)?;
        let pads = two("pads", &self.pads, 4, 0)?;
        let mask = optional(inputs, 4);
        if let Some(m) = mask {
            if m.shape() != [n, og * taps, oh, ow] {
                return Err(PluginError::invalid(format!(
                    "{OP}: mask {:?} must be [{n}, {}, {oh}, {ow}]",
                    m.shape(),
                    og * taps
                )));
            }
        }
        let bias = optional(inputs, 3);
        if let Some(b) = bias {
            if b.shape() != [oc] {
                return Err(PluginError::invalid(format!(
                    "{OP}: B {:?} must be [{oc}]",
                    b.shape()
                )));
            }
        }
        let load = |v: TensorView<'_>| -> Result<Vec<f64>, PluginError> {
            Ok(v.as_slice::<T>()?
                .iter()
                .map(|&x| x.load().to_f64())
                .collect())
        };
        let x = load(xv)?;
        let w = load(wv)?;
        let off = load(ov)?;
        let mask = mask.copied().map(load).transpose()?;
        let bias = bias.copied().map(load).transpose()?;
        let (ocg, icog) = (oc / group, ic / og);
        // Saturating: it only overflows when Y is empty (no plane is visited).
        let plane = oh.saturating_mul(ow);
        let y = ctx.output_slice::<T>(0, &[n, oc, oh, ow])?;
        ctx.parallel_chunks(y, plane.max(1), |start, chunk| {
            let (b, o) = (start / plane / oc, start / plane % oc);
            let g = o / ocg;
            for (p, yv) in chunk.iter_mut().enumerate() {
                let (i, j) = (p / ow, p % ow);
                let mut acc = bias.as_ref().map_or(0.0, |bv| bv[o]);
                for cg in 0..icg {
                    let c = g * icg + cg;
                    let ogi = c / icog;
                    let xp = &x[(b * ic + c) * ih * iw..(b * ic + c + 1) * ih * iw];
                    for a in 0..kh {
                        for e in 0..kw {
                            let t = a * kw + e;
                            // offset [n, og, kh, kw, 2, oh, ow]; mask [n, og, kh, kw, oh, ow]
                            let ob = (((b * og + ogi) * taps + t) * 2) * plane + p;
                            // In f64: attributes are arbitrary i64s, and i64 arithmetic on
                            // them could overflow.
                            let at = |o: usize, k: usize, d: usize| {
                                o as f64 * strides[d] as f64 - pads[d] as f64
                                    + k as f64 * dil[d] as f64
                            };
                            let h = at(i, a, 0) + off[ob];
                            let wc = at(j, e, 1) + off[ob + plane];
                            let m = mask
                                .as_ref()
                                .map_or(1.0, |m| m[((b * og + ogi) * taps + t) * plane + p]);
                            let wt = w[((o * icg + cg) * kh + a) * kw + e];
                            acc += bilinear(xp, ih, iw, h, wc) * wt * m;
                        }
                    }
                }
                *yv = T::store(<T::Compute as Scalar>::from_f64(acc));
            }
        })
    }
}

impl Kernel for DeformConv {
    fn compute(
        &self,
        ctx: &KernelContext<'_>,
        inputs: &[TensorView<'_>],
    ) -> Result<(), PluginError> {
        let dtype = input("DeformConv", inputs, 0, "X")?.dtype;
        opreg_sdk::dispatch!(dtype, FLOATS, |T| self.run::<T>(ctx, inputs), other => Err(not_implemented_for("DeformConv", other)))
    }
}

pub fn register(r: &mut Registrar) {
    register_versions(
        r,
        "DeformConv",
        &[19, 22],
        &[("T", FLOATS)],
        &["T", "T", "T", "T", "T"],
        &["T"],
        deform_conv_factory,
    );
}

#[cfg(test)]
mod tests {
    use super::*;
    use opreg_sdk::{
        host::HostTensor,
        testkit::{run_kernel_opt, NodeSpec},
    };

    #[test]
    fn deform_conv_by_hand() {
        // X 2x2 [[1,2],[3,4]], 1x1 kernel of weight 2, offsets (0.5, 0.5) at the one output
        // position (0,0): the sample is the centre, mean 2.5; times 2 = 5; plus bias 1.
        let x = HostTensor::from_vec(&[1, 1, 2, 2], &[1.0f32, 2.0, 3.0, 4.0]).expect("x");
        let w = HostTensor::from_vec(&[1, 1, 1, 1], &[2.0f32]).expect("w");
        let off = HostTensor::from_vec(&[1, 2, 1, 1], &[0.5f32, 0.5]).expect("offset");
        let b = HostTensor::from_vec(&[1], &[1.0f32]).expect("b");
        let node = NodeSpec::onnx("DeformConv", 22);
        let out = run_kernel_opt(
            deform_conv_factory,
            &node,
            &[Some(&x), Some(&w), Some(&off), Some(&b)],
            None,
        )
        .expect("run");
        assert_eq!(out[0].shape(), &[1, 1, 1, 1]);
        assert_eq!(out[0].to_vec::<f32>().expect("f32"), vec![6.0]);
        // Offset (1.5, 0): half outside the plane, zeros there: (3 * 0.5) * 2 = 3.
        let off = HostTensor::from_vec(&[1, 2, 1, 1], &[1.5f32, 0.0]).expect("offset");
        let out = run_kernel_opt(
            deform_conv_factory,
            &node,
            &[Some(&x), Some(&w), Some(&off)],
            None,
        )
        .expect("run");
        assert_eq!(out[0].to_vec::<f32>().expect("f32"), vec![3.0]);
    }

    #[test]
    fn deform_conv_official_cases() {
        crate::testcases::run_cases(
            &["test_basic_deform_conv", "test_deform_conv"],
            deform_conv_factory,
        );
    }
}

//! RoiAlign (opsets 10, 16) and NonMaxSuppression (opsets 10, 11).

use super::{optional, read_f64s, required, unsupported, Scalar};
use crate::util::numel;
use opreg_sdk::{alloc::try_with_capacity, prelude::*};

#[derive(Clone, Debug)]
struct RoiAlign {
    max: bool,
    out_h: usize,
    out_w: usize,
    sampling_ratio: i64,
    spatial_scale: f64,
    half_pixel: bool,
}

fn roi_align(node: &NodeInfo<'_>) -> Result<Box<dyn Kernel>, PluginError> {
    let max = match node.string_or("mode", "avg")?.as_str() {
        "avg" => false,
        "max" => true,
        other => {
            return Err(PluginError::invalid(format!(
                "RoiAlign: unsupported mode '{other}'"
            )))
        }
    };
    // Opset 10 has no attribute and behaves as `output_half_pixel`.
    let default_ctm = if node.opset >= 16 {
        "half_pixel"
    } else {
        "output_half_pixel"
    };
    let half_pixel = match node
        .string_or("coordinate_transformation_mode", default_ctm)?
        .as_str()
    {
        "half_pixel" => true,
        "output_half_pixel" => false,
        other => {
            return Err(PluginError::invalid(format!(
                "RoiAlign: unsupported coordinate_transformation_mode '{other}'"
            )))
        }
    };
    let dim = |name: &str| -> Result<usize, PluginError> {
        let v = node.int_or(name, 1)?;
        usize::try_from(v).ok().filter(|&v| v > 0).ok_or_else(|| {
            PluginError::invalid(format!("RoiAlign: '{name}' must be positive, got {v}"))
        })
    };
    Ok(Box::new(RoiAlign {
        max,
        out_h: dim("output_height")?,
        out_w: dim("output_width")?,
        sampling_ratio: node.int_or("sampling_ratio", 0)?,
        spatial_scale: node.float_or("spatial_scale", 1.0)? as f64,
        half_pixel,
    }))
}

/// One bilinear sample: four input positions (within a plane) and their weights.
#[derive(Clone, Copy, Default)]
struct Sample {
    pos: [usize; 4],
    w: [f64; 4],
}

impl RoiAlign {
    /// The sampling grid of one roi, and the number of samples per bin in each direction.
    /// Without `sampling_ratio` the grid follows the roi's extent, which is data (a huge roi
    /// asks for a huge grid): allocated fallibly.
    fn samples(
        &self,
        roi: &[f64],
        height: usize,
        width: usize,
    ) -> Result<(Vec<Sample>, usize, usize), PluginError> {
        let offset = if self.half_pixel { 0.5 } else { 0.0 };
        let s = self.spatial_scale;
        let (start_w, start_h) = (roi[0] * s - offset, roi[1] * s - offset);
        let (end_w, end_h) = (roi[2] * s - offset, roi[3] * s - offset);
        let (mut roi_w, mut roi_h) = (end_w - start_w, end_h - start_h);
        if !self.half_pixel {
            roi_w = roi_w.max(1.0);
            roi_h = roi_h.max(1.0);
        }
        let bin_h = roi_h / self.out_h as f64;
        let bin_w = roi_w / self.out_w as f64;
        let grid = |extent: f64, pooled: usize| -> usize {
            if self.sampling_ratio > 0 {
                self.sampling_ratio as usize
            } else {
                (extent / pooled as f64).ceil().max(0.0) as usize
            }
        };
        let (gh, gw) = (grid(roi_h, self.out_h), grid(roi_w, self.out_w));
        let (hf, wf) = (height as f64, width as f64);
        let mut out = try_with_capacity(numel(&[self.out_h, self.out_w, gh, gw])?)?;
        for ph in 0..self.out_h {
            for pw in 0..self.out_w {
                for iy in 0..gh {
                    let yy = start_h + ph as f64 * bin_h + (iy as f64 + 0.5) * bin_h / gh as f64;
                    for ix in 0..gw {
                        let xx =
                            start_w + pw as f64 * bin_w + (ix as f64 + 0.5) * bin_w / gw as f64;
                        if yy < -1.0 || yy > hf || xx < -1.0 || xx > wf {
                            out.push(Sample::default());
                            continue;
                        }
                        let (mut y, mut x) = (yy.max(0.0), xx.max(0.0));
                        let (mut y_low, mut x_low) = (y as usize, x as usize);
                        let (y_high, x_high);
                        if y_low >= height - 1 {
                            y_low = height - 1;
                            y_high = y_low;
                            y = y_low as f64;
                        } else {
                            y_high = y_low + 1;
                        }
                        if x_low >= width - 1 {
                            x_low = width - 1;
                            x_high = x_low;
                            x = x_low as f64;
                        } else {
                            x_high = x_low + 1;
                        }
                        let (ly, lx) = (y - y_low as f64, x - x_low as f64);
                        let (hy, hx) = (1.0 - ly, 1.0 - lx);
                        out.push(Sample {
                            pos: [
                                y_low * width + x_low,
                                y_low * width + x_high,
                                y_high * width + x_low,
                                y_high * width + x_high,
                            ],
                            w: [hy * hx, hy * lx, ly * hx, ly * lx],
                        });
                    }
                }
            }
        }
        Ok((out, gh, gw))
    }

    fn run<T: Scalar>(
        &self,
        ctx: &KernelContext<'_>,
        xv: &TensorView<'_>,
        rois: &[f64],
        batch: &[i64],
    ) -> Result<(), PluginError> {
        let &[n, c, h, w] = xv.shape() else {
            return Err(PluginError::invalid(format!(
                "RoiAlign: X must be 4-D, got {:?}",
                xv.shape()
            )));
        };
        let num = batch.len();
        if rois.len() != num * 4 {
            return Err(PluginError::invalid(format!(
                "RoiAlign: rois must be [{num}, 4] to match batch_indices, got {} values",
                rois.len()
            )));
        }
        if let Some(b) = batch.iter().find(|&&b| b < 0 || b as usize >= n) {
            return Err(PluginError::invalid(format!(
                "RoiAlign: batch index {b} out of range for {n} images"
            )));
        }
        let x = xv.as_slice::<T>()?;
        let y = ctx.output_slice::<T>(0, &[num, c, self.out_h, self.out_w])?;
        if y.is_empty() || h == 0 || w == 0 {
            return Ok(());
        }
        // Non-empty y: the bins multiply without overflow.
        let bins = self.out_h * self.out_w;
        let planes = y.len() / bins;
        let yd = crate::nn::Disjoint::new(y);
        // One step per (roi, channel) plane.
        ctx.parallel_for(planes, 1, |range| {
            for pi in range {
                // SAFETY: plane `pi` is written by this step only.
                let out = unsafe { yd.part(pi * bins, bins) };
                self.plane(x, rois, batch, (c, h, w), pi, out)?;
            }
            Ok(())
        })
    }

    /// Output plane `pi` (roi `pi / c`, channel `pi % c`) into `plane`.
    fn plane<T: Scalar>(
        &self,
        x: &[T],
        rois: &[f64],
        batch: &[i64],
        (c, h, w): (usize, usize, usize),
        pi: usize,
        plane: &mut [T],
    ) -> Result<(), PluginError> {
        {
            let (r, ch) = (pi / c, pi % c);
            let (samples, gh, gw) = self.samples(&rois[r * 4..r * 4 + 4], h, w)?;
            let per_bin = gh * gw;
            let count = per_bin.max(1) as f64;
            let data = &x[(batch[r] as usize * c + ch) * h * w..][..h * w];
            for (b, out) in plane.iter_mut().enumerate() {
                let bin = &samples[b * per_bin..(b + 1) * per_bin];
                let v = if self.max {
                    bin.iter()
                        .map(|s| {
                            (0..4)
                                .map(|k| s.w[k] * data[s.pos[k]].to_f64())
                                .fold(f64::NEG_INFINITY, f64::max)
                        })
                        .reduce(f64::max)
                        .unwrap_or(0.0)
                } else {
                    bin.iter()
                        .map(|s| {
                            (0..4)
                                .map(|k| s.w[k] * data[s.pos[k]].to_f64())
                                .sum::<f64>()
                        })
                        .sum::<f64>()
                        / count
                };
                *out = T::from_f64(v);
            }
        }
        Ok(())
    }
}

impl Kernel for RoiAlign {
    fn compute(
        &self,
        ctx: &KernelContext<'_>,
        inputs: &[TensorView<'_>],
    ) -> Result<(), PluginError> {
        let x = required(inputs, 0, "RoiAlign", "X")?;
        let rois = read_f64s(required(inputs, 1, "RoiAlign", "rois")?, "RoiAlign: rois")?;
        let batch = required(inputs, 2, "RoiAlign", "batch_indices")?.to_i64s()?;
        opreg_sdk::dispatch!(x.dtype, FLOATS, |T| self.run::<T>(ctx, x, &rois, &batch), other => Err(unsupported("RoiAlign: X", other)))
    }
}

#[derive(Clone, Debug)]
struct Nms {
    center_point_box: bool,
}

fn nms(node: &NodeInfo<'_>) -> Result<Box<dyn Kernel>, PluginError> {
    let center_point_box = match node.int_or("center_point_box", 0)? {
        0 => false,
        1 => true,
        other => {
            return Err(PluginError::invalid(format!(
                "NonMaxSuppression: center_point_box must be 0 or 1, got {other}"
            )))
        }
    };
    Ok(Box::new(Nms { center_point_box }))
}

impl Nms {
    /// `(x_min, x_max, y_min, y_max)` of a box.
    fn extent(&self, b: &[f32]) -> (f32, f32, f32, f32) {
        if self.center_point_box {
            let (hw, hh) = (b[2] / 2.0, b[3] / 2.0);
            (b[0] - hw, b[0] + hw, b[1] - hh, b[1] + hh)
        } else {
            (
                b[1].min(b[3]),
                b[1].max(b[3]),
                b[0].min(b[2]),
                b[0].max(b[2]),
            )
        }
    }

    fn suppresses(&self, a: &[f32], b: &[f32], iou_threshold: f32) -> bool {
        let (ax0, ax1, ay0, ay1) = self.extent(a);
        let (bx0, bx1, by0, by1) = self.extent(b);
        let (ix0, ix1) = (ax0.max(bx0), ax1.min(bx1));
        if ix1 <= ix0 {
            return false;
        }
        let (iy0, iy1) = (ay0.max(by0), ay1.min(by1));
        if iy1 <= iy0 {
            return false;
        }
        let inter = (ix1 - ix0) * (iy1 - iy0);
        let area_a = (ax1 - ax0) * (ay1 - ay0);
        let area_b = (bx1 - bx0) * (by1 - by0);
        let union = area_a + area_b - inter;
        if inter <= 0.0 || area_a <= 0.0 || area_b <= 0.0 || union <= 0.0 {
            return false;
        }
        inter / union > iou_threshold
    }
}

impl Kernel for Nms {
    fn compute(
        &self,
        ctx: &KernelContext<'_>,
        inputs: &[TensorView<'_>],
    ) -> Result<(), PluginError> {
        let op = "NonMaxSuppression";
        let boxes_v = required(inputs, 0, op, "boxes")?;
        let scores_v = required(inputs, 1, op, "scores")?;
        let (bs, ss) = (boxes_v.shape(), scores_v.shape());
        let (&[nb, nboxes, 4], &[nb2, ncls, nboxes2]) = (bs, ss) else {
            return Err(PluginError::invalid(format!(
                "{op}: boxes must be [batch, boxes, 4] and scores [batch, classes, boxes], got {bs:?} and {ss:?}"
            )));
        };
        if nb != nb2 || nboxes != nboxes2 {
            return Err(PluginError::invalid(format!(
                "{op}: boxes {bs:?} and scores {ss:?} disagree"
            )));
        }
        let (boxes, scores) = (boxes_v.as_slice::<f32>()?, scores_v.as_slice::<f32>()?);
        let present = |i: usize| optional(inputs, i).filter(|t| !t.is_empty());
        let max_per_class = match present(2) {
            Some(t) => t.to_i64s()?[0].max(0) as usize,
            None => 0,
        };
        let iou_threshold = match present(3) {
            Some(t) => t.as_slice::<f32>()?[0],
            None => 0.0,
        };
        let score_threshold = present(4)
            .map(|t| t.as_slice::<f32>().map(|s| s[0]))
            .transpose()?;
        let mut selected: Vec<[i64; 3]> = Vec::new();
        // Grown as scores are read (with no batch, `nboxes` is only a shape).
        let mut candidates: Vec<(f32, usize)> = Vec::new();
        let mut kept: Vec<usize> = Vec::new();
        for b in 0..nb {
            let bb = &boxes[b * nboxes * 4..][..nboxes * 4];
            for c in 0..ncls {
                let sc = &scores[(b * ncls + c) * nboxes..][..nboxes];
                candidates.clear();
                candidates.extend(
                    sc.iter()
                        .enumerate()
                        .filter(|(_, &s)| score_threshold.is_none_or(|t| s > t))
                        .map(|(i, &s)| (s, i)),
                );
                // Highest score first; among equal scores the lower index first.
                candidates.sort_by(|a, b| b.0.total_cmp(&a.0).then(a.1.cmp(&b.1)));
                kept.clear();
                for &(_, i) in &candidates {
                    if kept.len() >= max_per_class {
                        break;
                    }
                    let bi = &bb[i * 4..i * 4 + 4];
                    if kept
                        .iter()
                        .all(|&k| !self.suppresses(bi, &bb[k * 4..k * 4 + 4], iou_threshold))
                    {
                        kept.push(i);
                        selected.push([b as i64, c as i64, i as i64]);
                    }
                }
            }
        }
        let y = ctx.output_slice::<i64>(0, &[selected.len(), 3])?;
        for (dst, s) in y.chunks_exact_mut(3).zip(&selected) {
            dst.copy_from_slice(s);
        }
        Ok(())
    }
}

pub fn register(r: &mut Registrar) {
    let roi_types = &[DType::F16, DType::F32, DType::F64];
    for (since, end) in [(10, 15), (16, OPEN_END)] {
        r.kernel(
            KernelDesc::onnx("RoiAlign", since, end)
                .constraint("T1", roi_types)
                .constraint("T2", &[DType::I64])
                .inputs(&["T1", "T1", "T2"])
                .outputs(&["T1"]),
            roi_align,
        );
    }
    for (since, end) in [(10, 10), (11, OPEN_END)] {
        r.kernel(
            KernelDesc::onnx("NonMaxSuppression", since, end)
                .constraint("tensor(float)", &[DType::F32])
                .constraint("tensor(int64)", &[DType::I64])
                .inputs(&[
                    "tensor(float)",
                    "tensor(float)",
                    "tensor(int64)",
                    "tensor(float)",
                    "tensor(float)",
                ])
                .outputs(&["tensor(int64)"]),
            nms,
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testcases::run_cases;
    use opreg_sdk::{
        host::HostTensor,
        testkit::{run_kernel_opt, NodeSpec},
    };

    #[test]
    fn spatial_nms_suppress_by_iou() {
        // Operators.md, nonmaxsuppression_suppress_by_IOU.
        let boxes = HostTensor::from_vec(
            &[1, 6, 4],
            &[
                0.0f32, 0.0, 1.0, 1.0, 0.0, 0.1, 1.0, 1.1, 0.0, -0.1, 1.0, 0.9, 0.0, 10.0, 1.0,
                11.0, 0.0, 10.1, 1.0, 11.1, 0.0, 100.0, 1.0, 101.0,
            ],
        )
        .expect("boxes");
        let scores =
            HostTensor::from_vec(&[1, 1, 6], &[0.9f32, 0.75, 0.6, 0.95, 0.5, 0.3]).expect("scores");
        let max = HostTensor::from_vec(&[1], &[3i64]).expect("max");
        let iou = HostTensor::from_vec(&[1], &[0.5f32]).expect("iou");
        let score = HostTensor::from_vec(&[1], &[0.0f32]).expect("score");
        let out = run_kernel_opt(
            nms,
            &NodeSpec::onnx("NonMaxSuppression", 11),
            &[
                Some(&boxes),
                Some(&scores),
                Some(&max),
                Some(&iou),
                Some(&score),
            ],
            None,
        )
        .expect("run");
        assert_eq!(out[0].shape(), &[3, 3]);
        assert_eq!(
            out[0].to_vec::<i64>().expect("i64"),
            vec![0, 0, 3, 0, 0, 0, 0, 0, 5]
        );
    }

    #[test]
    fn spatial_roialign_conformance() {
        run_cases(&["test_roialign"], roi_align);
    }

    #[test]
    fn spatial_nms_conformance() {
        run_cases(&["test_nonmaxsuppression"], nms);
    }

    /// A roi of extent 1e30 without sampling_ratio asks for a 1e30-sample grid per bin: the
    /// call fails as too large (the grid used to be allocated infallibly). NMS over an empty
    /// batch with 2^40 boxes selects nothing.
    #[test]
    fn huge_rois_and_empty_batches() {
        let x = HostTensor::from_vec(&[1, 1, 2, 2], &[1.0f32; 4]).expect("x");
        let rois = HostTensor::from_vec(&[1, 4], &[0.0f32, 0.0, 1e30, 1e30]).expect("rois");
        let batch = HostTensor::from_vec(&[1], &[0i64]).expect("batch");
        let node = NodeSpec::onnx("RoiAlign", 16)
            .attr("output_height", AttrValue::Int(1))
            .attr("output_width", AttrValue::Int(1));
        let e = run_kernel_opt(
            roi_align,
            &node,
            &[Some(&x), Some(&rois), Some(&batch)],
            None,
        )
        .expect_err("too large");
        assert_eq!(e.code, ErrorCode::ResourceExhausted, "{}", e.message);

        let boxes = HostTensor::from_vec::<f32>(&[0, 1 << 40, 4], &[]).expect("boxes");
        let scores = HostTensor::from_vec::<f32>(&[0, 1, 1 << 40], &[]).expect("scores");
        let out = run_kernel_opt(
            nms,
            &NodeSpec::onnx("NonMaxSuppression", 11),
            &[Some(&boxes), Some(&scores)],
            None,
        )
        .expect("run");
        assert_eq!(out[0].shape(), &[0, 3]);
    }
}

//! CenterCropPad (opset 18) and Col2Im (opset 18).

use super::{required, row_major_strides, unsupported, Scalar};
use crate::util::{normalize_axis, numel};
use opreg_sdk::{alloc::try_vec, prelude::*};

#[derive(Clone, Debug)]
struct CenterCropPad {
    axes: Option<Vec<i64>>,
}

impl Kernel for CenterCropPad {
    fn compute(
        &self,
        ctx: &KernelContext<'_>,
        inputs: &[TensorView<'_>],
    ) -> Result<(), PluginError> {
        let op = "CenterCropPad";
        let x = required(inputs, 0, op, "input_data")?;
        let target = required(inputs, 1, op, "shape")?.to_i64s()?;
        let in_shape = x.shape();
        let rank = in_shape.len();
        let axes: Vec<usize> = match &self.axes {
            Some(a) => a
                .iter()
                .map(|&a| normalize_axis(a, rank))
                .collect::<Result<_, _>>()?,
            None => (0..rank).collect(),
        };
        if target.len() != axes.len() {
            return Err(PluginError::invalid(format!(
                "{op}: 'shape' has {} elements for {} axes",
                target.len(),
                axes.len()
            )));
        }
        let mut out_shape = in_shape.to_vec();
        // Input index = output index + shift.
        let mut shift = vec![0i64; rank];
        for (&a, &t) in axes.iter().zip(&target) {
            if t < 0 {
                return Err(PluginError::invalid(format!(
                    "{op}: negative target size {t}"
                )));
            }
            let d = in_shape[a] as i64;
            out_shape[a] = t as usize;
            shift[a] = if t <= d { (d - t) / 2 } else { -((t - d) / 2) };
        }
        let size = x.dtype.size();
        let src = x.as_bytes()?;
        let dst = ctx.output(0, x.dtype, &out_shape)?.into_bytes()?;
        if dst.is_empty() {
            return Ok(());
        }
        let in_strides = row_major_strides(in_shape);
        let mut coords = vec![0usize; rank];
        for (i, out) in dst.chunks_exact_mut(size).enumerate() {
            let mut lin = i;
            for d in (0..rank).rev() {
                coords[d] = lin % out_shape[d];
                lin /= out_shape[d];
            }
            let mut off = 0usize;
            let mut inside = true;
            for d in 0..rank {
                let j = coords[d] as i64 + shift[d];
                if j < 0 || j >= in_shape[d] as i64 {
                    inside = false;
                    break;
                }
                off += j as usize * in_strides[d];
            }
            if inside {
                out.copy_from_slice(&src[off * size..(off + 1) * size]);
            }
        }
        Ok(())
    }
}

fn center_crop_pad(node: &NodeInfo<'_>) -> Result<Box<dyn Kernel>, PluginError> {
    Ok(Box::new(CenterCropPad {
        axes: node.ints("axes")?,
    }))
}

#[derive(Clone, Debug)]
struct Col2Im {
    dilations: Option<Vec<i64>>,
    pads: Option<Vec<i64>>,
    strides: Option<Vec<i64>>,
}

impl Col2Im {
    fn run<T: Scalar>(
        &self,
        ctx: &KernelContext<'_>,
        xv: &TensorView<'_>,
        image: &[i64],
        block: &[i64],
    ) -> Result<(), PluginError> {
        let op = "Col2Im";
        let r = image.len();
        let attr = |v: &Option<Vec<i64>>,
                    len: usize,
                    default: i64,
                    name: &str|
         -> Result<Vec<i64>, PluginError> {
            match v {
                None => Ok(vec![default; len]),
                Some(v) if v.len() == len => Ok(v.clone()),
                Some(v) => Err(PluginError::invalid(format!(
                    "{op}: '{name}' has {} values, expected {len}",
                    v.len()
                ))),
            }
        };
        let dil = attr(&self.dilations, r, 1, "dilations")?;
        let pads = attr(&self.pads, 2 * r, 0, "pads")?;
        let strides = attr(&self.strides, r, 1, "strides")?;
        let &[n, cb, l] = xv.shape() else {
            return Err(PluginError::invalid(format!(
                "{op}: input must be 3-D [N, C * prod(block_shape), L], got {:?}",
                xv.shape()
            )));
        };
        if block.len() != r
            || image.iter().chain(block).any(|&v| v <= 0)
            || dil.iter().chain(&strides).any(|&v| v <= 0)
        {
            return Err(PluginError::invalid(format!(
                "{op}: image_shape {image:?}, block_shape {block:?}, dilations {dil:?} and strides {strides:?} must be positive and of one length"
            )));
        }
        // Shapes and attributes are data: products and extents are checked.
        let blk: Vec<usize> = block.iter().map(|&v| v as usize).collect();
        let kernel = numel(&blk)?;
        if cb % kernel != 0 {
            return Err(PluginError::invalid(format!(
                "{op}: input dimension 1 ({cb}) is not a multiple of prod(block_shape) ({kernel})"
            )));
        }
        let c = cb / kernel;
        // Blocks along each dimension.
        let mut blocks = Vec::with_capacity(r);
        for d in 0..r {
            let span = dil[d]
                .checked_mul(block[d] - 1)
                .and_then(|e| e.checked_add(1))
                .and_then(|e| {
                    image[d]
                        .checked_add(pads[d])?
                        .checked_add(pads[r + d])?
                        .checked_sub(e)
                })
                .ok_or_else(|| {
                    PluginError::invalid(format!(
                        "{op}: extents on axis {d} overflow (image_shape {image:?}, block_shape \
                         {block:?}, pads {pads:?}, dilations {dil:?})"
                    ))
                })?;
            if span < 0 {
                return Err(PluginError::invalid(format!(
                    "{op}: block {block:?} does not fit the padded image {image:?}"
                )));
            }
            blocks.push((span / strides[d] + 1) as usize);
        }
        if numel(&blocks)? != l {
            return Err(PluginError::invalid(format!(
                "{op}: input has {l} blocks, image_shape and attributes give {blocks:?}"
            )));
        }
        let img: Vec<usize> = image.iter().map(|&v| v as usize).collect();
        let img_strides = row_major_strides(&img);
        let plane = numel(&img)?;
        let mut out_shape = vec![n, c];
        out_shape.extend_from_slice(&img);
        let x = xv.as_slice::<T>()?;
        let y = ctx.output_slice::<T>(0, &out_shape)?;
        if y.is_empty() {
            return Ok(());
        }
        // One task step per output plane, accumulated in f64 in a buffer of the plane's size
        // (as large as the image the model asks for: allocated fallibly).
        let planes = y.len() / plane;
        let yd = crate::nn::Disjoint::new(y);
        ctx.parallel_for(planes, 1, |range| {
            let mut acc = try_vec(plane, 0.0f64)?;
            let (mut k, mut p) = (vec![0usize; r], vec![0usize; r]);
            for nc in range {
                let (b, ch) = (nc / c, nc % c);
                acc.fill(0.0);
                for kl in 0..kernel {
                    let mut rem = kl;
                    for d in (0..r).rev() {
                        k[d] = rem % blk[d];
                        rem /= blk[d];
                    }
                    let row = &x[((b * c + ch) * kernel + kl) * l..][..l];
                    'blocks: for (ll, v) in row.iter().enumerate() {
                        let mut rem = ll;
                        for d in (0..r).rev() {
                            p[d] = rem % blocks[d];
                            rem /= blocks[d];
                        }
                        let mut off = 0usize;
                        for d in 0..r {
                            let pos = p[d] as i64 * strides[d] - pads[d] + k[d] as i64 * dil[d];
                            if pos < 0 || pos >= image[d] {
                                continue 'blocks;
                            }
                            off += pos as usize * img_strides[d];
                        }
                        acc[off] += v.to_f64();
                    }
                }
                // SAFETY: plane `nc` is written by this step only.
                let out = unsafe { yd.part(nc * plane, plane) };
                for (o, a) in out.iter_mut().zip(&acc) {
                    *o = T::from_f64(*a);
                }
            }
            Ok(())
        })
    }
}

impl Kernel for Col2Im {
    fn compute(
        &self,
        ctx: &KernelContext<'_>,
        inputs: &[TensorView<'_>],
    ) -> Result<(), PluginError> {
        let x = required(inputs, 0, "Col2Im", "input")?;
        let image = required(inputs, 1, "Col2Im", "image_shape")?.to_i64s()?;
        let block = required(inputs, 2, "Col2Im", "block_shape")?.to_i64s()?;
        opreg_sdk::dispatch!(x.dtype, FLOATS, |T| self.run::<T>(ctx, x, &image, &block), other => Err(unsupported("Col2Im: input", other)))
    }
}

fn col2im(node: &NodeInfo<'_>) -> Result<Box<dyn Kernel>, PluginError> {
    Ok(Box::new(Col2Im {
        dilations: node.ints("dilations")?,
        pads: node.ints("pads")?,
        strides: node.ints("strides")?,
    }))
}

pub fn register(r: &mut Registrar) {
    r.kernel(
        KernelDesc::onnx("CenterCropPad", 18, OPEN_END)
            .constraint("T", crate::ALL_TYPES)
            .constraint("Tind", &[DType::I32, DType::I64])
            .inputs(&["T", "Tind"])
            .outputs(&["T"]),
        center_crop_pad,
    );
    r.kernel(
        KernelDesc::onnx("Col2Im", 18, OPEN_END)
            .constraint("T", super::FLOATS)
            .constraint("tensor(int64)", &[DType::I64])
            .inputs(&["T", "tensor(int64)", "tensor(int64)"])
            .outputs(&["T"]),
        col2im,
    );
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testcases::run_cases;
    use opreg_sdk::{
        host::HostTensor,
        testkit::{run_kernel, NodeSpec},
    };

    #[test]
    fn spatial_center_crop_pad_crops_and_pads() {
        // x is [2, 1]: axis 0 is cropped to 1 (keeps row 0), axis 1 padded to 3 (a zero each side).
        let x = HostTensor::from_vec(&[2, 1], &[7i32, 8]).expect("x");
        let shape = HostTensor::from_vec(&[2], &[1i64, 3]).expect("shape");
        let out = run_kernel(
            center_crop_pad,
            &NodeSpec::onnx("CenterCropPad", 18),
            &[&x, &shape],
            None,
        )
        .expect("run");
        assert_eq!(out[0].shape(), &[1, 3]);
        assert_eq!(out[0].to_vec::<i32>().expect("i32"), vec![0, 7, 0]);
    }

    #[test]
    fn spatial_col2im_sums_overlaps() {
        // One channel, 1x2 blocks over a 1x3 image, stride 1: the middle pixel gets two values.
        let x = HostTensor::from_vec(&[1, 2, 2], &[1.0f32, 2.0, 10.0, 20.0]).expect("x");
        let image = HostTensor::from_vec(&[2], &[1i64, 3]).expect("image");
        let block = HostTensor::from_vec(&[2], &[1i64, 2]).expect("block");
        let out = run_kernel(
            col2im,
            &NodeSpec::onnx("Col2Im", 18),
            &[&x, &image, &block],
            None,
        )
        .expect("run");
        assert_eq!(out[0].shape(), &[1, 1, 1, 3]);
        assert_eq!(out[0].to_vec::<f32>().expect("f32"), vec![1.0, 12.0, 20.0]);
    }

    #[test]
    fn spatial_center_crop_pad_conformance() {
        run_cases(&["test_center_crop_pad"], center_crop_pad);
    }

    #[test]
    fn spatial_col2im_conformance() {
        run_cases(&["test_col2im"], col2im);
    }
}

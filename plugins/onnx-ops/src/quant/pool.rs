//! `com.microsoft::NhwcMaxPool` (ONNX Runtime's contrib operator): MaxPool over channels-last
//! 8-bit data (`[N, H, W, C]`, 2-D windows), so that a quantized CNN's max pool sits between
//! channels-last convolutions without a transpose on either side. The maximum commutes with
//! the monotonic (de)quantization, so pooling the bytes equals ONNX's QDQ MaxPool.

use super::{Factory, Q8};
use crate::nn::WindowAttrs;
use crate::util::input;
use opreg_sdk::prelude::*;

const OP: &str = "NhwcMaxPool";

struct NhwcMaxPool(WindowAttrs);

impl Kernel for NhwcMaxPool {
    fn compute(
        &self,
        ctx: &KernelContext<'_>,
        inputs: &[TensorView<'_>],
    ) -> Result<(), PluginError> {
        let x = input(OP, inputs, 0, "x")?;
        let &[n, ih, iw, c] = x.shape() else {
            return Err(PluginError::invalid(format!(
                "{OP}: x must be 4-D [N, H, W, C], got {:?}",
                x.shape()
            )));
        };
        let g = self.0.resolve(OP, &[ih, iw], None)?;
        let [oh_n, ow_n] = [g.out[0], g.out[1]];
        let signed = x.dtype == DType::I8;
        let xb = x.as_bytes()?;
        let out = ctx.output(0, x.dtype, &[n, oh_n, ow_n, c])?.into_bytes()?;
        let row = ow_n * c;
        if out.is_empty() || row == 0 {
            return Ok(());
        }
        let image = ih * iw * c;
        if xb.len() < n * image {
            return Err(PluginError::invalid(format!(
                "{OP}: x is shorter than its shape"
            )));
        }
        // The smallest value of the type, as a byte: what a window entirely in the padding
        // yields (ONNX pads MaxPool with -inf).
        let low = if signed { 0x80u8 } else { 0 };
        let grain = row * 8192usize.div_ceil(row);
        ctx.parallel_chunks(out, grain, |start, chunk| {
            for (k, orow) in chunk.chunks_mut(row).enumerate() {
                let r = start / row + k;
                let (bn, oh) = (r / oh_n, r % oh_n);
                let Some(img) = xb.get(bn * image..(bn + 1) * image) else {
                    return;
                };
                for (ow, pixel) in orow.chunks_exact_mut(c).enumerate() {
                    pixel.fill(low);
                    for kh in 0..g.kernel[0] {
                        let y =
                            (oh * g.strides[0] + kh * g.dilations[0]).wrapping_sub(g.pad_begin[0]);
                        if y >= ih {
                            continue;
                        }
                        for kw in 0..g.kernel[1] {
                            let xx = (ow * g.strides[1] + kw * g.dilations[1])
                                .wrapping_sub(g.pad_begin[1]);
                            if xx >= iw {
                                continue;
                            }
                            let at = (y * iw + xx) * c;
                            let Some(src) = img.get(at..at + c) else {
                                return;
                            };
                            max_bytes(signed, src, pixel);
                        }
                    }
                }
            }
        })
    }
}

crate::simd::simd_fn! {
    /// `acc[i] = max(acc[i], src[i])`, as i8 when `signed`.
    fn max_bytes(signed: bool, src: &[u8], acc: &mut [u8]) {
        if signed {
            for (a, &s) in acc.iter_mut().zip(src) {
                *a = (*a as i8).max(s as i8) as u8;
            }
        } else {
            for (a, &s) in acc.iter_mut().zip(src) {
                *a = (*a).max(s);
            }
        }
    }
}

pub(super) fn factory(node: &NodeInfo<'_>) -> Result<Box<dyn Kernel>, PluginError> {
    let w = WindowAttrs::from_node(node)?;
    if w.kernel_shape.as_ref().map(Vec::len) != Some(2) {
        return Err(PluginError::invalid(format!(
            "{OP}: attribute 'kernel_shape' must give the 2 spatial extents"
        )));
    }
    Ok(Box::new(NhwcMaxPool(w)))
}

pub(super) fn register(r: &mut Registrar) {
    r.kernel(
        KernelDesc::new("com.microsoft", OP, 1, OPEN_END)
            .constraint("T", Q8)
            .inputs(&["T"])
            .outputs(&["T"]),
        factory as Factory,
    );
}

//! Resize over the last one, two or three dimensions: nearest, linear (bilinear, and
//! **trilinear** over three) and cubic, with every coordinate transformation mode but
//! `tf_crop_and_resize`. The host folds the mode into an affine map per dimension
//! (`in = out * scale + shift`), so the kernel does no string work.

use super::module::{Kernels, F};
use super::{count, decline, f32_outputs, optional, required, Env, Reg};
use crate::args;
use opreg_sdk::prelude::*;
use std::sync::Arc;

/// `Resize` of `kernels.cu`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct ResizeArgs {
    pub dims: i32,
    pub r#in: [i64; 3],
    pub out: [i64; 3],
    pub scale: [f32; 3],
    pub shift: [f32; 3],
    pub mode: i32,
    pub nearest: i32,
    pub cubic_a: f32,
    pub exclude_outside: i32,
    pub clamp_negative: i32,
}

/// `Resize3` of `kernels.cu`: linear over three trailing dimensions, 32-bit indices.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Resize3 {
    pub r#in: [i32; 3],
    pub out: [i32; 3],
    pub scale: [f32; 3],
    pub shift: [f32; 3],
    pub clamp_negative: i32,
}

impl ResizeArgs {
    /// The linear fast path's arguments (leading dimensions padded with extents of 1), when
    /// this is a linear resize whose every index fits 32 bits in a run over `total` outputs.
    pub fn linear3(&self, total: usize, input: usize) -> Option<Resize3> {
        if self.mode != 1 || total >= i32::MAX as usize || input >= i32::MAX as usize {
            return None;
        }
        let mut r = Resize3 {
            r#in: [1; 3],
            out: [1; 3],
            clamp_negative: self.clamp_negative,
            ..Default::default()
        };
        let dims = self.dims as usize;
        for d in 0..dims {
            let at = 3 - dims + d;
            r.r#in[at] = i32::try_from(self.r#in[d]).ok()?;
            r.out[at] = i32::try_from(self.out[d]).ok()?;
            r.scale[at] = self.scale[d];
            r.shift[at] = self.shift[d];
        }
        Some(r)
    }
}

/// A Resize node's attributes, as the kernel arguments are planned from them.
pub struct ResizeAttrs {
    mode: i32,
    coords: String,
    nearest: i32,
    cubic_a: f32,
    exclude_outside: bool,
}

struct Resize {
    k: Arc<Kernels>,
    attrs: ResizeAttrs,
}

fn make_resize(k: &Arc<Kernels>, node: &NodeInfo<'_>) -> Result<Box<dyn Kernel>, PluginError> {
    Ok(Box::new(Resize {
        k: k.clone(),
        attrs: ResizeAttrs::from_node(node)?,
    }))
}

impl ResizeAttrs {
    pub fn from_node(node: &NodeInfo<'_>) -> Result<ResizeAttrs, PluginError> {
        if node.int_or("antialias", 0)? != 0 {
            return Err(decline(node, "with antialias"));
        }
        if node.ints("axes")?.is_some() {
            return Err(decline(node, "with axes"));
        }
        if node.string_or("keep_aspect_ratio_policy", "stretch")? != "stretch" {
            return Err(decline(node, "with a keep_aspect_ratio_policy"));
        }
        let coords = node.string_or("coordinate_transformation_mode", "half_pixel")?;
        if coords == "tf_crop_and_resize" {
            return Err(decline(node, "with tf_crop_and_resize"));
        }
        Ok(ResizeAttrs {
            mode: match node.string_or("mode", "nearest")?.as_str() {
                "nearest" => 0,
                "linear" => 1,
                "cubic" => 2,
                other => return Err(PluginError::invalid(format!("Resize: mode '{other}'"))),
            },
            nearest: match node
                .string_or("nearest_mode", "round_prefer_floor")?
                .as_str()
            {
                "round_prefer_floor" => 0,
                "round_prefer_ceil" => 1,
                "floor" => 2,
                "ceil" => 3,
                other => {
                    return Err(PluginError::invalid(format!(
                        "Resize: nearest_mode '{other}'"
                    )))
                }
            },
            coords,
            cubic_a: node.float_or("cubic_coeff_a", -0.75)?,
            exclude_outside: node.int_or("exclude_outside", 0)? != 0,
        })
    }

    /// The output shape and kernel arguments for input shape `xs` with `scales` or `sizes`
    /// (one per dimension; sizes win when both are given).
    pub fn plan(
        &self,
        xs: &[usize],
        scales: Option<&[f32]>,
        sizes: Option<&[i64]>,
    ) -> Result<(Vec<usize>, ResizeArgs), PluginError> {
        let rank = xs.len();
        let (out, scale): (Vec<usize>, Vec<f32>) = match (sizes, scales) {
            (Some(s), _) if s.len() == rank => {
                let out: Vec<usize> = s
                    .iter()
                    .map(|&v| {
                        usize::try_from(v)
                            .map_err(|_| PluginError::invalid(format!("Resize: sizes {s:?}")))
                    })
                    .collect::<Result<_, _>>()?;
                let sc = out
                    .iter()
                    .zip(xs)
                    .map(|(&o, &i)| if i == 0 { 1.0 } else { o as f32 / i as f32 })
                    .collect();
                (out, sc)
            }
            (_, Some(s)) if s.len() == rank => {
                if s.iter().any(|&v| v <= 0.0 || !v.is_finite()) {
                    return Err(PluginError::invalid(format!(
                        "Resize: scales {s:?} must be positive"
                    )));
                }
                let out = xs
                    .iter()
                    .zip(s)
                    .map(|(&i, &v)| (i as f64 * v as f64).floor() as usize)
                    .collect();
                (out, s.to_vec())
            }
            _ => {
                return Err(PluginError::invalid(format!(
                    "Resize: needs scales or sizes with {rank} values"
                )))
            }
        };
        // Leading dimensions that do not change, at most 3 resized ones after them.
        let first = (0..rank)
            .find(|&i| out[i] != xs[i] || scale[i] != 1.0)
            .unwrap_or(rank);
        let dims = (rank - first).max(1).min(rank.max(1));
        if rank - first > 3 {
            return Err(PluginError::unimplemented(format!(
                "cuda: Resize over {} dimensions (the last 3 at most)",
                rank - first
            )));
        }
        let mut a = ResizeArgs {
            dims: dims as i32,
            mode: self.mode,
            nearest: self.nearest,
            cubic_a: self.cubic_a,
            exclude_outside: self.exclude_outside as i32,
            clamp_negative: (self.coords == "pytorch_half_pixel") as i32,
            ..Default::default()
        };
        for d in 0..dims {
            let i = rank - dims + d;
            let (inp, o, s) = (xs[i] as f32, out[i] as f32, scale[i]);
            let (sc, sh) = match self.coords.as_str() {
                "half_pixel" | "pytorch_half_pixel" => (1.0 / s, 0.5 / s - 0.5),
                "asymmetric" => (1.0 / s, 0.0),
                "tf_half_pixel_for_nn" => (1.0 / s, 0.5 / s),
                // The resized length is in * scale unrounded, as the ONNX reference reads it.
                "align_corners" => {
                    let len = inp * s;
                    (
                        if len > 1.0 {
                            (inp - 1.0) / (len - 1.0)
                        } else {
                            0.0
                        },
                        0.0,
                    )
                }
                "half_pixel_symmetric" => {
                    let adjustment = o / (s * inp);
                    let offset = inp / 2.0 * (1.0 - adjustment);
                    (1.0 / s, offset + 0.5 / s - 0.5)
                }
                other => {
                    return Err(PluginError::invalid(format!(
                        "Resize: coordinate_transformation_mode '{other}'"
                    )))
                }
            };
            a.r#in[d] = xs[i] as i64;
            a.out[d] = out[i] as i64;
            a.scale[d] = sc;
            a.shift[d] = sh;
        }
        Ok((out, a))
    }
}

impl Kernel for Resize {
    fn compute(
        &self,
        ctx: &KernelContext<'_>,
        inputs: &[TensorView<'_>],
    ) -> Result<(), PluginError> {
        let env = Env::new(&self.k, ctx);
        let x = required(inputs, 0, "Resize", "X")?;
        // An empty scales or sizes stands for an absent one.
        let given = |i: usize| optional(inputs, i).filter(|t| !t.is_empty());
        let scales = given(2).map(|t| t.as_slice::<f32>()).transpose()?;
        let sizes = given(3).map(|t| t.to_i64s()).transpose()?;
        let (out, a) = self.attrs.plan(x.shape(), scales, sizes.as_deref())?;
        let xp = env.input(x, "X")?;
        let yp = env.output(0, &out)?;
        let total = count(&out)?;
        let resized = count(&out[out.len() - a.dims as usize..])?;
        if x.is_empty() || resized == 0 {
            return Ok(());
        }
        let planes = (total / resized) as u64;
        if let Some(r) = a.linear3(total, x.len()) {
            let planes = planes as u32;
            // SAFETY: resize_linear3_f32(const float*, float*, unsigned planes, Resize3);
            // every index under 2^31 (checked by `linear3`).
            return unsafe { env.launch_n(F::ResizeLinear3, total, &mut args![xp, yp, planes, r]) };
        }
        // SAFETY: resize_f32(const float*, float*, u64 planes, Resize); planes of
        // prod(in) floats in, prod(out) out.
        unsafe { env.launch_n(F::Resize, total, &mut args![xp, yp, planes, a]) }
    }
}

pub fn regs() -> Vec<Reg> {
    vec![Reg {
        domain: "",
        op: "Resize",
        since: 11,
        end: OPEN_END,
        inputs: &["T", "R", "F", "I"],
        outputs: 1,
        host_inputs: &[1, 2, 3],
        make: make_resize,
        facts: f32_outputs,
    }]
}

#[cfg(test)]
mod tests {
    use super::*;

    fn resize(mode: i32, coords: &str) -> ResizeAttrs {
        ResizeAttrs {
            mode,
            coords: coords.into(),
            nearest: 0,
            cubic_a: -0.75,
            exclude_outside: false,
        }
    }

    #[test]
    fn trilinear_over_the_last_three_dimensions() {
        let (out, a) = resize(1, "half_pixel")
            .plan(&[1, 2, 4, 4, 4], Some(&[1.0, 1.0, 2.0, 2.0, 2.0]), None)
            .unwrap();
        assert_eq!(out, vec![1, 2, 8, 8, 8]);
        assert_eq!(a.dims, 3);
        assert_eq!((a.r#in, a.out), ([4, 4, 4], [8, 8, 8]));
        assert_eq!((a.scale[0], a.shift[0]), (0.5, -0.25));
    }

    #[test]
    fn the_linear_fast_path_pads_leading_dimensions() {
        let (out, a) = resize(1, "half_pixel")
            .plan(&[2, 3, 8, 10], Some(&[1.0, 1.0, 2.0, 0.5]), None)
            .unwrap();
        let r = a
            .linear3(out.iter().product(), 2 * 3 * 8 * 10)
            .expect("fits");
        assert_eq!((r.r#in, r.out), ([1, 8, 10], [1, 16, 5]));
        assert_eq!((r.scale[0], r.shift[0]), (0.0, 0.0));
        assert_eq!((r.scale[2], r.shift[2]), (2.0, 0.5));
        // Nearest and cubic, and runs past 32-bit indices, take the general kernel.
        assert!(resize(0, "half_pixel")
            .plan(&[1, 1, 4], Some(&[1.0, 1.0, 2.0]), None)
            .unwrap()
            .1
            .linear3(8, 4)
            .is_none());
        assert!(a.linear3(1 << 31, 10).is_none());
    }

    #[test]
    fn sizes_win_and_set_the_scale() {
        let (out, a) = resize(0, "asymmetric")
            .plan(&[1, 3, 10, 20], None, Some(&[1, 3, 5, 40]))
            .unwrap();
        assert_eq!(out, vec![1, 3, 5, 40]);
        assert_eq!(a.dims, 2);
        assert_eq!(a.scale, [2.0, 0.5, 0.0]);
        let (_, a) = resize(1, "align_corners")
            .plan(&[1, 1, 5, 5], None, Some(&[1, 1, 9, 1]))
            .unwrap();
        assert_eq!(a.scale[..2], [0.5, 0.0]);
    }

    #[test]
    fn resizing_more_than_three_trailing_dimensions_declines() {
        let e = resize(1, "half_pixel")
            .plan(&[2, 2, 2, 2], Some(&[2.0, 2.0, 2.0, 2.0]), None)
            .unwrap_err();
        assert_eq!(e.code, ErrorCode::Unimplemented);
    }
}

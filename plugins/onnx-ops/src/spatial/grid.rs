//! GridSample (opsets 16, 20) and AffineGrid (opset 20).

use super::{required, row_major_strides, unsupported, Scalar, FLOATS};
use crate::util::product_sat;
use opreg_sdk::prelude::*;

#[derive(Clone, Copy, Debug, PartialEq)]
enum Mode {
    Nearest,
    Linear,
    Cubic,
}

#[derive(Clone, Copy, Debug, PartialEq)]
enum Padding {
    Zeros,
    Border,
    Reflection,
}

#[derive(Clone, Debug)]
struct GridSample {
    mode: Mode,
    padding: Padding,
    align_corners: bool,
    /// Opset 16 takes 4-D inputs only.
    only_2d: bool,
}

fn grid_sample(node: &NodeInfo<'_>) -> Result<Box<dyn Kernel>, PluginError> {
    let v20 = node.opset >= 20;
    let mode = match (
        node.string_or("mode", if v20 { "linear" } else { "bilinear" })?
            .as_str(),
        v20,
    ) {
        ("nearest", _) => Mode::Nearest,
        ("bilinear", false) | ("linear", true) => Mode::Linear,
        ("bicubic", false) | ("cubic", true) => Mode::Cubic,
        (other, _) => {
            return Err(PluginError::invalid(format!(
                "GridSample-{}: unsupported mode '{other}'",
                node.opset
            )))
        }
    };
    let padding = match node.string_or("padding_mode", "zeros")?.as_str() {
        "zeros" => Padding::Zeros,
        "border" => Padding::Border,
        "reflection" => Padding::Reflection,
        other => {
            return Err(PluginError::invalid(format!(
                "GridSample: unsupported padding_mode '{other}'"
            )))
        }
    };
    Ok(Box::new(GridSample {
        mode,
        padding,
        align_corners: node.int_or("align_corners", 0)? != 0,
        only_2d: !v20,
    }))
}

/// Reflects `x` by the nearer border until it lies in `[lo, hi]`.
fn reflect(x: f64, lo: f64, hi: f64) -> f64 {
    let range = hi - lo;
    if range <= 0.0 {
        return lo;
    }
    if x < lo {
        let dx = lo - x;
        let n = (dx / range) as i64;
        let r = dx - n as f64 * range;
        if n % 2 == 0 {
            lo + r
        } else {
            hi - r
        }
    } else if x > hi {
        let dx = x - hi;
        let n = (dx / range) as i64;
        let r = dx - n as f64 * range;
        if n % 2 == 0 {
            hi - r
        } else {
            lo + r
        }
    } else {
        x
    }
}

fn cubic_coeffs(t: f64) -> [f64; 4] {
    let a = -0.75;
    let (p, q) = (t + 1.0, 2.0 - t);
    [
        ((a * p - 5.0 * a) * p + 8.0 * a) * p - 4.0 * a,
        ((a + 2.0) * t - (a + 3.0)) * t * t + 1.0,
        ((a + 2.0) * (1.0 - t) - (a + 3.0)) * (1.0 - t) * (1.0 - t) + 1.0,
        ((a * q - 5.0 * a) * q + 8.0 * a) * q - 4.0 * a,
    ]
}

impl GridSample {
    /// The valid-range borders of one spatial dimension of length `d`.
    fn borders(&self, d: usize) -> (f64, f64) {
        if self.align_corners {
            (0.0, d as f64 - 1.0)
        } else {
            (-0.5, d as f64 - 0.5)
        }
    }

    /// The input index that integer position `i` reads, or `None` for a zero.
    fn pixel(&self, i: i64, d: usize) -> Option<usize> {
        let last = d as i64 - 1;
        match self.padding {
            Padding::Zeros => (0..=last).contains(&i).then_some(i as usize),
            Padding::Border => Some(i.clamp(0, last) as usize),
            Padding::Reflection => {
                let (lo, hi) = self.borders(d);
                Some((reflect(i as f64, lo, hi) as i64).clamp(0, last) as usize)
            }
        }
    }

    /// Taps `(input index or zero, weight)` of normalized coordinate `n` along a dimension of
    /// length `d`, appended to `out`.
    fn taps(&self, n: f32, d: usize, out: &mut Vec<(Option<usize>, f64)>) {
        // The reference denormalizes in float32.
        let mut x = if self.align_corners {
            (n + 1.0) / 2.0 * (d as f32 - 1.0)
        } else {
            ((n + 1.0) * d as f32 - 1.0) / 2.0
        } as f64;
        if self.mode == Mode::Nearest {
            // Half to even, as PyTorch (since pytorch#97000) and the ONNX reference round.
            x = x.round_ties_even();
        }
        let (lo, hi) = self.borders(d);
        if x < lo || x > hi {
            x = match self.padding {
                Padding::Zeros => x,
                Padding::Border => x.clamp(0.0, d as f64 - 1.0),
                Padding::Reflection => reflect(x, lo, hi),
            } as f32 as f64;
        }
        match self.mode {
            Mode::Nearest => out.push((self.pixel(x as i64, d), 1.0)),
            Mode::Linear => {
                let x0 = x.floor();
                let t = x - x0;
                let i = x0 as i64;
                out.push((self.pixel(i, d), 1.0 - t));
                out.push((self.pixel(i + 1, d), t));
            }
            Mode::Cubic => {
                let x0 = x.floor();
                let i = x0 as i64;
                for (k, c) in cubic_coeffs(x - x0).into_iter().enumerate() {
                    out.push((self.pixel(i - 1 + k as i64, d), c));
                }
            }
        }
    }

    fn run<T: Scalar, G: Scalar>(
        &self,
        ctx: &KernelContext<'_>,
        xv: &TensorView<'_>,
        gv: &TensorView<'_>,
    ) -> Result<(), PluginError> {
        let (xs, gs) = (xv.shape(), gv.shape());
        let r = xs.len().saturating_sub(2);
        if xs.len() < 3 || gs.len() != r + 2 || gs[0] != xs[0] || gs[r + 1] != r {
            return Err(PluginError::invalid(format!(
                "GridSample: X {xs:?} and grid {gs:?} do not match (grid must be [N, ..., {r}])"
            )));
        }
        if self.only_2d && r != 2 {
            return Err(PluginError::invalid(format!(
                "GridSample-16: X must be 4-D, got {xs:?}"
            )));
        }
        let (x, g) = (xv.as_slice::<T>()?, gv.as_slice::<G>()?);
        let (n, c) = (xs[0], xs[1]);
        let spatial = &xs[2..];
        let out_spatial = &gs[1..=r];
        // Saturating: exact whenever X (or Y) has elements; empty tensors may carry huge
        // extents.
        let plane = product_sat(spatial);
        let out_plane = product_sat(out_spatial);
        let mut out_shape = vec![n, c];
        out_shape.extend_from_slice(out_spatial);
        let y = ctx.output_slice::<T>(0, &out_shape)?;
        if y.is_empty() {
            return Ok(());
        }
        if plane == 0 {
            // No pixel to read (border padding would clamp into an empty range).
            return Err(PluginError::invalid(format!(
                "GridSample: cannot sample the empty input {xs:?}"
            )));
        }
        let in_strides = row_major_strides(spatial);
        ctx.parallel_chunks(y, 256, |start, chunk| {
            let mut taps: Vec<Vec<(Option<usize>, f64)>> = vec![Vec::new(); r];
            for (i, out) in chunk.iter_mut().enumerate() {
                let lin = start + i;
                let o = lin % out_plane;
                let nc = lin / out_plane;
                let b = nc / c;
                let cell = &g[(b * out_plane + o) * r..][..r];
                for (d, t) in taps.iter_mut().enumerate() {
                    t.clear();
                    // The grid holds coordinates innermost dimension first: (x, y, z).
                    self.taps(cell[r - 1 - d].to_f64() as f32, spatial[d], t);
                }
                let base = &x[nc * plane..][..plane];
                *out = T::from_f64(sum(base, &taps, &in_strides, 0, 0));
            }
        })
    }
}

/// The weighted sum over the taps of dimensions `d..`; a `None` tap reads zero.
fn sum<T: Scalar>(
    x: &[T],
    taps: &[Vec<(Option<usize>, f64)>],
    strides: &[usize],
    d: usize,
    base: usize,
) -> f64 {
    let mut s = 0.0;
    for &(i, w) in &taps[d] {
        let Some(i) = i else { continue };
        let off = base + i * strides[d];
        s += w * if d + 1 == taps.len() {
            x[off].to_f64()
        } else {
            sum(x, taps, strides, d + 1, off)
        };
    }
    s
}

impl Kernel for GridSample {
    fn compute(
        &self,
        ctx: &KernelContext<'_>,
        inputs: &[TensorView<'_>],
    ) -> Result<(), PluginError> {
        let x = required(inputs, 0, "GridSample", "X")?;
        let g = required(inputs, 1, "GridSample", "grid")?;
        opreg_sdk::dispatch!(x.dtype, FLOATS, |T| {
            opreg_sdk::dispatch!(g.dtype, FLOATS, |G| self.run::<T, G>(ctx, x, g),
                other => Err(unsupported("GridSample: grid", other)))
        }, other => Err(unsupported("GridSample: X", other)))
    }
}

#[derive(Clone, Debug)]
struct AffineGrid {
    align_corners: bool,
}

impl AffineGrid {
    fn run<T: Scalar>(
        &self,
        ctx: &KernelContext<'_>,
        theta: &TensorView<'_>,
        size: &[i64],
    ) -> Result<(), PluginError> {
        let ts = theta.shape();
        let r = size.len().saturating_sub(2);
        if !(r == 2 || r == 3) || ts != [size[0].max(0) as usize, r, r + 1] {
            return Err(PluginError::invalid(format!(
                "AffineGrid: theta {ts:?} and size {size:?} do not match (theta must be [N, 2, 3] for 4-D sizes, [N, 3, 4] for 5-D)"
            )));
        }
        if size.iter().any(|&d| d < 0) {
            return Err(PluginError::invalid(format!(
                "AffineGrid: negative size {size:?}"
            )));
        }
        let th = theta.as_slice::<T>()?;
        let th: Vec<f64> = th.iter().map(|&v| v.to_f64()).collect();
        // Spatial sizes, outermost first: (D,) H, W.
        let dims: Vec<usize> = size[2..].iter().map(|&d| d as usize).collect();
        let mut out_shape = vec![size[0] as usize];
        out_shape.extend_from_slice(&dims);
        out_shape.push(r);
        let base = |i: usize, d: usize| -> f64 {
            if self.align_corners {
                if d <= 1 {
                    -1.0
                } else {
                    -1.0 + 2.0 * i as f64 / (d - 1) as f64
                }
            } else {
                (2 * i + 1) as f64 / d as f64 - 1.0
            }
        };
        let y = ctx.output_slice::<T>(0, &out_shape)?;
        // Saturating: exact whenever Y has elements.
        let plane = product_sat(&dims);
        ctx.parallel_chunks(y, 4096, |start, chunk| {
            let mut point = vec![0.0f64; r + 1];
            for (k, out) in chunk.iter_mut().enumerate() {
                let lin = start + k;
                let comp = lin % r;
                let p = lin / r;
                let (b, mut pos) = (p / plane, p % plane);
                // point = (x, y[, z], 1): x runs along the innermost dimension.
                for d in (0..r).rev() {
                    point[r - 1 - d] = base(pos % dims[d], dims[d]);
                    pos /= dims[d];
                }
                point[r] = 1.0;
                let row = &th[(b * r + comp) * (r + 1)..][..r + 1];
                *out = T::from_f64(row.iter().zip(&point).map(|(a, b)| a * b).sum());
            }
        })
    }
}

impl Kernel for AffineGrid {
    fn compute(
        &self,
        ctx: &KernelContext<'_>,
        inputs: &[TensorView<'_>],
    ) -> Result<(), PluginError> {
        let theta = required(inputs, 0, "AffineGrid", "theta")?;
        let size = required(inputs, 1, "AffineGrid", "size")?.to_i64s()?;
        opreg_sdk::dispatch!(theta.dtype, FLOATS, |T| self.run::<T>(ctx, theta, &size), other => Err(unsupported("AffineGrid: theta", other)))
    }
}

fn affine_grid(node: &NodeInfo<'_>) -> Result<Box<dyn Kernel>, PluginError> {
    Ok(Box::new(AffineGrid {
        align_corners: node.int_or("align_corners", 0)? != 0,
    }))
}

pub fn register(r: &mut Registrar) {
    for (since, end) in [(16, 19), (20, OPEN_END)] {
        r.kernel(
            KernelDesc::onnx("GridSample", since, end)
                .constraint("T1", FLOATS)
                .constraint("T2", FLOATS)
                .inputs(&["T1", "T2"])
                .outputs(&["T1"]),
            grid_sample,
        );
    }
    r.kernel(
        KernelDesc::onnx("AffineGrid", 20, OPEN_END)
            .constraint("T1", FLOATS)
            .constraint("T2", &[DType::I64])
            .inputs(&["T1", "T2"])
            .outputs(&["T1"]),
        affine_grid,
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
    fn spatial_gridsample_identity_grid_copies_input() {
        // align_corners=1: the corners of the grid are the corner pixels.
        let x = HostTensor::from_vec(&[1, 1, 2, 2], &[1.0f32, 2.0, 3.0, 4.0]).expect("x");
        let grid = HostTensor::from_vec(
            &[1, 2, 2, 2],
            &[-1.0f32, -1.0, 1.0, -1.0, -1.0, 1.0, 1.0, 1.0],
        )
        .expect("grid");
        let node = NodeSpec::onnx("GridSample", 20).attr("align_corners", AttrValue::Int(1));
        let out = run_kernel(grid_sample, &node, &[&x, &grid], None).expect("run");
        assert_eq!(
            out[0].to_vec::<f32>().expect("f32"),
            vec![1.0, 2.0, 3.0, 4.0]
        );
    }

    #[test]
    fn spatial_gridsample_conformance() {
        run_cases(&["test_gridsample"], grid_sample);
    }

    #[test]
    fn spatial_affine_grid_conformance() {
        run_cases(&["test_affine_grid"], affine_grid);
    }
}

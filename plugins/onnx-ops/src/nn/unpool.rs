//! MaxUnpool: scatters X into zeros at the flat positions in I (as MaxPool's indices), over
//! the shape MaxPool's input had; a larger `output_shape` pads that block at the end of
//! each dimension, as the reference implementation does.

use super::{not_implemented_for, optional, register_versions, Float, FLOATS};
use crate::util::{input, required};
use opreg_sdk::{
    alloc::{checked_numel, try_vec},
    prelude::*,
};

#[derive(Clone)]
struct MaxUnpool {
    kernel: Vec<i64>,
    strides: Option<Vec<i64>>,
    pads: Option<Vec<i64>>,
}

fn max_unpool_factory(node: &NodeInfo<'_>) -> Result<Box<dyn Kernel>, PluginError> {
    let kernel = node
        .ints("kernel_shape")?
        .ok_or_else(|| PluginError::invalid("MaxUnpool: attribute 'kernel_shape' is required"))?;
    Ok(Box::new(MaxUnpool {
        kernel,
        strides: node.ints("strides")?,
        pads: node.ints("pads")?,
    }))
}

impl MaxUnpool {
    /// The unpooled shape MaxPool's input had, from X's shape.
    fn inferred(&self, xs: &[usize]) -> Result<Vec<usize>, PluginError> {
        let s = self.kernel.len();
        if xs.len() != s + 2 {
            return Err(PluginError::invalid(format!(
                "MaxUnpool: X {xs:?} must have {} dimensions for kernel_shape {:?}",
                s + 2,
                self.kernel
            )));
        }
        let strides = self.strides.clone().unwrap_or_else(|| vec![1; s]);
        let pads = self.pads.clone().unwrap_or_else(|| vec![0; 2 * s]);
        if strides.len() != s || pads.len() != 2 * s {
            return Err(PluginError::invalid(format!(
                "MaxUnpool: strides {strides:?} / pads {pads:?} do not match kernel_shape {:?}",
                self.kernel
            )));
        }
        let mut out = xs[..2].to_vec();
        for d in 0..s {
            // Checked: the attributes are arbitrary i64s.
            let v = (xs[d + 2] as i64 - 1)
                .checked_mul(strides[d])
                .and_then(|v| v.checked_sub(pads[d]))
                .and_then(|v| v.checked_sub(pads[s + d]))
                .and_then(|v| v.checked_add(self.kernel[d]))
                .ok_or_else(|| {
                    PluginError::invalid(format!(
                        "MaxUnpool: spatial dimension {d} of the output overflows"
                    ))
                })?;
            if v < 0 {
                return Err(PluginError::invalid(format!(
                    "MaxUnpool: spatial dimension {d} of the output would be {v}"
                )));
            }
            out.push(v as usize);
        }
        Ok(out)
    }

    fn run<T: Float>(
        &self,
        ctx: &KernelContext<'_>,
        inputs: &[TensorView<'_>],
    ) -> Result<(), PluginError> {
        let [xv, iv] = required("MaxUnpool", inputs, ["X", "I"])?;
        let xs = xv.shape();
        if iv.shape() != xs {
            return Err(PluginError::invalid(format!(
                "MaxUnpool: I {:?} must have X's shape {xs:?}",
                iv.shape()
            )));
        }
        let inferred = self.inferred(xs)?;
        let shape = match optional(inputs, 2) {
            None => inferred.clone(),
            Some(o) => {
                let o = o.to_i64s()?;
                if o.len() != inferred.len() || o.iter().zip(&inferred).any(|(&a, &b)| a < b as i64)
                {
                    return Err(PluginError::invalid(format!(
                        "MaxUnpool: output_shape {o:?} is smaller than the unpooled shape \
                         {inferred:?}"
                    )));
                }
                o.iter().map(|&v| v as usize).collect()
            }
        };
        // The output first (the host refuses sizes past its limit; it holds at least the
        // block), then the block, fallibly: strides can make it far larger than X.
        let y = ctx.output_slice::<T>(0, &shape)?;
        y.fill(T::default());
        let total = checked_numel(&inferred)?;
        let mut block = try_vec(total, T::default())?;
        let x = xv.as_slice::<T>()?;
        let idx = iv.as_slice::<i64>()?;
        for (&v, &i) in x.iter().zip(idx) {
            if i < 0 || i as usize >= total {
                return Err(PluginError::invalid(format!(
                    "MaxUnpool: index {i} in I is outside the {total} unpooled elements"
                )));
            }
            block[i as usize] = v;
        }
        // Copy the block into the output's leading corner, one innermost row at a time.
        let rank = shape.len();
        let row = inferred[rank - 1];
        let rows = total.checked_div(row).unwrap_or(0);
        let mut at = vec![0usize; rank.saturating_sub(1)];
        for r in 0..rows {
            let mut off = 0;
            for d in 0..rank - 1 {
                off = off * shape[d] + at[d];
            }
            off *= shape[rank - 1];
            y[off..off + row].copy_from_slice(&block[r * row..(r + 1) * row]);
            for d in (0..rank - 1).rev() {
                at[d] += 1;
                if at[d] < inferred[d] {
                    break;
                }
                at[d] = 0;
            }
        }
        Ok(())
    }
}

impl Kernel for MaxUnpool {
    fn compute(
        &self,
        ctx: &KernelContext<'_>,
        inputs: &[TensorView<'_>],
    ) -> Result<(), PluginError> {
        let dtype = input("MaxUnpool", inputs, 0, "X")?.dtype;
        opreg_sdk::dispatch!(dtype, FLOATS, |T| self.run::<T>(ctx, inputs), other => Err(not_implemented_for("MaxUnpool", other)))
    }
}

pub fn register(r: &mut Registrar) {
    register_versions(
        r,
        "MaxUnpool",
        &[9, 11, 22],
        &[("T1", FLOATS), ("T2", &[DType::I64])],
        &["T1", "T2", "T2"],
        &["T1"],
        max_unpool_factory,
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
    fn max_unpool_by_hand() {
        // X [1,1,1,2] at flat positions 1 and 2 of a [1,1,2,2] block (kernel 2x1, stride 2x1)
        // -> block [[0,5],[6,0]]; output_shape [1,1,3,3] pads it at the ends.
        let x = HostTensor::from_vec(&[1, 1, 1, 2], &[5.0f32, 6.0]).expect("x");
        let i = HostTensor::from_vec(&[1, 1, 1, 2], &[1i64, 2]).expect("i");
        let node = NodeSpec::onnx("MaxUnpool", 22)
            .attr("kernel_shape", AttrValue::Ints(vec![2, 1]))
            .attr("strides", AttrValue::Ints(vec![2, 1]));
        let out =
            run_kernel_opt(max_unpool_factory, &node, &[Some(&x), Some(&i)], None).expect("run");
        assert_eq!(out[0].shape(), &[1, 1, 2, 2]);
        assert_eq!(
            out[0].to_vec::<f32>().expect("f32"),
            vec![0.0, 5.0, 6.0, 0.0]
        );
        let shape = HostTensor::from_vec(&[4], &[1i64, 1, 3, 3]).expect("shape");
        let out = run_kernel_opt(
            max_unpool_factory,
            &node,
            &[Some(&x), Some(&i), Some(&shape)],
            None,
        )
        .expect("run");
        assert_eq!(
            out[0].to_vec::<f32>().expect("f32"),
            vec![0.0, 5.0, 0.0, 6.0, 0.0, 0.0, 0.0, 0.0, 0.0]
        );
    }

    #[test]
    fn max_unpool_official_cases() {
        crate::testcases::run_cases(&["test_maxunpool"], max_unpool_factory);
    }

    /// Strides of 2^40 unpool a 2-element X into ~2^40 elements: refused as too large (the
    /// block used to be allocated infallibly); strides that overflow are invalid.
    #[test]
    fn huge_strides_are_refused() {
        let x = HostTensor::from_vec(&[1, 1, 2], &[5.0f32, 6.0]).expect("x");
        let i = HostTensor::from_vec(&[1, 1, 2], &[0i64, 1]).expect("i");
        for (strides, code) in [
            (1i64 << 40, ErrorCode::ResourceExhausted),
            (i64::MAX, ErrorCode::InvalidArgument),
        ] {
            let node = NodeSpec::onnx("MaxUnpool", 22)
                .attr("kernel_shape", AttrValue::Ints(vec![2]))
                .attr("strides", AttrValue::Ints(vec![strides]));
            let e = run_kernel_opt(max_unpool_factory, &node, &[Some(&x), Some(&i)], None)
                .expect_err("too large");
            assert_eq!(e.code, code, "{}", e.message);
        }
    }
}

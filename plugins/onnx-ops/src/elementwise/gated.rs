//! Swish, SwiGLU and Shrink. Float kernels round every intermediate to the element type, as
//! the reference's numpy arithmetic in that type does (exact for f32 and f64).

use crate::util::{input, not_implemented_for, required};
use opreg_sdk::numeric::{Arith, Float, Real, Scalar, FLOATS};
use opreg_sdk::prelude::*;

/// Elements per parallel task.
const GRAIN: usize = 1 << 14;

/// `v` rounded to `T` and back.
#[inline(always)]
fn r<T: Float>(v: T::Compute) -> T::Compute {
    T::store(v).load()
}

/// `x * sigmoid(alpha * x)`, each step in `T`: `x * (1 / (1 + exp(-alpha * x)))`.
#[inline(always)]
fn swish<T: Float>(x: T, alpha: T::Compute) -> T::Compute {
    let x = x.load();
    let e = r::<T>(r::<T>(-(alpha * x)).exp());
    let s = r::<T>(<T as Scalar>::Compute::ONE / r::<T>(<T as Scalar>::Compute::ONE + e));
    r::<T>(x * s)
}

fn fill<T: Float, F: Fn(usize) -> T + Sync>(
    ctx: &KernelContext<'_>,
    shape: &[usize],
    f: F,
) -> Result<(), PluginError> {
    let y = ctx.output_slice::<T>(0, shape)?;
    ctx.parallel_chunks(y, GRAIN, |start, chunk| {
        for (j, v) in chunk.iter_mut().enumerate() {
            *v = f(start + j);
        }
    })
}

/// Swish (opset 24): `x * sigmoid(alpha * x)`.
#[derive(Clone)]
pub(crate) struct Swish {
    alpha: f32,
}

impl Swish {
    pub fn from_node(node: &NodeInfo<'_>) -> Result<Box<dyn Kernel>, PluginError> {
        Ok(Box::new(Swish {
            alpha: node.float_or("alpha", 1.0)?,
        }))
    }
}

impl Kernel for Swish {
    fn compute(
        &self,
        ctx: &KernelContext<'_>,
        inputs: &[TensorView<'_>],
    ) -> Result<(), PluginError> {
        let x = input("Swish", inputs, 0, "X")?;
        opreg_sdk::dispatch!(x.dtype, FLOATS, |T| {
                    let xs = x.as_slice::<T>()?;
            let alpha = r::<T>(<T as Scalar>::Compute::from_f64(self.alpha as f64));
            fill::<T, _>(ctx, x.shape(), |i| T::store(swish(xs[i], alpha)))
        }, other => Err(not_implemented_for("Swish", other)))
    }
}

/// SwiGLU (opset 28): `Swish_alpha(A) * B`, A and B of one shape.
#[derive(Clone)]
pub(crate) struct SwiGlu {
    alpha: f32,
}

impl SwiGlu {
    pub fn from_node(node: &NodeInfo<'_>) -> Result<Box<dyn Kernel>, PluginError> {
        Ok(Box::new(SwiGlu {
            alpha: node.float_or("alpha", 1.0)?,
        }))
    }
}

impl Kernel for SwiGlu {
    fn compute(
        &self,
        ctx: &KernelContext<'_>,
        inputs: &[TensorView<'_>],
    ) -> Result<(), PluginError> {
        let [a, b] = required("SwiGLU", inputs, ["A", "B"])?;
        if a.shape() != b.shape() || a.dtype != b.dtype {
            return Err(PluginError::invalid(format!(
                "SwiGLU: A ({} {:?}) and B ({} {:?}) must have one type and shape \
                 (no broadcasting)",
                a.dtype,
                a.shape(),
                b.dtype,
                b.shape()
            )));
        }
        opreg_sdk::dispatch!(a.dtype, FLOATS, |T| {
                    let (av, bv) = (a.as_slice::<T>()?, b.as_slice::<T>()?);
            let alpha = r::<T>(<T as Scalar>::Compute::from_f64(self.alpha as f64));
            fill::<T, _>(ctx, a.shape(), |i| {
                T::store(swish(av[i], alpha) * bv[i].load())
            })
        }, other => Err(not_implemented_for("SwiGLU", other)))
    }
}

/// Shrink (opset 9): `x + bias` below `-lambd`, `x - bias` above `lambd`, 0 between.
#[derive(Clone)]
pub(crate) struct Shrink {
    bias: f32,
    lambd: f32,
}

impl Shrink {
    pub fn from_node(node: &NodeInfo<'_>) -> Result<Box<dyn Kernel>, PluginError> {
        Ok(Box::new(Shrink {
            bias: node.float_or("bias", 0.0)?,
            lambd: node.float_or("lambd", 0.5)?,
        }))
    }

    /// Integer inputs: computed in f64 (numpy promotes to float64), then cast back.
    fn ints<T: Element + Copy>(
        &self,
        ctx: &KernelContext<'_>,
        x: &TensorView<'_>,
        to: fn(T) -> f64,
        from: fn(f64) -> T,
    ) -> Result<(), PluginError> {
        let xs = x.as_slice::<T>()?;
        let (bias, lambd) = (self.bias as f64, self.lambd as f64);
        let y = ctx.output_slice::<T>(0, x.shape())?;
        ctx.parallel_chunks(y, GRAIN, |start, chunk| {
            for (j, v) in chunk.iter_mut().enumerate() {
                let x = to(xs[start + j]);
                *v = from(if x < -lambd {
                    x + bias
                } else if x > lambd {
                    x - bias
                } else {
                    0.0
                });
            }
        })
    }
}

impl Kernel for Shrink {
    fn compute(
        &self,
        ctx: &KernelContext<'_>,
        inputs: &[TensorView<'_>],
    ) -> Result<(), PluginError> {
        let x = input("Shrink", inputs, 0, "input")?;
        opreg_sdk::dispatch!(x.dtype, INTEGERS, |T| {
            self.ints::<T>(ctx, &x, Scalar::to_f64, Scalar::from_f64)
        }, dtype => opreg_sdk::dispatch!(dtype, FLOATS, |T| {
                            let xs = x.as_slice::<T>()?;
                let c = |v: f32| r::<T>(<T as Scalar>::Compute::from_f64(v as f64));
                let (bias, lambd) = (c(self.bias), c(self.lambd));
                fill::<T, _>(ctx, x.shape(), |i| {
                    let v = xs[i].load();
                    T::store(if v < -lambd {
                        v + bias
                    } else if v > lambd {
                        v - bias
                    } else {
                        <T as Scalar>::Compute::ZERO
                    })
                })
            }, other => Err(not_implemented_for("Shrink", other))))
    }
}

pub fn register(r: &mut Registrar) {
    use opreg_sdk::dtype::names::*;
    let one = |op: &str, since: i32, types: &[DType], n: usize| {
        KernelDesc::onnx(op, since, OPEN_END)
            .constraint("T", types)
            .inputs(&vec!["T"; n])
            .outputs(&["T"])
    };
    r.kernel(one("Swish", 24, FLOATS, 1), Swish::from_node);
    r.kernel(one("SwiGLU", 28, FLOATS, 2), SwiGlu::from_node);
    r.kernel(
        one(
            "Shrink",
            9,
            &[U8, I8, U16, I16, U32, I32, U64, I64, F16, F32, F64],
            1,
        ),
        Shrink::from_node,
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
    fn swish_swiglu_shrink_by_hand() {
        let x = HostTensor::from_vec(&[4], &[-2.0f64, 0.0, 1.0, 3.0]).expect("x");
        let sig = |v: f64| 1.0 / (1.0 + (-v).exp());
        let node = NodeSpec::onnx("Swish", 24).attr("alpha", AttrValue::Float(0.5));
        let y = run_kernel(Swish::from_node, &node, &[&x], None).expect("swish");
        let got = y[0].to_vec::<f64>().expect("f64");
        for (g, v) in got.iter().zip([-2.0, 0.0, 1.0, 3.0]) {
            assert!((g - v * sig(0.5 * v)).abs() < 1e-12, "{g} vs {v}");
        }
        let b = HostTensor::from_vec(&[4], &[1.0f64, 5.0, 2.0, -1.0]).expect("b");
        let node = NodeSpec::onnx("SwiGLU", 28);
        let y = run_kernel(SwiGlu::from_node, &node, &[&x, &b], None).expect("swiglu");
        let got = y[0].to_vec::<f64>().expect("f64");
        for ((g, v), w) in got
            .iter()
            .zip([-2.0, 0.0, 1.0, 3.0])
            .zip([1.0, 5.0, 2.0, -1.0])
        {
            assert!((g - v * sig(v) * w).abs() < 1e-12, "{g}");
        }
        let short = HostTensor::from_vec(&[2], &[1.0f64, 2.0]).expect("short");
        assert!(run_kernel(SwiGlu::from_node, &node, &[&x, &short], None).is_err());
        // Shrink: lambd 1.5, bias 1 on [-2, -1, 0, 2] -> [-1, 0, 0, 1]; integers too.
        let node = NodeSpec::onnx("Shrink", 9)
            .attr("lambd", AttrValue::Float(1.5))
            .attr("bias", AttrValue::Float(1.0));
        let x = HostTensor::from_vec(&[4], &[-2.0f32, -1.0, 0.0, 2.0]).expect("x");
        let y = run_kernel(Shrink::from_node, &node, &[&x], None).expect("shrink");
        assert_eq!(
            y[0].to_vec::<f32>().expect("f32"),
            vec![-1.0, 0.0, 0.0, 1.0]
        );
        let x = HostTensor::from_vec(&[4], &[-2i32, -1, 0, 2]).expect("x");
        let y = run_kernel(Shrink::from_node, &node, &[&x], None).expect("shrink");
        assert_eq!(y[0].to_vec::<i32>().expect("i32"), vec![-1, 0, 0, 1]);
    }

    #[test]
    fn official_cases() {
        run_cases(&["test_swish"], Swish::from_node);
        run_cases(&["test_swiglu"], SwiGlu::from_node);
        run_cases(&["test_shrink"], Shrink::from_node);
    }
}

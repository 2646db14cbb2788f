//! Cumulative operators: `CumProd` (`CumSum` is with the reductions).

use crate::util::{normalize_axis, product_sat, required, scalar_i64, Factory};
use opreg_sdk::half::{bf16, f16};
use opreg_sdk::numeric::INDICES;
use opreg_sdk::prelude::*;

trait Product: Element {
    fn one() -> Self;
    fn times(self, other: Self) -> Self;
}

macro_rules! int_product {
    ($($t:ty),*) => {$(
        impl Product for $t {
            fn one() -> Self { 1 }
            fn times(self, other: Self) -> Self { self.wrapping_mul(other) }
        }
    )*};
}
int_product!(u32, u64, i32, i64);

impl Product for f32 {
    fn one() -> Self {
        1.0
    }
    fn times(self, other: Self) -> Self {
        self * other
    }
}
impl Product for f64 {
    fn one() -> Self {
        1.0
    }
    fn times(self, other: Self) -> Self {
        self * other
    }
}
impl Product for f16 {
    fn one() -> Self {
        f16::ONE
    }
    fn times(self, other: Self) -> Self {
        f16::from_f32(self.to_f32() * other.to_f32())
    }
}
impl Product for bf16 {
    fn one() -> Self {
        bf16::ONE
    }
    fn times(self, other: Self) -> Self {
        bf16::from_f32(self.to_f32() * other.to_f32())
    }
}

#[derive(Clone)]
struct CumProd {
    exclusive: bool,
    reverse: bool,
}

impl CumProd {
    fn run<T: Product>(
        &self,
        ctx: &KernelContext<'_>,
        x: &TensorView<'_>,
        axis: usize,
    ) -> Result<(), PluginError> {
        let xs = x.as_slice::<T>()?;
        let shape = x.shape();
        let d = shape[axis];
        // Saturating: exact whenever x has elements.
        let post = product_sat(&shape[axis + 1..]);
        let y = ctx.output_slice::<T>(0, shape)?;
        if y.is_empty() {
            return Ok(());
        }
        // Each chunk is one [d, post] slab.
        ctx.parallel_chunks(y, d * post, |start, slab| {
            let src = &xs[start..start + slab.len()];
            for q in 0..post {
                let mut acc = T::one();
                for step in 0..d {
                    let j = if self.reverse { d - 1 - step } else { step };
                    let v = src[j * post + q];
                    if self.exclusive {
                        slab[j * post + q] = acc;
                        acc = acc.times(v);
                    } else {
                        acc = acc.times(v);
                        slab[j * post + q] = acc;
                    }
                }
            }
        })
    }
}

impl Kernel for CumProd {
    fn compute(
        &self,
        ctx: &KernelContext<'_>,
        inputs: &[TensorView<'_>],
    ) -> Result<(), PluginError> {
        let [x, axis] = required("CumProd", inputs, ["x", "axis"])?;
        let x = &x;
        let axis = scalar_i64(&axis, "CumProd", "axis")?;
        if x.rank() == 0 {
            return Err(PluginError::invalid("CumProd: x must have rank >= 1"));
        }
        let axis = normalize_axis(axis, x.rank())?;
        match x.dtype {
            DType::U32 => self.run::<u32>(ctx, x, axis),
            DType::U64 => self.run::<u64>(ctx, x, axis),
            DType::I32 => self.run::<i32>(ctx, x, axis),
            DType::I64 => self.run::<i64>(ctx, x, axis),
            DType::F32 => self.run::<f32>(ctx, x, axis),
            DType::F64 => self.run::<f64>(ctx, x, axis),
            DType::F16 => self.run::<f16>(ctx, x, axis),
            DType::BF16 => self.run::<bf16>(ctx, x, axis),
            other => Err(PluginError::unimplemented(format!(
                "CumProd: type {other} is not supported"
            ))),
        }
    }
}

fn cumprod_factory(node: &NodeInfo<'_>) -> Result<Box<dyn Kernel>, PluginError> {
    Ok(Box::new(CumProd {
        exclusive: node.int_or("exclusive", 0)? != 0,
        reverse: node.int_or("reverse", 0)? != 0,
    }))
}

pub fn register(r: &mut Registrar) {
    r.kernel(
        KernelDesc::onnx("CumProd", 26, OPEN_END)
            .constraint(
                "T",
                &[
                    DType::U32,
                    DType::U64,
                    DType::I32,
                    DType::I64,
                    DType::F16,
                    DType::F32,
                    DType::F64,
                    DType::BF16,
                ],
            )
            .constraint("T2", INDICES)
            .inputs(&["T", "T2"])
            .outputs(&["T"]),
        cumprod_factory as Factory,
    );
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::util::testing::{run, t};
    use opreg_sdk::testkit::NodeSpec;

    #[test]
    fn cumprod_modes() {
        let x = t(&[3], &[1.0f32, 2.0, 3.0]);
        let axis = t::<i64>(&[], &[0]);
        let case = |ex: i64, rev: i64| {
            let node = NodeSpec::onnx("CumProd", 26)
                .attr("exclusive", AttrValue::Int(ex))
                .attr("reverse", AttrValue::Int(rev));
            run(cumprod_factory, node, &[Some(&x), Some(&axis)]).unwrap()[0]
                .to_vec::<f32>()
                .unwrap()
        };
        // Operators.md examples.
        assert_eq!(case(0, 0), vec![1.0, 2.0, 6.0]);
        assert_eq!(case(1, 0), vec![1.0, 1.0, 2.0]);
        assert_eq!(case(0, 1), vec![6.0, 6.0, 3.0]);
        assert_eq!(case(1, 1), vec![6.0, 3.0, 1.0]);
        // 2-D, negative axis, int32 axis input, i64 data.
        let x = t(&[2, 3], &[1i64, 2, 3, 4, 5, 6]);
        let axis = t::<i32>(&[], &[-1]);
        let out = run(
            cumprod_factory,
            NodeSpec::onnx("CumProd", 26),
            &[Some(&x), Some(&axis)],
        )
        .unwrap();
        assert_eq!(out[0].to_vec::<i64>().unwrap(), vec![1, 2, 6, 4, 20, 120]);
        let axis = t::<i64>(&[], &[0]);
        let out = run(
            cumprod_factory,
            NodeSpec::onnx("CumProd", 26),
            &[Some(&x), Some(&axis)],
        )
        .unwrap();
        assert_eq!(out[0].to_vec::<i64>().unwrap(), vec![1, 2, 3, 4, 10, 18]);
        let x = t(&[2, 2], &[2i32, 3, 4, 5]);
        let node = NodeSpec::onnx("CumProd", 26).attr("exclusive", AttrValue::Int(1));
        let out = run(cumprod_factory, node, &[Some(&x), Some(&axis)]).unwrap();
        assert_eq!(out[0].to_vec::<i32>().unwrap(), vec![1, 1, 2, 3]);
    }
}

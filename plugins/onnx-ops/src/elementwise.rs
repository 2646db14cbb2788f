//! Elementwise operators: activations, unary math, binary arithmetic, comparison and logic
//! with broadcasting.

use opreg_sdk::prelude::*;

#[derive(Clone)]
struct Relu;

impl Kernel for Relu {
    fn compute(
        &self,
        ctx: &KernelContext<'_>,
        inputs: &[TensorView<'_>],
    ) -> Result<(), PluginError> {
        let x = inputs[0].as_slice::<f32>()?;
        let y = ctx.output_slice::<f32>(0, inputs[0].shape())?;
        ctx.parallel_chunks(y, 16 * 1024, |start, out| {
            for (o, v) in out.iter_mut().zip(&x[start..]) {
                *o = v.max(0.0);
            }
        })
    }
}

pub fn register(r: &mut Registrar) {
    r.kernel(
        KernelDesc::onnx("Relu", 6, OPEN_END)
            .constraint("T", &[DType::F32])
            .inputs(&["T"])
            .outputs(&["T"]),
        stateless(Relu),
    );
}

#[cfg(test)]
mod tests {
    use super::*;
    use opreg_sdk::{
        host::HostTensor,
        testkit::{run_kernel, NodeSpec},
    };

    #[test]
    fn relu_clamps_negatives() {
        let x = HostTensor::from_vec(&[4], &[-1.0f32, 0.0, 2.5, -0.0]).expect("x");
        let out =
            run_kernel(stateless(Relu), &NodeSpec::onnx("Relu", 14), &[&x], None).expect("run");
        assert_eq!(
            out[0].to_vec::<f32>().expect("f32"),
            vec![0.0, 0.0, 2.5, 0.0]
        );
    }
}

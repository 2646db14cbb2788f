//! Neural-network operators: matrix products (through the BLAS backend), convolution,
//! pooling, normalisation, softmax.

use opreg_sdk::prelude::*;

#[derive(Clone)]
struct MatMul2d;

impl Kernel for MatMul2d {
    fn compute(
        &self,
        ctx: &KernelContext<'_>,
        inputs: &[TensorView<'_>],
    ) -> Result<(), PluginError> {
        let (a, b) = (inputs[0], inputs[1]);
        let (&[m, k], &[k2, n]) = (a.shape(), b.shape()) else {
            return Err(PluginError::unimplemented(format!(
                "MatMul of shapes {:?} x {:?}: only 2-D operands so far",
                a.shape(),
                b.shape()
            )));
        };
        if k != k2 {
            return Err(PluginError::invalid(format!(
                "MatMul: inner dimensions differ ({m}x{k} * {k2}x{n})"
            )));
        }
        let blas = ctx.blas().ok_or_else(|| {
            PluginError::unimplemented(format!("MatMul needs a BLAS backend on {}", ctx.device()))
        })?;
        let c = ctx.output_slice::<f32>(0, &[m, n])?;
        let args = GemmArgs::f32(m, n, k, a.as_slice()?, b.as_slice()?, c)?;
        blas.gemm(ctx, &args)
    }
}

pub fn register(r: &mut Registrar) {
    r.kernel(
        KernelDesc::onnx("MatMul", 1, OPEN_END)
            .constraint("T", &[DType::F32])
            .inputs(&["T", "T"])
            .outputs(&["T"]),
        stateless(MatMul2d),
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
    fn matmul_without_blas_is_a_clear_error() {
        let a = HostTensor::from_vec(&[1, 2], &[1.0f32, 2.0]).expect("a");
        let b = HostTensor::from_vec(&[2, 1], &[3.0f32, 4.0]).expect("b");
        let err = run_kernel(
            stateless(MatMul2d),
            &NodeSpec::onnx("MatMul", 13),
            &[&a, &b],
            None,
        )
        .expect_err("no blas");
        assert!(
            err.message.contains("needs a BLAS backend"),
            "{}",
            err.message
        );
    }
}

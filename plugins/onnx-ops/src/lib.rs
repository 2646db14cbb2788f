//! ONNX standard operators (skeleton: the full operator set arrives with the graph runtime).
//!
//! Registered here: `Relu` and `Identity`, and `MatMul` for 2-D f32, which goes through the
//! node's BLAS backend like every matrix operator will.

use opreg_sdk::prelude::*;

const ALL_TYPES: &[DType] = &[
    DType::Bool,
    DType::U8,
    DType::I8,
    DType::U16,
    DType::I16,
    DType::U32,
    DType::I32,
    DType::U64,
    DType::I64,
    DType::F16,
    DType::BF16,
    DType::F32,
    DType::F64,
];

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

#[derive(Clone)]
struct Identity;

impl Kernel for Identity {
    fn compute(
        &self,
        ctx: &KernelContext<'_>,
        inputs: &[TensorView<'_>],
    ) -> Result<(), PluginError> {
        let x = inputs[0];
        let y = ctx.output(0, x.dtype, x.shape())?;
        y.into_bytes()?.copy_from_slice(x.as_bytes()?);
        Ok(())
    }
}

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

fn register(r: &mut Registrar) {
    r.kernel(
        KernelDesc::onnx("Relu", 6, OPEN_END)
            .constraint("T", &[DType::F32])
            .inputs(&["T"])
            .outputs(&["T"]),
        stateless(Relu),
    );
    r.kernel(
        KernelDesc::onnx("Identity", 1, OPEN_END)
            .constraint("T", ALL_TYPES)
            .inputs(&["T"])
            .outputs(&["T"]),
        stateless(Identity),
    );
    r.kernel(
        KernelDesc::onnx("MatMul", 1, OPEN_END)
            .constraint("T", &[DType::F32])
            .inputs(&["T", "T"])
            .outputs(&["T"]),
        stateless(MatMul2d),
    );
}

opreg_sdk::export_plugin! {
    name: "onnx-ops",
    version: env!("CARGO_PKG_VERSION"),
    description: "ONNX standard operators",
    register: register,
}

#[cfg(test)]
mod tests {
    use super::*;
    use opreg_sdk::{
        host::HostTensor,
        testkit::{run_kernel, NodeSpec},
    };

    fn f32s(t: &HostTensor) -> Vec<f32> {
        t.bytes()
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect()
    }

    fn tensor(shape: &[usize], v: &[f32]) -> HostTensor {
        let b: Vec<u8> = v.iter().flat_map(|x| x.to_le_bytes()).collect();
        HostTensor::from_bytes(DType::F32, shape, &b).expect("tensor")
    }

    #[test]
    fn relu_clamps_negatives() {
        let x = tensor(&[4], &[-1.0, 0.0, 2.5, -0.0]);
        let out =
            run_kernel(stateless(Relu), &NodeSpec::onnx("Relu", 14), &[&x], None).expect("run");
        assert_eq!(f32s(&out[0]), vec![0.0, 0.0, 2.5, 0.0]);
    }

    #[test]
    fn matmul_without_blas_is_a_clear_error() {
        let a = tensor(&[1, 2], &[1.0, 2.0]);
        let b = tensor(&[2, 1], &[3.0, 4.0]);
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

    #[test]
    fn identity_copies_any_type() {
        let x = HostTensor::from_bytes(
            DType::I64,
            &[2],
            &[1, 0, 0, 0, 0, 0, 0, 0, 2, 0, 0, 0, 0, 0, 0, 0],
        )
        .expect("t");
        let out = run_kernel(
            stateless(Identity),
            &NodeSpec::onnx("Identity", 16),
            &[&x],
            None,
        )
        .expect("run");
        assert_eq!(out[0].bytes(), x.bytes());
        assert_eq!(out[0].dtype(), DType::I64);
    }
}

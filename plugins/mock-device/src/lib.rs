//! A mock device for placement tests: kernels on `Device::MOCK`, whose memory is host memory,
//! so preference lists, fallback to the CPU and device boundaries are exercised without a GPU.
//!
//! Registers `Relu` (f32) on the mock device. A model whose config prefers
//! `["mock", "cpu"]` runs Relu here and everything else on the CPU.

use opreg_sdk::prelude::*;

#[derive(Clone)]
struct MockRelu;

impl Kernel for MockRelu {
    fn compute(
        &self,
        ctx: &KernelContext<'_>,
        inputs: &[TensorView<'_>],
    ) -> Result<(), PluginError> {
        if ctx.device() != Device::MOCK {
            return Err(PluginError::internal(format!(
                "mock-device kernel called on {}",
                ctx.device()
            )));
        }
        let x = inputs[0].as_slice::<f32>()?;
        let y = ctx.output_slice::<f32>(0, inputs[0].shape())?;
        for (o, v) in y.iter_mut().zip(x) {
            *o = v.max(0.0);
        }
        Ok(())
    }
}

fn register(r: &mut Registrar) {
    r.kernel(
        KernelDesc::onnx("Relu", 6, OPEN_END)
            .constraint("T", &[DType::F32])
            .inputs(&["T"])
            .outputs(&["T"])
            .device(Device::MOCK),
        stateless(MockRelu),
    );
}

opreg_sdk::export_plugin! {
    name: "mock-device",
    version: env!("CARGO_PKG_VERSION"),
    description: "mock device (host memory) for placement tests",
    register: register,
}

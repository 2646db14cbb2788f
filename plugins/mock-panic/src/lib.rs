//! A mock plugin whose kernel panics: the SDK must turn the panic into an error for that one
//! call, and the daemon must keep serving.

use opreg_sdk::prelude::*;

#[derive(Clone)]
struct Panics;

impl Kernel for Panics {
    fn compute(
        &self,
        ctx: &KernelContext<'_>,
        inputs: &[TensorView<'_>],
    ) -> Result<(), PluginError> {
        // Panic inside a parallel task as well as on the calling thread, depending on input:
        // both paths must be caught.
        if inputs.first().is_some_and(|t| t.len() > 1) {
            ctx.parallel_for(inputs[0].len(), 1, |r| {
                if r.start == 1 {
                    panic!("mock kernel panicked in a parallel task on purpose");
                }
                Ok(())
            })?;
        }
        panic!("mock kernel panicked on purpose")
    }
}

fn register(r: &mut Registrar) {
    r.kernel(
        KernelDesc::new("opreg.mock", "MockPanic", 1, OPEN_END),
        stateless(Panics),
    );
}

opreg_sdk::export_plugin! {
    name: "mock-panic",
    version: env!("CARGO_PKG_VERSION"),
    description: "mock plugin whose kernel panics",
    register: register,
}

#[cfg(test)]
mod tests {
    use super::*;
    use opreg_sdk::{
        host::HostTensor,
        testkit::{run_kernel, NodeSpec},
    };

    #[test]
    fn panic_becomes_an_error() {
        for n in [1usize, 4] {
            let t = HostTensor::zeroed(DType::F32, &[n]).expect("tensor");
            let err = run_kernel(
                stateless(Panics),
                &NodeSpec::onnx("MockPanic", 1),
                &[&t],
                None,
            )
            .expect_err("must fail");
            assert_eq!(err.code, ErrorCode::Panic);
            assert!(err.message.contains("on purpose"), "{}", err.message);
        }
    }
}

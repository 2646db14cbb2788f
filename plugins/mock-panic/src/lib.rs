//! A mock plugin whose kernel panics: the SDK must turn the panic into an error for that one
//! call, and the daemon must keep serving. Its quantization strategy `mock-panic-plan`
//! panics while planning: the run must fail naming it, and the model stay as it was.

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

struct PanicsPlanning;

impl Quantizer for PanicsPlanning {
    fn observe(
        &self,
        graph: &GraphView<'_>,
        _options: &[opreg_sdk::quant::KeyValue],
    ) -> Result<Vec<TensorObservation>, PluginError> {
        Ok(graph
            .inputs
            .iter()
            .map(|i| TensorObservation::new(i.as_str(), Observation::MIN_MAX))
            .collect())
    }

    fn plan_graph(
        &self,
        _graph: &GraphView<'_>,
        _request: &QuantRequest,
        _evaluator: &Evaluator<'_>,
    ) -> Result<GraphPlan, PluginError> {
        panic!("mock strategy panicked while planning, on purpose")
    }
}

fn register(r: &mut Registrar) {
    r.quantizer(
        QuantizerDesc {
            name: "mock-panic-plan".into(),
            description: "test strategy that panics while planning".into(),
        },
        PanicsPlanning,
    );
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

//! A mock plugin whose kernels panic (`MockPanic`, and `MockFlaky` over mock-good's): the SDK
//! must turn the panic into an error for that one call, and the daemon must keep serving. Its quantization strategy `mock-panic-plan`
//! panics while planning: the run must fail naming it, and the model stay as it was.
//! `mock-bad-observer` asks for its own observer of each input, which fails where its option
//! `at` says: `create` (refused), `update` (panics) or `finish` (panics).

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

struct BadObserver;

/// An observer that fails at one call.
struct FailsAt(String);

impl Observer for FailsAt {
    fn update(&mut self, _batch: &TensorView<'_>) -> Result<(), PluginError> {
        if self.0 == "update" {
            panic!("mock observer panicked in update, on purpose");
        }
        Ok(())
    }
    fn state(&self) -> Result<Vec<f64>, PluginError> {
        Ok(Vec::new())
    }
    fn merge(&mut self, _state: &[f64]) -> Result<(), PluginError> {
        Ok(())
    }
    fn finish(&self) -> Result<Vec<f64>, PluginError> {
        if self.0 == "finish" {
            panic!("mock observer panicked in finish, on purpose");
        }
        Ok(Vec::new())
    }
}

fn at(options: &[opreg_sdk::quant::KeyValue]) -> String {
    options
        .iter()
        .find(|kv| kv.key.as_str() == "at")
        .map(|kv| kv.value.to_string())
        .unwrap_or_default()
}

impl Quantizer for BadObserver {
    fn observe(
        &self,
        graph: &GraphView<'_>,
        _options: &[opreg_sdk::quant::KeyValue],
    ) -> Result<Vec<TensorObservation>, PluginError> {
        Ok(graph
            .inputs
            .iter()
            .map(|i| TensorObservation::new(i.as_str(), Observation::CUSTOM))
            .collect())
    }

    fn observer(
        &self,
        _tensor: &str,
        _observation: &Observation,
        options: &[opreg_sdk::quant::KeyValue],
    ) -> Result<Box<dyn Observer>, PluginError> {
        match at(options).as_str() {
            "create" => Err(PluginError::invalid("mock: no observer today")),
            other => Ok(Box::new(FailsAt(other.into()))),
        }
    }

    fn plan_observed(
        &self,
        _graph: &GraphView<'_>,
        _request: &QuantRequest,
        _observed: &[ObserverOutput],
        _evaluator: &Evaluator<'_>,
    ) -> Result<GraphPlan, PluginError> {
        Err(PluginError::internal(
            "mock-bad-observer: its observers all worked",
        ))
    }
}

fn register(r: &mut Registrar) {
    r.quantizer(
        QuantizerDesc {
            name: "mock-bad-observer".into(),
            description: "test strategy whose own observer fails".into(),
        },
        BadObserver,
    );
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
    // Overrides mock-good's identity `MockFlaky` (priority 0) and panics: the daemon's
    // quarantine test sees nodes fall back to mock-good once this plugin is quarantined.
    r.kernel(
        KernelDesc::new("opreg.mock", "MockFlaky", 1, OPEN_END).priority(10),
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

//! Optional values over tensors: `Optional`, `OptionalHasElement`, `OptionalGetElement`.
//!
//! opreg carries tensors between nodes; an optional that holds a tensor is that tensor, and
//! an optional left out of a node (an absent input, ONNX's "no input") is an empty one. That
//! covers what exporters emit inside graphs whose inputs and outputs are tensors: a
//! presence test on an input the node may leave out, and unwrapping. An *empty* optional made
//! inside the graph (`Optional` with only a `type` attribute) cannot be carried as a tensor:
//! such a node is refused at load with that reason rather than run wrongly.

use crate::shape::common::copy_reshaped;
use crate::util::{input, optional};
use opreg_sdk::numeric::Bool;
use opreg_sdk::prelude::*;

/// `OptionalHasElement`: true when the input is present.
#[derive(Clone, Debug)]
struct HasElement;

impl Kernel for HasElement {
    fn compute(
        &self,
        ctx: &KernelContext<'_>,
        inputs: &[TensorView<'_>],
    ) -> Result<(), PluginError> {
        let present = optional(inputs, 0).is_some();
        ctx.output_slice::<Bool>(0, &[])?[0] = Bool::new(present);
        Ok(())
    }
}

/// `Optional(x)` and `OptionalGetElement(x)` on a tensor: the tensor itself.
#[derive(Clone, Debug)]
struct Unwrap {
    op: &'static str,
}

impl Kernel for Unwrap {
    fn compute(
        &self,
        ctx: &KernelContext<'_>,
        inputs: &[TensorView<'_>],
    ) -> Result<(), PluginError> {
        // An empty optional reaches a kernel as a left-out input.
        let x = input(self.op, inputs, 0, "input").map_err(|_| {
            PluginError::invalid(format!("{}: the optional input is empty", self.op))
        })?;
        copy_reshaped(ctx, &x, x.shape())
    }
}

fn optional_factory(node: &NodeInfo<'_>) -> Result<Box<dyn Kernel>, PluginError> {
    if !node.inputs.first().is_some_and(|v| v.present) {
        return Err(PluginError::unimplemented(
            "Optional: an empty optional (no input) cannot be carried between nodes; opreg \
             passes tensors only",
        ));
    }
    Ok(Box::new(Unwrap { op: "Optional" }))
}

fn get_factory(_node: &NodeInfo<'_>) -> Result<Box<dyn Kernel>, PluginError> {
    Ok(Box::new(Unwrap {
        op: "OptionalGetElement",
    }))
}

fn has_factory(_node: &NodeInfo<'_>) -> Result<Box<dyn Kernel>, PluginError> {
    Ok(Box::new(HasElement))
}

pub fn register(r: &mut Registrar) {
    let any: &[DType] = &DType::ALL;
    r.kernel(
        KernelDesc::onnx("Optional", 15, OPEN_END)
            .constraint("V", any)
            .inputs(&["V"])
            .outputs(&["V"]),
        optional_factory,
    );
    r.kernel(
        KernelDesc::onnx("OptionalGetElement", 15, OPEN_END)
            .constraint("O", any)
            .inputs(&["O"])
            .outputs(&["O"]),
        get_factory,
    );
    r.kernel(
        KernelDesc::onnx("OptionalHasElement", 15, OPEN_END)
            .constraint("O", any)
            .inputs(&["O"])
            .outputs(&["tensor(bool)"]),
        has_factory,
    );
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::util::testing::{run, t};
    use opreg_sdk::testkit::NodeSpec;

    #[test]
    fn has_element_is_presence() {
        let x = t(&[2], &[1.0f32, 2.0]);
        let got = run(
            has_factory,
            NodeSpec::onnx("OptionalHasElement", 18),
            &[Some(&x)],
        )
        .unwrap();
        assert_eq!(got[0].to_vec::<Bool>().unwrap(), vec![Bool::new(true)]);
        assert!(got[0].shape().is_empty());
        let got = run(
            has_factory,
            NodeSpec::onnx("OptionalHasElement", 18),
            &[None],
        )
        .unwrap();
        assert_eq!(got[0].to_vec::<Bool>().unwrap(), vec![Bool::new(false)]);
        let got = run(has_factory, NodeSpec::onnx("OptionalHasElement", 18), &[]).unwrap();
        assert_eq!(got[0].to_vec::<Bool>().unwrap(), vec![Bool::new(false)]);
    }

    #[test]
    fn get_element_unwraps_and_refuses_empty() {
        let x = t(&[3], &[1i64, -2, 3]);
        let got = run(
            get_factory,
            NodeSpec::onnx("OptionalGetElement", 18),
            &[Some(&x)],
        )
        .unwrap();
        assert_eq!(got[0].to_vec::<i64>().unwrap(), vec![1, -2, 3]);
        let err = run(
            get_factory,
            NodeSpec::onnx("OptionalGetElement", 18),
            &[None],
        )
        .unwrap_err();
        assert!(err.message.contains("empty"), "{}", err.message);
    }
}

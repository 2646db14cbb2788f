//! Shape and data-movement operators.

use crate::ALL_TYPES;
use opreg_sdk::prelude::*;

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

pub fn register(r: &mut Registrar) {
    r.kernel(
        KernelDesc::onnx("Identity", 1, OPEN_END)
            .constraint("T", ALL_TYPES)
            .inputs(&["T"])
            .outputs(&["T"]),
        stateless(Identity),
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
    fn identity_copies_any_type() {
        let x = HostTensor::from_vec(&[2], &[1i64, 2]).expect("x");
        let out = run_kernel(
            stateless(Identity),
            &NodeSpec::onnx("Identity", 16),
            &[&x],
            None,
        )
        .expect("run");
        assert_eq!(out[0].to_vec::<i64>().expect("i64"), vec![1, 2]);
    }
}

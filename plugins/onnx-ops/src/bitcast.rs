//! `BitCast`: the bits of a tensor reinterpreted as another element type of the same size.

use crate::util::{input, Factory};
use opreg_sdk::prelude::*;

#[derive(Clone)]
struct BitCast {
    to: DType,
}

impl Kernel for BitCast {
    fn compute(
        &self,
        ctx: &KernelContext<'_>,
        inputs: &[TensorView<'_>],
    ) -> Result<(), PluginError> {
        let x = &input("BitCast", inputs, 0, "input")?;
        if x.dtype.size() != self.to.size() || x.dtype == DType::String {
            return Err(PluginError::invalid(format!(
                "BitCast: {} and {} do not have the same bit width",
                x.dtype, self.to
            )));
        }
        let out = ctx.output(0, self.to, x.shape())?.into_bytes()?;
        out.copy_from_slice(x.as_bytes()?);
        Ok(())
    }
}

fn bitcast_factory(node: &NodeInfo<'_>) -> Result<Box<dyn Kernel>, PluginError> {
    let code = match node.attr("to") {
        Some(AttrValue::Int(c)) => *c,
        _ => {
            return Err(PluginError::invalid(
                "BitCast: attribute 'to' (INT) is required",
            ))
        }
    };
    let to = DType::from_onnx_code(code as i32)
        .filter(|&d| d != DType::String)
        .ok_or_else(|| {
            PluginError::unimplemented(format!(
                "BitCast: attribute 'to' = {code} is a type opreg does not support"
            ))
        })?;
    Ok(Box::new(BitCast { to }))
}

pub fn register(r: &mut Registrar) {
    let all: Vec<DType> = DType::ALL
        .into_iter()
        .filter(|&d| d != DType::String)
        .collect();
    r.kernel(
        KernelDesc::onnx("BitCast", 26, OPEN_END)
            .constraint("T1", &all)
            .constraint("T2", &all)
            .inputs(&["T1"])
            .outputs(&["T2"]),
        bitcast_factory as Factory,
    );
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::util::testing::{run, t};
    use opreg_sdk::{host::HostTensor, testkit::NodeSpec};

    #[test]
    fn bitcast_reinterprets_bits() {
        let x = t(&[2], &[1.0f32, -2.0]);
        let node = NodeSpec::onnx("BitCast", 26).attr("to", AttrValue::Int(6));
        let out = run(bitcast_factory, node, &[Some(&x)]).unwrap();
        assert_eq!(
            out[0].to_vec::<i32>().unwrap(),
            vec![0x3f80_0000, 0xc000_0000u32 as i32]
        );
        let b = HostTensor::from_bytes(DType::Bool, &[4], &[1, 0, 1, 0]).unwrap();
        let node = NodeSpec::onnx("BitCast", 26).attr("to", AttrValue::Int(2));
        let out = run(bitcast_factory, node, &[Some(&b)]).unwrap();
        assert_eq!(out[0].to_vec::<u8>().unwrap(), vec![1, 0, 1, 0]);
        // Different widths are refused.
        let node = NodeSpec::onnx("BitCast", 26).attr("to", AttrValue::Int(7));
        assert!(run(bitcast_factory, node, &[Some(&x)]).is_err());
    }
}

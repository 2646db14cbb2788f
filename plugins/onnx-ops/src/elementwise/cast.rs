//! `Cast` and `CastLike` between every numeric type and bool (strings are not supported).

use super::engine::map;
use super::num::convert;
use opreg_sdk::prelude::*;

/// `Cast` to a fixed type (`to`), or `CastLike` (`None`: the type of input 1).
#[derive(Clone)]
pub struct Cast(pub Option<DType>);

impl Cast {
    /// Reads `to` for `Cast`.
    pub fn from_node(node: &NodeInfo<'_>) -> Result<Box<dyn Kernel>, PluginError> {
        let code = node
            .attr("to")
            .ok_or_else(|| PluginError::invalid("Cast: attribute 'to' is required"))?;
        let AttrValue::Int(code) = *code else {
            return Err(PluginError::invalid(format!(
                "Cast: attribute 'to' must be INT, got {code:?}"
            )));
        };
        let to = i32::try_from(code)
            .ok()
            .and_then(DType::from_onnx_code)
            .ok_or_else(|| {
                PluginError::unimplemented(format!(
                    "Cast: attribute 'to' = {code} is not supported"
                ))
            })?;
        if to == DType::String {
            return Err(PluginError::unimplemented(
                "Cast: to STRING is not supported",
            ));
        }
        Ok(Box::new(Cast(Some(to))))
    }
}

impl Kernel for Cast {
    fn compute(
        &self,
        ctx: &KernelContext<'_>,
        inputs: &[TensorView<'_>],
    ) -> Result<(), PluginError> {
        let x = &inputs[0];
        let to = match self.0 {
            Some(to) => to,
            None => match inputs.get(1) {
                Some(t) if !t.is_absent() => t.dtype,
                _ => {
                    return Err(PluginError::invalid(
                        "CastLike: input 'target_type' is missing",
                    ))
                }
            },
        };
        dispatch_all!(x.dtype, "Cast (input)", S => {
            dispatch_all!(to, "Cast (target)", D => map(ctx, x, convert::<S, D>))
        })
    }
}

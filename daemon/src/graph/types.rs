//! Output element types, where the planner can tell them before running.
//!
//! Kernel resolution checks type constraints against input types; graph inputs, initializers
//! and folded constants have known types, and these rules carry them through the common
//! operators. An unknown type (`None`) is not checked at plan time; the kernel checks it when
//! it runs.

// Request and model data reach this module: no unchecked index or slice.
#![deny(clippy::indexing_slicing)]

use super::import::Node;
use opreg_sdk::{AttrValue, DType};

/// The element type of output `index` of `node`, given its input types.
pub fn output_type(node: &Node, index: usize, inputs: &[Option<DType>]) -> Option<DType> {
    let attr = |name: &str| {
        node.attributes
            .iter()
            .find(|a| a.name.as_str() == name)
            .map(|a| &a.value)
    };
    let attr_type = |name: &str| match attr(name) {
        Some(AttrValue::Int(code)) => DType::from_onnx_code(*code as i32),
        _ => None,
    };
    let first = inputs.first().copied().flatten();
    if node.domain == "ai.onnx.ml" {
        return match node.op_type.as_str() {
            "ArrayFeatureExtractor" | "Binarizer" => first,
            _ => None,
        };
    }
    if !node.domain.is_empty() {
        return None;
    }
    Some(match node.op_type.as_str() {
        "Equal" | "Less" | "LessOrEqual" | "Greater" | "GreaterOrEqual" | "And" | "Or" | "Xor"
        | "Not" | "IsNaN" | "IsInf" => DType::Bool,
        "Shape" | "Size" | "ArgMax" | "ArgMin" | "NonZero" | "NonMaxSuppression" => DType::I64,
        "RegexFullMatch" => DType::Bool,
        "StringSplit" if index == 1 => DType::I64,
        "TfIdfVectorizer" => DType::F32,
        "StringNormalizer" | "StringConcat" | "StringSplit" => DType::String,
        "TopK" | "MaxPool" | "Unique" if index > 0 => DType::I64,
        "Dropout" if index == 1 => DType::Bool,
        "Cast" => return attr_type("to"),
        "CastLike" => return inputs.get(1).copied().flatten(),
        "EyeLike" | "RandomNormalLike" | "RandomUniformLike" => {
            return attr_type("dtype").or(first)
        }
        "RandomNormal" | "RandomUniform" => return attr_type("dtype").or(Some(DType::F32)),
        "ConstantOfShape" => match attr("value") {
            Some(AttrValue::Tensor(t)) => t.dtype,
            _ => DType::F32,
        },
        "Constant" => match attr("value") {
            Some(AttrValue::Tensor(t)) => t.dtype,
            _ if attr("value_float").is_some() || attr("value_floats").is_some() => DType::F32,
            _ if attr("value_int").is_some() || attr("value_ints").is_some() => DType::I64,
            _ if attr("value_string").is_some() || attr("value_strings").is_some() => DType::String,
            _ => return None,
        },
        "Where" => return inputs.get(1).copied().flatten(),
        "OneHot" => return inputs.get(2).copied().flatten(),
        "QuantizeLinear" | "DynamicQuantizeLinear" if index == 0 => {
            return inputs.get(2).copied().flatten().or(Some(DType::U8))
        }
        "DynamicQuantizeLinear" if index == 1 => DType::F32,
        "DynamicQuantizeLinear" => DType::U8,
        "DequantizeLinear" => return inputs.get(1).copied().flatten().or(Some(DType::F32)),
        "MatMulInteger" | "ConvInteger" => DType::I32,
        _ => return first,
    })
}

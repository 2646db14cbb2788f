//! Output element types from input types and attributes.

use opreg_sdk::{AttrValue, DType, NodeInfo};

/// The element type of output `index` of `node`, given its input types (`None`: unknown).
pub(super) fn output_type(
    node: &NodeInfo<'_>,
    index: usize,
    inputs: &[Option<DType>],
) -> Option<DType> {
    let attr_type = |name: &str| match node.attr(name) {
        Some(AttrValue::Int(code)) => i32::try_from(*code).ok().and_then(DType::from_onnx_code),
        _ => None,
    };
    let first = inputs.first().copied().flatten();
    match node.domain {
        "ai.onnx.ml" => {
            return match node.op_type {
                "ArrayFeatureExtractor" | "Binarizer" => first,
                _ => None,
            }
        }
        // opreg's fused operators keep the type of their data input.
        "opreg" => return first,
        // ONNX Runtime's quantized contrib operators this plugin has keep their input's type.
        "com.microsoft" => {
            return match node.op_type {
                "QLinearAdd" | "NhwcMaxPool" => first,
                // y's type is y_zero_point's (x's without one), as in ONNX's QLinearConv.
                "QLinearConv" => inputs.get(7).copied().flatten().or(first),
                _ => None,
            };
        }
        // The preview-training optimizers output updated copies of their optimized tensors
        // (T3, from input 2 on).
        "ai.onnx.preview.training" => {
            return match node.op_type {
                "Adagrad" | "Adam" | "Momentum" => inputs.get(2).copied().flatten(),
                _ => None,
            }
        }
        "" | "ai.onnx" => {}
        _ => return None,
    }
    Some(match node.op_type {
        "Equal" | "Less" | "LessOrEqual" | "Greater" | "GreaterOrEqual" | "And" | "Or" | "Xor"
        | "Not" | "IsNaN" | "IsInf" => DType::Bool,
        "Shape" | "Size" | "ArgMax" | "ArgMin" | "NonZero" | "NonMaxSuppression" => DType::I64,
        "RegexFullMatch" => DType::Bool,
        // present_state has past_state's type (S), the query's when past_state is left out.
        "LinearAttention" if index == 1 => return inputs.get(3).copied().flatten().or(first),
        "StringSplit" if index == 1 => DType::I64,
        "TfIdfVectorizer" => DType::F32,
        "StringNormalizer" | "StringConcat" | "StringSplit" => DType::String,
        "TopK" | "MaxPool" | "Unique" if index > 0 => DType::I64,
        "Dropout" if index == 1 => DType::Bool,
        // The running (and, before opset 14, saved) statistics have the input mean's type,
        // which may differ from X's (T2 / U).
        "BatchNormalization" if index > 0 => return inputs.get(3).copied().flatten(),
        "Cast" => return attr_type("to"),
        "CastLike" => return inputs.get(1).copied().flatten(),
        "EyeLike" | "RandomNormalLike" | "RandomUniformLike" => {
            return attr_type("dtype").or(first)
        }
        "RandomNormal" | "RandomUniform" => return attr_type("dtype").or(Some(DType::F32)),
        "Bernoulli" => return attr_type("dtype").or(first),
        "Multinomial" => return attr_type("dtype").or(Some(DType::I32)),
        "ConstantOfShape" => match node.attr("value") {
            Some(AttrValue::Tensor(t)) => t.dtype,
            _ => DType::F32,
        },
        "Constant" => match node.attr("value") {
            Some(AttrValue::Tensor(t)) => t.dtype,
            _ if node.attr("value_float").is_some() || node.attr("value_floats").is_some() => {
                DType::F32
            }
            _ if node.attr("value_int").is_some() || node.attr("value_ints").is_some() => {
                DType::I64
            }
            _ if node.attr("value_string").is_some() || node.attr("value_strings").is_some() => {
                DType::String
            }
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
        // y's type is y_zero_point's (x's without one).
        "QLinearConv" => return inputs.get(7).copied().flatten().or(first),
        _ => return first,
    })
}

//! Inputs made up from a model's declared shapes, for runs without real data: `ProfileModel`,
//! the verification of a swap on a model with no samples, and `opreg bench`. One place decides
//! how symbolic dimensions get a value and what the made-up values are.

use crate::graph::{Dim, IoSpec};
use crate::repo::Feeds;
use opreg_sdk::{host::HostTensor, DType};
use std::{collections::HashMap, sync::Arc};

/// What the made-up tensors hold.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fill {
    /// Zeros (numbers), empty strings.
    Zero,
    /// Floats spread over [-1, 1) by a fixed sequence per input (so a kernel that is wrong
    /// shows and two runs see the same data); integers and booleans zero (an integer input is
    /// often an index, and zero is valid for every index), strings empty.
    Spread,
}

/// How symbolic dimensions get their value.
#[derive(Clone, Debug, Default)]
pub struct Shapes {
    /// The value of a symbolic first dimension (the batch).
    pub batch: usize,
    /// The value of any other symbolic dimension; `None`: such an input needs a whole shape in
    /// `given`.
    pub other: Option<usize>,
    /// Whole shapes by input name, taking precedence over the declared ones.
    pub given: HashMap<String, Vec<usize>>,
}

impl Shapes {
    /// Every symbolic dimension `value`.
    pub fn all(value: usize) -> Shapes {
        Shapes {
            batch: value,
            other: Some(value),
            given: HashMap::new(),
        }
    }
}

/// Why inputs could not be made up.
#[derive(Debug, thiserror::Error)]
pub enum FeedsError {
    #[error("input '{0}' declares no shape: give its shape")]
    NoShape(String),
    #[error("input '{name}' has a symbolic dimension {dim} past the first: give its shape")]
    Symbolic { name: String, dim: usize },
    #[error("input '{name}' of shape {shape:?} is larger than the tensor limit ({limit} bytes)")]
    TooLarge {
        name: String,
        shape: Vec<usize>,
        limit: usize,
    },
    #[error("input '{name}': {message}")]
    Alloc { name: String, message: String },
}

/// The concrete shape of `input` under `shapes`.
pub fn shape_of(input: &IoSpec, shapes: &Shapes) -> Result<Vec<usize>, FeedsError> {
    if let Some(given) = shapes.given.get(&input.name) {
        return Ok(given.clone());
    }
    let declared = input
        .shape
        .as_ref()
        .ok_or_else(|| FeedsError::NoShape(input.name.clone()))?;
    declared
        .iter()
        .enumerate()
        .map(|(i, d)| match (d, i, shapes.other) {
            (Dim::Fixed(n), _, _) => Ok(*n),
            (Dim::Symbolic(_), 0, _) => Ok(shapes.batch),
            (Dim::Symbolic(_), _, Some(v)) => Ok(v),
            (Dim::Symbolic(_), dim, None) => Err(FeedsError::Symbolic {
                name: input.name.clone(),
                dim,
            }),
        })
        .collect()
}

/// One tensor per input of `inputs`, shaped by `shapes`, each at most `max_tensor_bytes`.
pub fn synthesize(
    inputs: &[IoSpec],
    shapes: &Shapes,
    fill: Fill,
    max_tensor_bytes: usize,
) -> Result<Feeds, FeedsError> {
    let mut feeds = Feeds::new();
    for (k, input) in inputs.iter().enumerate() {
        let shape = shape_of(input, shapes)?;
        let bytes = opreg_sdk::alloc::numel(&shape).and_then(|n| n.checked_mul(input.dtype.size()));
        if bytes.is_none_or(|b| b > max_tensor_bytes) {
            return Err(FeedsError::TooLarge {
                name: input.name.clone(),
                shape,
                limit: max_tensor_bytes,
            });
        }
        let mut t = HostTensor::zeroed(input.dtype, &shape).map_err(|e| FeedsError::Alloc {
            name: input.name.clone(),
            message: e.message.to_string(),
        })?;
        if fill == Fill::Spread {
            spread(&mut t, k as u64 + 1);
        }
        feeds.insert(input.name.clone(), Arc::new(t));
    }
    Ok(feeds)
}

/// Fills a float tensor from a fixed sequence over [-1, 1) (xorshift64*, portable).
fn spread(t: &mut HostTensor, seed: u64) {
    let dtype = t.dtype();
    if !dtype.is_float() {
        return;
    }
    let mut state = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut next = move || {
        state ^= state >> 12;
        state ^= state << 25;
        state ^= state >> 27;
        let r = state.wrapping_mul(0x2545_F491_4F6C_DD1D) >> 11;
        (r as f64 / (1u64 << 53) as f64) * 2.0 - 1.0
    };
    let size = dtype.size();
    for e in t.bytes_mut().chunks_exact_mut(size) {
        let v = next();
        match dtype {
            DType::F32 => e.copy_from_slice(&(v as f32).to_le_bytes()),
            DType::F64 => e.copy_from_slice(&v.to_le_bytes()),
            DType::F16 => e.copy_from_slice(&half::f16::from_f64(v).to_le_bytes()),
            DType::BF16 => e.copy_from_slice(&half::bf16::from_f64(v).to_le_bytes()),
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn input(name: &str, dtype: DType, dims: &[Option<usize>]) -> IoSpec {
        IoSpec {
            name: name.into(),
            dtype,
            shape: Some(
                dims.iter()
                    .map(|d| match d {
                        Some(n) => Dim::Fixed(*n),
                        None => Dim::Symbolic("n".into()),
                    })
                    .collect(),
            ),
        }
    }

    #[test]
    fn symbolic_dimensions_take_the_batch_or_a_given_shape() {
        let x = input("x", DType::F32, &[None, Some(3), None]);
        let shapes = Shapes {
            batch: 8,
            other: None,
            given: HashMap::new(),
        };
        assert!(matches!(
            shape_of(&x, &shapes),
            Err(FeedsError::Symbolic { dim: 2, .. })
        ));
        assert_eq!(shape_of(&x, &Shapes::all(2)).unwrap(), vec![2, 3, 2]);
        let given = Shapes {
            given: [("x".to_string(), vec![1, 3, 5])].into(),
            ..shapes
        };
        assert_eq!(shape_of(&x, &given).unwrap(), vec![1, 3, 5]);
    }

    #[test]
    fn spread_floats_repeat_and_integers_stay_zero() {
        let inputs = [
            input("x", DType::F32, &[None, Some(4)]),
            input("ids", DType::I64, &[None, Some(4)]),
        ];
        let a = synthesize(&inputs, &Shapes::all(2), Fill::Spread, 1 << 20).unwrap();
        let b = synthesize(&inputs, &Shapes::all(2), Fill::Spread, 1 << 20).unwrap();
        let x = a["x"].bytes();
        assert_eq!(x, b["x"].bytes());
        let floats: Vec<f32> = x
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
            .collect();
        assert_eq!(floats.len(), 8);
        assert!(floats.iter().all(|v| (-1.0..1.0).contains(v)));
        assert!(floats.iter().any(|v| *v != floats[0]));
        assert!(a["ids"].bytes().iter().all(|&b| b == 0));
        let zero = synthesize(&inputs, &Shapes::all(2), Fill::Zero, 1 << 20).unwrap();
        assert!(zero["x"].bytes().iter().all(|&b| b == 0));
    }

    #[test]
    fn sizes_past_the_limit_are_refused() {
        let inputs = [input("x", DType::F32, &[None, Some(1 << 20)])];
        assert!(matches!(
            synthesize(&inputs, &Shapes::all(4), Fill::Zero, 1 << 20),
            Err(FeedsError::TooLarge { .. })
        ));
        let huge = [input("x", DType::F32, &[Some(usize::MAX), Some(4)])];
        assert!(matches!(
            synthesize(&huge, &Shapes::all(1), Fill::Zero, usize::MAX),
            Err(FeedsError::TooLarge { .. })
        ));
    }
}

//! `Unique`: the distinct elements (or slices along an axis) of a tensor, with their indices
//! and counts.

use crate::util::{input, normalize_axis, product_sat, Factory};
use opreg_sdk::alloc::{try_vec, try_with_capacity};
use opreg_sdk::half::{bf16, f16};
use opreg_sdk::prelude::*;
use std::cmp::Ordering;

#[derive(Clone)]
struct Unique {
    axis: Option<i64>,
    sorted: bool,
}

/// Total order for sorting (NaN compares equal to everything; equal NaNs are merged below).
fn cmp_items<T: PartialOrd>(a: &[T], b: &[T]) -> Ordering {
    for (x, y) in a.iter().zip(b) {
        match x.partial_cmp(y) {
            Some(Ordering::Equal) | None => {}
            Some(o) => return o,
        }
    }
    Ordering::Equal
}

fn same_items<T: PartialOrd>(a: &[T], b: &[T]) -> bool {
    #[allow(clippy::eq_op)] // x != x is the NaN test
    a.iter().zip(b).all(|(x, y)| x == y || (x != x && y != y))
}

impl Unique {
    /// `view` turns the allocated `Y` into a `[T]` (bools travel as bytes).
    fn run<'c, T: PartialOrd + Copy + 'static>(
        &self,
        ctx: &'c KernelContext<'_>,
        xs: &[T],
        shape: &[usize],
        dtype: DType,
        view: impl FnOnce(TensorViewMut<'c>) -> Result<&'c mut [T], PluginError>,
    ) -> Result<(), PluginError> {
        let (pre, d, post, axis) = match self.axis {
            None => (1, xs.len(), 1, None),
            Some(a) => {
                let a = normalize_axis(a, shape.len())?;
                let d = shape[a];
                (
                    product_sat(&shape[..a]),
                    d,
                    product_sat(&shape[a + 1..]),
                    Some(a),
                )
            }
        };
        // An empty X may still have a huge extent along the axis (`[0, 2^40]`): the tables
        // of `d` entries are allocated fallibly.
        // Item j: the sub-tensor at index j along the axis, flattened row-major.
        let mut items: Vec<Vec<T>> = try_with_capacity(d)?;
        items.extend((0..d).map(|j| {
            (0..pre)
                .flat_map(|p| xs[(p * d + j) * post..][..post].iter().copied())
                .collect()
        }));
        let mut order: Vec<usize> = try_with_capacity(d)?;
        order.extend(0..d);
        order.sort_by(|&a, &b| cmp_items(&items[a], &items[b]));
        // Groups of equal items, in sorted order: (first index, members).
        let mut groups: Vec<(usize, Vec<usize>)> = Vec::new();
        for &j in &order {
            match groups.last_mut() {
                Some((first, members)) if same_items(&items[*first], &items[j]) => {
                    members.push(j);
                    *first = (*first).min(j);
                }
                _ => groups.push((j, vec![j])),
            }
        }
        if !self.sorted {
            groups.sort_by_key(|g| g.0);
        }
        let u = groups.len();
        let mut inverse = try_vec(d, 0i64)?;
        for (g, (_, members)) in groups.iter().enumerate() {
            for &j in members {
                inverse[j] = g as i64;
            }
        }
        let y_shape = match axis {
            None => vec![u],
            Some(a) => {
                let mut s = shape.to_vec();
                s[a] = u;
                s
            }
        };
        let y = view(ctx.output(0, dtype, &y_shape)?)?;
        for (g, (first, _)) in groups.iter().enumerate() {
            for p in 0..pre {
                let src = &items[*first][p * post..][..post];
                y[(p * u + g) * post..][..post].copy_from_slice(src);
            }
        }
        let n = ctx.num_outputs();
        if n > 1 {
            let out = ctx.output_slice::<i64>(1, &[u])?;
            for (o, (first, _)) in out.iter_mut().zip(&groups) {
                *o = *first as i64;
            }
        }
        if n > 2 {
            ctx.output_slice::<i64>(2, &[d])?.copy_from_slice(&inverse);
        }
        if n > 3 {
            let out = ctx.output_slice::<i64>(3, &[u])?;
            for (o, (_, members)) in out.iter_mut().zip(&groups) {
                *o = members.len() as i64;
            }
        }
        Ok(())
    }
}

impl Kernel for Unique {
    fn compute(
        &self,
        ctx: &KernelContext<'_>,
        inputs: &[TensorView<'_>],
    ) -> Result<(), PluginError> {
        let x = &input("Unique", inputs, 0, "X")?;
        let s = x.shape();
        match x.dtype {
            DType::U8 => self.run(ctx, x.as_slice::<u8>()?, s, x.dtype, |y| y.into_slice()),
            DType::Bool => self.run(ctx, x.as_bytes()?, s, x.dtype, |y| y.into_bytes()),
            DType::I8 => self.run(ctx, x.as_slice::<i8>()?, s, x.dtype, |y| y.into_slice()),
            DType::U16 => self.run(ctx, x.as_slice::<u16>()?, s, x.dtype, |y| y.into_slice()),
            DType::I16 => self.run(ctx, x.as_slice::<i16>()?, s, x.dtype, |y| y.into_slice()),
            DType::U32 => self.run(ctx, x.as_slice::<u32>()?, s, x.dtype, |y| y.into_slice()),
            DType::I32 => self.run(ctx, x.as_slice::<i32>()?, s, x.dtype, |y| y.into_slice()),
            DType::U64 => self.run(ctx, x.as_slice::<u64>()?, s, x.dtype, |y| y.into_slice()),
            DType::I64 => self.run(ctx, x.as_slice::<i64>()?, s, x.dtype, |y| y.into_slice()),
            DType::F16 => self.run(ctx, x.as_slice::<f16>()?, s, x.dtype, |y| y.into_slice()),
            DType::BF16 => self.run(ctx, x.as_slice::<bf16>()?, s, x.dtype, |y| y.into_slice()),
            DType::F32 => self.run(ctx, x.as_slice::<f32>()?, s, x.dtype, |y| y.into_slice()),
            DType::F64 => self.run(ctx, x.as_slice::<f64>()?, s, x.dtype, |y| y.into_slice()),
            other => Err(PluginError::unimplemented(format!(
                "Unique: type {other} is not supported"
            ))),
        }
    }
}

fn unique_factory(node: &NodeInfo<'_>) -> Result<Box<dyn Kernel>, PluginError> {
    let axis = match node.attr("axis") {
        None => None,
        Some(_) => Some(node.int_or("axis", 0)?),
    };
    Ok(Box::new(Unique {
        axis,
        sorted: node.int_or("sorted", 1)? != 0,
    }))
}

const UNIQUE_TYPES: &[DType] = &[
    DType::U8,
    DType::U16,
    DType::U32,
    DType::U64,
    DType::I8,
    DType::I16,
    DType::I32,
    DType::I64,
    DType::F16,
    DType::F32,
    DType::F64,
    DType::Bool,
];

pub fn register(r: &mut Registrar) {
    let mut unique28 = UNIQUE_TYPES.to_vec();
    unique28.push(DType::BF16);
    for (since, end, types) in [(11, 27, UNIQUE_TYPES), (28, OPEN_END, &unique28[..])] {
        r.kernel(
            KernelDesc::onnx("Unique", since, end)
                .constraint("T", types)
                .constraint("I", &[DType::I64])
                .inputs(&["T"])
                .outputs(&["T", "I", "I", "I"]),
            unique_factory as Factory,
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::util::testing::{run, t};
    use opreg_sdk::{host::HostTensor, testkit::NodeSpec};

    #[test]
    fn unique_sorted_unsorted_and_axis() {
        let x = t(&[6], &[2.0f32, 1.0, 1.0, 3.0, 4.0, 3.0]);
        let node = NodeSpec::onnx("Unique", 11)
            .attr("sorted", AttrValue::Int(0))
            .outputs(4);
        let out = run(unique_factory, node, &[Some(&x)]).unwrap();
        assert_eq!(out[0].to_vec::<f32>().unwrap(), vec![2.0, 1.0, 3.0, 4.0]);
        assert_eq!(out[1].to_vec::<i64>().unwrap(), vec![0, 1, 3, 4]);
        assert_eq!(out[2].to_vec::<i64>().unwrap(), vec![0, 1, 1, 2, 3, 2]);
        assert_eq!(out[3].to_vec::<i64>().unwrap(), vec![1, 2, 2, 1]);
        let out = run(
            unique_factory,
            NodeSpec::onnx("Unique", 11).outputs(4),
            &[Some(&x)],
        )
        .unwrap();
        assert_eq!(out[0].to_vec::<f32>().unwrap(), vec![1.0, 2.0, 3.0, 4.0]);
        assert_eq!(out[1].to_vec::<i64>().unwrap(), vec![1, 0, 3, 4]);
        assert_eq!(out[2].to_vec::<i64>().unwrap(), vec![1, 0, 0, 2, 3, 2]);
        assert_eq!(out[3].to_vec::<i64>().unwrap(), vec![2, 1, 2, 1]);
        // Conformance test_unique_sorted_with_axis.
        let x = t(&[3, 3], &[1.0f32, 0.0, 0.0, 1.0, 0.0, 0.0, 2.0, 3.0, 4.0]);
        let node = NodeSpec::onnx("Unique", 11)
            .attr("axis", AttrValue::Int(0))
            .outputs(4);
        let out = run(unique_factory, node, &[Some(&x)]).unwrap();
        assert_eq!(out[0].shape(), &[2, 3]);
        assert_eq!(
            out[0].to_vec::<f32>().unwrap(),
            vec![1.0, 0.0, 0.0, 2.0, 3.0, 4.0]
        );
        assert_eq!(out[1].to_vec::<i64>().unwrap(), vec![0, 2]);
        assert_eq!(out[2].to_vec::<i64>().unwrap(), vec![0, 0, 1]);
        assert_eq!(out[3].to_vec::<i64>().unwrap(), vec![2, 1]);
        // Axis 1 of a [2, 3] int tensor: columns [1,4], [0,5], [1,4] -> [[0,1],[5,4]].
        let x = t(&[2, 3], &[1i32, 0, 1, 4, 5, 4]);
        let node = NodeSpec::onnx("Unique", 11)
            .attr("axis", AttrValue::Int(-1))
            .outputs(3);
        let out = run(unique_factory, node, &[Some(&x)]).unwrap();
        assert_eq!(out[0].shape(), &[2, 2]);
        assert_eq!(out[0].to_vec::<i32>().unwrap(), vec![0, 1, 5, 4]);
        assert_eq!(out[2].to_vec::<i64>().unwrap(), vec![1, 0, 1]);
        // Bool, Y only.
        let b = HostTensor::from_bytes(DType::Bool, &[3], &[1, 0, 1]).unwrap();
        let out = run(unique_factory, NodeSpec::onnx("Unique", 11), &[Some(&b)]).unwrap();
        assert_eq!(out.len(), 1);
        assert_eq!(out[0].bytes(), &[0, 1]);
    }

    /// Unique along an axis of 2^40 on an empty X: the per-item tables are refused as too
    /// large instead of aborting.
    #[test]
    fn unique_along_a_huge_empty_axis_is_resource_exhausted() {
        let x = t::<i32>(&[0, 1 << 40], &[]);
        let node = NodeSpec::onnx("Unique", 11).attr("axis", AttrValue::Int(1));
        let e = run(unique_factory, node, &[Some(&x)]).expect_err("too large");
        assert_eq!(e.code, ErrorCode::ResourceExhausted, "{}", e.message);
    }
}

//! Hand-computed checks of the shape family, run through the registered factories (so the
//! opset ranges are exercised too).

use super::*;
use crate::util::testing::Registered;
use opreg_sdk::{
    host::HostTensor,
    testkit::{run_kernel_opt, NodeSpec},
};

fn registered() -> Vec<opreg_sdk::module::KernelRegistration> {
    opreg_sdk::module::collect_from(register)
        .expect("registration")
        .kernels
}

/// Runs the kernel registered for `spec`'s op and opset.
fn run(spec: &NodeSpec, inputs: &[Option<&HostTensor>]) -> Result<Vec<HostTensor>, PluginError> {
    let mut hits: Vec<_> = registered()
        .into_iter()
        .filter(|k| k.desc.op_type.as_str() == spec.op_type && k.desc.covers(spec.opset))
        .collect();
    assert_eq!(hits.len(), 1, "{} at opset {}", spec.op_type, spec.opset);
    let k = hits.pop().expect("one kernel");
    run_kernel_opt(Registered(k.factory), spec, inputs, None)
}

fn run1(spec: &NodeSpec, inputs: &[Option<&HostTensor>]) -> HostTensor {
    run(spec, inputs).expect("run").remove(0)
}

fn f32t(shape: &[usize], v: &[f32]) -> HostTensor {
    HostTensor::from_vec(shape, v).expect("f32 tensor")
}

fn i64t(shape: &[usize], v: &[i64]) -> HostTensor {
    HostTensor::from_vec(shape, v).expect("i64 tensor")
}

fn iota(shape: &[usize]) -> HostTensor {
    let n: usize = shape.iter().product();
    i64t(shape, &(0..n as i64).collect::<Vec<_>>())
}

fn ints(v: &[i64]) -> AttrValue {
    AttrValue::Ints(v.to_vec())
}

fn s(v: &str) -> AttrValue {
    AttrValue::String(v.to_string())
}

fn vi(t: &HostTensor) -> Vec<i64> {
    t.to_vec::<i64>().expect("i64")
}

fn vf(t: &HostTensor) -> Vec<f32> {
    t.to_vec::<f32>().expect("f32")
}

#[test]
fn registrations_do_not_overlap() {
    let regs = registered();
    for (i, a) in regs.iter().enumerate() {
        for b in &regs[i + 1..] {
            let overlap = a.desc.op_type == b.desc.op_type
                && a.desc.since_version <= b.desc.end_version
                && b.desc.since_version <= a.desc.end_version;
            assert!(!overlap, "{:?} overlaps {:?}", a.desc, b.desc);
        }
    }
    assert!(regs.len() >= 35, "{} registrations", regs.len());
}

#[test]
fn identity_copies_any_type() {
    let x = i64t(&[2], &[1, 2]);
    assert_eq!(
        vi(&run1(&NodeSpec::onnx("Identity", 16), &[Some(&x)])),
        vec![1, 2]
    );
}

#[test]
fn reshape_variants() {
    let x = iota(&[2, 3, 4]);
    let out = run1(
        &NodeSpec::onnx("Reshape", 14),
        &[Some(&x), Some(&i64t(&[2], &[0, -1]))],
    );
    assert_eq!(out.shape(), &[2, 12]);
    assert_eq!(vi(&out), (0..24).collect::<Vec<_>>());
    let out = run1(
        &NodeSpec::onnx("Reshape", 13),
        &[Some(&x), Some(&i64t(&[3], &[-1, 2, 2]))],
    );
    assert_eq!(out.shape(), &[6, 2, 2]);
    // allowzero: a 0 is a real zero-sized dimension.
    let e = i64t(&[0, 3], &[]);
    let out = run1(
        &NodeSpec::onnx("Reshape", 14).attr("allowzero", AttrValue::Int(1)),
        &[Some(&e), Some(&i64t(&[2], &[3, 0]))],
    );
    assert_eq!(out.shape(), &[3, 0]);
    assert!(run(
        &NodeSpec::onnx("Reshape", 14),
        &[Some(&x), Some(&i64t(&[2], &[-1, -1]))]
    )
    .is_err());
    assert!(run(
        &NodeSpec::onnx("Reshape", 14),
        &[Some(&x), Some(&i64t(&[2], &[5, -1]))]
    )
    .is_err());
    let out = run1(
        &NodeSpec::onnx("Reshape", 1).attr("shape", ints(&[4, -1])),
        &[Some(&x)],
    );
    assert_eq!(out.shape(), &[4, 6]);
}

#[test]
fn flatten_squeeze_unsqueeze() {
    let x = iota(&[2, 3, 4]);
    let f = |axis| {
        run1(
            &NodeSpec::onnx("Flatten", 13).attr("axis", AttrValue::Int(axis)),
            &[Some(&x)],
        )
        .shape()
        .to_vec()
    };
    assert_eq!(f(0), vec![1, 24]);
    assert_eq!(f(-1), vec![6, 4]);
    assert_eq!(f(3), vec![24, 1]);

    let y = iota(&[1, 3, 1]);
    let sq = |opset, axes: Option<&[i64]>| {
        let mut spec = NodeSpec::onnx("Squeeze", opset);
        let t;
        let mut inputs = vec![Some(&y)];
        match (opset, axes) {
            (o, Some(a)) if o < 13 => spec = spec.attr("axes", ints(a)),
            (_, Some(a)) => {
                t = i64t(&[a.len()], a);
                inputs.push(Some(&t));
            }
            _ => {}
        }
        run(&spec, &inputs).map(|o| o[0].shape().to_vec())
    };
    assert_eq!(sq(11, Some(&[0])).expect("sq"), vec![3, 1]);
    assert_eq!(sq(13, Some(&[-1])).expect("sq"), vec![1, 3]);
    assert_eq!(sq(13, None).expect("sq"), vec![3]);
    assert!(sq(13, Some(&[1])).is_err());

    let z = iota(&[3]);
    let out = run1(
        &NodeSpec::onnx("Unsqueeze", 13),
        &[Some(&z), Some(&i64t(&[2], &[0, -1]))],
    );
    assert_eq!(out.shape(), &[1, 3, 1]);
    assert_eq!(vi(&out), vec![0, 1, 2]);
    let out = run1(
        &NodeSpec::onnx("Unsqueeze", 11).attr("axes", ints(&[1])),
        &[Some(&iota(&[2, 3]))],
    );
    assert_eq!(out.shape(), &[2, 1, 3]);
}

#[test]
fn transpose_default_perm_and_explicit() {
    let x = f32t(&[2, 3], &[1.0, 2.0, 3.0, 4.0, 5.0, 6.0]);
    let out = run1(&NodeSpec::onnx("Transpose", 13), &[Some(&x)]);
    assert_eq!(out.shape(), &[3, 2]);
    assert_eq!(vf(&out), vec![1.0, 4.0, 2.0, 5.0, 3.0, 6.0]);
    let out = run1(
        &NodeSpec::onnx("Transpose", 13).attr("perm", ints(&[1, 2, 0])),
        &[Some(&iota(&[2, 2, 3]))],
    );
    assert_eq!(out.shape(), &[2, 3, 2]);
    assert_eq!(vi(&out), vec![0, 6, 1, 7, 2, 8, 3, 9, 4, 10, 5, 11]);
    assert!(run(
        &NodeSpec::onnx("Transpose", 13).attr("perm", ints(&[0, 0])),
        &[Some(&x)]
    )
    .is_err());
}

#[test]
fn transpose_large_matches_naive() {
    let (a, b, c) = (37, 300, 41);
    let x = iota(&[a, b, c]);
    let out = run1(
        &NodeSpec::onnx("Transpose", 13).attr("perm", ints(&[2, 0, 1])),
        &[Some(&x)],
    );
    assert_eq!(out.shape(), &[c, a, b]);
    let got = vi(&out);
    for k in 0..c {
        for i in 0..a {
            for j in 0..b {
                assert_eq!(got[(k * a + i) * b + j], ((i * b + j) * c + k) as i64);
            }
        }
    }
}

/// `data` (of 4-D `shape`) transposed by `perm`, by the index formula.
fn permuted<T: Copy>(data: &[T], shape: [usize; 4], perm: [i64; 4]) -> Vec<T> {
    let strides = [
        shape[1] * shape[2] * shape[3],
        shape[2] * shape[3],
        shape[3],
        1,
    ];
    let os: Vec<usize> = perm.iter().map(|&p| shape[p as usize]).collect();
    let mut out = Vec::with_capacity(data.len());
    for a in 0..os[0] {
        for b in 0..os[1] {
            for c in 0..os[2] {
                for d in 0..os[3] {
                    let idx = [a, b, c, d];
                    out.push(
                        data[(0..4)
                            .map(|q| idx[q] * strides[perm[q] as usize])
                            .sum::<usize>()],
                    );
                }
            }
        }
    }
    out
}

/// Byte tensors (the integer models' layout changes, moved in 16 x 16 blocks) both ways
/// between NCHW and NHWC: whole blocks, images whose planes or channels are not multiples of
/// 16 or 32 (the element loop's edges), two images, against the index formula.
#[test]
fn byte_transposes_match_naive() {
    for (n, c, h, w) in [
        (1, 96, 16, 32),
        (2, 48, 9, 37),
        (1, 3, 40, 40),
        (1, 144, 7, 7),
    ] {
        let len = n * c * h * w;
        let bytes: Vec<u8> = (0..len).map(|i| (i * 131 % 251) as u8).collect();
        for (perm, shape) in [([0, 2, 3, 1], [n, c, h, w]), ([0, 3, 1, 2], [n, h, w, c])] {
            let x = HostTensor::from_vec(&shape, &bytes).expect("tensor");
            let out = run1(
                &NodeSpec::onnx("Transpose", 13).attr("perm", ints(&perm)),
                &[Some(&x)],
            );
            let got = out.to_vec::<u8>().expect("u8");
            let os: Vec<usize> = perm.iter().map(|&p| shape[p as usize]).collect();
            assert_eq!(out.shape(), &os[..]);
            assert_eq!(
                got,
                permuted(&bytes, shape, perm),
                "{shape:?} perm {perm:?}"
            );
        }
    }
}

/// Four-byte tensors (moved in 8 x 8 blocks of register transposes) both ways between NCHW
/// and NHWC: whole blocks, planes and channels that are not multiples of 8 or 32 (the element
/// loop's edges), two images, against the index formula; f32 bit patterns (NaN payloads,
/// -0.0) come through unchanged.
#[test]
fn four_byte_transposes_match_naive() {
    for (n, c, h, w) in [
        (1, 96, 16, 32),
        (2, 48, 9, 37),
        (1, 64, 8, 8),
        (1, 20, 7, 7),
    ] {
        let len = n * c * h * w;
        let words: Vec<u32> = (0..len)
            .map(|i| match i % 97 {
                3 => 0x7fc0_1234,
                5 => 0x8000_0000,
                _ => (i as u32).wrapping_mul(2_654_435_761),
            })
            .collect();
        for (perm, shape) in [([0, 2, 3, 1], [n, c, h, w]), ([0, 3, 1, 2], [n, h, w, c])] {
            let x = HostTensor::from_vec(&shape, &words).expect("tensor");
            let out = run1(
                &NodeSpec::onnx("Transpose", 13).attr("perm", ints(&perm)),
                &[Some(&x)],
            );
            let os: Vec<usize> = perm.iter().map(|&p| shape[p as usize]).collect();
            assert_eq!(out.shape(), &os[..]);
            let got = out.to_vec::<u32>().expect("u32");
            assert_eq!(
                got,
                permuted(&words, shape, perm),
                "{shape:?} perm {perm:?}"
            );
            // The same bits as f32.
            let floats: Vec<f32> = words.iter().map(|&b| f32::from_bits(b)).collect();
            let xf = HostTensor::from_vec(&shape, &floats).expect("tensor");
            let outf = run1(
                &NodeSpec::onnx("Transpose", 13).attr("perm", ints(&perm)),
                &[Some(&xf)],
            );
            let bits: Vec<u32> = outf
                .to_vec::<f32>()
                .expect("f32")
                .iter()
                .map(|v| v.to_bits())
                .collect();
            assert_eq!(bits, got, "f32 {shape:?} perm {perm:?}");
        }
    }
}

#[test]
fn transpose_nchw_to_nhwc_batched() {
    let (n, c, h, w) = (3, 45, 7, 11);
    let x = iota(&[n, c, h, w]);
    let out = run1(
        &NodeSpec::onnx("Transpose", 13).attr("perm", ints(&[0, 2, 3, 1])),
        &[Some(&x)],
    );
    assert_eq!(out.shape(), &[n, h, w, c]);
    let got = vi(&out);
    let mut k = 0;
    for b in 0..n {
        for y in 0..h {
            for xx in 0..w {
                for ch in 0..c {
                    assert_eq!(got[k], (((b * c + ch) * h + y) * w + xx) as i64);
                    k += 1;
                }
            }
        }
    }
    // A plain 2-D transpose with sizes that are not multiples of the tile.
    let m = f32t(
        &[33, 70],
        &(0..33 * 70).map(|v| v as f32).collect::<Vec<_>>(),
    );
    let t = vf(&run1(&NodeSpec::onnx("Transpose", 13), &[Some(&m)]));
    for i in 0..70 {
        for j in 0..33 {
            assert_eq!(t[i * 33 + j], (j * 70 + i) as f32);
        }
    }
}

#[test]
fn concat_and_types() {
    let a = f32t(&[2, 1], &[1.0, 2.0]);
    let b = f32t(&[2, 2], &[3.0, 4.0, 5.0, 6.0]);
    let e = f32t(&[2, 0], &[]);
    let out = run1(
        &NodeSpec::onnx("Concat", 13).attr("axis", AttrValue::Int(-1)),
        &[Some(&a), Some(&e), Some(&b)],
    );
    assert_eq!(out.shape(), &[2, 3]);
    assert_eq!(vf(&out), vec![1.0, 3.0, 4.0, 2.0, 5.0, 6.0]);
    // 1-byte (bool) and 2-byte (f16) elements.
    let t = HostTensor::from_bytes(DType::Bool, &[2], &[1, 0]).expect("bool");
    let out = run1(
        &NodeSpec::onnx("Concat", 13).attr("axis", AttrValue::Int(0)),
        &[Some(&t), Some(&t)],
    );
    assert_eq!(out.bytes(), &[1, 0, 1, 0]);
    let h = |v: f32| opreg_sdk::half::f16::from_f32(v);
    let x = HostTensor::from_vec(&[1, 2], &[h(1.0), h(2.0)]).expect("f16");
    let out = run1(
        &NodeSpec::onnx("Concat", 13).attr("axis", AttrValue::Int(0)),
        &[Some(&x), Some(&x)],
    );
    assert_eq!(
        out.to_vec::<opreg_sdk::half::f16>().expect("f16"),
        vec![h(1.0), h(2.0), h(1.0), h(2.0)]
    );
    assert!(run(
        &NodeSpec::onnx("Concat", 13).attr("axis", AttrValue::Int(0)),
        &[Some(&a), Some(&b)]
    )
    .is_err());
}

/// Concat and Split along the channels of images larger than a task ([`GRAIN`] elements):
/// the tasks cut the output anywhere (mid-input, across images), an empty input among them.
#[test]
fn concat_and_split_across_tasks() {
    let plane = 99 * 71;
    let chans = [3usize, 0, 5, 2];
    let (n, total) = (2usize, chans.iter().sum::<usize>());
    let ins: Vec<HostTensor> = chans
        .iter()
        .enumerate()
        .map(|(i, &c)| {
            let v: Vec<f32> = (0..n * c * plane)
                .map(|j| (i * 1_000_000 + j) as f32)
                .collect();
            f32t(&[n, c, 99, 71], &v)
        })
        .collect();
    let mut want = Vec::new();
    for b in 0..n {
        for (t, &c) in ins.iter().zip(&chans) {
            want.extend_from_slice(&vf(t)[b * c * plane..(b + 1) * c * plane]);
        }
    }
    let refs: Vec<Option<&HostTensor>> = ins.iter().map(Some).collect();
    let node = NodeSpec::onnx("Concat", 13).attr("axis", AttrValue::Int(1));
    let out = run1(&node, &refs);
    assert_eq!(out.shape(), &[n, total, 99, 71]);
    assert!(vf(&out) == want, "concat differs");
    // And back: Split into the non-empty inputs' channels, of both images and of the first
    // alone (one run per output).
    let sizes = i64t(&[3], &[3, 5, 2]);
    let node = NodeSpec::onnx("Split", 13)
        .attr("axis", AttrValue::Int(1))
        .outputs(3);
    let parts = run(&node, &[Some(&out), Some(&sizes)]).expect("split");
    for (part, i) in parts.iter().zip([0usize, 2, 3]) {
        assert!(vf(part) == vf(&ins[i]), "split part {i}");
    }
    let one = f32t(&[1, total, 99, 71], &want[..total * plane]);
    let parts = run(&node, &[Some(&one), Some(&sizes)]).expect("split");
    for (part, i) in parts.iter().zip([0usize, 2, 3]) {
        assert!(
            vf(part) == vf(&ins[i])[..chans[i] * plane],
            "split part {i} of one"
        );
    }
}

#[test]
fn split_uneven_and_explicit() {
    let x = iota(&[7]);
    let out = run(
        &NodeSpec::onnx("Split", 18)
            .attr("num_outputs", AttrValue::Int(3))
            .outputs(3),
        &[Some(&x)],
    )
    .expect("split");
    assert_eq!(vi(&out[0]), vec![0, 1, 2]);
    assert_eq!(vi(&out[1]), vec![3, 4, 5]);
    assert_eq!(vi(&out[2]), vec![6]);
    // Opset 13 cannot split 7 evenly into 3.
    assert!(run(&NodeSpec::onnx("Split", 13).outputs(3), &[Some(&x)]).is_err());

    let y = f32t(&[2, 3], &[1.0, 2.0, 3.0, 4.0, 5.0, 6.0]);
    let out = run(
        &NodeSpec::onnx("Split", 13)
            .attr("axis", AttrValue::Int(1))
            .outputs(2),
        &[Some(&y), Some(&i64t(&[2], &[1, 2]))],
    )
    .expect("split");
    assert_eq!(out[0].shape(), &[2, 1]);
    assert_eq!(vf(&out[0]), vec![1.0, 4.0]);
    assert_eq!(vf(&out[1]), vec![2.0, 3.0, 5.0, 6.0]);
    let out = run(
        &NodeSpec::onnx("Split", 11)
            .attr("axis", AttrValue::Int(-1))
            .attr("split", ints(&[2, 1]))
            .outputs(2),
        &[Some(&y)],
    )
    .expect("split");
    assert_eq!(vf(&out[1]), vec![3.0, 6.0]);
    let out = run(&NodeSpec::onnx("Split", 13).outputs(2), &[Some(&y)]).expect("split");
    assert_eq!(vf(&out[1]), vec![4.0, 5.0, 6.0]);
}

#[test]
fn slice_steps_and_clamping() {
    let x = iota(&[10]);
    let sl = |starts: &[i64], ends: &[i64], axes: Option<&[i64]>, steps: Option<&[i64]>, x| {
        let (st, en) = (i64t(&[starts.len()], starts), i64t(&[ends.len()], ends));
        let ax = axes.map(|a| i64t(&[a.len()], a));
        let sp = steps.map(|a| i64t(&[a.len()], a));
        run1(
            &NodeSpec::onnx("Slice", 13),
            &[Some(x), Some(&st), Some(&en), ax.as_ref(), sp.as_ref()],
        )
    };
    assert_eq!(
        vi(&sl(&[-1], &[i64::MIN], None, Some(&[-3]), &x)),
        vec![9, 6, 3, 0]
    );
    assert_eq!(
        vi(&sl(&[100], &[0], None, Some(&[-2]), &x)),
        vec![9, 7, 5, 3, 1]
    );
    assert_eq!(vi(&sl(&[2], &[-5], None, None, &x)), vec![2, 3, 4]);
    assert_eq!(sl(&[5], &[2], None, None, &x).shape(), &[0]);
    let m = iota(&[3, 4]);
    let out = sl(&[0, 1], &[i64::MAX, 3], Some(&[0, -1]), Some(&[2, 1]), &m);
    assert_eq!(out.shape(), &[2, 2]);
    assert_eq!(vi(&out), vec![1, 2, 9, 10]);
    // Axes and steps left out, axes as trailing absent input.
    let out = sl(&[1], &[3], Some(&[1]), None, &m);
    assert_eq!(vi(&out), vec![1, 2, 5, 6, 9, 10]);
    let out = run1(
        &NodeSpec::onnx("Slice", 9)
            .attr("starts", ints(&[1]))
            .attr("ends", ints(&[1000]))
            .attr("axes", ints(&[0])),
        &[Some(&m)],
    );
    assert_eq!(vi(&out), (4..12).collect::<Vec<_>>());
    // Step 0 is an error.
    let st = i64t(&[1], &[0]);
    assert!(run(
        &NodeSpec::onnx("Slice", 13),
        &[Some(&x), Some(&st), Some(&st), None, Some(&st)]
    )
    .is_err());
}

#[test]
fn expand_and_tile() {
    let x = i64t(&[3, 1], &[1, 2, 3]);
    let out = run1(
        &NodeSpec::onnx("Expand", 13),
        &[Some(&x), Some(&i64t(&[3], &[2, 1, 4]))],
    );
    assert_eq!(out.shape(), &[2, 3, 4]);
    let half = [1, 1, 1, 1, 2, 2, 2, 2, 3, 3, 3, 3];
    assert_eq!(vi(&out), [half, half].concat());
    let y = f32t(&[3], &[1.0, 2.0, 3.0]);
    let out = run1(
        &NodeSpec::onnx("Expand", 8),
        &[Some(&y), Some(&i64t(&[2], &[2, 1]))],
    );
    assert_eq!(out.shape(), &[2, 3]);
    assert_eq!(vf(&out), vec![1.0, 2.0, 3.0, 1.0, 2.0, 3.0]);
    assert!(run(
        &NodeSpec::onnx("Expand", 13),
        &[Some(&y), Some(&i64t(&[1], &[2]))]
    )
    .is_err());

    let t = i64t(&[2, 2], &[1, 2, 3, 4]);
    let tile = |reps: &[i64]| {
        run1(
            &NodeSpec::onnx("Tile", 13),
            &[Some(&t), Some(&i64t(&[2], reps))],
        )
    };
    let out = tile(&[1, 2]);
    assert_eq!(out.shape(), &[2, 4]);
    assert_eq!(vi(&out), vec![1, 2, 1, 2, 3, 4, 3, 4]);
    assert_eq!(vi(&tile(&[2, 1])), vec![1, 2, 3, 4, 1, 2, 3, 4]);
    assert_eq!(tile(&[0, 3]).shape(), &[0, 6]);
}

#[test]
fn pad_modes() {
    let x = f32t(&[3, 2], &[1.0, 1.2, 2.3, 3.4, 4.5, 5.7]);
    let pads = i64t(&[4], &[0, 2, 0, 0]);
    let pad = |mode: &str, value: Option<&HostTensor>| {
        vf(&run1(
            &NodeSpec::onnx("Pad", 13).attr("mode", s(mode)),
            &[Some(&x), Some(&pads), value],
        ))
    };
    assert_eq!(
        pad("constant", None),
        vec![0.0, 0.0, 1.0, 1.2, 0.0, 0.0, 2.3, 3.4, 0.0, 0.0, 4.5, 5.7]
    );
    let v = f32t(&[], &[1.5]);
    assert_eq!(
        pad("constant", Some(&v)),
        vec![1.5, 1.5, 1.0, 1.2, 1.5, 1.5, 2.3, 3.4, 1.5, 1.5, 4.5, 5.7]
    );
    assert_eq!(
        pad("reflect", None),
        vec![1.0, 1.2, 1.0, 1.2, 2.3, 3.4, 2.3, 3.4, 4.5, 5.7, 4.5, 5.7]
    );
    assert_eq!(
        pad("edge", None),
        vec![1.0, 1.0, 1.0, 1.2, 2.3, 2.3, 2.3, 3.4, 4.5, 4.5, 4.5, 5.7]
    );
    let y = i64t(&[3], &[1, 2, 3]);
    let pad1 = |opset, mode: &str, p: &[i64]| {
        vi(&run1(
            &NodeSpec::onnx("Pad", opset).attr("mode", s(mode)),
            &[Some(&y), Some(&i64t(&[2], p))],
        ))
    };
    assert_eq!(pad1(13, "reflect", &[2, 2]), vec![3, 2, 1, 2, 3, 2, 1]);
    assert_eq!(pad1(19, "wrap", &[2, 4]), vec![2, 3, 1, 2, 3, 1, 2, 3, 1]);
    assert_eq!(pad1(13, "constant", &[-1, 1]), vec![2, 3, 0]);
    // Empty rows, cropped past their start: padding only.
    let empty = run1(
        &NodeSpec::onnx("Pad", 13),
        &[Some(&f32t(&[2, 0], &[])), Some(&i64t(&[4], &[0, -1, 0, 2]))],
    );
    assert_eq!(empty.shape(), &[2, 1]);
    assert_eq!(vf(&empty), vec![0.0, 0.0]);
    assert!(run(
        &NodeSpec::onnx("Pad", 13).attr("mode", s("wrap")),
        &[Some(&y), Some(&i64t(&[2], &[1, 1]))]
    )
    .is_err());
    // Opset 18 axes.
    let m = i64t(&[2, 2], &[1, 2, 3, 4]);
    let out = run1(
        &NodeSpec::onnx("Pad", 18),
        &[
            Some(&m),
            Some(&i64t(&[2], &[1, 0])),
            None,
            Some(&i64t(&[1], &[-1])),
        ],
    );
    assert_eq!(out.shape(), &[2, 3]);
    assert_eq!(vi(&out), vec![0, 1, 2, 0, 3, 4]);
    // Opset 2: attributes.
    let out = run1(
        &NodeSpec::onnx("Pad", 2)
            .attr("pads", ints(&[1, 1]))
            .attr("value", AttrValue::Float(9.0)),
        &[Some(&f32t(&[2], &[1.0, 2.0]))],
    );
    assert_eq!(vf(&out), vec![9.0, 1.0, 2.0, 9.0]);
}

#[test]
fn gather_negative_indices() {
    let x = i64t(&[3, 2], &[1, 2, 3, 4, 5, 6]);
    let idx = i64t(&[2, 2], &[0, -1, 1, 0]);
    let out = run1(&NodeSpec::onnx("Gather", 13), &[Some(&x), Some(&idx)]);
    assert_eq!(out.shape(), &[2, 2, 2]);
    assert_eq!(vi(&out), vec![1, 2, 5, 6, 3, 4, 1, 2]);
    let idx32 = HostTensor::from_vec(&[1], &[-1i32]).expect("i32");
    let out = run1(
        &NodeSpec::onnx("Gather", 13).attr("axis", AttrValue::Int(1)),
        &[Some(&x), Some(&idx32)],
    );
    assert_eq!(out.shape(), &[3, 1]);
    assert_eq!(vi(&out), vec![2, 4, 6]);
    let scalar = i64t(&[], &[1]);
    let out = run1(&NodeSpec::onnx("Gather", 13), &[Some(&x), Some(&scalar)]);
    assert_eq!(out.shape(), &[2]);
    assert_eq!(vi(&out), vec![3, 4]);
    assert!(run(
        &NodeSpec::onnx("Gather", 13),
        &[Some(&x), Some(&i64t(&[1], &[3]))]
    )
    .is_err());
}

#[test]
fn gather_elements_and_nd() {
    let x = i64t(&[2, 2], &[1, 2, 3, 4]);
    let out = run1(
        &NodeSpec::onnx("GatherElements", 13).attr("axis", AttrValue::Int(1)),
        &[Some(&x), Some(&i64t(&[2, 2], &[0, 0, 1, 0]))],
    );
    assert_eq!(vi(&out), vec![1, 1, 4, 3]);
    let y = i64t(&[3, 3], &[1, 2, 3, 4, 5, 6, 7, 8, 9]);
    let out = run1(
        &NodeSpec::onnx("GatherElements", 13),
        &[Some(&y), Some(&i64t(&[2, 3], &[1, 2, 0, 2, 0, -3]))],
    );
    assert_eq!(vi(&out), vec![4, 8, 3, 7, 2, 3]);

    let nd = |b: i64, data: &HostTensor, idx: &HostTensor| {
        run1(
            &NodeSpec::onnx("GatherND", 13).attr("batch_dims", AttrValue::Int(b)),
            &[Some(data), Some(idx)],
        )
    };
    let d = i64t(&[2, 2], &[0, 1, 2, 3]);
    assert_eq!(vi(&nd(0, &d, &i64t(&[2, 2], &[0, 0, 1, 1]))), vec![0, 3]);
    let out = nd(0, &d, &i64t(&[2, 1], &[1, 0]));
    assert_eq!(out.shape(), &[2, 2]);
    assert_eq!(vi(&out), vec![2, 3, 0, 1]);
    let d3 = iota(&[2, 2, 2]);
    let out = nd(1, &d3, &i64t(&[2, 1], &[1, 0]));
    assert_eq!(out.shape(), &[2, 2]);
    assert_eq!(vi(&out), vec![2, 3, 4, 5]);
    assert_eq!(vi(&nd(0, &d, &i64t(&[1, 2], &[-1, -2]))), vec![2]);
}

#[test]
fn scatter_elements_reductions() {
    let data = f32t(&[3, 3], &[0.0; 9]);
    let idx = i64t(&[2, 3], &[1, 0, 2, 0, 2, 1]);
    let upd = f32t(&[2, 3], &[1.0, 1.1, 1.2, 2.0, 2.1, 2.2]);
    let out = run1(
        &NodeSpec::onnx("ScatterElements", 13),
        &[Some(&data), Some(&idx), Some(&upd)],
    );
    assert_eq!(vf(&out), vec![2.0, 1.1, 0.0, 1.0, 0.0, 2.2, 0.0, 2.1, 1.2]);
    let d = i64t(&[1, 5], &[1, 2, 3, 4, 5]);
    let se = |red: &str, opset, idx: &[i64], upd: &[i64]| {
        run(
            &NodeSpec::onnx("ScatterElements", opset)
                .attr("axis", AttrValue::Int(1))
                .attr("reduction", s(red)),
            &[
                Some(&d),
                Some(&i64t(&[1, idx.len()], idx)),
                Some(&i64t(&[1, upd.len()], upd)),
            ],
        )
        .map(|o| vi(&o[0]))
    };
    assert_eq!(
        se("add", 16, &[1, 1, -1], &[10, 20, 7]).expect("add"),
        vec![1, 32, 3, 4, 12]
    );
    assert_eq!(
        se("mul", 16, &[0, 0], &[3, 4]).expect("mul"),
        vec![12, 2, 3, 4, 5]
    );
    assert_eq!(
        se("max", 18, &[0, 2, 2], &[5, 0, 9]).expect("max"),
        vec![5, 2, 9, 4, 5]
    );
    assert_eq!(
        se("min", 18, &[4], &[-1]).expect("min"),
        vec![1, 2, 3, 4, -1]
    );
    assert!(se("max", 16, &[0], &[1]).is_err());
    // Float add with a duplicate index.
    let out = run1(
        &NodeSpec::onnx("ScatterElements", 18)
            .attr("axis", AttrValue::Int(1))
            .attr("reduction", s("add")),
        &[
            Some(&f32t(&[1, 3], &[1.0, 2.0, 3.0])),
            Some(&i64t(&[1, 2], &[1, 1])),
            Some(&f32t(&[1, 2], &[0.5, 0.25])),
        ],
    );
    assert_eq!(vf(&out), vec![1.0, 2.75, 3.0]);
}

#[test]
fn scatter_nd_add_and_slices() {
    let data = iota(&[8]);
    let out = run1(
        &NodeSpec::onnx("ScatterND", 13),
        &[
            Some(&data),
            Some(&i64t(&[4, 1], &[4, 3, 1, 7])),
            Some(&i64t(&[4], &[9, 10, 11, 12])),
        ],
    );
    assert_eq!(vi(&out), vec![0, 11, 2, 10, 9, 5, 6, 12]);
    let out = run1(
        &NodeSpec::onnx("ScatterND", 16).attr("reduction", s("add")),
        &[
            Some(&i64t(&[2], &[1, 2])),
            Some(&i64t(&[2, 1], &[0, 0])),
            Some(&i64t(&[2], &[5, 6])),
        ],
    );
    assert_eq!(vi(&out), vec![12, 2]);
    let out = run1(
        &NodeSpec::onnx("ScatterND", 18).attr("reduction", s("mul")),
        &[
            Some(&f32t(&[2, 2], &[1.0, 2.0, 3.0, 4.0])),
            Some(&i64t(&[1, 1], &[-1])),
            Some(&f32t(&[1, 2], &[10.0, 0.5])),
        ],
    );
    assert_eq!(vf(&out), vec![1.0, 2.0, 30.0, 2.0]);
    assert!(run(
        &NodeSpec::onnx("ScatterND", 13),
        &[
            Some(&data),
            Some(&i64t(&[1, 1], &[0])),
            Some(&i64t(&[2], &[1, 2])),
        ],
    )
    .is_err());
}

#[test]
fn shape_size_constant_of_shape() {
    let x = f32t(&[2, 3, 4], &[0.0; 24]);
    let sh = |start: Option<i64>, end: Option<i64>, opset| {
        let mut spec = NodeSpec::onnx("Shape", opset);
        if let Some(s) = start {
            spec = spec.attr("start", AttrValue::Int(s));
        }
        if let Some(e) = end {
            spec = spec.attr("end", AttrValue::Int(e));
        }
        vi(&run1(&spec, &[Some(&x)]))
    };
    assert_eq!(sh(None, None, 13), vec![2, 3, 4]);
    assert_eq!(sh(Some(1), None, 15), vec![3, 4]);
    assert_eq!(sh(None, Some(-1), 15), vec![2, 3]);
    assert_eq!(sh(Some(-1), Some(10), 15), vec![4]);
    assert_eq!(sh(Some(2), Some(1), 15), Vec::<i64>::new());
    let out = run1(&NodeSpec::onnx("Size", 13), &[Some(&x)]);
    assert_eq!(out.shape(), &[] as &[usize]);
    assert_eq!(vi(&out), vec![24]);

    let shape = i64t(&[2], &[2, 3]);
    let value = OwnedTensor::from_vec(vec![1], vec![7i64]).expect("value");
    let out = run1(
        &NodeSpec::onnx("ConstantOfShape", 9).attr("value", AttrValue::Tensor(value)),
        &[Some(&shape)],
    );
    assert_eq!(out.shape(), &[2, 3]);
    assert_eq!(vi(&out), vec![7; 6]);
    let out = run1(
        &NodeSpec::onnx("ConstantOfShape", 20),
        &[Some(&i64t(&[0], &[]))],
    );
    assert_eq!(out.shape(), &[] as &[usize]);
    assert_eq!(vf(&out), vec![0.0]);
}

#[test]
fn range_one_hot_nonzero() {
    let r = |a: HostTensor, b: HostTensor, c: HostTensor| {
        run1(
            &NodeSpec::onnx("Range", 11),
            &[Some(&a), Some(&b), Some(&c)],
        )
    };
    let sc = |v: i64| i64t(&[], &[v]);
    assert_eq!(vi(&r(sc(1), sc(10), sc(3))), vec![1, 4, 7]);
    assert_eq!(vi(&r(sc(10), sc(1), sc(-4))), vec![10, 6, 2]);
    assert_eq!(r(sc(0), sc(0), sc(1)).shape(), &[0]);
    let fs = |v: f32| f32t(&[], &[v]);
    assert_eq!(vf(&r(fs(10.0), fs(4.0), fs(-3.0))), vec![10.0, 7.0]);
    assert_eq!(
        vf(&r(fs(0.0), fs(1.0), fs(0.25))),
        vec![0.0, 0.25, 0.5, 0.75]
    );

    let values = f32t(&[2], &[0.0, 1.0]);
    let oh = |axis: i64, idx: &HostTensor| {
        run1(
            &NodeSpec::onnx("OneHot", 11).attr("axis", AttrValue::Int(axis)),
            &[Some(idx), Some(&i64t(&[], &[3])), Some(&values)],
        )
    };
    let out = oh(-1, &i64t(&[3], &[0, -1, 5]));
    assert_eq!(out.shape(), &[3, 3]);
    assert_eq!(vf(&out), vec![1.0, 0.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0]);
    let out = run1(
        &NodeSpec::onnx("OneHot", 9),
        &[
            Some(&i64t(&[2], &[-1, 1])),
            Some(&i64t(&[], &[3])),
            Some(&values),
        ],
    );
    assert_eq!(vf(&out), vec![0.0, 0.0, 0.0, 0.0, 1.0, 0.0]);
    let out = oh(0, &f32t(&[2], &[0.0, 2.0]));
    assert_eq!(out.shape(), &[3, 2]);
    assert_eq!(vf(&out), vec![1.0, 0.0, 0.0, 0.0, 0.0, 1.0]);

    let out = run1(
        &NodeSpec::onnx("NonZero", 13),
        &[Some(&i64t(&[2, 2], &[1, 0, 1, 1]))],
    );
    assert_eq!(out.shape(), &[2, 3]);
    assert_eq!(vi(&out), vec![0, 1, 1, 0, 0, 1]);
    let out = run1(
        &NodeSpec::onnx("NonZero", 13),
        &[Some(&f32t(&[3], &[-0.0, 2.0, f32::NAN]))],
    );
    assert_eq!(vi(&out), vec![1, 2]);
}

#[test]
fn depth_to_space_and_back() {
    let x = iota(&[1, 8, 2, 3]);
    let d2s = |mode: &str| {
        run1(
            &NodeSpec::onnx("DepthToSpace", 13)
                .attr("blocksize", AttrValue::Int(2))
                .attr("mode", s(mode)),
            &[Some(&x)],
        )
    };
    let dcr = d2s("DCR");
    assert_eq!(dcr.shape(), &[1, 2, 4, 6]);
    assert_eq!(
        vi(&dcr),
        vec![
            0, 12, 1, 13, 2, 14, 24, 36, 25, 37, 26, 38, 3, 15, 4, 16, 5, 17, 27, 39, 28, 40, 29,
            41, 6, 18, 7, 19, 8, 20, 30, 42, 31, 43, 32, 44, 9, 21, 10, 22, 11, 23, 33, 45, 34, 46,
            35, 47
        ]
    );
    assert_eq!(
        vi(&d2s("CRD")),
        vec![
            0, 6, 1, 7, 2, 8, 12, 18, 13, 19, 14, 20, 3, 9, 4, 10, 5, 11, 15, 21, 16, 22, 17, 23,
            24, 30, 25, 31, 26, 32, 36, 42, 37, 43, 38, 44, 27, 33, 28, 34, 29, 35, 39, 45, 40, 46,
            41, 47
        ]
    );
    let back = run1(
        &NodeSpec::onnx("SpaceToDepth", 13).attr("blocksize", AttrValue::Int(2)),
        &[Some(&dcr)],
    );
    assert_eq!(back.shape(), &[1, 8, 2, 3]);
    assert_eq!(vi(&back), vi(&x));
}

#[test]
fn trilu_upper_lower() {
    let x = i64t(&[3, 3], &[1, 2, 3, 4, 5, 6, 7, 8, 9]);
    let tri = |upper: i64, k: Option<i64>| {
        let kt = k.map(|k| i64t(&[], &[k]));
        vi(&run1(
            &NodeSpec::onnx("Trilu", 14).attr("upper", AttrValue::Int(upper)),
            &[Some(&x), kt.as_ref()],
        ))
    };
    assert_eq!(tri(1, None), vec![1, 2, 3, 0, 5, 6, 0, 0, 9]);
    assert_eq!(tri(1, Some(1)), vec![0, 2, 3, 0, 0, 6, 0, 0, 0]);
    assert_eq!(tri(0, Some(-1)), vec![0, 0, 0, 4, 0, 0, 7, 8, 0]);
    assert_eq!(tri(0, None), vec![1, 0, 0, 4, 5, 0, 7, 8, 9]);
}

#[test]
fn dropout_constant_eyelike() {
    let x = f32t(&[2], &[1.0, 2.0]);
    let out = run(&NodeSpec::onnx("Dropout", 13).outputs(2), &[Some(&x)]).expect("dropout");
    assert_eq!(vf(&out[0]), vec![1.0, 2.0]);
    assert_eq!(out[1].dtype(), DType::Bool);
    assert_eq!(out[1].bytes(), &[1, 1]);

    let out = run1(
        &NodeSpec::onnx("Constant", 13).attr("value_ints", ints(&[1, 2])),
        &[],
    );
    assert_eq!(out.shape(), &[2]);
    assert_eq!(vi(&out), vec![1, 2]);
    let out = run1(
        &NodeSpec::onnx("Constant", 13).attr("value_float", AttrValue::Float(2.5)),
        &[],
    );
    assert_eq!(out.shape(), &[] as &[usize]);
    assert_eq!(vf(&out), vec![2.5]);
    let t = OwnedTensor::from_vec(vec![2, 1], vec![3i64, 4]).expect("t");
    let out = run1(
        &NodeSpec::onnx("Constant", 1).attr("value", AttrValue::Tensor(t)),
        &[],
    );
    assert_eq!(out.shape(), &[2, 1]);
    assert_eq!(vi(&out), vec![3, 4]);
    let out = run1(
        &NodeSpec::onnx("Constant", 13).attr("value_string", s("hi")),
        &[],
    );
    assert_eq!(out.strings()[0].as_str(), "hi");

    let e = f32t(&[2, 3], &[5.0; 6]);
    let out = run1(
        &NodeSpec::onnx("EyeLike", 9).attr("k", AttrValue::Int(1)),
        &[Some(&e)],
    );
    assert_eq!(vf(&out), vec![0.0, 1.0, 0.0, 0.0, 0.0, 1.0]);
    let out = run1(
        &NodeSpec::onnx("EyeLike", 9).attr("dtype", AttrValue::Int(7)),
        &[Some(&e)],
    );
    assert_eq!(vi(&out), vec![1, 0, 0, 0, 1, 0]);
}

#[test]
fn compress_and_reverse_sequence() {
    let x = i64t(&[3, 2], &[1, 2, 3, 4, 5, 6]);
    let cond = |v: &[u8]| HostTensor::from_bytes(DType::Bool, &[v.len()], v).expect("cond");
    let c = |axis: Option<i64>, v: &[u8]| {
        let mut spec = NodeSpec::onnx("Compress", 11);
        if let Some(a) = axis {
            spec = spec.attr("axis", AttrValue::Int(a));
        }
        run1(&spec, &[Some(&x), Some(&cond(v))])
    };
    let out = c(Some(0), &[0, 1, 1]);
    assert_eq!(out.shape(), &[2, 2]);
    assert_eq!(vi(&out), vec![3, 4, 5, 6]);
    let out = c(Some(-1), &[0, 1]);
    assert_eq!(out.shape(), &[3, 1]);
    assert_eq!(vi(&out), vec![2, 4, 6]);
    assert_eq!(vi(&c(None, &[0, 1, 0, 0, 1])), vec![2, 5]);

    let x = i64t(
        &[4, 4],
        &[0, 4, 8, 12, 1, 5, 9, 13, 2, 6, 10, 14, 3, 7, 11, 15],
    );
    let out = run1(
        &NodeSpec::onnx("ReverseSequence", 10)
            .attr("time_axis", AttrValue::Int(0))
            .attr("batch_axis", AttrValue::Int(1)),
        &[Some(&x), Some(&i64t(&[4], &[4, 3, 2, 1]))],
    );
    assert_eq!(
        vi(&out),
        vec![3, 6, 9, 12, 2, 5, 8, 13, 1, 4, 10, 14, 0, 7, 11, 15]
    );
    let y = iota(&[2, 3]);
    let out = run1(
        &NodeSpec::onnx("ReverseSequence", 10)
            .attr("time_axis", AttrValue::Int(1))
            .attr("batch_axis", AttrValue::Int(0)),
        &[Some(&y), Some(&i64t(&[2], &[3, 2]))],
    );
    assert_eq!(vi(&out), vec![2, 1, 0, 4, 3, 5]);
}

#[test]
fn strings_move_too() {
    let x = HostTensor::from_strings(&[2, 2], &[b"a", b"b", b"c", b"d"]).expect("strings");
    let strs = |t: &HostTensor| {
        t.strings()
            .iter()
            .map(|s| s.to_string())
            .collect::<Vec<_>>()
    };
    let out = run1(&NodeSpec::onnx("Transpose", 13), &[Some(&x)]);
    assert_eq!(strs(&out), vec!["a", "c", "b", "d"]);
    let out = run1(
        &NodeSpec::onnx("Gather", 13).attr("axis", AttrValue::Int(1)),
        &[Some(&x), Some(&i64t(&[1], &[-1]))],
    );
    assert_eq!(strs(&out), vec!["b", "d"]);
    let out = run1(
        &NodeSpec::onnx("Pad", 13),
        &[Some(&x), Some(&i64t(&[4], &[0, 1, 0, 0]))],
    );
    assert_eq!(strs(&out), vec!["", "a", "b", "", "c", "d"]);
    let out = run1(
        &NodeSpec::onnx("Reshape", 14),
        &[Some(&x), Some(&i64t(&[1], &[-1]))],
    );
    assert_eq!(strs(&out), vec!["a", "b", "c", "d"]);
}

#[test]
fn int32_indices_trailing_inputs_and_byte_types() {
    let x = iota(&[2, 5]);
    let st = HostTensor::from_vec(&[1], &[-2i32]).expect("i32");
    let en = HostTensor::from_vec(&[1], &[i32::MAX]).expect("i32");
    // Only three inputs: axes and steps missing from the end of the slice.
    let out = run1(
        &NodeSpec::onnx("Slice", 13),
        &[Some(&x), Some(&st), Some(&en)],
    );
    // Axis 0 of length 2: -2 is row 0, to the end.
    assert_eq!(out.shape(), &[2, 5]);
    let st1 = HostTensor::from_vec(&[1], &[-1i32]).expect("i32");
    let out = run1(
        &NodeSpec::onnx("Slice", 13),
        &[Some(&x), Some(&st1), Some(&en)],
    );
    assert_eq!(vi(&out), vec![5, 6, 7, 8, 9]);
    let ax = HostTensor::from_vec(&[1], &[1i32]).expect("i32");
    let out = run1(
        &NodeSpec::onnx("Slice", 13),
        &[Some(&x), Some(&st), Some(&en), Some(&ax)],
    );
    assert_eq!(vi(&out), vec![3, 4, 8, 9]);
    let b = HostTensor::from_bytes(DType::Bool, &[3], &[1, 0, 1]).expect("bool");
    let out = run1(
        &NodeSpec::onnx("Gather", 13),
        &[Some(&b), Some(&i64t(&[4], &[1, 0, -1, 1]))],
    );
    assert_eq!(out.bytes(), &[0, 1, 1, 0]);
    let u8s = HostTensor::from_vec(&[2, 2], &[1u8, 2, 3, 4]).expect("u8");
    let out = run1(
        &NodeSpec::onnx("ScatterND", 16).attr("reduction", s("add")),
        &[
            Some(&u8s),
            Some(&i64t(&[1, 2], &[1, 1])),
            Some(&HostTensor::from_vec(&[1], &[255u8]).expect("u8")),
        ],
    );
    assert_eq!(out.to_vec::<u8>().expect("u8"), vec![1, 2, 3, 3]);
    let strs = HostTensor::from_strings(&[3], &[b"x", b"y", b"z"]).expect("s");
    let upd = HostTensor::from_strings(&[1], &[b"w"]).expect("s");
    let out = run1(
        &NodeSpec::onnx("ScatterND", 13),
        &[Some(&strs), Some(&i64t(&[1, 1], &[-2])), Some(&upd)],
    );
    let got: Vec<String> = out.strings().iter().map(|s| s.to_string()).collect();
    assert_eq!(got, vec!["x", "w", "z"]);
    let out = run(
        &NodeSpec::onnx("Split", 18).outputs(2),
        &[Some(&x), Some(&i64t(&[2], &[0, 2]))],
    )
    .expect("split");
    assert_eq!(out[0].shape(), &[0, 5]);
    assert_eq!(vi(&out[1]), (0..10).collect::<Vec<_>>());
}

#[test]
#[ignore = "timing; run with --release -- --ignored --nocapture"]
fn transpose_timing() {
    let n = 4096;
    let x = f32t(&[n, n], &vec![1.0; n * n]);
    for perm in [[1i64, 0], [0, 1]] {
        let spec = NodeSpec::onnx("Transpose", 13).attr("perm", ints(&perm));
        run1(&spec, &[Some(&x)]);
        let t = std::time::Instant::now();
        for _ in 0..5 {
            run1(&spec, &[Some(&x)]);
        }
        let dt = t.elapsed().as_secs_f64() / 5.0;
        eprintln!(
            "transpose {perm:?} {n}x{n} f32: {:.2} ms, {:.2} GB/s",
            dt * 1e3,
            2.0 * (n * n * 4) as f64 / dt / 1e9
        );
    }
    let y = f32t(&[64, 256, 512], &vec![1.0; 64 * 256 * 512]);
    let spec = NodeSpec::onnx("Transpose", 13).attr("perm", ints(&[2, 0, 1]));
    let t = std::time::Instant::now();
    run1(&spec, &[Some(&y)]);
    eprintln!(
        "transpose [64,256,512] perm 2,0,1: {:.2} ms",
        t.elapsed().as_secs_f64() * 1e3
    );
}

/// Sizes from data far past memory fail the call (ResourceExhausted) instead of aborting the
/// process; empty tensors with huge extents still work, without overflow.
#[test]
fn data_sized_buffers_fail_cleanly() {
    let exhausted = |r: Result<Vec<HostTensor>, PluginError>, what: &str| {
        let e = r.expect_err(what);
        assert_eq!(
            e.code,
            ErrorCode::ResourceExhausted,
            "{what}: {}",
            e.message
        );
    };
    let x = f32t(&[2], &[1.0, 2.0]);
    // Pad: 2^40 and i64::MAX pads, every mode; pads removing more than the input.
    for pads in [[1i64 << 40, 0], [i64::MAX, i64::MAX]] {
        for mode in ["constant", "reflect", "edge", "wrap"] {
            let p = i64t(&[2], &pads);
            let node = NodeSpec::onnx("Pad", 19).attr("mode", s(mode));
            exhausted(run(&node, &[Some(&x), Some(&p)]), mode);
        }
    }
    let p = i64t(&[2], &[i64::MIN, 0]);
    let e = run(&NodeSpec::onnx("Pad", 19), &[Some(&x), Some(&p)]).expect_err("negative");
    assert_eq!(e.code, ErrorCode::InvalidArgument, "{}", e.message);
    // Tile: repeats whose product with the extent is past memory.
    let reps = i64t(&[1], &[i64::MAX]);
    exhausted(
        run(&NodeSpec::onnx("Tile", 13), &[Some(&x), Some(&reps)]),
        "Tile",
    );
    // GatherND: 2^40 empty index tuples (k = 0), each selecting all of X.
    let idx = i64t(&[1 << 40, 0], &[]);
    exhausted(
        run(&NodeSpec::onnx("GatherND", 13), &[Some(&x), Some(&idx)]),
        "GatherND",
    );

    // An empty cache with a 2^40 batch: nothing per batch.
    let past = f32t(&[1 << 40, 4, 0], &[]);
    let upd = f32t(&[1 << 40, 1, 0], &[]);
    let out = run1(
        &NodeSpec::onnx("TensorScatter", 24),
        &[Some(&past), Some(&upd)],
    );
    assert_eq!(out.shape(), &[1 << 40, 4, 0]);
    // [2^30, 0, 2^30]: huge extents around an empty one.
    let e = f32t(&[1 << 30, 0, 1 << 30], &[]);
    let shape = i64t(&[3], &[1 << 30, -1, 1 << 20]);
    let out = run1(&NodeSpec::onnx("Reshape", 14), &[Some(&e), Some(&shape)]);
    assert_eq!(out.shape(), &[1 << 30, 0, 1 << 20]);
    let node = NodeSpec::onnx("Concat", 13).attr("axis", AttrValue::Int(2));
    let out = run1(&node, &[Some(&e), Some(&e)]);
    assert_eq!(out.shape(), &[1 << 30, 0, 1 << 31]);
    let sizes = i64t(&[2], &[1 << 29, 1 << 29]);
    let node = NodeSpec::onnx("Split", 13)
        .attr("axis", AttrValue::Int(2))
        .outputs(2);
    let out = run(&node, &[Some(&e), Some(&sizes)]).expect("split");
    assert_eq!(out[1].shape(), &[1 << 30, 0, 1 << 29]);
}

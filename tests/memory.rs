//! Memory planning on a real plan: the first run with new input shapes allocates as usual and
//! teaches the plan their sizes; later runs place their values in one reused arena, with the
//! same results.

use opreg_sdk::{host::HostTensor, Device};
use opreg_tests::onnx::*;
use opregd::{exec::ComputePool, graph, registry::Registry};
use std::{collections::HashMap, sync::Arc};

/// A model compiled with the shipped plugins, run on a two-thread pool.
struct Compiled {
    pool: ComputePool,
    plan: graph::Plan,
    // Holds the registry's staged plugin copies for the plan's life.
    _stage: tempfile::TempDir,
}

impl Compiled {
    fn new(model: &[u8]) -> Self {
        let stage = tempfile::tempdir().expect("tempdir");
        let registry = Registry::new(stage.path().join("stage"), Default::default());
        for (p, r) in registry.load_all(&[
            opreg_tests::plugin("onnx_ops"),
            opreg_tests::plugin("blas_cpu"),
        ]) {
            r.unwrap_or_else(|e| panic!("{}: {e}", p.display()));
        }
        let pool = ComputePool::new(2).expect("pool");
        let model = graph::import(model, None).expect("import");
        let plan = pool
            .install(|| graph::compile(&model, registry.snapshot(), &[Device::CPU], usize::MAX))
            .expect("compile");
        Compiled {
            pool,
            plan,
            _stage: stage,
        }
    }

    /// Runs with `x` of shape `[batch, 4, 8, 8]` (values cycling with `period`); each output's
    /// name, shape and bytes.
    fn run(&self, batch: usize, period: usize) -> Vec<(String, Vec<usize>, Vec<u8>)> {
        self.outputs(batch, period)
            .iter()
            .map(|(name, t)| (name.clone(), t.shape().to_vec(), t.bytes().to_vec()))
            .collect()
    }

    /// [`run`](Self::run)'s outputs themselves.
    fn outputs(&self, batch: usize, period: usize) -> Vec<(String, Arc<HostTensor>)> {
        let x: Vec<f32> = (0..batch * 256)
            .map(|i| ((i % period) as f32 - (period / 2) as f32) / 7.0)
            .collect();
        self.run_x(batch, &x)
    }

    /// The outputs for `x` of shape `[batch, 4, 8, 8]`.
    fn run_x(&self, batch: usize, x: &[f32]) -> Vec<(String, Arc<HostTensor>)> {
        let x = HostTensor::from_vec(&[batch, 4, 8, 8], x).expect("x");
        let feeds: HashMap<String, Arc<HostTensor>> = [("x".to_string(), Arc::new(x))].into();
        self.pool
            .install(|| graph::run(&self.plan, feeds))
            .expect("run")
    }
}

/// `y = Sigmoid(Conv(Sigmoid(Conv(x)))) + Sigmoid(Conv(x))` with a symbolic batch (Sigmoid: no
/// fusion joins it to the Conv, so four values are planned).
fn residual_cnn() -> Vec<u8> {
    let w = |name: &str, seed: usize| {
        let v: Vec<f32> = (0..4 * 4 * 9)
            .map(|i| (((i * 37 + seed) % 17) as f32 - 8.0) / 16.0)
            .collect();
        f32_initializer(name, &[4, 4, 3, 3], &v)
    };
    let pads = || vec![attr_ints("pads", &[1, 1, 1, 1])];
    model(
        vec![
            node_with("Conv", &["x", "w1"], &["a"], pads()),
            node("Sigmoid", &["a"], &["b"]),
            node_with("Conv", &["b", "w2"], &["c"], pads()),
            node("Sigmoid", &["c"], &["d"]),
            node("Add", &["d", "b"], &["y"]),
        ],
        vec![value("x", 1, &[-1, 4, 8, 8])],
        vec![value("y", 1, &[-1, 4, 8, 8])],
        vec![w("w1", 1), w("w2", 5)],
        13,
    )
}

#[test]
fn later_runs_place_values_in_one_reused_arena_with_the_same_results() {
    let model = Compiled::new(&residual_cnn());
    let run = |batch: usize| model.run(batch, 23);
    // (Batch 3 on two threads runs as one batch; 2 or 4 would run image by image.)
    for batch in [1, 3] {
        // The first run with these shapes: heap allocations, sizes learnt.
        let first = run(batch);
        for _ in 0..3 {
            assert_eq!(run(batch), first, "an arena run differs (batch {batch})");
        }
    }
    let stats = model.plan.memory.stats();
    assert_eq!(stats.patterns, 2, "{stats:?}");
    // Sequential runs reuse the one arena of each pattern.
    assert_eq!(stats.arenas_allocated, 2, "{stats:?}");
    // a (Conv) dies before c (the second Conv) is made: they share memory.
    assert!(stats.arena_bytes < stats.value_bytes, "{stats:?}");
    assert_eq!(
        stats.value_bytes,
        4 * (3 * 4 * 8 * 8 * 4),
        "a, b, c and d at batch 3"
    );
}

/// Graph outputs go to blocks the plan keeps: runs whose outputs are dropped reuse one block,
/// and an output still held keeps its block and its values while later runs (of other
/// inputs) get another block.
#[test]
fn graph_outputs_reuse_blocks_nothing_holds_and_never_a_held_ones() {
    let model = Compiled::new(&residual_cnn());
    let blocks = || model.plan.memory.stats().output_blocks_allocated;
    // The first run learns the sizes; the next ones place `y` in one block, the same results.
    // (Batch 3 on two threads runs as one batch: 2 or 4 would run image by image.)
    let first = model.run(3, 23);
    assert_eq!(blocks(), 0, "nothing placed before the pattern is learnt");
    for _ in 0..3 {
        assert_eq!(model.run(3, 23), first);
    }
    assert_eq!(blocks(), 1, "one block, reused once each output is dropped");
    let held = model.outputs(3, 23);
    assert_eq!(held.len(), 1);
    let kept = held[0].1.bytes().to_vec();
    assert_eq!(kept, first[0].2);
    // Other inputs while `held` is alive: another block, other values, `held` untouched.
    let other = model.run(3, 11);
    assert_ne!(other[0].2, kept, "the inputs should give other values");
    assert_eq!(
        held[0].1.bytes(),
        &kept[..],
        "a later run wrote into a held output"
    );
    assert_eq!(blocks(), 2, "{:?}", model.plan.memory.stats());
    // Released, both blocks are reused: no more allocations.
    drop(held);
    for _ in 0..3 {
        assert_eq!(model.run(3, 23), first);
        assert_eq!(model.run(3, 11), other);
    }
    assert_eq!(blocks(), 2, "{:?}", model.plan.memory.stats());
}

/// Weights `name` of a `k x k` convolution of 4 channels to 4, small multiples of 1/16.
fn conv_weights(name: &str, k: i64, seed: usize) -> opreg_proto::onnx::TensorProto {
    let v: Vec<f32> = (0..4 * 4 * (k * k) as usize)
        .map(|i| (((i * 29 + seed) % 19) as f32 - 9.0) / 16.0)
        .collect();
    f32_initializer(name, &[4, 4, k, k], &v)
}

/// Two concatenations along the channels of a batch: `c = Concat(a, b)`, whose inputs only it
/// reads, and `e = Concat(b2, a2)`, whose `a2` an `Add` reads too.
fn concats() -> Vec<u8> {
    let w = conv_weights;
    let pads = || vec![attr_ints("pads", &[1, 1, 1, 1])];
    let axis = || vec![attr_int("axis", 1)];
    model(
        vec![
            node("Conv", &["x", "w1"], &["a0"]),
            node("Sigmoid", &["a0"], &["a"]),
            node_with("Conv", &["x", "w3"], &["b0"], pads()),
            node("Sigmoid", &["b0"], &["b"]),
            node_with("Concat", &["a", "b"], &["c"], axis()),
            node("Tanh", &["c"], &["d"]),
            node("Sigmoid", &["x"], &["a2"]),
            node("Tanh", &["x"], &["b2"]),
            node_with("Concat", &["b2", "a2"], &["e"], axis()),
            node("Tanh", &["e"], &["f"]),
            node("Add", &["a2", "x"], &["g"]),
        ],
        vec![value("x", 1, &[-1, 4, 8, 8])],
        vec![
            value("d", 1, &[-1, 8, 8, 8]),
            value("f", 1, &[-1, 8, 8, 8]),
            value("g", 1, &[-1, 4, 8, 8]),
        ],
        vec![w("w1", 1, 3), w("w3", 3, 7)],
        13,
    )
}

#[test]
fn a_batch_one_concat_is_assembled_in_place_with_the_same_results() {
    let model = Compiled::new(&concats());
    let run = |batch: usize| model.run(batch, 31);
    // Batch 1: each input of `c` is one run of its output, and only `c` reads them; batch 3
    // (run as one batch on two threads): the images interleave the inputs, so the concat
    // copies.
    for batch in [1, 3] {
        let first = run(batch);
        assert_eq!(first[0].1, [batch, 8, 8, 8]);
        for _ in 0..3 {
            assert_eq!(run(batch), first, "an arena run differs (batch {batch})");
        }
        // The three arena runs at batch 1 skipped `c`'s copy; those at batch 3 none.
        assert_eq!(
            model.plan.memory.stats().concats_assembled,
            3,
            "batch {batch}"
        );
    }
    let stats = model.plan.memory.stats();
    assert_eq!(stats.patterns, 2, "{stats:?}");
    assert_eq!(
        stats.concats_in_place, 1,
        "only `c` at batch 1: `e`'s `a2` has a second reader, batch 3 interleaves: {stats:?}"
    );
}

/// `y = MatMul(MatMul(x, w1), s) + s`: `w1` is read by one MatMul (which packs it: absorbed),
/// `s` by a MatMul and by an Add (which reads it at run time).
fn shared_weights(w1: &[f32]) -> Vec<u8> {
    let s: Vec<f32> = (0..16).map(|i| (i as f32 - 7.5) / 8.0).collect();
    model(
        vec![
            node("MatMul", &["x", "w1"], &["h"]),
            node("MatMul", &["h", "s"], &["m"]),
            node("Add", &["m", "s"], &["y"]),
        ],
        vec![value("x", 1, &[4, 8])],
        vec![value("y", 1, &[4, 4])],
        vec![
            f32_initializer("w1", &[8, 4], w1),
            f32_initializer("s", &[4, 4], &s),
        ],
        13,
    )
}

fn w1() -> Vec<f32> {
    (0..32).map(|i| ((i * 7 % 13) as f32 - 6.0) / 4.0).collect()
}

/// What [`shared_weights`] computes, in f64.
fn shared_weights_reference(x: &[f32], w1: &[f32]) -> Vec<f32> {
    let s: Vec<f64> = (0..16).map(|i| (i as f64 - 7.5) / 8.0).collect();
    let mut y = vec![0f32; 16];
    for r in 0..4 {
        let h: Vec<f64> = (0..4)
            .map(|c| {
                (0..8)
                    .map(|k| x[r * 8 + k] as f64 * w1[k * 4 + c] as f64)
                    .sum()
            })
            .collect();
        for c in 0..4 {
            let m: f64 = (0..4).map(|k| h[k] * s[k * 4 + c]).sum();
            y[r * 4 + c] = (m + s[r * 4 + c]) as f32;
        }
    }
    y
}

fn shared_weights_input() -> (HashMap<String, Arc<HostTensor>>, Vec<f32>) {
    let x: Vec<f32> = (0..32).map(|i| (i as f32 - 16.0) / 10.0).collect();
    let t = HostTensor::from_vec(&[4, 8], &x).expect("x");
    ([("x".to_string(), Arc::new(t))].into(), x)
}

fn assert_close(got: &HostTensor, want: &[f32]) {
    let got = got.to_vec::<f32>().expect("f32 output");
    assert_eq!(got.len(), want.len());
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        assert!(
            (g - w).abs() <= 1e-4 * (1.0 + w.abs()),
            "y[{i}] = {g}, want {w}"
        );
    }
}

fn shipped_registry(stage: &std::path::Path) -> Registry {
    let registry = Registry::new(stage.join("stage"), Default::default());
    for (p, r) in registry.load_all(&[
        opreg_tests::plugin("onnx_ops"),
        opreg_tests::plugin("blas_cpu"),
    ]) {
        r.unwrap_or_else(|e| panic!("{}: {e}", p.display()));
    }
    registry
}

#[test]
fn weights_a_kernel_packed_are_freed_as_it_binds_and_results_are_unchanged() {
    let stage = tempfile::tempdir().expect("tempdir");
    let registry = shipped_registry(stage.path());
    let pool = ComputePool::new(2).expect("pool");
    let (feeds, x) = shared_weights_input();
    let want = shared_weights_reference(&x, &w1());

    let mut model = graph::import(&shared_weights(&w1()), None).expect("import");
    let w1_weak = Arc::downgrade(&model.initializers["w1"]);
    let s_weak = Arc::downgrade(&model.initializers["s"]);
    let mut seen = Vec::new();
    let (plan, freed) = pool
        .install(|| {
            graph::compile_owned(
                &mut model,
                registry.snapshot(),
                &[Device::CPU],
                usize::MAX,
                &mut |name, _| seen.push(name.to_string()),
            )
        })
        .expect("compile");
    // w1's only reader packed it: gone from memory, not only from the plan. s is read by the
    // Add at run time: kept, and back in the model.
    assert_eq!(freed, ["w1"]);
    assert_eq!(seen, ["w1"], "told of what it let go of");
    assert!(w1_weak.upgrade().is_none(), "w1 is still allocated");
    assert!(!model.initializers.contains_key("w1"));
    assert!(Arc::ptr_eq(
        &model.initializers["s"],
        &s_weak.upgrade().expect("s kept")
    ));
    for _ in 0..2 {
        let out = pool
            .install(|| graph::run(&plan, feeds.clone()))
            .expect("run");
        assert_close(&out[0].1, &want);
    }

    // The borrowing compile leaves the model whole and computes the same.
    let model = graph::import(&shared_weights(&w1()), None).expect("import");
    let plan = pool
        .install(|| graph::compile(&model, registry.snapshot(), &[Device::CPU], usize::MAX))
        .expect("compile");
    assert!(model.initializers.contains_key("w1"));
    let out = pool.install(|| graph::run(&plan, feeds)).expect("run");
    assert_close(&out[0].1, &want);
}

#[test]
fn a_version_reads_freed_weights_again_for_a_new_plan_and_refuses_a_changed_file() {
    use opregd::repo::{ModelSettings, RepoError, ServedModel};
    let stage = tempfile::tempdir().expect("tempdir");
    let registry = shipped_registry(stage.path());
    let pool = ComputePool::new(2).expect("pool");
    let (feeds, x) = shared_weights_input();
    let want = shared_weights_reference(&x, &w1());
    let dir = tempfile::tempdir().expect("tempdir");
    let file = dir.path().join("model.onnx");
    std::fs::write(&file, shared_weights(&w1())).expect("write model");
    let bytes = graph::ModelBytes::read(&file, u64::MAX).expect("read");
    let served = pool
        .install(|| {
            ServedModel::build(
                "shared",
                1,
                bytes,
                Some(&file),
                ModelSettings::default(),
                registry.snapshot(),
                1 << 20,
            )
        })
        .expect("build");
    assert!(!served.model.initializers.contains_key("w1"));
    let full = served.full_model().expect("whole graph");
    assert_eq!(full.initializers["w1"].to_vec::<f32>().expect("w1"), w1());
    assert!(Arc::ptr_eq(
        &full.initializers["s"],
        &served.model.initializers["s"]
    ));
    drop(full);

    // A plugin load makes a new generation: the next plan is compiled from the file again.
    let run_on_new_plan = |registry: &Registry| {
        let snapshot = registry.snapshot();
        let plan = pool.install(|| served.plan(&snapshot))?;
        assert_eq!(plan.generation(), snapshot.generation);
        let out = pool
            .install(|| graph::run(&plan, feeds.clone()))
            .expect("run");
        assert_close(&out[0].1, &want);
        Ok::<_, RepoError>(())
    };
    for (p, r) in registry.load_all(&[opreg_tests::plugin("mock_good")]) {
        r.unwrap_or_else(|e| panic!("{}: {e}", p.display()));
    }
    run_on_new_plan(&registry).expect("re-bound plan");

    // The file now holds other weights: a new plan is refused, naming the weights, and the
    // version's own plan goes on serving.
    let other: Vec<f32> = w1().iter().map(|v| v + 1.0).collect();
    std::fs::write(&file, shared_weights(&other)).expect("rewrite model");
    registry
        .unload("mock-good")
        .expect("unload mock-good (a new generation)");
    let err = run_on_new_plan(&registry).expect_err("a changed file");
    assert!(
        matches!(&err, RepoError::Changed { .. }) && err.to_string().contains("'w1'"),
        "{err}"
    );
    let plan = served.current_plan();
    let out = pool.install(|| graph::run(&plan, feeds)).expect("run");
    assert_close(&out[0].1, &want);
}

/// Eight images `[8, 4, 8, 8]`, each different.
fn eight_images() -> Vec<f32> {
    (0..8 * 256)
        .map(|i| (((i * 7 + i / 256 * 13) % 29) as f32 - 14.0) / 9.0)
        .collect()
}

/// Each image of `x` run alone (batch 1), the outputs' values image after image.
fn image_by_image(model: &Compiled, x: &[f32]) -> Vec<Vec<f32>> {
    let mut per_output: Vec<Vec<f32>> = Vec::new();
    for image in x.chunks(256) {
        for (k, (_, t)) in model.run_x(1, image).iter().enumerate() {
            if per_output.len() <= k {
                per_output.push(Vec::new());
            }
            per_output[k].extend(t.to_vec::<f32>().expect("f32"));
        }
    }
    per_output
}

/// A batch of a graph whose samples never meet (convolutions, activations, a residual sum)
/// runs image by image, the images side by side on the pool's two threads: the results are
/// each image's own, and the plan learnt no batch-8 memory pattern (only the parts' batch-1
/// one: the run never ran as one batch-8 graph).
#[test]
fn a_separable_batch_runs_image_by_image_with_each_images_results() {
    let model = Compiled::new(&residual_cnn());
    let x = eight_images();
    let want = image_by_image(&model, &x);
    assert_eq!(model.plan.memory.stats().patterns, 1);
    for _ in 0..3 {
        let out = model.run_x(8, &x);
        assert_eq!(out.len(), 1);
        assert_eq!(out[0].1.shape(), &[8, 4, 8, 8]);
        let got = out[0].1.to_vec::<f32>().expect("f32");
        for (i, (g, w)) in got.iter().zip(&want[0]).enumerate() {
            assert!(
                (g - w).abs() <= 1e-5 * (1.0 + w.abs()),
                "element {i}: {g} vs {w}"
            );
        }
    }
    let stats = model.plan.memory.stats();
    assert_eq!(
        stats.patterns, 1,
        "split runs plan batch-1 parts only: {stats:?}"
    );
}

/// A split batch's parts read their images where they lie in the batch when an image starts
/// on the host's 64-byte alignment (4x8x8 f32: 1 KiB) and from a copy otherwise (3x5x5 f32:
/// 300 bytes, so images 1..8 start off it); both ways each image's results are its own.
#[test]
fn split_images_viewed_in_place_or_copied_give_each_images_results() {
    for (c, hw) in [(4usize, 8usize), (3, 5)] {
        let dims = [-1, c as i64, hw as i64, hw as i64];
        let bytes = model(
            vec![
                node("Sigmoid", &["x"], &["a"]),
                node("Neg", &["a"], &["b"]),
                node("Exp", &["b"], &["y"]),
            ],
            vec![value("x", 1, &dims)],
            vec![value("y", 1, &dims)],
            vec![],
            13,
        );
        let m = Compiled::new(&bytes);
        let per = c * hw * hw;
        let x: Vec<f32> = (0..8 * per)
            .map(|i| ((i * 11 % 23) as f32 - 11.0) / 7.0)
            .collect();
        let run = |batch: usize, x: &[f32]| {
            let t = HostTensor::from_vec(&[batch, c, hw, hw], x).expect("x");
            let feeds: HashMap<String, Arc<HostTensor>> = [("x".to_string(), Arc::new(t))].into();
            let out = m.pool.install(|| graph::run(&m.plan, feeds)).expect("run");
            out[0].1.to_vec::<f32>().expect("f32")
        };
        let want: Vec<f32> = x.chunks(per).flat_map(|image| run(1, image)).collect();
        for _ in 0..2 {
            let got = run(8, &x);
            assert_eq!(got.len(), want.len());
            for (i, (g, w)) in got.iter().zip(&want).enumerate() {
                assert_eq!(
                    g.to_bits(),
                    w.to_bits(),
                    "{c}x{hw}x{hw} element {i}: {g} vs {w}"
                );
            }
        }
        // Split: only the parts' batch-1 pattern was ever planned.
        assert_eq!(m.plan.memory.stats().patterns, 1, "{c}x{hw}x{hw}");
    }
}

/// A constant of the batch's own extent (`[8, 4, 8, 8]`) added to the activations pairs each
/// image with its own slice: split image by image each part would get the whole constant.
/// Such a graph (and one that concatenates along the batch) runs whole, and answers right.
#[test]
fn a_graph_that_pairs_samples_with_a_batch_sized_constant_runs_whole() {
    let c: Vec<f32> = (0..8 * 256).map(|i| (i % 97) as f32 / 50.0).collect();
    let bytes = model(
        vec![
            node("Sigmoid", &["x"], &["a"]),
            node("Add", &["a", "c"], &["y"]),
        ],
        vec![value("x", 1, &[-1, 4, 8, 8])],
        vec![value("y", 1, &[8, 4, 8, 8])],
        vec![f32_initializer("c", &[8, 4, 8, 8], &c)],
        13,
    );
    let m = Compiled::new(&bytes);
    let x = eight_images();
    let out = m.run_x(8, &x);
    let got = out[0].1.to_vec::<f32>().expect("f32");
    for (i, g) in got.iter().enumerate() {
        let want = 1.0 / (1.0 + (-x[i]).exp()) + c[i];
        assert!((g - want).abs() <= 1e-5, "element {i}: {g} vs {want}");
    }
    assert_eq!(m.plan.memory.stats().patterns, 1, "one batch-8 pattern");

    let concat = model(
        vec![
            node("Sigmoid", &["x"], &["a"]),
            node_with("Concat", &["a", "x"], &["y"], vec![attr_int("axis", 0)]),
        ],
        vec![value("x", 1, &[-1, 4, 8, 8])],
        vec![value("y", 1, &[-1, 4, 8, 8])],
        vec![],
        13,
    );
    let m = Compiled::new(&concat);
    let out = m.run_x(8, &x);
    assert_eq!(out[0].1.shape(), &[16, 4, 8, 8]);
    let got = out[0].1.to_vec::<f32>().expect("f32");
    assert_eq!(&got[8 * 256..], &x[..], "the second half is x itself");
}

/// A ResNet bottleneck and a layer after it: `a = Relu(Conv1x1(x))`,
/// `b = Relu(Conv3x3(a))`, `s = Relu(Conv1x1(b) + a)`, `y = Conv1x1(s)`. `a` is read last
/// by the sum's convolution, which may write `s` over it.
fn bottleneck() -> Vec<u8> {
    let w = conv_weights;
    let pads = || vec![attr_ints("pads", &[1, 1, 1, 1])];
    model(
        vec![
            node("Conv", &["x", "w1"], &["a0"]),
            node("Relu", &["a0"], &["a"]),
            node_with("Conv", &["a", "w2"], &["b0"], pads()),
            node("Relu", &["b0"], &["b"]),
            node("Conv", &["b", "w3"], &["c"]),
            node("Add", &["c", "a"], &["s0"]),
            node("Relu", &["s0"], &["s"]),
            node("Conv", &["s", "w4"], &["y"]),
        ],
        vec![value("x", 1, &[-1, 4, 8, 8])],
        vec![value("y", 1, &[-1, 4, 8, 8])],
        vec![w("w1", 1, 1), w("w2", 3, 5), w("w3", 1, 9), w("w4", 1, 13)],
        13,
    )
}

#[test]
fn a_residual_sum_is_written_over_its_addend_with_the_same_results() {
    let model = Compiled::new(&bottleneck());
    let stats = || model.plan.memory.stats();
    for batch in [1, 3] {
        // The first run with these shapes allocates each value apart: the sum reads `a`
        // from its own memory. Later ones place `s` over `a` and sum into it in the product.
        let first = model.outputs(batch, 29);
        let want = first[0].1.to_vec::<f32>().expect("f32");
        assert!(want.iter().any(|v| *v != 0.0), "a degenerate test model");
        let handed = stats().aliases_handed;
        for _ in 0..3 {
            assert_close(&model.outputs(batch, 29)[0].1, &want);
        }
        assert_eq!(stats().aliases_handed, handed + 3, "{:?}", stats());
    }
    assert_eq!(stats().aliased, 2, "one per pattern: {:?}", stats());
}

/// `y = SequenceAt(SequenceConstruct(Sigmoid(x)), 0) + Tanh(Neg(x))`: the sequence holds
/// `Sigmoid(x)` past that value's last read (the construct), while `Neg` and `Tanh` run.
fn held_by_a_sequence() -> Vec<u8> {
    model(
        vec![
            node("Sigmoid", &["x"], &["a"]),
            node("SequenceConstruct", &["a"], &["q"]),
            node("Neg", &["x"], &["b"]),
            node("Tanh", &["b"], &["c"]),
            node("SequenceAt", &["q", "at"], &["e"]),
            node("Add", &["e", "c"], &["y"]),
        ],
        vec![value("x", 1, &[-1, 4, 8, 8])],
        vec![value("y", 1, &[-1, 4, 8, 8])],
        vec![i64_initializer("at", &[], &[0])],
        13,
    )
}

/// A value a sequence holds keeps its memory to itself: the plan used to place `Neg(x)` where
/// `Sigmoid(x)` lay once the construct had read it, and the sequence's element then read
/// `Neg`'s values from the second run on.
#[test]
fn a_value_a_sequence_holds_is_not_overwritten_by_a_later_one() {
    let model = Compiled::new(&held_by_a_sequence());
    for batch in [1, 3] {
        let x: Vec<f32> = (0..batch * 256)
            .map(|i| (i % 19) as f32 / 4.0 - 2.0)
            .collect();
        let want: Vec<f32> = x
            .iter()
            .map(|&v| {
                let v = v as f64;
                (1.0 / (1.0 + (-v).exp()) + (-v).tanh()) as f32
            })
            .collect();
        // The first run learns the sizes; the next ones place values in the arena.
        for _ in 0..3 {
            assert_close(&model.run_x(batch, &x)[0].1, &want);
        }
    }
    assert_eq!(model.plan.memory.stats().patterns, 2);
}

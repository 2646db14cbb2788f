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
        let x = HostTensor::from_vec(&[batch, 4, 8, 8], &x).expect("x");
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
    for batch in [1, 2] {
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
        4 * (2 * 4 * 8 * 8 * 4),
        "a, b, c and d at batch 2"
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
    let first = model.run(2, 23);
    assert_eq!(blocks(), 0, "nothing placed before the pattern is learnt");
    for _ in 0..3 {
        assert_eq!(model.run(2, 23), first);
    }
    assert_eq!(blocks(), 1, "one block, reused once each output is dropped");
    let held = model.outputs(2, 23);
    assert_eq!(held.len(), 1);
    let kept = held[0].1.bytes().to_vec();
    assert_eq!(kept, first[0].2);
    // Other inputs while `held` is alive: another block, other values, `held` untouched.
    let other = model.run(2, 11);
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
        assert_eq!(model.run(2, 23), first);
        assert_eq!(model.run(2, 11), other);
    }
    assert_eq!(blocks(), 2, "{:?}", model.plan.memory.stats());
}

/// Two concatenations along the channels of a batch: `c = Concat(a, b)`, whose inputs only it
/// reads, and `e = Concat(b2, a2)`, whose `a2` an `Add` reads too.
fn concats() -> Vec<u8> {
    let w = |name: &str, k: i64, seed: usize| {
        let v: Vec<f32> = (0..4 * 4 * (k * k) as usize)
            .map(|i| (((i * 29 + seed) % 19) as f32 - 9.0) / 16.0)
            .collect();
        f32_initializer(name, &[4, 4, k, k], &v)
    };
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
    // Batch 1: each input of `c` is one run of its output, and only `c` reads them; batch 2:
    // the images interleave the inputs, so the concat copies.
    for batch in [1, 2] {
        let first = run(batch);
        assert_eq!(first[0].1, [batch, 8, 8, 8]);
        for _ in 0..3 {
            assert_eq!(run(batch), first, "an arena run differs (batch {batch})");
        }
        // The three arena runs at batch 1 skipped `c`'s copy; those at batch 2 none.
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
        "only `c` at batch 1: `e`'s `a2` has a second reader, batch 2 interleaves: {stats:?}"
    );
}

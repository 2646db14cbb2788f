//! Memory planning on a real plan: the first run with new input shapes allocates as usual and
//! teaches the plan their sizes; later runs place their values in one reused arena, with the
//! same results.

use opreg_sdk::{host::HostTensor, Device};
use opreg_tests::onnx::*;
use opregd::{exec::ComputePool, graph, registry::Registry};
use std::{collections::HashMap, sync::Arc};

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
    let stage = tempfile::tempdir().expect("tempdir");
    let registry = Registry::new(stage.path().join("stage"), Default::default());
    for (p, r) in registry.load_all(&[
        opreg_tests::plugin("onnx_ops"),
        opreg_tests::plugin("blas_cpu"),
    ]) {
        r.unwrap_or_else(|e| panic!("{}: {e}", p.display()));
    }
    let pool = ComputePool::new(2).expect("pool");
    let model = graph::import(&residual_cnn(), None).expect("import");
    let plan = pool
        .install(|| graph::compile(&model, registry.snapshot(), &[Device::CPU], usize::MAX))
        .expect("compile");
    let run = |batch: usize| {
        let x: Vec<f32> = (0..batch * 256)
            .map(|i| ((i % 23) as f32 - 11.0) / 7.0)
            .collect();
        let x = HostTensor::from_vec(&[batch, 4, 8, 8], &x).expect("x");
        let feeds: HashMap<String, Arc<HostTensor>> = [("x".to_string(), Arc::new(x))].into();
        let out = pool.install(|| graph::run(&plan, feeds)).expect("run");
        out[0].1.bytes().to_vec()
    };
    for batch in [1, 2] {
        // The first run with these shapes: heap allocations, sizes learnt.
        let first = run(batch);
        for _ in 0..3 {
            assert_eq!(run(batch), first, "an arena run differs (batch {batch})");
        }
    }
    let stats = plan.memory.stats();
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

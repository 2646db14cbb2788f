//! Compile cost on real model sizes (ResNet-50, MobileNetV2, a BERT-base-style encoder, made
//! with seeded random weights by `tests/python/make_models.py`): import, the graph passes
//! (nodes before -> after, per pass), and compiling the plan (binding, folding, weight
//! packing), with the passes and without them, side by side in one run.
//!
//! Run with `scripts/bench` (release build; the models are written to `target/models`).

use opreg_sdk::{host::HostTensor, Device};
use opregd::{exec::ComputePool, graph, registry::Registry};
use std::{collections::HashMap, sync::Arc, time::Instant};

fn main() {
    let dir = opreg_tests::workspace().join("target/models");
    let stage = tempfile::tempdir().expect("tempdir");
    let registry = Registry::new(stage.path().join("stage"), Default::default());
    for (p, r) in registry.load_all(&[
        opreg_tests::plugin("onnx_ops"),
        opreg_tests::plugin("blas_cpu"),
    ]) {
        if let Err(e) = r {
            panic!("{}: {e}", p.display());
        }
    }
    let pool = ComputePool::new(
        std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1),
    )
    .expect("pool");
    println!(
        "{:>12} {:>10} {:>12} {:>14} {:>14} {:>10}",
        "model", "import ms", "passes ms", "compile ms", "no-pass ms", "with/without"
    );
    for name in ["resnet50", "mobilenetv2", "bert"] {
        let path = dir.join(format!("{name}.onnx"));
        let bytes = std::fs::read(&path)
            .unwrap_or_else(|e| panic!("{}: {e} (scripts/bench makes it)", path.display()));
        // As the daemon imports a model file: from the buffer it was read into.
        let owned = bytes.clone();
        let t = Instant::now();
        let model = graph::import_owned(owned, None).expect("import");
        let import_ms = t.elapsed().as_secs_f64() * 1e3;
        let mut optimized = graph::import(&bytes, None).expect("import");
        let t = Instant::now();
        let reports = graph::optimize(&mut optimized).expect("passes");
        let passes_ms = t.elapsed().as_secs_f64() * 1e3;
        let compile = |m: &graph::Model| {
            let t = Instant::now();
            pool.install(|| graph::compile(m, registry.snapshot(), &[Device::CPU], usize::MAX))
                .expect("compile");
            t.elapsed().as_secs_f64() * 1e3
        };
        // Alternating, best of three each: the first compile of a model pays page faults for
        // its weights that later ones do not.
        let (mut with, mut without) = (f64::MAX, f64::MAX);
        for _ in 0..3 {
            with = with.min(compile(&optimized));
            without = without.min(compile(&model));
        }
        println!(
            "{name:>12} {import_ms:>10.1} {passes_ms:>12.1} {with:>14.1} {without:>14.1} {:>10.2}",
            with / without
        );
        for r in reports {
            println!(
                "{:>12}   {:<16} {} -> {} nodes",
                "", r.pass, r.nodes_before, r.nodes_after
            );
        }
        // Memory planning: two runs on zeros (batch 1, sequence 1 for symbolic dimensions);
        // the first teaches the plan its sizes, the second runs in the arena.
        let plan = pool
            .install(|| graph::compile(&optimized, registry.snapshot(), &[Device::CPU], usize::MAX))
            .expect("compile");
        let feeds = || -> HashMap<String, Arc<HostTensor>> {
            optimized
                .inputs
                .iter()
                .map(|i| {
                    let shape: Vec<usize> = i
                        .shape
                        .iter()
                        .flatten()
                        .map(|d| match d {
                            graph::Dim::Fixed(n) => *n,
                            graph::Dim::Symbolic(_) => 1,
                        })
                        .collect();
                    let t = HostTensor::zeroed(i.dtype, &shape).expect("input");
                    (i.name.clone(), Arc::new(t))
                })
                .collect()
        };
        for _ in 0..2 {
            pool.install(|| graph::run(&plan, feeds())).expect("run");
        }
        let m = plan.memory.stats();
        println!(
            "{:>12}   memory plan: values {:.1} MB in an arena of {:.1} MB ({:.2}), {} arena(s) for 2 runs",
            "",
            m.value_bytes as f64 / 1e6,
            m.arena_bytes as f64 / 1e6,
            m.arena_bytes as f64 / m.value_bytes.max(1) as f64,
            m.arenas_allocated
        );
    }
}

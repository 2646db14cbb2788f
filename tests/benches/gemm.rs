//! f32 gemm: opreg's CPU BLAS plugin, called through the plugin ABI exactly as kernels call
//! it, side by side with numpy's OpenBLAS in the same run. Reports time ratios
//! (opreg / OpenBLAS; below 1 means opreg is faster), on one thread and on every core.
//!
//! Run with `scripts/bench` (builds the release plugin and the Python venv first).

use abi_stable::library::{lib_header_from_path, RootModule};
use opreg_sdk::{host::CallFrame, module::PluginModRef, Device, GemmArgs, LogLevel};
use std::time::Instant;

/// Squares, then the im2col products of ResNet-50 (output channels x pixels x depth, from the
/// stem to the last stage), then a BERT-base encoder layer at sequence 128 (QKV/output
/// projection, the two feed-forward products).
const SHAPES: &[(usize, usize, usize)] = &[
    (64, 64, 64),
    (128, 128, 128),
    (256, 256, 256),
    (512, 512, 512),
    (1024, 1024, 1024),
    (2048, 2048, 2048),
    (64, 12544, 147),
    (64, 3136, 576),
    (256, 3136, 64),
    (3136, 64, 576),
    (128, 784, 1152),
    (256, 196, 2304),
    (1024, 196, 256),
    (512, 49, 4608),
    (2048, 49, 512),
    (128, 768, 768),
    (128, 3072, 768),
    (128, 768, 3072),
];

fn best_of<F: FnMut()>(mut f: F) -> f64 {
    f(); // warm-up
    let mut best = f64::MAX;
    let start = Instant::now();
    let mut runs = 0;
    while runs < 5 || (start.elapsed().as_secs_f64() < 1.0 && runs < 200) {
        let t = Instant::now();
        f();
        best = best.min(t.elapsed().as_secs_f64());
        runs += 1;
    }
    best
}

fn numpy_times(python: &str, threads: usize) -> Vec<f64> {
    let shapes: Vec<String> = SHAPES
        .iter()
        .map(|(m, n, k)| format!("({m},{n},{k})"))
        .collect();
    let script = format!(
        r#"
import time, numpy as np, threadpoolctl, sys
info = [(i.get("internal_api"), i.get("architecture"), i.get("num_threads")) for i in threadpoolctl.threadpool_info()]
print("numpy blas:", info, file=sys.stderr)
for (m, n, k) in [{}]:
    a = np.random.rand(m, k).astype(np.float32); b = np.random.rand(k, n).astype(np.float32)
    a @ b
    best = 1e9; start = time.perf_counter(); runs = 0
    while runs < 5 or (time.perf_counter() - start < 1.0 and runs < 200):
        t = time.perf_counter(); a @ b; best = min(best, time.perf_counter() - t); runs += 1
    print(best)
"#,
        shapes.join(",")
    );
    // OPENBLAS_CORETYPE / OPENBLAS_L2_SIZE make a current numpy pick slower kernels on this
    // machine: unset them for the peer, in this command only.
    let out = std::process::Command::new(python)
        .arg("-c")
        .arg(script)
        .env_remove("OPENBLAS_CORETYPE")
        .env_remove("OPENBLAS_L2_SIZE")
        .env("OPENBLAS_NUM_THREADS", threads.to_string())
        .output()
        .expect("run numpy");
    eprint!("{}", String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "numpy benchmark failed");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| l.trim().parse().expect("seconds"))
        .collect()
}

fn main() {
    let lib = opreg_tests::plugin("blas_cpu");
    let header = lib_header_from_path(&lib).expect("open blas-cpu");
    let module = header
        .init_root_module::<PluginModRef>()
        .expect("root module");
    let registration = opreg_sdk::module::collect(module.register()).expect("register");
    let backend = &registration.backends[0];
    println!("backend: {} ({})", backend.desc.name, lib.display());
    let cores = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1);
    let python = std::env::var("OPREG_TEST_PYTHON").unwrap_or_else(|_| "python3".into());
    let mut counts = vec![1];
    if cores > 1 {
        counts.push(cores);
    }
    for threads in counts {
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .build()
            .expect("pool");
        let mut ours = Vec::new();
        for &(m, n, k) in SHAPES {
            let a: Vec<f32> = (0..m * k).map(|i| (i % 17) as f32 * 0.1).collect();
            let b: Vec<f32> = (0..k * n).map(|i| (i % 13) as f32 * 0.1).collect();
            let mut c = vec![0f32; m * n];
            let log = |_: LogLevel, _: &str| {};
            let t = pool.install(|| {
                best_of(|| {
                    let args = GemmArgs::f32(m, n, k, &a, &b, &mut c).expect("args");
                    let frame = CallFrame::new(0, Device::CPU, Some(&backend.backend), &log);
                    frame
                        .with_context(|ctx| ctx.blas().expect("blas").gemm(ctx, &args))
                        .expect("gemm");
                })
            });
            ours.push(t);
        }
        let theirs = numpy_times(&python, threads);
        println!("threads: {threads}");
        println!(
            "{:>18} {:>12} {:>12} {:>14}",
            "m x n x k", "opreg GF/s", "OpenBLAS GF/s", "opreg/OpenBLAS"
        );
        for (((m, n, k), o), t) in SHAPES.iter().zip(&ours).zip(&theirs) {
            let flops = 2.0 * (*m * *n * *k) as f64;
            println!(
                "{:>18} {:>12.1} {:>12.1} {:>14.2}",
                format!("{m}x{n}x{k}"),
                flops / o / 1e9,
                flops / t / 1e9,
                o / t
            );
        }
    }
    drop(registration);
    let _ = PluginModRef::NAME;
}

//! The cost of the memory model, measured on the mock device (a scrambled copy of host
//! memory: its copies cost what a host memcpy with an XOR costs, a lower bound for a real
//! device's PCIe copies). Reported side by side, as ratios in one run:
//!
//! - an allocation from the daemon's device pool (steady state, the block reused) vs the same
//!   allocation from the provider's allocator vs the system allocator (`std::alloc`);
//! - a copy step (host -> device) vs a plain host `memcpy` of the same bytes;
//! - a model whose middle node runs on the device (two copy steps per request) vs the same
//!   model on the CPU only.
//!
//! Run with `scripts/bench` (release build).

use opreg_sdk::{host::HostTensor, Device, MemRef, MemoryType, Stream};
use opregd::{exec::ComputePool, graph, registry::Registry};
use std::{collections::HashMap, sync::Arc, time::Instant};

/// Median seconds of `f`, over at least 50 runs or 0.5 s.
fn median<F: FnMut()>(mut f: F) -> f64 {
    f();
    let mut times = Vec::new();
    let start = Instant::now();
    while times.len() < 50 || (start.elapsed().as_secs_f64() < 0.5 && times.len() < 100_000) {
        let t = Instant::now();
        f();
        times.push(t.elapsed().as_secs_f64());
    }
    times.sort_by(f64::total_cmp);
    times[times.len() / 2]
}

fn main() {
    let dir = tempfile::tempdir().expect("tempdir");
    let registry = Registry::new(dir.path().join("stage"), Default::default());
    for (p, r) in registry.load_all(&[
        opreg_tests::plugin("onnx_ops"),
        opreg_tests::plugin("blas_cpu"),
        opreg_tests::plugin("mock_device"),
    ]) {
        if let Err(e) = r {
            panic!("{}: {e}", p.display());
        }
    }
    let snapshot = registry.snapshot();
    let mock = snapshot.device(Device::MOCK).expect("mock device");
    let provider = &snapshot.plugins["mock-device"].devices[0].provider;

    println!("allocation (alloc + free), median ns:");
    println!(
        "{:>10} {:>10} {:>10} {:>10} {:>12} {:>12}",
        "bytes", "pool", "provider", "system", "pool/prov", "pool/system"
    );
    for bytes in [4 << 10, 1 << 20, 16 << 20] {
        let pool = median(|| drop(mock.alloc_pooled(bytes).expect("pool")));
        let prov = median(|| {
            let m = provider
                .alloc(Device::MOCK, MemoryType::DEVICE, bytes, Stream::DEFAULT)
                .into_result()
                .expect("provider");
            provider.free(m, bytes, Stream::DEFAULT);
        });
        let layout = std::alloc::Layout::from_size_align(bytes, 64).expect("layout");
        let system = median(|| {
            // SAFETY: non-zero size; freed with the same layout.
            unsafe {
                let p = std::alloc::alloc(layout);
                std::hint::black_box(p);
                std::alloc::dealloc(p, layout);
            }
        });
        println!(
            "{bytes:>10} {:>10.0} {:>10.0} {:>10.0} {:>12.3} {:>12.3}",
            pool * 1e9,
            prov * 1e9,
            system * 1e9,
            pool / prov,
            pool / system
        );
    }
    let stats = &mock.pool().stats;
    println!(
        "pool: {} driver allocations, {} reuses",
        stats
            .driver_allocs
            .load(std::sync::atomic::Ordering::Relaxed),
        stats.reused.load(std::sync::atomic::Ordering::Relaxed)
    );

    println!("\ncopy host -> device vs host memcpy, median us:");
    println!(
        "{:>10} {:>10} {:>10} {:>10}",
        "bytes", "copy", "memcpy", "copy/memcpy"
    );
    for bytes in [4 << 10, 1 << 20, 16 << 20] {
        let src = vec![7u8; bytes];
        let mut dst_host = vec![0u8; bytes];
        let buf = mock.alloc_pooled(bytes).expect("buffer");
        let dst = opreg_sdk::host::DeviceBuffer::mem(&buf);
        let host = MemRef {
            device: Device::CPU,
            memory: MemoryType::HOST,
            ptr: src.as_ptr().cast_mut(),
        };
        let copy = median(|| mock.copy(dst, host, bytes).expect("copy"));
        let memcpy = median(|| {
            dst_host.copy_from_slice(&src);
            std::hint::black_box(&dst_host);
        });
        println!(
            "{bytes:>10} {:>10.1} {:>10.1} {:>10.2}",
            copy * 1e6,
            memcpy * 1e6,
            copy / memcpy
        );
    }

    // MatMul -> Relu -> MatMul at a transformer-ish width, Relu on the device or not.
    let (n, k) = (64usize, 768usize);
    let model = sandwich(k);
    let model = graph::import(&model, None).expect("import");
    let pool = ComputePool::new(
        std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1),
    )
    .expect("pool");
    let x = Arc::new(HostTensor::from_vec(&[n, k], &vec![0.5f32; n * k]).expect("x"));
    let mut times = Vec::new();
    for devices in [vec![Device::MOCK, Device::CPU], vec![Device::CPU]] {
        let plan = pool
            .install(|| graph::compile(&model, snapshot.clone(), &devices, usize::MAX))
            .expect("compile");
        let copies = plan.copies.len();
        let t = median(|| {
            let feeds: HashMap<String, Arc<HostTensor>> = [("x".to_string(), x.clone())].into();
            pool.install(|| graph::run(&plan, feeds)).expect("run");
        });
        times.push((copies, t));
    }
    println!(
        "\nmodel {n}x{k} MatMul -> Relu -> MatMul: Relu on mock ({} copies) {:.3} ms, all CPU ({} copies) {:.3} ms, ratio {:.3}",
        times[0].0,
        times[0].1 * 1e3,
        times[1].0,
        times[1].1 * 1e3,
        times[0].1 / times[1].1
    );
}

fn sandwich(k: usize) -> Vec<u8> {
    use opreg_tests::onnx::*;
    let w: Vec<f32> = (0..k * k).map(|i| ((i % 13) as f32 - 6.0) * 0.01).collect();
    model(
        vec![
            node("MatMul", &["x", "w1"], &["h"]),
            node("Relu", &["h"], &["r"]),
            node("MatMul", &["r", "w2"], &["y"]),
        ],
        vec![value("x", 1, &[-1, k as i64])],
        vec![value("y", 1, &[-1, k as i64])],
        vec![
            f32_initializer("w1", &[k as i64, k as i64], &w),
            f32_initializer("w2", &[k as i64, k as i64], &w),
        ],
        17,
    )
}

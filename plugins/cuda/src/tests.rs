//! Registration with and without a GPU, and (with `OPREG_GPU_TESTS=1`) cuBLAS against the CPU
//! reference.

use super::*;
use opreg_sdk::module::{collect, collect_from, PluginModRef, Registration};

fn gpu_tests() -> bool {
    std::env::var("OPREG_GPU_TESTS").as_deref() == Ok("1")
}

fn has_gpu() -> bool {
    probe::probe().is_ok()
}

/// With no GPU: nothing at all; with one: a provider, a backend per device, and the operator
/// kernels on each device where NVRTC is installed.
fn check(reg: &Registration) {
    assert!(reg.quantizers.is_empty());
    if has_gpu() {
        assert_eq!(reg.devices.len(), 1);
        let n = reg.devices[0].provider.info().devices.len();
        assert!(n >= 1);
        assert_eq!(reg.backends.len(), n);
        let want = if kernels::module::nvrtc_present() {
            kernels::regs().len() * n
        } else {
            0
        };
        assert_eq!(reg.kernels.len(), want);
    } else {
        assert!(!gpu_tests(), "OPREG_GPU_TESTS=1 but the probe finds no GPU");
        assert!(reg.kernels.is_empty(), "kernels without a GPU");
        assert!(reg.devices.is_empty(), "a device provider without a GPU");
        assert!(reg.backends.is_empty(), "a BLAS backend without a GPU");
    }
}

#[test]
fn registration_on_this_machine_does_not_panic() {
    let reg = collect_from(register).expect("register");
    check(&reg);
}

#[test]
fn the_exported_entry_points_register_the_same() {
    // What the daemon calls on the loaded library, without the dlopen.
    let info = __opreg_plugin_info();
    assert_eq!(info.name.as_str(), "cuda");
    __opreg_plugin_init("".into()).into_result().expect("init");
    let reg = collect(__opreg_plugin_register).expect("register");
    check(&reg);
    drop(reg);
    __opreg_plugin_shutdown();
}

#[test]
fn the_configuration_sets_tf32_and_refuses_unknown_keys() {
    // One test owns the static (tests run in parallel).
    init("tf32 = true\n# a comment\n").expect("tf32 on");
    assert!(tf32());
    init("").expect("defaults");
    assert!(!tf32(), "TF32 is opt-in");
    let e = init("tf32 = maybe").expect_err("a bad value");
    assert!(e.message.contains("tf32 = true|false"), "{}", e.message);
    assert!(init("fast = true").is_err());
    assert!(init("tf32").is_err());
    init("").expect("defaults");
}

#[test]
fn the_no_gpu_line_names_the_reason() {
    let names = probe::LibNames {
        driver: vec!["libopreg-test-no-cuda.so.1".into()],
        cublas: vec![],
    };
    let why = probe::probe_with(&names, || unreachable!()).expect_err("no driver");
    assert_eq!(
        no_gpu_line(&why.to_string()),
        "cuda: no GPU (CUDA driver library not found: tried libopreg-test-no-cuda.so.1); \
         registering nothing"
    );
}

/// The cdylib `cargo build` wrote next to this test's `deps/` folder, if it is there
/// (`cargo test` alone does not rebuild it: `scripts/test` builds the workspace first).
fn built_library() -> Option<std::path::PathBuf> {
    let exe = std::env::current_exe().ok()?;
    let dir = exe.parent()?.parent()?;
    let lib = dir.join(format!(
        "{}opreg_cuda{}",
        std::env::consts::DLL_PREFIX,
        std::env::consts::DLL_SUFFIX
    ));
    lib.exists().then_some(lib)
}

#[test]
fn the_built_library_loads_without_cuda_and_registers_accordingly() {
    use opreg_sdk::abi_stable::library::RootModule;
    let Some(path) = built_library() else {
        eprintln!("skipped: libopreg_cuda.so is not built (cargo build -p opreg-plugin-cuda)");
        return;
    };
    // dlopen succeeding proves the library needs no CUDA library at link time; then the
    // module is checked and called as the daemon does (abi_stable's layout check included).
    let module = PluginModRef::load_from_file(&path).expect("load the plugin");
    let info = (module.info())();
    assert_eq!(info.name.as_str(), "cuda");
    (module.init())("".into()).into_result().expect("init");
    let reg = collect(module.register()).expect("register");
    check(&reg);
    drop(reg);
    (module.shutdown())();
}

/// cuBLAS against the CPU reference, on every GPU. Skipped unless `OPREG_GPU_TESTS=1`.
mod gpu {
    use super::*;
    use crate::blas::{case, CublasBlas};
    use opreg_sdk::testkit::{self_test_blas, self_test_device};

    fn cuda() -> Option<Arc<device::Cuda>> {
        if !gpu_tests() {
            eprintln!("skipped: GPU tests run with OPREG_GPU_TESTS=1");
            return None;
        }
        let g = probe::probe().expect("OPREG_GPU_TESTS=1 needs a GPU");
        Some(Arc::new(
            device::Cuda::open(g.count).expect("open the GPUs"),
        ))
    }

    #[test]
    fn the_provider_passes_its_self_test() {
        let Some(cuda) = cuda() else { return };
        self_test_device(device::CudaProvider(cuda)).expect("self-test");
    }

    #[test]
    fn streams_events_and_pinned_memory_work() {
        let Some(cuda) = cuda() else { return };
        let p = device::CudaProvider(cuda);
        let d = Device::CUDA0;
        let (s1, s2) = (
            p.create_stream(d).expect("stream"),
            p.create_stream(d).expect("stream"),
        );
        let pinned = p
            .alloc(d, MemoryType::HOST_PINNED, 1024, s1)
            .expect("pinned");
        let dev = p.alloc(d, MemoryType::DEVICE, 1024, s1).expect("device");
        // SAFETY: 1024 pinned host bytes.
        let host = unsafe { std::slice::from_raw_parts_mut(pinned.ptr, 1024) };
        host.iter_mut().enumerate().for_each(|(i, b)| *b = i as u8);
        p.copy(dev, pinned, 1024, s1).expect("up");
        let e = p.create_event(d).expect("event");
        p.record(d, e, s1).expect("record");
        p.wait(d, s2, e).expect("wait");
        let mut back = vec![0u8; 1024];
        let out = MemRef {
            device: Device::CPU,
            memory: MemoryType::HOST,
            ptr: back.as_mut_ptr(),
        };
        p.copy(out, dev, 1024, s2).expect("down");
        p.synchronize(d, s2).expect("sync");
        assert!(back.iter().enumerate().all(|(i, &b)| b == i as u8));
        assert_ne!(p.resource(d, s2, "cublas"), 0);
        assert_eq!(p.resource(d, s2, "nothing"), 0);
        assert!(p.create_stream(Device::CPU).is_err());
        assert!(
            p.synchronize(d, Stream(12345)).is_err(),
            "a stream it never made"
        );
        p.free(dev, 1024, s1);
        p.free(pinned, 1024, s1);
        p.destroy_event(d, e);
        p.destroy_stream(d, s1);
        p.destroy_stream(d, s2);
    }

    #[test]
    fn cublas_matches_the_reference() {
        let Some(cuda) = cuda() else { return };
        for ordinal in 0..cuda.gpus.len() as u32 {
            let device = Device {
                kind: DeviceKind::CUDA,
                ordinal,
            };
            let b = CublasBlas {
                cuda: cuda.clone(),
                device,
            };
            let p = device::CudaProvider(cuda.clone());
            let s = p.create_stream(device).expect("stream");
            for layout in [Layout::ROW_MAJOR, Layout::COL_MAJOR] {
                for ta in [Transpose::NO, Transpose::YES] {
                    for tb in [Transpose::NO, Transpose::YES] {
                        for &(m, n, k) in &[(1, 1, 1), (3, 5, 4), (64, 48, 33), (129, 7, 257)] {
                            for beta in [0.0, 1.0, -0.5] {
                                let g = case(m, n, k, ta, tb, layout, beta);
                                b.verify(s, &g).expect("gemm");
                            }
                        }
                    }
                }
                // Padded leading dimensions, a batch with strides, a shared B, and k = 0.
                let mut g = case(5, 6, 7, Transpose::NO, Transpose::NO, layout, 0.5);
                g.lda += 3;
                g.ldb += 2;
                g.ldc += 1;
                b.verify(s, &g).expect("padded");
                let mut g = case(4, 3, 5, Transpose::NO, Transpose::YES, layout, 0.0);
                g.batch = 3;
                g.stride_a = 4 * 5 + 1;
                g.stride_b = 0;
                g.stride_c = 4 * 3;
                b.verify(s, &g).expect("batched, shared B");
                let g = case(3, 4, 0, Transpose::NO, Transpose::NO, layout, 0.5);
                b.verify(s, &g).expect("k = 0");
            }
            p.destroy_stream(device, s);
            self_test_blas(
                CublasBlas {
                    cuda: cuda.clone(),
                    device,
                },
                device,
            )
            .expect("backend self-test");
        }
    }
}

/// Speed of the backend's gemm against cuBLAS called directly, in one process: the plugin's
/// overhead (argument mapping, handle lookup) must vanish. A benchmark, not a test: run on a
/// GPU with `OPREG_GPU_TESTS=1 cargo test -p opreg-plugin-cuda --release -- --ignored
/// --nocapture gemm_speed`; it prints ratios and asserts nothing about time.
#[test]
#[ignore]
fn gemm_speed_against_cublas_called_directly() {
    use cudarc::cublas::{result as cublas, sys::cublasOperation_t};
    use cudarc::driver::result as driver;
    if !gpu_tests() {
        eprintln!("skipped: GPU benchmarks run with OPREG_GPU_TESTS=1");
        return;
    }
    let g = probe::probe().expect("a GPU");
    let cuda = Arc::new(device::Cuda::open(g.count).expect("open"));
    let device = Device::CUDA0;
    let b = crate::blas::CublasBlas {
        cuda: cuda.clone(),
        device,
    };
    let gpu = cuda.gpu(device).expect("gpu");
    let handle = gpu.cublas(Stream::DEFAULT).expect("handle");
    println!("gemm f32 (row-major C = A B), median of 7 batches; time ratio plugin / cuBLAS (<= 1.05 is the target)");
    for n in [256usize, 512, 1024, 2048, 4096, 8192] {
        let bytes = n * n * 4;
        // SAFETY: the context is bound (cuda.gpu); three n x n buffers, zeroed.
        let (pa, pb, pc) = unsafe {
            let a = driver::malloc_sync(bytes).expect("a");
            let bb = driver::malloc_sync(bytes).expect("b");
            let c = driver::malloc_sync(bytes).expect("c");
            for p in [a, bb, c] {
                driver::memset_d8_sync(p, 0x3c, bytes).expect("fill");
            }
            (a, bb, c)
        };
        let mut args = GemmArgs::new(GemmTypes::F32, n, n, n);
        args.a = pa as usize as *const u8;
        args.b = pb as usize as *const u8;
        args.c = pc as usize as *mut u8;
        let reps = (4096 * 4096 * 4096 / (n * n * n)).clamp(2, 200);
        let time = |f: &dyn Fn()| -> f64 {
            f();
            driver::ctx::synchronize().expect("sync");
            let mut batches: Vec<f64> = (0..7)
                .map(|_| {
                    let t = std::time::Instant::now();
                    for _ in 0..reps {
                        f();
                    }
                    driver::ctx::synchronize().expect("sync");
                    t.elapsed().as_secs_f64() / reps as f64
                })
                .collect();
            batches.sort_by(f64::total_cmp);
            batches[3]
        };
        let plugin = time(&|| b.run(Stream::DEFAULT, &args).expect("plugin gemm"));
        let (alpha, beta) = (1.0f32, 0.0f32);
        let direct = time(&|| {
            // SAFETY: n x n device buffers; the row-major product as cuBLAS's column-major
            // one with the operands swapped (what the plugin maps it to).
            unsafe {
                cublas::sgemm(
                    handle,
                    cublasOperation_t::CUBLAS_OP_N,
                    cublasOperation_t::CUBLAS_OP_N,
                    n as i32,
                    n as i32,
                    n as i32,
                    &alpha,
                    pb as usize as *const f32,
                    n as i32,
                    pa as usize as *const f32,
                    n as i32,
                    &beta,
                    pc as usize as *mut f32,
                    n as i32,
                )
            }
            .expect("sgemm")
        });
        let tflops = |s: f64| 2.0 * (n * n * n) as f64 / s / 1e12;
        println!(
            "gemm {n:>5}: plugin {:.1} TFLOP/s, cuBLAS {:.1} TFLOP/s, time ratio {:.3}",
            tflops(plugin),
            tflops(direct),
            plugin / direct
        );
        // SAFETY: allocated above, no work pending (synchronized).
        unsafe {
            for p in [pa, pb, pc] {
                driver::free_sync(p).expect("free");
            }
        }
    }
}

/// The driver path through `cudarc` without a GPU: fake CUDA libraries built with `cc` (each
/// driver function returns an error but `cuInit` and `cuDeviceGetCount`, which the
/// environment steers), and this test binary run again as a child with `LD_LIBRARY_PATH`
/// pointing at them (the dynamic loader reads it at start-up only). Skipped without `cc`.
mod fake {
    use super::*;
    use std::{path::Path, process::Command};

    const CHILD: &str = "OPREG_CUDA_FAKE_CHILD";

    /// Builds `lib` from `functions` into `dir`; false when there is no C compiler.
    fn build(dir: &Path, lib: &str, functions: &[&str]) -> bool {
        let mut c = String::from(
            "#include <stdlib.h>\n\
             static int env(const char *k, int d) { const char *e = getenv(k); return e ? atoi(e) : d; }\n",
        );
        for f in functions {
            c += &match *f {
                "cuInit" => "int cuInit(unsigned f) { return env(\"FAKE_CUINIT\", 0); }\n".into(),
                "cuDeviceGetCount" => {
                    "int cuDeviceGetCount(int *n) { *n = env(\"FAKE_COUNT\", 0); return 0; }\n"
                        .into()
                }
                // CUDA_ERROR_INVALID_DEVICE; for cuBLAS, NOT_INITIALIZED.
                f => format!("int {f}(void) {{ return 101; }}\n"),
            };
        }
        let src = dir.join(format!("{lib}.c"));
        std::fs::write(&src, c).expect("write C");
        Command::new("cc")
            .args(["-shared", "-fPIC", "-o"])
            .arg(dir.join(lib))
            .arg(&src)
            .status()
            .is_ok_and(|s| s.success())
    }

    /// In the child: the line registration would write.
    #[test]
    fn child() {
        if std::env::var(CHILD).is_err() {
            return;
        }
        match find() {
            Found::Nothing(why) => println!("REASON:{}", no_gpu_line(&why)),
            Found::Gpus(_, n) => println!("REASON:{n} gpus"),
        }
    }

    fn run_child(dir: &Path, env: &[(&str, &str)]) -> String {
        let out = Command::new(std::env::current_exe().expect("test binary"))
            .args(["--exact", "tests::fake::child", "--nocapture"])
            .args(["--test-threads", "1"])
            .env("LD_LIBRARY_PATH", dir)
            .env(CHILD, "1")
            .env_remove(probe::ENV_LIBCUDA)
            .env_remove(probe::ENV_LIBCUBLAS)
            .envs(env.iter().copied())
            .output()
            .expect("run the child");
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(out.status.success(), "{text}");
        assert!(!text.contains("panicked"), "a panic: {text}");
        text.lines()
            .find_map(|l| l.split_once("REASON:").map(|(_, r)| r))
            .unwrap_or_else(|| panic!("no reason line in {text}"))
            .to_string()
    }

    #[test]
    fn fake_drivers_give_one_reason_each_without_panicking() {
        if has_gpu() {
            // The fakes stand in for a driver that is absent; on a GPU machine the real one
            // (mapped in by the container runtime) is what the loader finds.
            eprintln!("skipped: a real CUDA driver is installed");
            return;
        }
        let dir = std::env::temp_dir().join(format!("opreg-cuda-fake-{}", std::process::id()));
        let old = dir.join("old");
        std::fs::create_dir_all(&old).expect("temp dir");
        let without = |skip: &str| -> Vec<&str> {
            probe::DRIVER_SYMBOLS
                .iter()
                .copied()
                .filter(|s| *s != skip)
                .collect()
        };
        let built = build(&dir, "libcuda.so.1", probe::DRIVER_SYMBOLS)
            && build(&dir, "libcublas.so.12", probe::CUBLAS_SYMBOLS)
            && build(&old, "libcuda.so.1", &without("cuMemAllocAsync"))
            && build(&old, "libcublas.so.12", probe::CUBLAS_SYMBOLS);
        if !built {
            eprintln!("skipped: no C compiler to build fake CUDA libraries");
            let _ = std::fs::remove_dir_all(&dir);
            return;
        }
        let line = |why: &str| format!("cuda: no GPU ({why}); registering nothing");
        // (folder of the fakes, environment, the line wanted)
        type Case<'a> = (&'a Path, &'a [(&'a str, &'a str)], String);
        let cases: [Case<'_>; 5] = [
            (
                &dir,
                &[("FAKE_CUINIT", "34")],
                line("the CUDA driver failed to initialise: CUDA_ERROR_STUB_LIBRARY (34)"),
            ),
            (
                &dir,
                &[("FAKE_CUINIT", "100")],
                line("the CUDA driver reports no device"),
            ),
            (
                &dir,
                &[("FAKE_COUNT", "0")],
                line("the CUDA driver reports no device"),
            ),
            (
                // The probe passes; opening device 0 through cudarc fails with an error.
                &dir,
                &[("FAKE_COUNT", "1")],
                line(
                    "opening the devices failed: cuda: opening device 0: \
                     CUDA_ERROR_INVALID_DEVICE (101)",
                ),
            ),
            (
                &old,
                &[("FAKE_COUNT", "1")],
                line(
                    "libcuda.so.1 loads but has no cuMemAllocAsync: not a usable CUDA driver \
                     library (not CUDA's, or too old)",
                ),
            ),
        ];
        for (lib_dir, env, want) in cases {
            assert_eq!(run_child(lib_dir, env), want, "{env:?}");
        }
        // The probe pointed at the fakes by path, where cudarc's own names find nothing:
        // cudarc is asked first and answers without a panic.
        let path = |l: &str| dir.join(l).to_string_lossy().into_owned();
        let got = run_child(
            Path::new("/nonexistent"),
            &[
                (probe::ENV_LIBCUDA, &path("libcuda.so.1")),
                (probe::ENV_LIBCUBLAS, &path("libcublas.so.12")),
                ("FAKE_COUNT", "1"),
            ],
        );
        assert_eq!(
            got,
            line(
                "the CUDA driver could not be called: cudarc finds no CUDA driver library or \
                 cuBLAS under its own names"
            )
        );
        let _ = std::fs::remove_dir_all(&dir);
    }
}

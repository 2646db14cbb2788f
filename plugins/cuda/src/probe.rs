//! Is there a GPU this plugin can use? Answered without panicking, on any machine.
//!
//! `cudarc` (with `dynamic-loading`) opens the CUDA libraries on first use and *panics* when
//! one is missing or lacks a symbol. So the probe first opens them itself with `libloading`
//! and looks for the symbols the plugin needs, and only then calls the driver through
//! `cudarc` (`cuInit`, `cuDeviceGetCount`), inside `catch_unwind` as a second guard.
//!
//! The names tried are `cudarc`'s own candidates (the names it will open itself), after the
//! usual Linux sonames: so when the probe opens a library, `cudarc` finds one too. The
//! environment variables [`ENV_LIBCUDA`] and [`ENV_LIBCUBLAS`] replace the lists (a
//! comma-separated list of names or paths): tests point them at a missing library or at one
//! that is not CUDA's. They only change what the probe checks; `cudarc` still opens its own
//! candidates, so an override that names a library `cudarc` would not find ends in a caught
//! panic at first use, never in a crash.

use std::fmt;

/// Replaces the names tried for the CUDA driver library (comma-separated).
pub const ENV_LIBCUDA: &str = "OPREG_CUDA_LIBCUDA";
/// Replaces the names tried for cuBLAS (comma-separated).
pub const ENV_LIBCUBLAS: &str = "OPREG_CUDA_LIBCUBLAS";

/// Every driver function the plugin calls (through `cudarc`, which looks each one up at its
/// first call and panics if it is missing): checked up front, so an old or odd driver is a
/// reason here rather than a panic later.
pub const DRIVER_SYMBOLS: &[&str] = &[
    "cuInit",
    "cuDeviceGetCount",
    "cuDeviceGet",
    "cuDeviceGetAttribute",
    "cuDevicePrimaryCtxRetain",
    "cuDevicePrimaryCtxRelease_v2",
    "cuCtxGetCurrent",
    "cuCtxSetCurrent",
    "cuCtxSynchronize",
    "cuMemAllocAsync",
    "cuMemFreeAsync",
    "cuMemAlloc_v2",
    "cuMemFree_v2",
    "cuMemHostAlloc",
    "cuMemFreeHost",
    "cuMemcpyHtoDAsync_v2",
    "cuMemcpyDtoHAsync_v2",
    "cuMemcpyDtoDAsync_v2",
    "cuMemcpyPeerAsync",
    "cuMemcpyHtoD_v2",
    "cuMemcpyDtoH_v2",
    "cuStreamCreate",
    "cuStreamDestroy_v2",
    "cuStreamSynchronize",
    "cuStreamWaitEvent",
    "cuEventCreate",
    "cuEventRecord",
    "cuEventDestroy_v2",
    "cuModuleLoadData",
    "cuModuleGetFunction",
    "cuModuleUnload",
    "cuLaunchKernel",
];
/// Every cuBLAS function the plugin calls.
pub const CUBLAS_SYMBOLS: &[&str] = &[
    "cublasCreate_v2",
    "cublasDestroy_v2",
    "cublasSetStream_v2",
    "cublasSgemm_v2",
    "cublasSgemmStridedBatched",
    "cublasSetMathMode",
];

/// The library names the probe tries, in order.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LibNames {
    /// Names (or paths) of the CUDA driver library.
    pub driver: Vec<String>,
    /// Names (or paths) of cuBLAS.
    pub cublas: Vec<String>,
}

impl LibNames {
    /// The usual sonames, then every name `cudarc` tries, without repeats.
    pub fn defaults() -> Self {
        LibNames {
            driver: candidates(&["libcuda.so.1", "libcuda.so"], "cuda"),
            cublas: candidates(&["libcublas.so.12", "libcublas.so"], "cublas"),
        }
    }

    /// The defaults, with [`ENV_LIBCUDA`] / [`ENV_LIBCUBLAS`] (as `var` reads them) replacing
    /// their list when set and not blank.
    pub fn from_vars(var: impl Fn(&str) -> Option<String>) -> Self {
        let mut names = LibNames::defaults();
        let list = |v: String| -> Vec<String> {
            v.split(',')
                .map(str::trim)
                .filter(|s| !s.is_empty())
                .map(str::to_string)
                .collect()
        };
        if let Some(v) = var(ENV_LIBCUDA).map(list).filter(|l| !l.is_empty()) {
            names.driver = v;
        }
        if let Some(v) = var(ENV_LIBCUBLAS).map(list).filter(|l| !l.is_empty()) {
            names.cublas = v;
        }
        names
    }

    /// The names this process's environment asks for.
    pub fn from_env() -> Self {
        LibNames::from_vars(|k| std::env::var(k).ok())
    }
}

fn candidates(first: &[&str], lib: &str) -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    let theirs = cudarc::get_lib_name_candidates(lib);
    for name in first.iter().map(|s| s.to_string()).chain(theirs) {
        if !out.contains(&name) {
            out.push(name);
        }
    }
    out
}

/// The GPUs found.
#[derive(Debug)]
pub struct Gpus {
    /// Number of CUDA devices (at least 1).
    pub count: u32,
    /// The driver library that was opened.
    pub driver_lib: String,
    /// The cuBLAS library that was opened.
    pub cublas_lib: String,
    // Held open until the caller has opened the devices through `cudarc` (which opens the
    // libraries again and never closes them).
    _libs: Vec<libloading::Library>,
}

/// Which library a reason is about.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub enum Lib {
    /// The CUDA driver library (`libcuda`).
    Driver,
    /// cuBLAS.
    Cublas,
}

impl fmt::Display for Lib {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Lib::Driver => "CUDA driver library",
            Lib::Cublas => "cuBLAS",
        })
    }
}

/// Why there is no GPU to use.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum NoGpu {
    /// None of the names loads.
    Missing {
        /// The library.
        lib: Lib,
        /// The names tried, in order.
        tried: Vec<String>,
    },
    /// A library loads but lacks a symbol the plugin needs (not CUDA's, or too old).
    Unusable {
        /// The library.
        lib: Lib,
        /// The name that loaded.
        name: String,
        /// The symbol it lacks.
        symbol: &'static str,
    },
    /// `cuInit` (or `cuDeviceGetCount`) failed.
    InitFailed {
        /// The `CUresult` code.
        code: u32,
        /// Its name, e.g. `CUDA_ERROR_NOT_INITIALIZED`.
        name: String,
    },
    /// The driver works and reports no device.
    NoDevices,
    /// Calling the driver panicked (a library `cudarc` could not open, a missing symbol).
    Panicked(String),
}

impl fmt::Display for NoGpu {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            NoGpu::Missing { lib, tried } => {
                write!(f, "{lib} not found: tried ")?;
                match tried.as_slice() {
                    [] => f.write_str("no name"),
                    [one] => f.write_str(one),
                    [first, rest @ ..] => write!(
                        f,
                        "{first} and {} other name{}",
                        rest.len(),
                        if rest.len() == 1 { "" } else { "s" }
                    ),
                }
            }
            NoGpu::Unusable { lib, name, symbol } => {
                write!(
                    f,
                    "{name} loads but has no {symbol}: not a usable {lib} (not CUDA's, or too old)"
                )
            }
            NoGpu::InitFailed { code, name } => {
                write!(f, "the CUDA driver failed to initialise: {name} ({code})")
            }
            NoGpu::NoDevices => f.write_str("the CUDA driver reports no device"),
            NoGpu::Panicked(m) => write!(f, "the CUDA driver could not be called: {m}"),
        }
    }
}

impl std::error::Error for NoGpu {}

/// Opens the first of `names` that loads, and checks it has every symbol of `symbols`.
pub fn open(
    lib: Lib,
    names: &[String],
    symbols: &[&'static str],
) -> Result<(libloading::Library, String), NoGpu> {
    for name in names {
        // SAFETY: opening a library runs its initialisers; these are the system's CUDA
        // libraries (or what the operator named in the environment), which `cudarc` would
        // open anyway.
        let Ok(l) = (unsafe { libloading::Library::new(name) }) else {
            continue;
        };
        for &symbol in symbols {
            // SAFETY: only looked up, never called through this type.
            if unsafe { l.get::<*const ()>(symbol.as_bytes()) }.is_err() {
                return Err(NoGpu::Unusable {
                    lib,
                    name: name.clone(),
                    symbol,
                });
            }
        }
        return Ok((l, name.clone()));
    }
    Err(NoGpu::Missing {
        lib,
        tried: names.to_vec(),
    })
}

/// The outcome of calling the driver: a panic, a `CUresult` error, or the device count.
pub type DriverOutcome = std::thread::Result<Result<i32, cudarc::driver::sys::CUresult>>;

/// What a driver outcome means.
pub fn classify(outcome: DriverOutcome) -> Result<u32, NoGpu> {
    use cudarc::driver::sys::CUresult;
    match outcome {
        Err(p) => Err(NoGpu::Panicked(panic_text(&*p))),
        Ok(Err(CUresult::CUDA_ERROR_NO_DEVICE)) => Err(NoGpu::NoDevices),
        // `{:?}` of the enum is its name; `DriverError`'s own formatting would call the
        // driver (`cuGetErrorString`), which is what failed.
        Ok(Err(e)) => Err(NoGpu::InitFailed {
            code: e as u32,
            name: format!("{e:?}"),
        }),
        Ok(Ok(n)) if n <= 0 => Err(NoGpu::NoDevices),
        Ok(Ok(n)) => Ok(n as u32),
    }
}

fn panic_text(p: &(dyn std::any::Any + Send)) -> String {
    let text = p
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| p.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "a panic".into());
    // cudarc's messages list every name it tried: keep the line short.
    match text.char_indices().nth(200) {
        Some((i, _)) => format!("{}...", &text[..i]),
        None => text,
    }
}

/// `cuInit` and `cuDeviceGetCount` through `cudarc`, panics caught. First asks `cudarc`
/// whether it can open both libraries by its own names (it cannot when the environment
/// pointed the probe elsewhere), which it answers without panicking.
fn count_devices() -> DriverOutcome {
    // SAFETY: only opens and closes the libraries, as the probe did.
    let present = unsafe {
        cudarc::driver::sys::is_culib_present() && cudarc::cublas::sys::is_culib_present()
    };
    if !present {
        return Err(Box::new(
            "cudarc finds no CUDA driver library or cuBLAS under its own names",
        ));
    }
    std::panic::catch_unwind(|| {
        use cudarc::driver::result;
        result::init().map_err(|e| e.0)?;
        result::device::get_count().map_err(|e| e.0)
    })
}

/// The probe with given names and driver call (for tests).
pub fn probe_with(names: &LibNames, driver: impl FnOnce() -> DriverOutcome) -> Result<Gpus, NoGpu> {
    let (driver_lib, driver_name) = open(Lib::Driver, &names.driver, DRIVER_SYMBOLS)?;
    let (cublas_lib, cublas_name) = open(Lib::Cublas, &names.cublas, CUBLAS_SYMBOLS)?;
    let count = classify(driver())?;
    Ok(Gpus {
        count,
        driver_lib: driver_name,
        cublas_lib: cublas_name,
        _libs: vec![cublas_lib, driver_lib],
    })
}

/// The GPUs of this machine, or why there are none. Never panics.
pub fn probe() -> Result<Gpus, NoGpu> {
    probe_with(&LibNames::from_env(), count_devices)
}

#[cfg(test)]
mod tests {
    use super::*;
    use cudarc::driver::sys::CUresult;

    fn names(driver: &[&str], cublas: &[&str]) -> LibNames {
        let v = |l: &[&str]| l.iter().map(|s| s.to_string()).collect();
        LibNames {
            driver: v(driver),
            cublas: v(cublas),
        }
    }

    fn never() -> DriverOutcome {
        panic!("the driver must not be called when a library is missing")
    }

    /// A library every Linux machine has, which is not CUDA's.
    const LIBM: &str = "libm.so.6";

    #[test]
    fn defaults_start_with_the_sonames_and_cover_cudarcs_names() {
        let n = LibNames::defaults();
        assert_eq!(n.driver[..2], ["libcuda.so.1", "libcuda.so"]);
        assert_eq!(n.cublas[..2], ["libcublas.so.12", "libcublas.so"]);
        for c in cudarc::get_lib_name_candidates("cuda") {
            assert!(n.driver.contains(&c), "{c}");
        }
        for c in cudarc::get_lib_name_candidates("cublas") {
            assert!(n.cublas.contains(&c), "{c}");
        }
        let mut unique = n.driver.clone();
        unique.dedup();
        assert_eq!(unique.len(), n.driver.len());
    }

    #[test]
    fn the_environment_replaces_the_names() {
        let n = LibNames::from_vars(|k| match k {
            ENV_LIBCUDA => Some(" /nowhere/libcuda.so.1 , libfake.so ".into()),
            ENV_LIBCUBLAS => Some("  ".into()),
            _ => None,
        });
        assert_eq!(n.driver, ["/nowhere/libcuda.so.1", "libfake.so"]);
        assert_eq!(
            n.cublas,
            LibNames::defaults().cublas,
            "blank keeps the defaults"
        );
    }

    #[test]
    fn a_missing_driver_library_is_named() {
        let r = probe_with(&names(&["libopreg-no-such-cuda.so.1"], &[LIBM]), never);
        let e = r.expect_err("no driver");
        assert_eq!(
            e,
            NoGpu::Missing {
                lib: Lib::Driver,
                tried: vec!["libopreg-no-such-cuda.so.1".into()]
            }
        );
        assert_eq!(
            e.to_string(),
            "CUDA driver library not found: tried libopreg-no-such-cuda.so.1"
        );
    }

    #[test]
    fn a_library_that_is_not_the_driver_is_refused_by_symbol() {
        let e = probe_with(&names(&["libopreg-nope.so", LIBM], &[LIBM]), never)
            .expect_err("libm is not CUDA");
        assert_eq!(
            e,
            NoGpu::Unusable {
                lib: Lib::Driver,
                name: LIBM.into(),
                symbol: "cuInit"
            }
        );
        assert!(e.to_string().contains("has no cuInit"), "{e}");
    }

    #[test]
    fn open_finds_a_library_with_the_symbols() {
        let (_lib, name) = open(Lib::Driver, &[LIBM.to_string()], &["cos", "sin"]).expect("libm");
        assert_eq!(name, LIBM);
        let e = open(Lib::Cublas, &["libopreg-none.so".into()], &[]).expect_err("missing");
        assert!(matches!(
            e,
            NoGpu::Missing {
                lib: Lib::Cublas,
                ..
            }
        ));
        let e = open(Lib::Cublas, &[LIBM.into()], &["cublasCreate_v2"]).expect_err("not cuBLAS");
        assert!(e.to_string().contains("not a usable cuBLAS"), "{e}");
    }

    #[test]
    fn driver_outcomes_are_classified() {
        assert_eq!(classify(Ok(Ok(2))), Ok(2));
        assert_eq!(classify(Ok(Ok(0))), Err(NoGpu::NoDevices));
        assert_eq!(
            classify(Ok(Err(CUresult::CUDA_ERROR_NO_DEVICE))),
            Err(NoGpu::NoDevices)
        );
        let e = classify(Ok(Err(CUresult::CUDA_ERROR_STUB_LIBRARY))).expect_err("init");
        assert_eq!(
            e,
            NoGpu::InitFailed {
                code: 34,
                name: "CUDA_ERROR_STUB_LIBRARY".into()
            }
        );
        assert_eq!(
            e.to_string(),
            "the CUDA driver failed to initialise: CUDA_ERROR_STUB_LIBRARY (34)"
        );
        let long = "x".repeat(500);
        let e = classify(Err(Box::new(long))).expect_err("panic");
        let NoGpu::Panicked(m) = e else {
            panic!("{e:?}")
        };
        assert!(m.len() < 210, "{m}");
    }

    #[test]
    fn the_probe_on_this_machine_does_not_panic() {
        // With a GPU (and OPREG_GPU_TESTS=1) it must find one; without, any reason will do.
        match probe() {
            Ok(g) => assert!(g.count >= 1),
            Err(e) => {
                assert!(
                    std::env::var("OPREG_GPU_TESTS").as_deref() != Ok("1"),
                    "OPREG_GPU_TESTS=1 but no GPU: {e}"
                );
                eprintln!("cuda probe on this machine: {e}");
            }
        }
    }
}

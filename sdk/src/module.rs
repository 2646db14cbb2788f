//! The root module every plugin exports, and the registration it returns.

use crate::{
    blas::{into_ffi_blas, Blas, BlasDesc, FfiBlasBox},
    error::guard,
    kernel::{into_ffi_factory, FfiKernelFactoryBox, KernelDesc, KernelFactory},
    quant::{into_ffi_quantizer, FfiQuantizerBox, Quantizer, QuantizerDesc},
    PluginError, ABI_MINOR, ABI_VERSION,
};
use abi_stable::{
    library::RootModule,
    package_version_strings,
    sabi_types::VersionStrings,
    std_types::{RResult, RStr, RString, RVec},
    StableAbi,
};

/// Who a plugin is.
#[repr(C)]
#[derive(StableAbi, Clone, Debug, PartialEq)]
pub struct PluginInfo {
    /// Unique name; loading a second plugin of the same name replaces the first (hot swap).
    pub name: RString,
    /// The plugin's own version.
    pub version: RString,
    /// One line for listings.
    pub description: RString,
    /// [`ABI_MINOR`](crate::ABI_MINOR) of the SDK it was built with.
    pub abi_minor: u32,
    /// Version of the `opreg-sdk` crate it was built with.
    pub sdk_version: RString,
}

/// The ABI version a plugin was built for, exported as the plain C symbol
/// [`ABI_SYMBOL`] next to the `abi_stable` header. The daemon reads it *before* any layout
/// check: a plugin built for a newer minor than the daemon's is refused there, so its (larger)
/// layouts never reach `abi_stable`'s process-wide layout cache, whose entries would point into
/// the plugin after it is unloaded.
#[repr(C)]
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub struct PluginAbi {
    /// [`ABI_MAJOR`](crate::ABI_MAJOR) of the SDK the plugin was built with.
    pub major: u32,
    /// [`ABI_MINOR`](crate::ABI_MINOR) of the SDK the plugin was built with.
    pub minor: u32,
}

/// The symbol name of the plugin's [`PluginAbi`] (NUL-terminated, for `dlsym`).
pub const ABI_SYMBOL: &[u8] = b"opreg_plugin_abi\0";

impl PluginAbi {
    /// The ABI of this SDK.
    pub const CURRENT: PluginAbi = PluginAbi {
        major: crate::ABI_MAJOR,
        minor: ABI_MINOR,
    };

    /// Whether a host speaking `self` can load a plugin built for `plugin`: same major, and
    /// the plugin's minor no newer than the host's (a newer plugin may call what this host
    /// does not have).
    pub fn accepts(self, plugin: PluginAbi) -> bool {
        self.major == plugin.major && plugin.minor <= self.minor
    }
}

/// A kernel with its description.
#[repr(C)]
#[derive(StableAbi)]
pub struct KernelRegistration {
    /// What it implements.
    pub desc: KernelDesc,
    /// Builds it per node.
    pub factory: FfiKernelFactoryBox,
}

/// A BLAS backend with its description.
#[repr(C)]
#[derive(StableAbi)]
pub struct BlasRegistration {
    /// What it supports.
    pub desc: BlasDesc,
    /// The backend.
    pub backend: FfiBlasBox,
}

/// A quantization strategy with its description.
#[repr(C)]
#[derive(StableAbi)]
pub struct QuantizerRegistration {
    /// What it is.
    pub desc: QuantizerDesc,
    /// The strategy.
    pub quantizer: FfiQuantizerBox,
}

/// Everything a plugin registers.
#[repr(C)]
#[derive(StableAbi, Default)]
pub struct Registration {
    /// Operator kernels.
    pub kernels: RVec<KernelRegistration>,
    /// BLAS backends.
    pub backends: RVec<BlasRegistration>,
    /// Quantization strategies.
    pub quantizers: RVec<QuantizerRegistration>,
}

/// The root module: the one symbol a plugin exports.
///
/// A prefix type: fields after `last_prefix_field` may be appended in later minor versions;
/// the host reads them as `Option`s, so plugins built before they existed still load.
#[repr(C)]
#[derive(StableAbi)]
#[sabi(kind(Prefix(prefix_ref = PluginModRef)))]
pub struct PluginMod {
    /// Who the plugin is. Pure: called first, before `init`.
    pub info: extern "C" fn() -> PluginInfo,
    /// Called once per load, before `register`, with the plugin's configuration (TOML text
    /// of the daemon's `[plugin_config.<plugin name>]` table; empty when there is none). A
    /// plugin opens drivers, probes devices and creates pools here. An error refuses the load.
    pub init: extern "C" fn(config: RStr<'_>) -> RResult<(), PluginError>,
    /// What it registers. Called once per load, after `init`.
    pub register: extern "C" fn() -> RResult<Registration, PluginError>,
    /// Called once after a successful `init`, when the last object of this load is released
    /// and before the library is unmapped: release contexts, handles, pools and threads.
    #[sabi(last_prefix_field)]
    pub shutdown: extern "C" fn(),
}

impl RootModule for PluginModRef {
    abi_stable::declare_root_module_statics! {PluginModRef}
    const BASE_NAME: &'static str = "opreg_plugin";
    const NAME: &'static str = "opreg_plugin";
    // Only the major is compared by `abi_stable` (for majors >= 1), so the minor can grow
    // without refusing older plugins.
    const VERSION_STRINGS: VersionStrings = VersionStrings::new(ABI_VERSION);
}

/// Collects what a plugin registers; the [`export_plugin!`](crate::export_plugin) macro
/// passes one to the plugin's `register` function.
#[derive(Default)]
pub struct Registrar {
    reg: Registration,
}

impl Registrar {
    /// Registers a kernel.
    pub fn kernel(&mut self, desc: KernelDesc, factory: impl KernelFactory) -> &mut Self {
        self.reg.kernels.push(KernelRegistration {
            desc,
            factory: into_ffi_factory(factory),
        });
        self
    }

    /// Registers a BLAS backend.
    pub fn blas(&mut self, desc: BlasDesc, backend: impl Blas) -> &mut Self {
        self.reg.backends.push(BlasRegistration {
            desc,
            backend: into_ffi_blas(backend),
        });
        self
    }

    /// Registers a quantization strategy.
    pub fn quantizer(&mut self, desc: QuantizerDesc, quantizer: impl Quantizer) -> &mut Self {
        self.reg.quantizers.push(QuantizerRegistration {
            desc,
            quantizer: into_ffi_quantizer(quantizer),
        });
        self
    }

    /// The finished registration.
    pub fn finish(self) -> Registration {
        self.reg
    }
}

#[doc(hidden)]
pub fn __info(name: &str, version: &str, description: &str) -> PluginInfo {
    PluginInfo {
        name: name.into(),
        version: version.into(),
        description: description.into(),
        abi_minor: ABI_MINOR,
        sdk_version: package_version_strings!().version.as_str().into(),
    }
}

/// A plugin's `init` function (see [`export_plugin!`](crate::export_plugin)).
pub type InitFn = fn(&str) -> Result<(), PluginError>;

#[doc(hidden)]
pub fn __init(config: RStr<'_>, init: Option<InitFn>) -> RResult<(), PluginError> {
    guard("plugin init", || match init {
        Some(f) => f(config.as_str()),
        None => Ok(()),
    })
    .into()
}

#[doc(hidden)]
pub fn __shutdown(shutdown: Option<fn()>) {
    if let Some(f) = shutdown {
        // A panic must not cross `extern "C"`; there is nobody to report it to but the log.
        let _ = guard("plugin shutdown", || {
            f();
            Ok(())
        });
    }
}

#[doc(hidden)]
pub fn __register(register: fn(&mut Registrar)) -> RResult<Registration, PluginError> {
    guard("plugin registration", || {
        let mut r = Registrar::default();
        register(&mut r);
        Ok(r.finish())
    })
    .into()
}

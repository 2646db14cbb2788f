//! The root module every plugin exports, and the registration it returns.

use crate::{
    blas::{into_ffi_blas, Blas, BlasDesc, FfiBlasBox, GemmTypes},
    device::{into_ffi_device_provider, DeviceProvider, FfiDeviceProviderBox},
    error::guard,
    kernel::{
        into_ffi_factory, FfiKernelFactoryBox, Io, KernelDesc, KernelFactory, TypeConstraint,
    },
    quant::{into_ffi_quantizer, FfiQuantizerBox, Quantizer, QuantizerDesc},
    DType, Device, MemoryType, PluginError, ABI_MINOR, ABI_VERSION,
};
use abi_stable::{
    library::RootModule,
    package_version_strings, sabi_trait,
    sabi_trait::TD_Opaque,
    sabi_types::VersionStrings,
    std_types::{RErr, ROk, RResult, RSlice, RStr, RString},
    RMut, StableAbi,
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

/// A kernel with its description, as the host collects it.
pub struct KernelRegistration {
    /// What it implements.
    pub desc: KernelDesc,
    /// Builds it per node.
    pub factory: FfiKernelFactoryBox,
}

/// A BLAS backend with its description, as the host collects it.
pub struct BlasRegistration {
    /// What it supports.
    pub desc: BlasDesc,
    /// The backend.
    pub backend: FfiBlasBox,
}

/// A quantization strategy with its description, as the host collects it.
pub struct QuantizerRegistration {
    /// What it is.
    pub desc: QuantizerDesc,
    /// The strategy.
    pub quantizer: FfiQuantizerBox,
}

/// A device provider, as the host collects it.
pub struct DeviceRegistration {
    /// The provider.
    pub provider: FfiDeviceProviderBox,
}

/// Everything a plugin registered, as the host collects it through [`Collector`].
#[derive(Default)]
pub struct Registration {
    /// Operator kernels.
    pub kernels: Vec<KernelRegistration>,
    /// BLAS backends.
    pub backends: Vec<BlasRegistration>,
    /// Quantization strategies.
    pub quantizers: Vec<QuantizerRegistration>,
    /// Device providers.
    pub devices: Vec<DeviceRegistration>,
}

/// The host's side of registration (ONNX Runtime's `KernelDefBuilder`, spread over calls):
/// a plugin adds an object, gets its id back, and describes it with further calls. Methods
/// are only ever appended (a host always implements every method of its own minor; a plugin
/// built for a newer minor is refused before it can call one the host lacks).
#[sabi_trait]
pub trait FfiRegistrar {
    /// Adds a kernel for `op_type` in `domain` over opsets `since..=end`, on the CPU with
    /// priority 0 until said otherwise. Returns its id for the `kernel_*` calls.
    fn add_kernel(
        &mut self,
        domain: RStr<'_>,
        op_type: RStr<'_>,
        since: i32,
        end: i32,
        factory: FfiKernelFactoryBox,
    ) -> RResult<u32, PluginError>;
    /// Adds the type constraint `name` accepting `types`.
    fn kernel_constraint(
        &mut self,
        kernel: u32,
        name: RStr<'_>,
        types: RSlice<'_, DType>,
    ) -> RResult<(), PluginError>;
    /// Names the constraint of each input or output, by position.
    fn kernel_value_constraints(
        &mut self,
        kernel: u32,
        io: Io,
        names: RSlice<'_, RStr<'_>>,
    ) -> RResult<(), PluginError>;
    /// Places the kernel on `device`.
    fn kernel_device(&mut self, kernel: u32, device: Device) -> RResult<(), PluginError>;
    /// Sets the kernel's priority.
    fn kernel_priority(&mut self, kernel: u32, priority: i32) -> RResult<(), PluginError>;
    /// Asks for input or output `index` in `memory`.
    fn kernel_memory(
        &mut self,
        kernel: u32,
        io: Io,
        index: u32,
        memory: MemoryType,
    ) -> RResult<(), PluginError>;
    /// Lets `output` reuse `input`'s buffer.
    fn kernel_alias(&mut self, kernel: u32, input: u32, output: u32) -> RResult<(), PluginError>;
    /// Declares the device scratch one call needs.
    fn kernel_workspace(&mut self, kernel: u32, bytes: u64) -> RResult<(), PluginError>;
    /// Adds a BLAS backend on `device`; `types` lists its operand types for listings
    /// ([`Blas::supports`](crate::Blas::supports) is what callers ask).
    fn add_blas(
        &mut self,
        name: RStr<'_>,
        device: Device,
        priority: i32,
        types: RSlice<'_, GemmTypes>,
        backend: FfiBlasBox,
    ) -> RResult<u32, PluginError>;
    /// Adds a quantization strategy.
    fn add_quantizer(
        &mut self,
        name: RStr<'_>,
        description: RStr<'_>,
        quantizer: FfiQuantizerBox,
    ) -> RResult<u32, PluginError>;
    /// Adds a device provider.
    #[sabi(last_prefix_field)]
    fn add_device_provider(&mut self, provider: FfiDeviceProviderBox) -> RResult<u32, PluginError>;
}

/// The host's registrar: collects what a plugin registers into a [`Registration`]. Used by
/// the daemon and the test kit.
#[derive(Default)]
pub struct Collector {
    /// What was registered so far.
    pub registration: Registration,
}

impl Collector {
    fn kernel(&mut self, id: u32) -> RResult<&mut KernelDesc, PluginError> {
        match self.registration.kernels.get_mut(id as usize) {
            Some(k) => ROk(&mut k.desc),
            None => RErr(PluginError::invalid(format!("no kernel with id {id}"))),
        }
    }

    fn with_kernel(
        &mut self,
        id: u32,
        f: impl FnOnce(&mut KernelDesc),
    ) -> RResult<(), PluginError> {
        self.kernel(id).map(f)
    }
}

fn next_id(len: usize) -> Result<u32, PluginError> {
    u32::try_from(len).map_err(|_| PluginError::invalid("too many registrations"))
}

impl FfiRegistrar for Collector {
    fn add_kernel(
        &mut self,
        domain: RStr<'_>,
        op_type: RStr<'_>,
        since: i32,
        end: i32,
        factory: FfiKernelFactoryBox,
    ) -> RResult<u32, PluginError> {
        let id = match next_id(self.registration.kernels.len()) {
            Ok(id) => id,
            Err(e) => return RErr(e),
        };
        self.registration.kernels.push(KernelRegistration {
            desc: KernelDesc::new(domain.as_str(), op_type.as_str(), since, end),
            factory,
        });
        ROk(id)
    }
    fn kernel_constraint(
        &mut self,
        kernel: u32,
        name: RStr<'_>,
        types: RSlice<'_, DType>,
    ) -> RResult<(), PluginError> {
        self.with_kernel(kernel, |k| {
            k.type_constraints.push(TypeConstraint {
                name: name.as_str().to_string(),
                types: types.to_vec(),
            })
        })
    }
    fn kernel_value_constraints(
        &mut self,
        kernel: u32,
        io: Io,
        names: RSlice<'_, RStr<'_>>,
    ) -> RResult<(), PluginError> {
        let names: Vec<String> = names.iter().map(|n| n.as_str().to_string()).collect();
        match io {
            Io::INPUT => self.with_kernel(kernel, |k| k.input_constraints = names),
            Io::OUTPUT => self.with_kernel(kernel, |k| k.output_constraints = names),
            other => RErr(PluginError::invalid(format!(
                "unknown value side {}",
                other.0
            ))),
        }
    }
    fn kernel_device(&mut self, kernel: u32, device: Device) -> RResult<(), PluginError> {
        self.with_kernel(kernel, |k| k.device = device)
    }
    fn kernel_priority(&mut self, kernel: u32, priority: i32) -> RResult<(), PluginError> {
        self.with_kernel(kernel, |k| k.priority = priority)
    }
    fn kernel_memory(
        &mut self,
        kernel: u32,
        io: Io,
        index: u32,
        memory: MemoryType,
    ) -> RResult<(), PluginError> {
        let index = index as usize;
        match io {
            Io::INPUT => self.with_kernel(kernel, |k| {
                k.input_memory.retain(|&(i, _)| i != index);
                k.input_memory.push((index, memory));
            }),
            Io::OUTPUT => self.with_kernel(kernel, |k| {
                k.output_memory.retain(|&(i, _)| i != index);
                k.output_memory.push((index, memory));
            }),
            other => RErr(PluginError::invalid(format!(
                "unknown value side {}",
                other.0
            ))),
        }
    }
    fn kernel_alias(&mut self, kernel: u32, input: u32, output: u32) -> RResult<(), PluginError> {
        self.with_kernel(kernel, |k| {
            k.aliases.push((input as usize, output as usize))
        })
    }
    fn kernel_workspace(&mut self, kernel: u32, bytes: u64) -> RResult<(), PluginError> {
        self.with_kernel(kernel, |k| k.workspace_bytes = bytes)
    }
    fn add_blas(
        &mut self,
        name: RStr<'_>,
        device: Device,
        priority: i32,
        types: RSlice<'_, GemmTypes>,
        backend: FfiBlasBox,
    ) -> RResult<u32, PluginError> {
        let id = match next_id(self.registration.backends.len()) {
            Ok(id) => id,
            Err(e) => return RErr(e),
        };
        self.registration.backends.push(BlasRegistration {
            desc: BlasDesc {
                name: name.as_str().to_string(),
                device,
                priority,
                types: types.to_vec(),
            },
            backend,
        });
        ROk(id)
    }
    fn add_quantizer(
        &mut self,
        name: RStr<'_>,
        description: RStr<'_>,
        quantizer: FfiQuantizerBox,
    ) -> RResult<u32, PluginError> {
        let id = match next_id(self.registration.quantizers.len()) {
            Ok(id) => id,
            Err(e) => return RErr(e),
        };
        self.registration.quantizers.push(QuantizerRegistration {
            desc: QuantizerDesc {
                name: name.as_str().to_string(),
                description: description.as_str().to_string(),
            },
            quantizer,
        });
        ROk(id)
    }
    fn add_device_provider(&mut self, provider: FfiDeviceProviderBox) -> RResult<u32, PluginError> {
        let id = match next_id(self.registration.devices.len()) {
            Ok(id) => id,
            Err(e) => return RErr(e),
        };
        self.registration
            .devices
            .push(DeviceRegistration { provider });
        ROk(id)
    }
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
    /// Registers what the plugin provides through the host's registrar. Called once per
    /// load, after `init`.
    pub register:
        extern "C" fn(registrar: FfiRegistrar_TO<'_, RMut<'_, ()>>) -> RResult<(), PluginError>,
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

/// What a plugin's `register` function receives (through
/// [`export_plugin!`](crate::export_plugin)): the typed face of the host's [`FfiRegistrar`].
/// The first failed call is kept and returned to the host when `register` returns, which
/// refuses the load with that message.
pub struct Registrar<'a, 'b> {
    host: FfiRegistrar_TO<'a, RMut<'b, ()>>,
    error: Option<PluginError>,
    infer: Option<crate::kernel::InferFn>,
}

impl<'a, 'b> Registrar<'a, 'b> {
    /// For the SDK and hosts: a registrar over the host's.
    pub fn new(host: FfiRegistrar_TO<'a, RMut<'b, ()>>) -> Self {
        Registrar {
            host,
            error: None,
            infer: None,
        }
    }

    /// Sets the inference used by kernels registered from now on wherever their factory's
    /// own [`infer`](KernelFactory::infer) gives nothing: an operator library's one table of
    /// type and shape rules (ABI 1.1).
    pub fn infer_with(
        &mut self,
        infer: impl Fn(&crate::NodeInfo<'_>) -> Result<Vec<crate::OutputFact>, PluginError>
            + Send
            + Sync
            + 'static,
    ) -> &mut Self {
        self.infer = Some(std::sync::Arc::new(infer));
        self
    }

    fn keep<T>(&mut self, r: RResult<T, PluginError>) -> Option<T> {
        match r.into_result() {
            Ok(v) => Some(v),
            Err(e) => {
                self.error.get_or_insert(e);
                None
            }
        }
    }

    /// Registers a kernel.
    pub fn kernel(&mut self, desc: KernelDesc, factory: impl KernelFactory) -> &mut Self {
        let r = self.host.add_kernel(
            desc.domain.as_str().into(),
            desc.op_type.as_str().into(),
            desc.since_version,
            desc.end_version,
            match &self.infer {
                Some(infer) => into_ffi_factory(crate::WithInfer::new(factory, infer.clone())),
                None => into_ffi_factory(factory),
            },
        );
        let Some(id) = self.keep(r) else { return self };
        for c in &desc.type_constraints {
            let r =
                self.host
                    .kernel_constraint(id, c.name.as_str().into(), c.types.as_slice().into());
            self.keep(r);
        }
        for (io, names) in [
            (Io::INPUT, &desc.input_constraints),
            (Io::OUTPUT, &desc.output_constraints),
        ] {
            if !names.is_empty() {
                let names: Vec<RStr<'_>> = names.iter().map(|n| n.as_str().into()).collect();
                let r = self
                    .host
                    .kernel_value_constraints(id, io, names.as_slice().into());
                self.keep(r);
            }
        }
        if desc.device != Device::CPU {
            let r = self.host.kernel_device(id, desc.device);
            self.keep(r);
        }
        if desc.priority != 0 {
            let r = self.host.kernel_priority(id, desc.priority);
            self.keep(r);
        }
        for (io, list) in [
            (Io::INPUT, &desc.input_memory),
            (Io::OUTPUT, &desc.output_memory),
        ] {
            for &(index, memory) in list {
                let r = match u32::try_from(index) {
                    Ok(i) => self.host.kernel_memory(id, io, i, memory),
                    Err(_) => RErr(PluginError::invalid("value index out of range")),
                };
                self.keep(r);
            }
        }
        for &(input, output) in &desc.aliases {
            let r = match (u32::try_from(input), u32::try_from(output)) {
                (Ok(i), Ok(o)) => self.host.kernel_alias(id, i, o),
                _ => RErr(PluginError::invalid("alias index out of range")),
            };
            self.keep(r);
        }
        if desc.workspace_bytes != 0 {
            let r = self.host.kernel_workspace(id, desc.workspace_bytes);
            self.keep(r);
        }
        self
    }

    /// Registers a BLAS backend.
    pub fn blas(&mut self, desc: BlasDesc, backend: impl Blas) -> &mut Self {
        let r = self.host.add_blas(
            desc.name.as_str().into(),
            desc.device,
            desc.priority,
            desc.types.as_slice().into(),
            into_ffi_blas(backend),
        );
        self.keep(r);
        self
    }

    /// Registers a quantization strategy.
    pub fn quantizer(&mut self, desc: QuantizerDesc, quantizer: impl Quantizer) -> &mut Self {
        let r = self.host.add_quantizer(
            desc.name.as_str().into(),
            desc.description.as_str().into(),
            into_ffi_quantizer(quantizer),
        );
        self.keep(r);
        self
    }

    /// Registers a device provider: its devices, allocator, copies and streams.
    pub fn device_provider(&mut self, provider: impl DeviceProvider) -> &mut Self {
        let r = self
            .host
            .add_device_provider(into_ffi_device_provider(provider));
        self.keep(r);
        self
    }

    /// The first error any call returned.
    pub fn finish(self) -> Result<(), PluginError> {
        match self.error {
            Some(e) => Err(e),
            None => Ok(()),
        }
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
pub fn __register(
    host: FfiRegistrar_TO<'_, RMut<'_, ()>>,
    register: fn(&mut Registrar<'_, '_>),
) -> RResult<(), PluginError> {
    guard("plugin registration", || {
        let mut r = Registrar::new(host);
        register(&mut r);
        r.finish()
    })
    .into()
}

/// For hosts: runs a plugin's `register` entry against a fresh [`Collector`].
pub fn collect(
    register: extern "C" fn(FfiRegistrar_TO<'_, RMut<'_, ()>>) -> RResult<(), PluginError>,
) -> Result<Registration, PluginError> {
    let mut collector = Collector::default();
    register(FfiRegistrar_TO::from_ptr(
        RMut::new(&mut collector),
        TD_Opaque,
    ))
    .into_result()?;
    Ok(collector.registration)
}

/// For hosts and tests: runs `register` (a plugin's registration function, or several) against
/// a fresh [`Collector`] in-process, and returns what it registered.
pub fn collect_from(
    register: impl FnOnce(&mut Registrar<'_, '_>),
) -> Result<Registration, PluginError> {
    let mut collector = Collector::default();
    let mut r = Registrar::new(FfiRegistrar_TO::from_ptr(
        RMut::new(&mut collector),
        TD_Opaque,
    ));
    register(&mut r);
    r.finish()?;
    Ok(collector.registration)
}

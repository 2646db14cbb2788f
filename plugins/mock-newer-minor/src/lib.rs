//! A plugin built for a newer minor of ABI 1 (1.99): its root module has a field this daemon
//! does not know. The daemon must refuse it from its version symbol, before `abi_stable`
//! checks (and caches) its layouts.

#![allow(non_local_definitions)] // `#[derive(StableAbi)]` on a prefix type, see opreg-sdk.

use abi_stable::{
    export_root_module,
    library::RootModule,
    prefix_type::PrefixTypeTrait,
    sabi_types::VersionStrings,
    std_types::{RResult, RStr, RString},
    RMut, StableAbi,
};
use opreg_sdk::module::{FfiRegistrar_TO, PluginAbi, PluginInfo};
use opreg_sdk::PluginError;

/// The version symbol a 1.99 SDK would write.
#[no_mangle]
#[allow(non_upper_case_globals)]
pub static opreg_plugin_abi: PluginAbi = PluginAbi {
    major: 1,
    minor: 99,
};

/// The SDK's root module as a later minor would declare it: one field appended.
#[repr(C)]
#[derive(StableAbi)]
#[sabi(kind(Prefix(prefix_ref = NewerModRef)))]
pub struct NewerMod {
    pub info: extern "C" fn() -> PluginInfo,
    pub init: extern "C" fn(config: RStr<'_>) -> RResult<(), PluginError>,
    pub register:
        extern "C" fn(registrar: FfiRegistrar_TO<'_, RMut<'_, ()>>) -> RResult<(), PluginError>,
    #[sabi(last_prefix_field)]
    pub shutdown: extern "C" fn(),
    /// What 1.99 appended.
    pub newer: extern "C" fn() -> u32,
}

impl RootModule for NewerModRef {
    abi_stable::declare_root_module_statics! {NewerModRef}
    const BASE_NAME: &'static str = "opreg_plugin";
    const NAME: &'static str = "opreg_plugin";
    const VERSION_STRINGS: VersionStrings = VersionStrings::new("1.0.0");
}

extern "C" fn info() -> PluginInfo {
    PluginInfo {
        name: RString::from("mock-newer-minor"),
        version: RString::from("1.99.0"),
        description: RString::from("built for ABI 1.99"),
        abi_minor: 99,
        sdk_version: RString::from("1.99.0"),
    }
}

extern "C" fn init(_: RStr<'_>) -> RResult<(), PluginError> {
    RResult::ROk(())
}

extern "C" fn register(_: FfiRegistrar_TO<'_, RMut<'_, ()>>) -> RResult<(), PluginError> {
    RResult::ROk(())
}

extern "C" fn shutdown() {}

extern "C" fn newer() -> u32 {
    199
}

#[export_root_module]
pub fn root() -> NewerModRef {
    NewerMod {
        info,
        init,
        register,
        shutdown,
        newer,
    }
    .leak_into_prefix()
}

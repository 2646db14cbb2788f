//! A plugin built for another ABI major version (2.x): the daemon must refuse it with a
//! message naming both versions.

#![allow(non_local_definitions)] // `#[derive(StableAbi)]` on a prefix type, see opreg-sdk.

use abi_stable::{
    export_root_module,
    library::RootModule,
    prefix_type::PrefixTypeTrait,
    sabi_types::VersionStrings,
    std_types::{RResult, RString},
    StableAbi,
};
use opreg_sdk::module::PluginInfo;
use opreg_sdk::PluginError;

/// The SDK's root module as a future major version would declare it.
#[repr(C)]
#[derive(StableAbi)]
#[sabi(kind(Prefix(prefix_ref = FutureModRef)))]
pub struct FutureMod {
    pub info: extern "C" fn() -> PluginInfo,
    #[sabi(last_prefix_field)]
    pub register: extern "C" fn() -> RResult<u32, PluginError>,
}

impl RootModule for FutureModRef {
    abi_stable::declare_root_module_statics! {FutureModRef}
    const BASE_NAME: &'static str = "opreg_plugin";
    const NAME: &'static str = "opreg_plugin";
    const VERSION_STRINGS: VersionStrings = VersionStrings::new("2.0.0");
}

extern "C" fn info() -> PluginInfo {
    PluginInfo {
        name: RString::from("mock-abi-major"),
        version: RString::from("2.0.0"),
        description: RString::from("built for ABI 2"),
        abi_minor: 0,
        sdk_version: RString::from("2.0.0"),
    }
}

extern "C" fn register() -> RResult<u32, PluginError> {
    RResult::ROk(0)
}

#[export_root_module]
pub fn root() -> FutureModRef {
    FutureMod { info, register }.leak_into_prefix()
}

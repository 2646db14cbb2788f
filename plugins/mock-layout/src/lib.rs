//! A plugin whose root module claims the daemon's ABI version (1.0.0) but has another layout,
//! as a plugin built against a mismatched SDK would: the daemon must refuse it by name and
//! reason instead of calling into it.

#![allow(non_local_definitions)] // `#[derive(StableAbi)]` on a prefix type, see opreg-sdk.

use abi_stable::{
    export_root_module, library::RootModule, prefix_type::PrefixTypeTrait,
    sabi_types::VersionStrings, std_types::RString, StableAbi,
};

/// The SDK's root module with `register` returning the wrong type.
#[repr(C)]
#[derive(StableAbi)]
#[sabi(kind(Prefix(prefix_ref = SkewedModRef)))]
pub struct SkewedMod {
    pub info: extern "C" fn() -> RString,
    #[sabi(last_prefix_field)]
    pub register: extern "C" fn() -> u32,
}

impl RootModule for SkewedModRef {
    abi_stable::declare_root_module_statics! {SkewedModRef}
    const BASE_NAME: &'static str = "opreg_plugin";
    const NAME: &'static str = "opreg_plugin";
    const VERSION_STRINGS: VersionStrings = VersionStrings::new(opreg_sdk::ABI_VERSION);
}

extern "C" fn info() -> RString {
    RString::from("mock-layout")
}

extern "C" fn register() -> u32 {
    0
}

#[export_root_module]
pub fn root() -> SkewedModRef {
    SkewedMod { info, register }.leak_into_prefix()
}

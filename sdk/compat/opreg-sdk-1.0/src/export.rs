//! The export macro.

/// Exports a plugin: its identity and the function that registers what it provides.
///
/// ```ignore
/// opreg_sdk::export_plugin! {
///     name: "my-ops",
///     version: env!("CARGO_PKG_VERSION"),
///     description: "My operators",
///     init: init,           // optional: fn init(config: &str) -> Result<(), PluginError>
///     register: register,   // fn register(r: &mut opreg_sdk::Registrar)
///     shutdown: shutdown,   // optional: fn shutdown()
/// }
/// ```
///
/// `init` runs once per load before `register`, with the TOML text of the daemon's
/// `[plugin_config.<name>]` table; `shutdown` runs once before the library is unmapped (after
/// every object of this load was released): release whatever `init` acquired there.
///
/// It defines the `abi_stable` library header the daemon looks up, so a plugin crate needs no
/// direct dependency on `abi_stable`. Registration runs inside `catch_unwind`.
#[macro_export]
macro_rules! export_plugin {
    (
        name: $name:expr,
        version: $version:expr,
        description: $description:expr,
        $(init: $init:path,)?
        register: $register:path
        $(, shutdown: $shutdown:path)? $(,)?
    ) => {
        extern "C" fn __opreg_plugin_info() -> $crate::module::PluginInfo {
            $crate::module::__info($name, $version, $description)
        }

        extern "C" fn __opreg_plugin_init(
            config: $crate::abi_stable::std_types::RStr<'_>,
        ) -> $crate::abi_stable::std_types::RResult<(), $crate::PluginError> {
            #[allow(unused_variables)]
            let init: Option<$crate::module::InitFn> = None;
            $(let init = Some($init as $crate::module::InitFn);)?
            $crate::module::__init(config, init)
        }

        extern "C" fn __opreg_plugin_shutdown() {
            #[allow(unused_variables)]
            let shutdown: Option<fn()> = None;
            $(let shutdown = Some($shutdown as fn());)?
            $crate::module::__shutdown(shutdown)
        }

        extern "C" fn __opreg_plugin_register(
            registrar: $crate::module::FfiRegistrar_TO<'_, $crate::abi_stable::sabi_types::RMut<'_, ()>>,
        ) -> $crate::abi_stable::std_types::RResult<(), $crate::PluginError> {
            $crate::module::__register(registrar, $register)
        }

        const __OPREG_PLUGIN_MOD: &$crate::abi_stable::prefix_type::WithMetadata<
            $crate::module::PluginMod,
        > = &$crate::abi_stable::prefix_type::WithMetadata::new($crate::module::PluginMod {
            info: __opreg_plugin_info,
            init: __opreg_plugin_init,
            register: __opreg_plugin_register,
            shutdown: __opreg_plugin_shutdown,
        });

        /// The ABI version this plugin was built for, read by the daemon before anything else.
        #[no_mangle]
        #[allow(non_upper_case_globals)]
        pub static opreg_plugin_abi: $crate::module::PluginAbi = $crate::module::PluginAbi::CURRENT;

        fn __opreg_plugin_root_module() -> $crate::module::PluginModRef {
            $crate::module::PluginModRef(__OPREG_PLUGIN_MOD.static_as_prefix())
        }

        /// The `abi_stable` library header; its symbol name is what
        /// `#[export_root_module]` would generate (checked by an SDK unit test).
        #[no_mangle]
        pub static _1as_0lib_1header_0root_bmodule_bloader: $crate::abi_stable::library::LibHeader = {
            extern "C" fn __constructor() -> $crate::abi_stable::library::RootModuleResult {
                $crate::abi_stable::library::__call_root_module_loader(__opreg_plugin_root_module)
            }
            // SAFETY: the constructor returns the module type named here.
            unsafe {
                $crate::abi_stable::library::LibHeader::from_constructor::<$crate::module::PluginModRef>(
                    __constructor,
                    $crate::abi_stable::library::CheckTypeLayout::Yes,
                )
            }
        };
    };
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_version_symbol_matches_the_macro() {
        assert_eq!(crate::module::ABI_SYMBOL, b"opreg_plugin_abi\0");
        let host = crate::module::PluginAbi::CURRENT;
        let newer = crate::module::PluginAbi {
            minor: host.minor + 1,
            ..host
        };
        assert!(host.accepts(host));
        assert!(!host.accepts(newer), "a newer minor is refused");
        assert!(newer.accepts(host), "an older minor loads");
        let other_major = crate::module::PluginAbi {
            major: host.major + 1,
            minor: 0,
        };
        assert!(!host.accepts(other_major));
    }

    #[test]
    fn exported_symbol_is_abi_stables_header_name() {
        assert_eq!(
            abi_stable::library::ROOT_MODULE_LOADER_NAME,
            "_1as_0lib_1header_0root_bmodule_bloader"
        );
    }
}

//! A shared library that is not an opreg plugin: it exports a C function but no opreg
//! header. The daemon must refuse it by name and reason.

/// Anything but an opreg root module.
#[no_mangle]
pub extern "C" fn not_an_opreg_plugin() -> i32 {
    42
}

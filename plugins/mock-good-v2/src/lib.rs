//! A second build of the `mock-good` plugin, for hot-swap tests: the same plugin name,
//! kernels and quantizer, but `opreg.mock::MockScale(x) = x * scale + 0.5`, so a client can
//! tell which build answered, and a verified swap between the two sees the outputs move by
//! exactly 0.5.

/// What this build adds to every `MockScale` output.
const OFFSET: f32 = 0.5;
const VERSION: &str = concat!(env!("CARGO_PKG_VERSION"), "+v2");

include!("../../mock-good/src/plugin.rs");

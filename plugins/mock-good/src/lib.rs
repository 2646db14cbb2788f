//! A well-behaved mock plugin for tests: two kernels, one quantizer.
//!
//! `opreg.mock::MockScale(x) = x * scale` (attribute `scale`, default 2.0) for f32. With the
//! attribute `out_dtype` (an element-type code) it asks the host for an output of that type
//! instead, as a plugin built for a later ABI might: the host must refuse a code it does not
//! know, by name.
//! `opreg.mock::MockFlaky(x) = x`: the fallback when mock-panic's panicking `MockFlaky` is
//! quarantined.
//! The quantizer `mock-minmax` turns min/max observations into asymmetric u8 parameters, as a
//! strategy written against ABI 1.0 does (only `observation` and `plan`); with the option
//! `malformed=yes` its plan has a NaN scale, for the daemon's test of malformed plans.

/// Added to every `MockScale` output: 0 in this build, so the kernel is exactly `x * scale`.
const OFFSET: f32 = 0.0;
const VERSION: &str = env!("CARGO_PKG_VERSION");

include!("plugin.rs");

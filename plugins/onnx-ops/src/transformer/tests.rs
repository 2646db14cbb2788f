use super::testdata::sweep;
use super::*;

fn check_sweep(prefix: &str, factory: fn(&NodeInfo<'_>) -> Result<Box<dyn Kernel>, PluginError>) {
    let (n, failures) = sweep(prefix, factory);
    eprintln!("{prefix}: {} of {n} conformance cases pass", n - failures.len());
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[test]
fn conformance_attention() {
    check_sweep("test_attention", attention_factory);
}

#[test]
fn conformance_rms_normalization() {
    check_sweep("test_rms_normalization", rms_factory);
}

#[test]
fn conformance_rotary_embedding() {
    check_sweep("test_rotary_embedding", rotary_factory);
}

#[test]
fn conformance_lp_and_mvn() {
    check_sweep("test_lpnormalization", lp_factory);
    check_sweep("test_mvn", mvn_factory);
}

use super::*;
use opreg_sdk::{
    host::HostTensor,
    testkit::{run_kernel, run_kernel_opt, NodeSpec},
};

#[test]
fn identity_copies_any_type() {
    let x = HostTensor::from_vec(&[2], &[1i64, 2]).expect("x");
    let out = run_kernel(
        stateless(gen::Identity),
        &NodeSpec::onnx("Identity", 16),
        &[&x],
        None,
    )
    .expect("run");
    assert_eq!(out[0].to_vec::<i64>().expect("i64"), vec![1, 2]);
}

//! Shape and data-movement operators.
//!
//! These operators move elements without looking at them, so they work on raw bytes with
//! the dtype's element size (`[u8; N]`), one implementation for every fixed-size dtype, and on
//! `RString` for string tensors. Arithmetic (scatter reductions, Range) is typed.

mod common;
mod gen;
mod index;
mod layout;
mod tensor_scatter;

use opreg_sdk::prelude::*;

pub fn register(r: &mut Registrar) {
    gen::register(r);
    layout::register(r);
    index::register(r);
    tensor_scatter::register(r);
}

#[cfg(test)]
mod tests;

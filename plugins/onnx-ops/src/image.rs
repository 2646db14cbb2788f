//! (being written)

use opreg_sdk::prelude::*;

pub fn register(_r: &mut Registrar) {}

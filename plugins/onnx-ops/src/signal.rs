//! Signal processing (opset 17 on): window functions, `DFT`, `STFT` and `MelWeightMatrix`,
//! computed in f64.

use opreg_sdk::prelude::*;

mod dft;
mod stft;
mod window;

pub fn register(r: &mut Registrar) {
    stft::register(r);
    window::register(r);
    dft::register(r);
}

//! `quant-static`: post-training static quantization — the strategy of `opreg_quant_core`
//! (calibrators KL, min-max and percentile; see there for the options and defaults) as a
//! plugin.

use opreg_quant_core::Static;
use opreg_sdk::{QuantizerDesc, Registrar};

fn register(r: &mut Registrar) {
    r.quantizer(
        QuantizerDesc {
            name: "quant-static".into(),
            description: "post-training static int8: percentile, KL/entropy or min-max calibration (default auto: each measured on held-out samples, the best kept); per-channel int8 weights; QDQ output".into(),
        },
        Static,
    );
}

opreg_sdk::export_plugin! {
    name: "quant-static",
    version: env!("CARGO_PKG_VERSION"),
    description: "post-training static quantization (KL, min-max and percentile calibration)",
    register: register,
}

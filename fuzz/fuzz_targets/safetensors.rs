//! safetensors files the server and the client load: checkpoints (`Model::load_safetensors`,
//! `flat_from_safetensors` against a fixed layout), the model spec in their metadata
//! (`spec_from_safetensors`), and named flat vectors (`vectors_from_safetensors`: personal
//! heads, a server optimizer's state), on arbitrary bytes.
#![no_main]

use std::collections::BTreeMap;

use candle_core::Device;
use cohort_common::model::{
    flat_from_safetensors, spec_from_safetensors, vectors_from_safetensors, vectors_to_safetensors, Model, ModelSpec,
};
use libfuzzer_sys::fuzz_target;

const SPEC: &str = "name = 'tiny'\ninput_shape = [4]\n[[trunk]]\nkind = 'linear'\nout = 8\n[[trunk]]\nkind = 'relu'\n\
                    [[heads]]\nname = 'y'\nclasses = 3\n";

thread_local! {
    static MODEL: Model = Model::new(&ModelSpec::from_toml(SPEC).unwrap(), &Device::Cpu, 0).unwrap();
}

fuzz_target!(|data: &[u8]| {
    if let Ok(vectors) = vectors_from_safetensors(data) {
        // What was read writes back to the same vectors (compared bitwise: NaN is a value here).
        let bits = |v: &BTreeMap<String, Vec<f32>>| -> Vec<(String, Vec<u32>)> {
            v.iter().map(|(k, x)| (k.clone(), x.iter().map(|f| f.to_bits()).collect())).collect()
        };
        let again = vectors_from_safetensors(&vectors_to_safetensors(&vectors)).expect("written vectors read back");
        assert_eq!(bits(&again), bits(&vectors));
    }
    if let Ok(Some(spec)) = spec_from_safetensors(data) {
        assert!(ModelSpec::from_toml(&spec.to_toml()).is_ok());
    }
    MODEL.with(|model| {
        if let Ok(flat) = flat_from_safetensors(model.layout(), data) {
            assert_eq!(flat.len(), model.layout().total_len());
        }
        let _ = model.load_safetensors(data);
    });
});

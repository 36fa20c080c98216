//! `cohort_common::data::npy::read_npy` (the `.npy` header parser and data reader) and
//! `dataset_from_npy` on arbitrary bytes.
//!
//! The input is read whole as one `.npy` file, then split in two (the first byte says where) as
//! a features file and a labels file that make a data set (the second byte: the classes, 0 for
//! none given; the third: whether uint8 features are scaled).
#![no_main]

use cohort_common::data::npy::{dataset_from_npy, read_npy, MAX_NPY_BYTES};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(array) = read_npy(data, MAX_NPY_BYTES, "whole.npy") {
        let n = array.shape.iter().try_fold(1usize, |a, &d| a.checked_mul(d));
        assert_eq!(n.map(|n| n * array.dtype.size), Some(array.data.len()));
        assert!(array.data.len() < data.len(), "no more data than the file holds");
        let _ = array.features(true, "whole.npy");
        let _ = array.labels(10, "whole.npy");
    }
    let [split, classes, scale, rest @ ..] = data else { return };
    let at = (*split as usize * 8).min(rest.len());
    let (x, y) = rest.split_at(at);
    let (Ok(x), Ok(y)) = (read_npy(x, MAX_NPY_BYTES, "x.npy"), read_npy(y, MAX_NPY_BYTES, "y.npy")) else { return };
    let classes = (*classes != 0).then_some(*classes as usize);
    if let Ok(ds) = dataset_from_npy(&x, &y, classes, scale & 1 == 1, "x.npy", "y.npy") {
        assert_eq!(ds.features.len(), ds.len() * ds.example_len());
        assert!(ds.features.iter().all(|v| v.is_finite()));
        assert!(ds.labels.iter().all(|&l| (l as usize) < ds.classes));
    }
});

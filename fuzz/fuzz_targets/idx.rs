//! `cohort_common::data::read_idx` and `dataset_from_idx` on arbitrary bytes: MNIST-style IDX
//! files of images and labels.
//!
//! The input is read whole as one IDX file, then split in two (the first byte says where) as
//! an images file and a labels file that make a data set.
#![no_main]

use cohort_common::data::{dataset_from_idx, read_idx};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(array) = read_idx(data, "whole.idx") {
        let n = array.dims.iter().try_fold(1usize, |a, &d| a.checked_mul(d));
        assert_eq!(n, Some(array.data.len()));
    }
    let [split, classes, rest @ ..] = data else { return };
    let at = (*split as usize * 4).min(rest.len());
    let (images, labels) = rest.split_at(at);
    let (Ok(images), Ok(labels)) = (read_idx(images, "images.idx"), read_idx(labels, "labels.idx")) else { return };
    if let Ok(ds) = dataset_from_idx(images, labels, *classes as usize, "fuzz") {
        assert_eq!(ds.features.len(), ds.len() * ds.example_len());
        assert!(ds.labels.iter().all(|&l| (l as usize) < ds.classes));
        assert_eq!(ds.label_counts().iter().sum::<u64>(), ds.len() as u64);
    }
});

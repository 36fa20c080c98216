//! `cohort_common::data::read_csv` on arbitrary bytes: a data owner's CSV file.
//!
//! The first two bytes choose the options (label column, label values or class count,
//! delimiter); the rest is the file. Whatever the file holds, the loader answers with a data set
//! whose shape is consistent, or with an error.
#![no_main]

use cohort_common::data::{read_csv, CsvOptions};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let &[a, b, ref file @ ..] = data else { return };
    let label_column = ["label", "y", "", "a b"][(a & 3) as usize].to_string();
    let (label_values, classes) = match (a >> 2) & 3 {
        0 => (None, Some((b & 15) as usize)),
        1 => (Some(vec![5, 6, -1]), None),
        2 => (Some(Vec::new()), None),
        _ => (None, None),
    };
    let delimiter = match (a >> 4) & 7 {
        0 | 1 => None,
        2 => Some(','),
        3 => Some(';'),
        4 => Some('\t'),
        5 => Some('é'),
        6 => Some(' '),
        _ => Some(char::from(b)),
    };
    let options = CsvOptions { label_column, label_values, classes, delimiter };
    if let Ok(ds) = read_csv(file, &options, "fuzz.csv") {
        assert!(!ds.is_empty());
        assert_eq!(ds.features.len(), ds.len() * ds.example_len());
        assert!(ds.features.iter().all(|v| v.is_finite()));
        assert!(ds.labels.iter().all(|&l| (l as usize) < ds.classes));
        assert_eq!(ds.label_counts().iter().sum::<u64>(), ds.len() as u64);
    }
});

//! `cohort-sim split`: a data set cut into per-client parts for trials with real processes.
//!
//! The data set is any `[data]` table a client reads (IDX, CSV, NumPy, image folders), in a
//! file of its own or a client.toml. It is split with the simulations' partitioners
//! ([`Partition`]: IID or Dirichlet label skew, seeded), every example going to exactly one
//! client, and written as:
//!
//! ```text
//! OUT/client-I/x.npy        client I's features (float32, [n, ...]), as loaded (scaled)
//! OUT/client-I/y.npy        its labels (int64, [n])
//! OUT/client-I.data.toml    a [data] table that reads them (paths relative to it), to paste
//!                           into client I's client.toml or give to `cohort-client evaluate --data`
//! ```

use std::path::{Path, PathBuf};

use cohort_common::data::npy;
use cohort_common::data::Partition;
use cohort_io::files::{self, DataSource};
use rand::SeedableRng;
use serde::Deserialize;

/// What to split and how.
#[derive(Debug, Clone)]
pub struct SplitOptions {
    /// A TOML file with a `[data]` table (paths relative to it).
    pub data: PathBuf,
    pub clients: usize,
    /// A new or empty folder.
    pub out: PathBuf,
    pub partition: Partition,
    pub seed: u64,
}

/// One client's part, as written.
#[derive(Debug, Clone, PartialEq)]
pub struct SplitPart {
    pub index: usize,
    pub examples: usize,
    pub label_counts: Vec<u64>,
    /// Its `[data]` snippet.
    pub snippet: PathBuf,
}

/// The `[data]` table of a file (other keys, as in a client.toml, are left alone).
#[derive(Deserialize)]
struct DataFile {
    data: DataSource,
}

/// Splits the data set and writes the parts; every error names the file or option at fault.
pub fn split(options: &SplitOptions) -> Result<Vec<SplitPart>, String> {
    let n = options.clients;
    if n == 0 {
        return Err("--clients must be at least 1".into());
    }
    crate::require_new_out(&options.out, "split never mixes its parts with other files")?;
    let file: DataFile = files::read_toml(&options.data).map_err(|e| e.to_string())?;
    let base = options.data.parent().unwrap_or(Path::new("."));
    let data = file.data.resolve(base).load().map_err(|e| e.to_string())?;
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(options.seed);
    let parts = options
        .partition
        .split_all(&data.labels, data.classes, n, &mut rng)
        .map_err(|e| format!("splitting the {} examples of {} in {n}: {e}", data.len(), options.data.display()))?;
    let write = |path: &Path, bytes: &[u8]| files::write_atomic(path, bytes).map_err(|e| e.to_string());
    let mut written = Vec::with_capacity(n);
    for (i, mut rows) in parts.into_iter().enumerate() {
        rows.sort_unstable();
        let part = data.subset(&rows);
        let folder = format!("client-{i}");
        let mut shape = vec![part.len()];
        shape.extend_from_slice(&part.feature_shape);
        write(&options.out.join(&folder).join("x.npy"), &npy::npy_f32(&shape, &part.features))?;
        let labels: Vec<i64> = part.labels.iter().map(|&l| i64::from(l)).collect();
        write(&options.out.join(&folder).join("y.npy"), &npy::npy_i64(&[part.len()], &labels))?;
        // The table as a client.toml has it (`format` first), strings quoted by TOML itself.
        let quoted = |p: PathBuf| toml::Value::from(p.to_string_lossy().into_owned()).to_string();
        let text = format!(
            "# Client {i} of {n}: {} examples of shape {:?}, written by `cohort-sim split` from {} ({:?}, seed {}).\n\
             # Paths are relative to this file: paste the [data] table into client {i}'s client.toml with them\n\
             # made relative to that file, or give this file to `cohort-client evaluate --data`.\n\
             [data]\nformat = \"npy\"\nx = {}\ny = {}\nclasses = {}\n",
            part.len(),
            part.feature_shape,
            options.data.display(),
            options.partition,
            options.seed,
            quoted(Path::new(&folder).join("x.npy")),
            quoted(Path::new(&folder).join("y.npy")),
            data.classes
        );
        let snippet = options.out.join(format!("{folder}.data.toml"));
        write(&snippet, text.as_bytes())?;
        // Read back as a client would.
        let back: DataFile = files::read_toml(&snippet).map_err(|e| e.to_string())?;
        let back = back.data.resolve(&options.out).load().map_err(|e| format!("the written part {i}: {e}"))?;
        if back != part {
            return Err(format!("the written part {i} ({}) does not read back as written", snippet.display()));
        }
        written.push(SplitPart { index: i, examples: part.len(), label_counts: part.label_counts(), snippet });
    }
    Ok(written)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// 103 examples whose first feature is their index, labels `index % 3`, as x.npy and y.npy
    /// with data.toml naming them.
    fn data_set(dir: &Path) -> PathBuf {
        let features: Vec<f32> = (0..103).flat_map(|i| [i as f32, 0.5]).collect();
        let labels: Vec<i64> = (0..103).map(|i| i % 3).collect();
        std::fs::create_dir_all(dir.join("src")).unwrap();
        std::fs::write(dir.join("src/x.npy"), npy::npy_f32(&[103, 2], &features)).unwrap();
        std::fs::write(dir.join("src/y.npy"), npy::npy_i64(&[103], &labels)).unwrap();
        let file = dir.join("src/data.toml");
        std::fs::write(&file, "server = 'ignored:1'\n[data]\nformat = 'npy'\nx = 'x.npy'\ny = 'y.npy'\n").unwrap();
        file
    }

    #[test]
    fn parts_are_disjoint_cover_the_set_and_read_back() {
        let dir = tempfile::tempdir().unwrap();
        let data = data_set(dir.path());
        for (k, (partition, clients)) in
            [(Partition::Iid, 4), (Partition::Dirichlet { alpha: 0.5 }, 5), (Partition::Iid, 1)].into_iter().enumerate()
        {
            let out = dir.path().join(format!("out{k}"));
            let options = SplitOptions { data: data.clone(), clients, out: out.clone(), partition, seed: 7 };
            let parts = split(&options).unwrap();
            assert_eq!(parts.len(), clients);
            let mut seen = vec![0; 103];
            for part in &parts {
                let source: DataFile = files::read_toml(&part.snippet).unwrap();
                let ds = source.data.resolve(&out).load().unwrap();
                assert_eq!((ds.len(), ds.classes, ds.feature_shape.clone()), (part.examples, 3, vec![2]));
                for (row, label) in ds.features.chunks(2).zip(&ds.labels) {
                    let i = row[0] as usize;
                    seen[i] += 1;
                    assert_eq!(*label as usize, i % 3, "example {i} keeps its label");
                }
            }
            assert!(seen.iter().all(|&s| s == 1), "every example in exactly one part: {seen:?}");
            // Seeded: the same split again.
            let again = SplitOptions { out: dir.path().join(format!("again{k}")), ..options };
            let counts = |p: &[SplitPart]| p.iter().map(|p| p.label_counts.clone()).collect::<Vec<_>>();
            assert_eq!(counts(&split(&again).unwrap()), counts(&parts));
        }
    }

    #[test]
    fn refuses_what_it_cannot_split() {
        let dir = tempfile::tempdir().unwrap();
        let data = data_set(dir.path());
        let options = |clients, out: &str| SplitOptions {
            data: data.clone(),
            clients,
            out: dir.path().join(out),
            partition: Partition::Iid,
            seed: 1,
        };
        assert!(split(&options(0, "a")).unwrap_err().contains("--clients"));
        let err = split(&options(200, "b")).unwrap_err();
        assert!(err.contains("103 examples") && err.contains("200"), "{err}");
        let err = split(&options(2, "src")).unwrap_err();
        assert!(err.contains("not an empty folder"), "{err}");
        let err = split(&SplitOptions { data: dir.path().join("none.toml"), ..options(2, "c") }).unwrap_err();
        assert!(err.contains("none.toml"), "{err}");
    }
}

//! Data sets in memory, their loaders and the partitioners used by simulations.
//!
//! Loaders parse from readers the caller opens (IDX for MNIST, CSV with a header, NumPy `.npy`
//! in [`npy`]); `origin` names the file in every error, with the field, line or column at fault. Partitioners split
//! example indices across clients the way the federated-learning literature does: IID, label
//! shards (McMahan et al. 2017) and Dirichlet(alpha) label skew; all are seeded.

use std::io::Read;

use rand::seq::SliceRandom;
use rand::Rng;
use rand_distr::{Distribution, Gamma};
use serde::{Deserialize, Serialize};

pub mod npy;

#[derive(Debug, thiserror::Error)]
pub enum DataError {
    #[error("{origin}: {source}")]
    Io { origin: String, source: std::io::Error },
    #[error("{origin}: {problem}")]
    Format { origin: String, problem: String },
    #[error("{origin}, line {line}, column `{column}`: {problem}")]
    Csv { origin: String, line: usize, column: String, problem: String },
    #[error("partitioning: {0}")]
    Partition(String),
}

type Result<T> = std::result::Result<T, DataError>;

/// Labelled examples, features stored row-major as `f32`.
#[derive(Debug, Clone, PartialEq)]
pub struct Dataset {
    pub features: Vec<f32>,
    /// Shape of one example, e.g. `[1, 28, 28]`.
    pub feature_shape: Vec<usize>,
    pub labels: Vec<u32>,
    pub classes: usize,
}

impl Dataset {
    pub fn new(features: Vec<f32>, feature_shape: Vec<usize>, labels: Vec<u32>, classes: usize) -> Result<Self> {
        let width: usize = feature_shape.iter().product();
        let bad = |problem: String| DataError::Format { origin: "dataset".into(), problem };
        if width == 0 || features.len() != width * labels.len() {
            return Err(bad(format!(
                "{} feature values do not make {} examples of shape {feature_shape:?}",
                features.len(),
                labels.len()
            )));
        }
        if let Some(l) = labels.iter().find(|&&l| l as usize >= classes) {
            return Err(bad(format!("label {l} is out of range for {classes} classes")));
        }
        Ok(Self { features, feature_shape, labels, classes })
    }

    pub fn len(&self) -> usize {
        self.labels.len()
    }
    pub fn is_empty(&self) -> bool {
        self.labels.is_empty()
    }
    pub fn example_len(&self) -> usize {
        self.feature_shape.iter().product()
    }

    /// The examples at `indices`, in that order.
    pub fn subset(&self, indices: &[usize]) -> Dataset {
        let w = self.example_len();
        let mut features = Vec::with_capacity(indices.len() * w);
        for &i in indices {
            features.extend_from_slice(&self.features[i * w..(i + 1) * w]);
        }
        Dataset {
            features,
            feature_shape: self.feature_shape.clone(),
            labels: indices.iter().map(|&i| self.labels[i]).collect(),
            classes: self.classes,
        }
    }

    /// The same examples with labels mapped through `map` (`map[label]`) into `classes` classes:
    /// parity from digits, coarse groups from fine labels.
    pub fn map_labels(&self, map: &[u32], classes: usize) -> Result<Dataset> {
        if map.len() != self.classes || map.iter().any(|&m| m as usize >= classes) {
            return Err(DataError::Format {
                origin: "label map".into(),
                problem: format!(
                    "a map needs one entry per class of the data ({}), each below the head's {classes} classes; got {map:?}",
                    self.classes
                ),
            });
        }
        Ok(Dataset {
            features: self.features.clone(),
            feature_shape: self.feature_shape.clone(),
            labels: self.labels.iter().map(|&l| map[l as usize]).collect(),
            classes,
        })
    }

    /// How many examples each class has.
    pub fn label_counts(&self) -> Vec<u64> {
        let mut counts = vec![0u64; self.classes];
        for &l in &self.labels {
            counts[l as usize] += 1;
        }
        counts
    }
}

/// An IDX array (the MNIST file format): dimensions and unsigned bytes.
#[derive(Debug, Clone, PartialEq)]
pub struct IdxArray {
    pub dims: Vec<usize>,
    pub data: Vec<u8>,
}

/// The most bytes an IDX file may announce (MNIST's training images are 47 MB).
pub const MAX_IDX_BYTES: usize = 1 << 31;

/// Reads an IDX file of unsigned bytes (type code 0x08).
pub fn read_idx(mut reader: impl Read, origin: &str) -> Result<IdxArray> {
    let fmt = |problem: String| DataError::Format { origin: origin.into(), problem };
    let io = |source| DataError::Io { origin: origin.into(), source };
    let mut magic = [0u8; 4];
    reader
        .read_exact(&mut magic)
        .map_err(|_| fmt("file ends inside the 4-byte IDX header; is it an IDX file?".into()))?;
    if magic[0] != 0 || magic[1] != 0 {
        return Err(fmt(format!(
            "bad IDX magic {magic:02x?}: the first two bytes must be zero (is the file still gzipped?)"
        )));
    }
    if magic[2] != 0x08 {
        return Err(fmt(format!("IDX element type 0x{:02x} is not supported (only unsigned bytes, 0x08)", magic[2])));
    }
    let ndims = magic[3] as usize;
    if ndims == 0 || ndims > 4 {
        return Err(fmt(format!("IDX header announces {ndims} dimensions (expected 1 to 4)")));
    }
    let mut dims = Vec::with_capacity(ndims);
    for d in 0..ndims {
        let mut b = [0u8; 4];
        reader.read_exact(&mut b).map_err(|_| fmt(format!("file ends inside the size of dimension {d}")))?;
        dims.push(u32::from_be_bytes(b) as usize);
    }
    let expected = dims.iter().try_fold(1usize, |acc, &d| acc.checked_mul(d)).filter(|&n| n <= MAX_IDX_BYTES);
    let expected =
        expected.ok_or_else(|| fmt(format!("dimensions {dims:?} announce more than {MAX_IDX_BYTES} bytes")))?;
    let mut data = Vec::new();
    reader.by_ref().take(expected as u64).read_to_end(&mut data).map_err(io)?;
    if data.len() < expected {
        return Err(fmt(format!(
            "truncated: dimensions {dims:?} need {expected} data bytes, the file has {}",
            data.len()
        )));
    }
    let mut extra = [0u8; 1];
    if reader.read(&mut extra).map_err(io)? != 0 {
        return Err(fmt(format!("trailing bytes after the {expected} data bytes that dimensions {dims:?} announce")));
    }
    Ok(IdxArray { dims, data })
}

/// Builds a data set from IDX images (`[n, rows, cols]`, scaled to [0, 1]) and labels (`[n]`).
pub fn dataset_from_idx(images: IdxArray, labels: IdxArray, classes: usize, origin: &str) -> Result<Dataset> {
    let fmt = |problem: String| DataError::Format { origin: origin.into(), problem };
    if images.dims.len() != 3 {
        return Err(fmt(format!("images must have 3 dimensions [n, rows, cols], got {:?}", images.dims)));
    }
    if labels.dims.len() != 1 {
        return Err(fmt(format!("labels must have 1 dimension [n], got {:?}", labels.dims)));
    }
    if images.dims[0] != labels.dims[0] {
        return Err(fmt(format!("{} images but {} labels", images.dims[0], labels.dims[0])));
    }
    if let Some((i, l)) = labels.data.iter().enumerate().find(|(_, &l)| l as usize >= classes) {
        return Err(fmt(format!("label {l} at index {i} is out of range for {classes} classes")));
    }
    let features = images.data.iter().map(|&p| p as f32 / 255.0).collect();
    let labels = labels.data.iter().map(|&l| l as u32).collect();
    Dataset::new(features, vec![1, images.dims[1], images.dims[2]], labels, classes)
}

/// How to read a CSV file.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CsvOptions {
    /// Name of the label column (from the header).
    pub label_column: String,
    /// The label values in class order; labels are then mapped to their position. Without
    /// it, labels must already be class indices `0..classes`.
    #[serde(default)]
    pub label_values: Option<Vec<i64>>,
    /// Number of classes when `label_values` is absent.
    #[serde(default)]
    pub classes: Option<usize>,
    /// Field separator; detected from the header (`,` `;` or tab) when absent.
    #[serde(default)]
    pub delimiter: Option<char>,
}

/// Reads a CSV file with a header: every column but the label is a numeric feature.
pub fn read_csv(reader: impl Read, options: &CsvOptions, origin: &str) -> Result<Dataset> {
    let mut text = String::new();
    std::io::BufReader::new(reader)
        .read_to_string(&mut text)
        .map_err(|source| DataError::Io { origin: origin.into(), source })?;
    let mut lines = text.lines().enumerate().filter(|(_, l)| !l.trim().is_empty());
    let fmt = |problem: String| DataError::Format { origin: origin.into(), problem };
    let (_, header) = lines.next().ok_or_else(|| fmt("the file is empty; expected a header line".into()))?;
    let delim = options
        .delimiter
        .unwrap_or_else(|| [';', '\t', ','].into_iter().max_by_key(|d| header.matches(*d).count()).unwrap_or(','));
    let columns: Vec<String> = header.split(delim).map(|c| c.trim().trim_matches('"').to_string()).collect();
    let label_at = columns.iter().position(|c| *c == options.label_column).ok_or_else(|| {
        fmt(format!("no column named `{}` in the header (columns: {})", options.label_column, columns.join(", ")))
    })?;
    let classes = match (&options.label_values, options.classes) {
        (Some(v), _) => v.len(),
        (None, Some(c)) => c,
        (None, None) => return Err(fmt("set `label_values` (the labels in class order) or `classes`".into())),
    };
    let mut features = Vec::new();
    let mut labels = Vec::new();
    for (lineno, line) in lines {
        let line_no = lineno + 1;
        let fields: Vec<&str> = line.split(delim).collect();
        if fields.len() != columns.len() {
            return Err(DataError::Csv {
                origin: origin.into(),
                line: line_no,
                column: "*".into(),
                problem: format!("{} fields, the header has {}", fields.len(), columns.len()),
            });
        }
        for (i, field) in fields.iter().enumerate() {
            let field = field.trim().trim_matches('"');
            let err = |problem: String| DataError::Csv {
                origin: origin.into(),
                line: line_no,
                column: columns[i].clone(),
                problem,
            };
            if i == label_at {
                let value: i64 = field.parse().map_err(|_| err(format!("label `{field}` is not an integer")))?;
                let class = match &options.label_values {
                    Some(values) => values
                        .iter()
                        .position(|&v| v == value)
                        .ok_or_else(|| err(format!("label {value} is not among label_values {values:?}")))?,
                    None => usize::try_from(value)
                        .ok()
                        .filter(|&c| c < classes)
                        .ok_or_else(|| err(format!("label {value} is not a class index below {classes}")))?,
                };
                labels.push(class as u32);
            } else {
                let value: f32 = field.parse().map_err(|_| err(format!("`{field}` is not a number")))?;
                if !value.is_finite() {
                    return Err(err(format!("`{field}` is not a finite number")));
                }
                features.push(value);
            }
        }
    }
    if labels.is_empty() {
        return Err(fmt("no data rows after the header".into()));
    }
    Dataset::new(features, vec![columns.len() - 1], labels, classes)
}

/// How a simulation splits a data set across clients.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
pub enum Partition {
    /// Shuffle, then deal equal parts.
    Iid,
    /// Sort by label, cut into shards of `shard_size`, give each client `shards_per_client`
    /// random shards (McMahan et al. 2017: 200 shards of 300, 2 per client).
    Shards { shards_per_client: usize, shard_size: usize },
    /// For each class, split its examples across clients in Dirichlet(alpha) proportions.
    Dirichlet { alpha: f64 },
}

impl Partition {
    /// Example indices for each of `clients` clients. Every index appears at most once.
    pub fn split(&self, labels: &[u32], classes: usize, clients: usize, rng: &mut impl Rng) -> Result<Vec<Vec<usize>>> {
        if clients == 0 {
            return Err(DataError::Partition("zero clients".into()));
        }
        let n = labels.len();
        match *self {
            Partition::Iid => {
                let mut idx: Vec<usize> = (0..n).collect();
                idx.shuffle(rng);
                let per = n / clients;
                if per == 0 {
                    return Err(DataError::Partition(format!("{n} examples cannot give {clients} clients one each")));
                }
                Ok(idx.chunks(per).take(clients).map(<[usize]>::to_vec).collect())
            }
            Partition::Shards { shards_per_client, shard_size } => {
                let shards = clients * shards_per_client;
                if shard_size == 0 || shards * shard_size > n {
                    return Err(DataError::Partition(format!(
                        "{clients} clients x {shards_per_client} shards x {shard_size} examples is more than the {n} examples"
                    )));
                }
                let mut idx: Vec<usize> = (0..n).collect();
                idx.shuffle(rng); // random order within a label
                idx.sort_by_key(|&i| labels[i]);
                let mut order: Vec<usize> = (0..shards).collect();
                order.shuffle(rng);
                Ok(order
                    .chunks(shards_per_client)
                    .map(|s| {
                        s.iter().flat_map(|&k| idx[k * shard_size..(k + 1) * shard_size].iter().copied()).collect()
                    })
                    .collect())
            }
            Partition::Dirichlet { alpha } => {
                if !(alpha.is_finite() && alpha > 0.0) {
                    return Err(DataError::Partition(format!("alpha = {alpha} must be > 0")));
                }
                let gamma = Gamma::new(alpha, 1.0).map_err(|e| DataError::Partition(e.to_string()))?;
                let mut parts = vec![Vec::new(); clients];
                for class in 0..classes as u32 {
                    let mut idx: Vec<usize> = (0..n).filter(|&i| labels[i] == class).collect();
                    idx.shuffle(rng);
                    let draws: Vec<f64> = (0..clients).map(|_| gamma.sample(rng).max(f64::MIN_POSITIVE)).collect();
                    let total: f64 = draws.iter().sum();
                    let mut start = 0usize;
                    let mut acc = 0.0;
                    for (c, d) in draws.iter().enumerate() {
                        acc += d / total;
                        let end = if c + 1 == clients {
                            idx.len()
                        } else {
                            ((acc * idx.len() as f64).round() as usize).min(idx.len())
                        };
                        parts[c].extend_from_slice(&idx[start..end.max(start)]);
                        start = end.max(start);
                    }
                }
                for p in &mut parts {
                    p.shuffle(rng);
                }
                Ok(parts)
            }
        }
    }

    /// [`Partition::split`], then whatever it left over (a remainder of an IID split, unused
    /// shards) dealt round-robin, so that every index lands on exactly one client; an error when
    /// a client would get no example.
    pub fn split_all(
        &self,
        labels: &[u32],
        classes: usize,
        clients: usize,
        rng: &mut impl Rng,
    ) -> Result<Vec<Vec<usize>>> {
        // Before the split: a client count past the examples would fail anyway, after allocating
        // per client (`--clients 1000000000000` with Dirichlet: terabytes).
        if clients > labels.len() {
            return Err(DataError::Partition(format!(
                "{} examples cannot give {clients} clients one each",
                labels.len()
            )));
        }
        let mut parts = self.split(labels, classes, clients, rng)?;
        let mut taken = vec![false; labels.len()];
        for &i in parts.iter().flatten() {
            taken[i] = true;
        }
        for (k, i) in (0..labels.len()).filter(|&i| !taken[i]).enumerate() {
            parts[k % clients].push(i);
        }
        if let Some(empty) = parts.iter().position(Vec::is_empty) {
            return Err(DataError::Partition(format!(
                "client {empty} gets no examples of the {}: fewer clients, more data, or a larger alpha",
                labels.len()
            )));
        }
        Ok(parts)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;

    fn idx_bytes(dims: &[u32], data: &[u8]) -> Vec<u8> {
        let mut v = vec![0, 0, 8, dims.len() as u8];
        for d in dims {
            v.extend_from_slice(&d.to_be_bytes());
        }
        v.extend_from_slice(data);
        v
    }

    #[test]
    fn reads_idx_and_builds_a_dataset() {
        let images = read_idx(&idx_bytes(&[2, 2, 2], &[0, 255, 0, 0, 1, 2, 3, 4])[..], "img").unwrap();
        let labels = read_idx(&idx_bytes(&[2], &[3, 9])[..], "lbl").unwrap();
        let ds = dataset_from_idx(images, labels, 10, "mnist").unwrap();
        assert_eq!(ds.len(), 2);
        assert_eq!(ds.feature_shape, vec![1, 2, 2]);
        assert_eq!(ds.features[1], 1.0);
        assert_eq!(ds.label_counts()[9], 1);
    }

    #[test]
    fn malformed_idx_files_name_the_file_and_problem() {
        let truncated = idx_bytes(&[2, 2, 2], &[0; 5]);
        let err = read_idx(&truncated[..], "train-images.idx3-ubyte").unwrap_err().to_string();
        assert!(err.contains("train-images.idx3-ubyte") && err.contains("truncated"), "{err}");
        let err = read_idx(&[0x1f, 0x8b, 8, 0][..], "x.gz").unwrap_err().to_string();
        assert!(err.contains("gzipped"), "{err}");
        let err = read_idx(&idx_bytes(&[u32::MAX, u32::MAX, 4], &[])[..], "huge").unwrap_err().to_string();
        assert!(err.contains("announce more"), "{err}");
        let err = read_idx(&[0, 0][..], "short").unwrap_err().to_string();
        assert!(err.contains("header"), "{err}");
        let labels = read_idx(&idx_bytes(&[1], &[12])[..], "l").unwrap();
        let images = read_idx(&idx_bytes(&[1, 1, 1], &[0])[..], "i").unwrap();
        assert!(dataset_from_idx(images, labels, 10, "m").unwrap_err().to_string().contains("label 12"));
    }

    #[test]
    fn reads_csv_and_names_line_and_column_on_error() {
        let opts = CsvOptions {
            label_column: "quality".into(),
            label_values: Some(vec![5, 6]),
            classes: None,
            delimiter: None,
        };
        let ds = read_csv("a;b;quality\n1.5;2;5\n3;4;6\n".as_bytes(), &opts, "wine.csv").unwrap();
        assert_eq!(ds.features, vec![1.5, 2.0, 3.0, 4.0]);
        assert_eq!(ds.labels, vec![0, 1]);
        let err = read_csv("a;b;quality\n1.5;x;5\n".as_bytes(), &opts, "wine.csv").unwrap_err().to_string();
        assert!(err.contains("wine.csv, line 2, column `b`"), "{err}");
        let err = read_csv("a;b;quality\n1.5;2;7\n".as_bytes(), &opts, "wine.csv").unwrap_err().to_string();
        assert!(err.contains("column `quality`") && err.contains("label 7"), "{err}");
        let err = read_csv("a;b;q\n".as_bytes(), &opts, "wine.csv").unwrap_err().to_string();
        assert!(err.contains("no column named `quality`"), "{err}");
        let err = read_csv("a;b;quality\n1;2\n".as_bytes(), &opts, "wine.csv").unwrap_err().to_string();
        assert!(err.contains("line 2"), "{err}");
    }

    fn labels() -> Vec<u32> {
        (0..1000).map(|i| (i % 10) as u32).collect()
    }

    fn check_disjoint(parts: &[Vec<usize>], n: usize) {
        let mut seen = vec![false; n];
        for p in parts {
            for &i in p {
                assert!(!seen[i], "index {i} dealt twice");
                seen[i] = true;
            }
        }
    }

    #[test]
    fn partitions_are_disjoint_seeded_and_shaped() {
        let labels = labels();
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(1);
        let iid = Partition::Iid.split(&labels, 10, 10, &mut rng).unwrap();
        assert!(iid.iter().all(|p| p.len() == 100));
        check_disjoint(&iid, 1000);

        let shards =
            Partition::Shards { shards_per_client: 2, shard_size: 50 }.split(&labels, 10, 10, &mut rng).unwrap();
        check_disjoint(&shards, 1000);
        for p in &shards {
            let mut classes: Vec<u32> = p.iter().map(|&i| labels[i]).collect();
            classes.sort();
            classes.dedup();
            assert!(classes.len() <= 2, "shard client sees {classes:?}");
        }

        let dir = Partition::Dirichlet { alpha: 0.1 }.split(&labels, 10, 10, &mut rng).unwrap();
        check_disjoint(&dir, 1000);
        assert_eq!(dir.iter().map(Vec::len).sum::<usize>(), 1000);

        let all = Partition::Iid.split_all(&labels[..995], 10, 10, &mut rng).unwrap();
        check_disjoint(&all, 995);
        assert_eq!(all.iter().map(Vec::len).sum::<usize>(), 995, "the remainder is dealt too");
        let err = Partition::Dirichlet { alpha: 0.01 }.split_all(&labels[..20], 10, 10, &mut rng).unwrap_err();
        assert!(err.to_string().contains("gets no examples"), "{err}");
        let err = Partition::Dirichlet { alpha: 1.0 }.split_all(&labels[..20], 10, 1 << 40, &mut rng).unwrap_err();
        assert!(err.to_string().contains("20 examples cannot give 1099511627776 clients"), "{err}");

        let again = Partition::Iid.split(&labels, 10, 10, &mut rand_chacha::ChaCha8Rng::seed_from_u64(1)).unwrap();
        assert_eq!(again, iid);
        assert!(Partition::Shards { shards_per_client: 2, shard_size: 500 }.split(&labels, 10, 10, &mut rng).is_err());
    }
}

//! Files the drivers read and write: data sets named in configuration, TOML configuration
//! and atomic writes.
//!
//! Data sets ([`DataSource`]): IDX (MNIST), CSV, NumPy `.npy` pairs and `.npz` archives, and
//! image folders ([`images`]), each with bounds checked before memory is committed.

pub mod images;

use std::fs::File;
use std::io::{BufReader, Read, Write};
use std::path::{Path, PathBuf};

use cohort_common::data::npy::{self, NpyArray};
use cohort_common::data::{self, CsvOptions, DataError, Dataset};
use cohort_common::peer::escape;
use images::ImageFolder;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

#[derive(Debug, thiserror::Error)]
pub enum FileError {
    #[error("{path}: {source}")]
    Io { path: String, source: std::io::Error },
    #[error("{path}: {message}")]
    Config { path: String, message: String },
    #[error(transparent)]
    Data(#[from] DataError),
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> FileError + '_ {
    move |source| FileError::Io { path: path.display().to_string(), source }
}

fn default_classes() -> usize {
    10
}
fn yes() -> bool {
    true
}
fn is_true(b: &bool) -> bool {
    *b
}
fn default_npy_bytes() -> u64 {
    npy::MAX_NPY_BYTES
}
fn is_default_npy_bytes(b: &u64) -> bool {
    *b == npy::MAX_NPY_BYTES
}
fn x_name() -> String {
    "x".into()
}
fn y_name() -> String {
    "y".into()
}

/// Where a data set lives; paths are relative to the configuration file that names them.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "format", rename_all = "lowercase", deny_unknown_fields)]
pub enum DataSource {
    /// IDX images and labels (MNIST), optionally gzipped.
    Idx {
        images: PathBuf,
        labels: PathBuf,
        #[serde(default = "default_classes")]
        classes: usize,
    },
    /// A CSV file with a header, optionally gzipped.
    Csv {
        path: PathBuf,
        #[serde(flatten)]
        options: CsvOptions,
    },
    /// Image files, one sub-folder of `dir` per class (PNG and JPEG).
    Images(ImageFolder),
    /// NumPy arrays: features `x` (`[n, ...]`: float32, float64 or uint8) and integer labels `y`
    /// (`[n]`), each a `.npy` file (optionally gzipped).
    Npy {
        x: PathBuf,
        y: PathBuf,
        /// Default: the largest label + 1; set it to the federation's number of classes.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        classes: Option<usize>,
        /// Divide uint8 features by 255 (to [0, 1], as IDX images are); floats are kept as they are.
        #[serde(default = "yes", skip_serializing_if = "is_true")]
        scale: bool,
        /// The most data bytes either array may announce.
        #[serde(default = "default_npy_bytes", skip_serializing_if = "is_default_npy_bytes")]
        max_bytes: u64,
    },
    /// `x` and `y` as above, two arrays of one `.npz` archive (`np.savez` or `np.savez_compressed`).
    Npz {
        path: PathBuf,
        #[serde(default = "x_name")]
        x: String,
        #[serde(default = "y_name")]
        y: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        classes: Option<usize>,
        #[serde(default = "yes", skip_serializing_if = "is_true")]
        scale: bool,
        /// The most bytes either array may take, uncompressed (checked before inflating it).
        #[serde(default = "default_npy_bytes", skip_serializing_if = "is_default_npy_bytes")]
        max_bytes: u64,
    },
}

impl DataSource {
    /// Makes relative paths relative to `base` (the directory of the file that named them).
    pub fn resolve(mut self, base: &Path) -> Self {
        let fix = |p: &mut PathBuf| {
            if p.is_relative() {
                *p = base.join(&*p);
            }
        };
        match &mut self {
            DataSource::Idx { images, labels, .. } => {
                fix(images);
                fix(labels);
            }
            DataSource::Csv { path, .. } | DataSource::Npz { path, .. } => fix(path),
            DataSource::Images(folder) => fix(&mut folder.dir),
            DataSource::Npy { x, y, .. } => {
                fix(x);
                fix(y);
            }
        }
        self
    }

    /// One line on where the data are, for `cohort-client check` (image folders: which folder is
    /// which class).
    pub fn describe(&self) -> String {
        match self {
            DataSource::Idx { images, labels, classes } => {
                format!("IDX images {} and labels {}, {classes} classes", images.display(), labels.display())
            }
            DataSource::Csv { path, options } => {
                format!("CSV {}, labels in `{}`", path.display(), options.label_column)
            }
            DataSource::Images(folder) => folder.describe(),
            DataSource::Npy { x, y, classes, .. } => format!(
                "NumPy features {} and labels {}, {}",
                x.display(),
                y.display(),
                classes.map_or("classes from the largest label".into(), |c| format!("{c} classes"))
            ),
            DataSource::Npz { path, x, y, classes, .. } => format!(
                "NumPy archive {}, features `{x}` and labels `{y}`, {}",
                path.display(),
                classes.map_or("classes from the largest label".into(), |c| format!("{c} classes"))
            ),
        }
    }

    /// Reads the data set.
    pub fn load(&self) -> Result<Dataset, FileError> {
        match self {
            DataSource::Idx { images, labels, classes } => {
                let img = data::read_idx(open_maybe_gz(images)?, &images.display().to_string())?;
                let lbl = data::read_idx(open_maybe_gz(labels)?, &labels.display().to_string())?;
                Ok(data::dataset_from_idx(img, lbl, *classes, &format!("{} + {}", images.display(), labels.display()))?)
            }
            DataSource::Csv { path, options } => {
                Ok(data::read_csv(open_maybe_gz(path)?, options, &path.display().to_string())?)
            }
            DataSource::Images(folder) => folder.load(),
            DataSource::Npy { x, y, classes, scale, max_bytes } => {
                let (xo, yo) = (x.display().to_string(), y.display().to_string());
                let xa = npy::read_npy(open_maybe_gz(x)?, *max_bytes, &xo)?;
                let ya = npy::read_npy(open_maybe_gz(y)?, *max_bytes, &yo)?;
                Ok(npy::dataset_from_npy(&xa, &ya, *classes, *scale, &xo, &yo)?)
            }
            DataSource::Npz { path, x, y, classes, scale, max_bytes } => {
                let file = File::open(path).map_err(io_err(path))?;
                let mut archive = zip::ZipArchive::new(BufReader::new(file)).map_err(|e| FileError::Config {
                    path: path.display().to_string(),
                    message: format!("not a readable .npz (zip) archive: {e}"),
                })?;
                let xa = npz_array(&mut archive, path, x, *max_bytes)?;
                let ya = npz_array(&mut archive, path, y, *max_bytes)?;
                let (xo, yo) = (format!("{}:{x}", path.display()), format!("{}:{y}", path.display()));
                Ok(npy::dataset_from_npy(&xa, &ya, *classes, *scale, &xo, &yo)?)
            }
        }
    }
}

/// Reads array `name` (the entry `name.npy`, or `name` as given) of a `.npz` archive. Its
/// uncompressed size, as the archive says, must be within `max_bytes` (and a header) before a
/// byte is inflated, and no more than that is ever read from it.
fn npz_array<R: Read + std::io::Seek>(
    archive: &mut zip::ZipArchive<R>,
    path: &Path,
    name: &str,
    max_bytes: u64,
) -> Result<NpyArray, FileError> {
    let origin = format!("{}:{name}", path.display());
    let bad = |problem: String| FileError::Data(DataError::Format { origin: origin.clone(), problem });
    let entry = [format!("{name}.npy"), name.to_string()].into_iter().find(|n| archive.index_for_name(n).is_some());
    let Some(entry) = entry else {
        // The archive's own names: escaped, as any text a file controls.
        let names: Vec<String> = archive.file_names().take(20).filter_map(Result::ok).map(|n| escape(&n, 80)).collect();
        return Err(bad(format!("no array `{name}` in the archive (it holds {})", names.join(", "))));
    };
    let file = archive.by_name(&entry).map_err(|e| bad(format!("cannot read entry {entry}: {e}")))?;
    let limit = max_bytes.saturating_add((npy::MAX_HEADER_BYTES + 12) as u64);
    if file.size() > limit {
        return Err(bad(format!(
            "entry {entry} inflates to {} bytes ({} compressed), more than max_bytes = {max_bytes}; raise max_bytes if \
             the array is that large and the machine has the memory",
            file.size(),
            file.compressed_size()
        )));
    }
    let declared = file.size();
    Ok(npy::read_npy(file.take(declared), max_bytes, &origin)?)
}

/// Opens a file, decompressing it on the fly when its name ends in `.gz`.
pub fn open_maybe_gz(path: &Path) -> Result<Box<dyn Read>, FileError> {
    let file = File::open(path).map_err(io_err(path))?;
    let reader = BufReader::new(file);
    if path.extension().is_some_and(|e| e == "gz") {
        Ok(Box::new(flate2::read::GzDecoder::new(reader)))
    } else {
        Ok(Box::new(reader))
    }
}

/// Reads a TOML file into `T`; errors name the file, the line and the field.
pub fn read_toml<T: DeserializeOwned>(path: &Path) -> Result<T, FileError> {
    let text = std::fs::read_to_string(path).map_err(io_err(path))?;
    toml::from_str(&text).map_err(|e| FileError::Config { path: path.display().to_string(), message: e.to_string() })
}

/// Writes `bytes` to `path` atomically: a new temporary file beside it, fsync, rename, fsync of
/// the directory. A crash leaves either the old file or the new one, never half of one.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<(), FileError> {
    write_replacing(path, bytes, 0o644)
}

/// Writes a secret (a private key) readable by its owner only, atomically. The file is mode 0600
/// from the moment it exists: it is created exclusively with that mode under an unpredictable
/// name (no other user can have opened it first, or point that name somewhere else), then renamed
/// over `path`.
pub fn write_secret(path: &Path, bytes: &[u8]) -> Result<(), FileError> {
    write_replacing(path, bytes, 0o600)
}

/// Writes a new file with `mode` (on Unix; the umask may only narrow it) beside `path` and renames
/// it over `path`.
fn write_replacing(path: &Path, bytes: &[u8], mode: u32) -> Result<(), FileError> {
    let dir = path.parent().filter(|d| !d.as_os_str().is_empty()).unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir).map_err(io_err(dir))?;
    let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("file");
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut options, mode);
    #[cfg(not(unix))]
    let _ = mode;
    let (tmp, mut file) = loop {
        let tmp = dir.join(format!(".{name}.{}.tmp", random_suffix()?));
        match options.open(&tmp) {
            Ok(file) => break (tmp, file),
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => continue,
            Err(e) => return Err(io_err(&tmp)(e)),
        }
    };
    let written = file.write_all(bytes).and_then(|_| file.sync_all());
    drop(file);
    if let Err(e) = written.and_then(|_| std::fs::rename(&tmp, path)) {
        let _ = std::fs::remove_file(&tmp);
        return Err(io_err(path)(e));
    }
    if let Ok(d) = File::open(dir) {
        let _ = d.sync_all();
    }
    Ok(())
}

/// 16 random hex digits from the operating system.
fn random_suffix() -> Result<String, FileError> {
    let mut bytes = [0u8; 8];
    ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut bytes).map_err(|_| FileError::Io {
        path: "the operating system's random source".into(),
        source: std::io::Error::other("no randomness for a temporary file name"),
    })?;
    Ok(bytes.iter().map(|b| format!("{b:02x}")).collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_errors_name_file_and_field() {
        #[derive(Debug, Deserialize)]
        #[serde(deny_unknown_fields)]
        #[allow(dead_code)]
        struct Cfg {
            rounds: u64,
        }
        let dir = std::env::temp_dir().join(format!("cohort-io-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("server.toml");
        std::fs::write(&path, "rounds = \"ten\"\n").unwrap();
        let err = read_toml::<Cfg>(&path).unwrap_err().to_string();
        assert!(err.contains("server.toml") && err.contains("rounds"), "{err}");
        std::fs::write(&path, "rounds = 1\nround = 2\n").unwrap();
        let err = read_toml::<Cfg>(&path).unwrap_err().to_string();
        assert!(err.contains("unknown field `round`"), "{err}");
        let missing = DataSource::Idx { images: dir.join("nope.idx"), labels: dir.join("nope2"), classes: 10 };
        let err = missing.load().unwrap_err().to_string();
        assert!(err.contains("nope.idx"), "{err}");
        write_secret(&dir.join("k.pem"), b"secret").unwrap();
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(dir.join("k.pem")).unwrap().permissions().mode();
            assert_eq!(mode & 0o777, 0o600);
        }
        std::fs::remove_dir_all(&dir).unwrap();
    }

    /// A `[data]` table parsed as client.toml has it, paths made relative to `dir`.
    fn source(dir: &Path, table: &str) -> Result<DataSource, String> {
        #[derive(Deserialize)]
        struct File {
            data: DataSource,
        }
        toml::from_str::<File>(&format!("[data]\n{table}")).map(|f| f.data.resolve(dir)).map_err(|e| e.to_string())
    }

    fn npz(entries: &[(&str, &[u8], zip::CompressionMethod)]) -> Vec<u8> {
        let mut zip = zip::ZipWriter::new(std::io::Cursor::new(Vec::new()));
        for (name, bytes, method) in entries {
            zip.start_file(*name, zip::write::SimpleFileOptions::default().compression_method(*method)).unwrap();
            zip.write_all(bytes).unwrap();
        }
        zip.finish().unwrap().into_inner()
    }

    #[test]
    fn npy_and_npz_sources_load_and_round_trip() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        let x = npy::write_npy("|u1", &[4, 2], &[0, 255, 51, 102, 1, 2, 3, 4]);
        let y = npy::npy_i64(&[4], &[1, 0, 2, 1]);
        std::fs::write(d.join("x.npy"), &x).unwrap();
        std::fs::write(d.join("y.npy"), &y).unwrap();
        let plain = source(d, "format = 'npy'\nx = 'x.npy'\ny = 'y.npy'").unwrap();
        let ds = plain.load().unwrap();
        assert_eq!((ds.len(), ds.classes, ds.feature_shape.clone(), ds.features[1]), (4, 3, vec![2], 1.0));
        let raw = source(d, "format = 'npy'\nx = 'x.npy'\ny = 'y.npy'\nclasses = 10\nscale = false").unwrap();
        assert_eq!((raw.load().unwrap().features[1], raw.load().unwrap().classes), (255.0, 10));
        assert!(plain.describe().contains("x.npy") && plain.describe().contains("classes from the largest label"));

        use zip::CompressionMethod::{Deflated, Stored};
        std::fs::write(d.join("saved.npz"), npz(&[("x.npy", &x, Stored), ("y.npy", &y, Stored)])).unwrap();
        std::fs::write(d.join("packed.npz"), npz(&[("images.npy", &x, Deflated), ("labels.npy", &y, Deflated)]))
            .unwrap();
        let saved = source(d, "format = 'npz'\npath = 'saved.npz'").unwrap();
        assert_eq!(saved.load().unwrap(), ds);
        let packed = source(d, "format = 'npz'\npath = 'packed.npz'\nx = 'images'\ny = 'labels.npy'").unwrap();
        assert_eq!(packed.load().unwrap(), ds);

        // Every kind of source survives TOML both ways (server.toml's run files are written so).
        let images = source(d, "format = 'images'\ndir = 'train'\nclasses = ['a', 'b']\nsize = [28, 28]").unwrap();
        for s in [plain, raw, saved, packed, images] {
            let text = toml::to_string(&toml::Table::from_iter([("data".into(), toml::Value::try_from(&s).unwrap())]))
                .unwrap();
            assert_eq!(source(Path::new("/elsewhere"), text.trim_start_matches("[data]\n")).unwrap(), s, "{text}");
        }
        let err = source(d, "format = 'images'\ndir = 'train'\nsizes = [28, 28]").unwrap_err();
        assert!(err.contains("unknown field `sizes`"), "{err}");
        let err = source(d, "format = 'npy'\nx = 'x.npy'").unwrap_err();
        assert!(err.contains("missing field `y`"), "{err}");
    }

    #[test]
    fn damaged_npy_and_npz_files_name_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        let x = npy::npy_f32(&[3, 2], &[0.5; 6]);
        let y = npy::npy_i64(&[3], &[0, 1, 7]);
        std::fs::write(d.join("x.npy"), &x).unwrap();
        std::fs::write(d.join("short.npy"), &x[..x.len() - 1]).unwrap();
        std::fs::write(d.join("y.npy"), &y).unwrap();
        std::fs::write(d.join("yf.npy"), npy::npy_f32(&[3], &[0.0, 1.0, 1.0])).unwrap();
        std::fs::write(d.join("text.npy"), "a,b\n1,2\n").unwrap();
        let load = |table: &str| source(d, table).unwrap().load().unwrap_err().to_string();
        let e = load("format = 'npy'\nx = 'short.npy'\ny = 'y.npy'");
        assert!(e.contains("short.npy") && e.contains("truncated"), "{e}");
        let e = load("format = 'npy'\nx = 'text.npy'\ny = 'y.npy'");
        assert!(e.contains("text.npy") && e.contains("magic"), "{e}");
        let e = load("format = 'npy'\nx = 'x.npy'\ny = 'yf.npy'");
        assert!(e.contains("yf.npy") && e.contains("integers"), "{e}");
        let e = load("format = 'npy'\nx = 'x.npy'\ny = 'y.npy'\nclasses = 3");
        assert!(e.contains("y.npy") && e.contains("label 7 at index 2"), "{e}");
        let e = load("format = 'npy'\nx = 'x.npy'\ny = 'missing.npy'");
        assert!(e.contains("missing.npy"), "{e}");

        // Not a zip; a zip without the array; an entry the header says is shorter than it is.
        let e = load("format = 'npz'\npath = 'text.npy'");
        assert!(e.contains("text.npy") && e.contains("not a readable .npz"), "{e}");
        std::fs::write(d.join("other.npz"), npz(&[("a.npy", &x, zip::CompressionMethod::Stored)])).unwrap();
        let e = load("format = 'npz'\npath = 'other.npz'");
        assert!(e.contains("other.npz:x") && e.contains("no array `x`") && e.contains("a.npy"), "{e}");
        // The archive's entry names are the file's text: escaped in the error.
        std::fs::write(d.join("odd.npz"), npz(&[("a\nINFO forged\u{1b}[2J.npy", &x, zip::CompressionMethod::Stored)]))
            .unwrap();
        let e = load("format = 'npz'\npath = 'odd.npz'");
        assert!(e.contains("no array `x`") && e.contains("a\\nINFO forged"), "{e}");
        assert!(!e.contains(['\n', '\u{1b}']), "{e:?}");

        // A zip bomb: 16 MiB of zeros deflate to some 16 KiB; refused before inflating.
        let mut big = npy::write_npy("|u1", &[16 << 20], &[]);
        big.resize(big.len() + (16 << 20), 0);
        let bomb =
            npz(&[("x.npy", &big, zip::CompressionMethod::Deflated), ("y.npy", &y, zip::CompressionMethod::Stored)]);
        assert!(bomb.len() < 100_000, "{}", bomb.len());
        std::fs::write(d.join("bomb.npz"), &bomb).unwrap();
        let e = load("format = 'npz'\npath = 'bomb.npz'\nmax_bytes = 1048576");
        assert!(e.contains("bomb.npz:x") && e.contains("inflates to 16777344 bytes") && e.contains("max_bytes"), "{e}");
        assert!(!e.contains("  "), "one line of prose, no run of spaces: {e}");
        // The same entry claiming (in the central directory) to be small: no more than that is read.
        let mut liar = bomb.clone();
        let central = liar.windows(4).position(|w| w == b"PK\x01\x02").unwrap();
        liar[central + 24..central + 28].copy_from_slice(&1000u32.to_le_bytes());
        std::fs::write(d.join("liar.npz"), &liar).unwrap();
        let e = load("format = 'npz'\npath = 'liar.npz'");
        assert!(e.contains("liar.npz:x") && e.contains("truncated") && e.contains("has 872"), "{e}");
    }

    /// Another local user polls the directory while keys are written: no file in it, temporary
    /// or final, is ever readable or writable by anyone but the owner.
    #[cfg(unix)]
    #[test]
    fn a_key_file_is_never_readable_by_others() {
        use std::os::unix::fs::PermissionsExt;
        use std::sync::atomic::{AtomicBool, Ordering};
        let dir = tempfile::tempdir().unwrap();
        let done = AtomicBool::new(false);
        let (exposed, looks) = std::thread::scope(|scope| {
            let watcher = scope.spawn(|| {
                let (mut exposed, mut looks) = (Vec::new(), 0u64);
                while !done.load(Ordering::Relaxed) {
                    for entry in std::fs::read_dir(dir.path()).unwrap().flatten() {
                        looks += 1;
                        if let Ok(meta) = entry.metadata() {
                            if meta.permissions().mode() & 0o077 != 0 {
                                exposed.push((entry.file_name(), meta.permissions().mode() & 0o777));
                            }
                        }
                    }
                }
                (exposed, looks)
            });
            for i in 0..200 {
                write_secret(&dir.path().join(format!("k{}.key", i % 3)), &[7u8; 4096]).unwrap();
            }
            done.store(true, Ordering::Relaxed);
            watcher.join().unwrap()
        });
        assert!(looks > 0);
        assert!(exposed.is_empty(), "seen readable by others: {:?}", &exposed[..exposed.len().min(5)]);
        let left: Vec<_> = std::fs::read_dir(dir.path()).unwrap().flatten().map(|e| e.file_name()).collect();
        assert_eq!(left.len(), 3, "no temporary file stays behind: {left:?}");
    }
}

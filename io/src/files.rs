//! Files the drivers read and write: data sets named in configuration, TOML configuration
//! and atomic writes.

use std::fs::File;
use std::io::{BufReader, Read, Write};
use std::path::{Path, PathBuf};

use cohort_common::data::{self, CsvOptions, DataError, Dataset};
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
            DataSource::Csv { path, .. } => fix(path),
        }
        self
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
        }
    }
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

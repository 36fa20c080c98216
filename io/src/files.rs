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

/// Writes `bytes` to `path` atomically: a temporary file beside it, fsync, rename, fsync of
/// the directory. A crash leaves either the old file or the new one, never half of one.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<(), FileError> {
    let dir = path.parent().filter(|d| !d.as_os_str().is_empty()).unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir).map_err(io_err(dir))?;
    let tmp = dir.join(format!(".{}.tmp", path.file_name().and_then(|n| n.to_str()).unwrap_or("file")));
    {
        let mut f = File::create(&tmp).map_err(io_err(&tmp))?;
        f.write_all(bytes).map_err(io_err(&tmp))?;
        f.sync_all().map_err(io_err(&tmp))?;
    }
    std::fs::rename(&tmp, path).map_err(io_err(path))?;
    if let Ok(d) = File::open(dir) {
        let _ = d.sync_all();
    }
    Ok(())
}

/// Writes a secret (a private key) readable by its owner only (mode 0600), atomically.
pub fn write_secret(path: &Path, bytes: &[u8]) -> Result<(), FileError> {
    write_atomic(path, bytes)?;
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).map_err(io_err(path))?;
    }
    Ok(())
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
}

//! What `cohort-sim` carries with it and where it finds the rest, so that an installed binary
//! (`cargo install --path scenarios`) runs without the source tree:
//!
//! - the bundled scenarios and the model specs they name are compiled in ([`SCENARIOS`],
//!   [`MODELS`]): `cohort-sim run quickstart` needs no file;
//! - the data sets (MNIST is 11 MB) are looked up at run time ([`DataSearch`]): `--data DIR`,
//!   else `COHORT_DATA`, else `<exe>/../share/cohort/data`, `/usr/local/share/cohort/data`,
//!   `/usr/share/cohort/data`, and last the source tree's `scenarios/data` as it was when the
//!   binary was built.

use std::ffi::OsString;
use std::path::{Path, PathBuf};

/// The bundled scenario files, by name (the file name without `.toml`).
pub const SCENARIOS: &[(&str, &str)] = &[
    ("quickstart", include_str!("../quickstart.toml")),
    ("mnist-2nn-iid", include_str!("../mnist-2nn-iid.toml")),
    ("mnist-2nn-noniid", include_str!("../mnist-2nn-noniid.toml")),
    ("mnist-cnn-iid", include_str!("../mnist-cnn-iid.toml")),
    ("mnist-cnn-iid-secure", include_str!("../mnist-cnn-iid-secure.toml")),
    ("mnist-cnn-noniid-secure", include_str!("../mnist-cnn-noniid-secure.toml")),
    ("mnist-2nn-iid-secure", include_str!("../mnist-2nn-iid-secure.toml")),
    ("mnist-2nn-noniid-secure", include_str!("../mnist-2nn-noniid-secure.toml")),
    ("mnist-2nn-iid-dropouts", include_str!("../mnist-2nn-iid-dropouts.toml")),
    ("mnist-2nn-dp", include_str!("../mnist-2nn-dp.toml")),
    ("mnist-2nn-dp-baseline", include_str!("../mnist-2nn-dp-baseline.toml")),
    ("mnist-longtail", include_str!("../mnist-longtail.toml")),
    ("mnist-multitask", include_str!("../mnist-multitask.toml")),
    ("mnist-personal", include_str!("../mnist-personal.toml")),
    ("mnist-cnn-gpu", include_str!("../mnist-cnn-gpu.toml")),
    ("scale-secure-10", include_str!("../scale-secure-10.toml")),
    ("scale-secure-100", include_str!("../scale-secure-100.toml")),
    ("scale-secure-1000", include_str!("../scale-secure-1000.toml")),
    ("winequality", include_str!("../winequality.toml")),
];

/// The model specs the bundled scenarios name, by the path they name them with.
pub const MODELS: &[(&str, &str)] = &[
    ("models/mnist-2nn-personal.toml", include_str!("../models/mnist-2nn-personal.toml")),
    ("models/mnist-multitask.toml", include_str!("../models/mnist-multitask.toml")),
    ("models/synthetic-100k.toml", include_str!("../models/synthetic-100k.toml")),
    ("models/winequality-mlp.toml", include_str!("../models/winequality-mlp.toml")),
];

/// The text of bundled scenario `name` (`quickstart`, or `quickstart.toml`).
pub fn scenario(name: &str) -> Option<&'static str> {
    let name = name.strip_suffix(".toml").unwrap_or(name);
    SCENARIOS.iter().find(|(n, _)| *n == name).map(|(_, text)| *text)
}

/// The text of a model spec a bundled scenario names (`models/winequality-mlp.toml`).
pub fn model(path: &str) -> Option<&'static str> {
    let path = path.strip_prefix("./").unwrap_or(path);
    MODELS.iter().find(|(p, _)| *p == path).map(|(_, text)| *text)
}

/// The names of the bundled scenarios, comma-separated (for error messages).
pub fn scenario_names() -> String {
    SCENARIOS.iter().map(|(n, _)| *n).collect::<Vec<_>>().join(", ")
}

/// A data set the simulator reads from a data folder: its subfolder and the files that must be
/// there.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DataSet {
    pub name: &'static str,
    pub folder: &'static str,
    pub files: &'static [&'static str],
}

pub const MNIST: DataSet = DataSet {
    name: "MNIST",
    folder: "mnist",
    files: &[
        "train-images.idx3-ubyte.gz",
        "train-labels.idx1-ubyte.gz",
        "t10k-images.idx3-ubyte.gz",
        "t10k-labels.idx1-ubyte.gz",
    ],
};

pub const WINEQUALITY: DataSet =
    DataSet { name: "Wine Quality (red)", folder: "winequality", files: &["winequality-red.csv.gz"] };

impl DataSet {
    /// The data set a scenario's `data.dataset` names (`None` for `synthetic`, which reads
    /// nothing).
    pub fn named(dataset: &str) -> Option<DataSet> {
        match dataset {
            "mnist" => Some(MNIST),
            "winequality" => Some(WINEQUALITY),
            _ => None,
        }
    }

    /// The first of its files missing under `dir`, if any.
    fn missing_in(&self, dir: &Path) -> Option<PathBuf> {
        self.files.iter().map(|f| dir.join(self.folder).join(f)).find(|p| !p.is_file())
    }
}

/// The places a data folder is looked for, in order.
#[derive(Debug, Clone, Default)]
pub struct DataSearch {
    /// `--data DIR`: when given, the only place looked.
    pub explicit: Option<PathBuf>,
    /// `COHORT_DATA`: when set (and no `--data`), the only place looked.
    pub env: Option<OsString>,
    /// The running executable (for `<exe>/../share/cohort/data`).
    pub exe: Option<PathBuf>,
    /// Fixed places after the executable's: the system-wide share folders and the source tree's
    /// `scenarios/data` as it was at build time.
    pub fixed: Vec<PathBuf>,
}

/// The source tree's data folder, as it was when this binary was built.
pub fn compiled_in_data_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("data")
}

impl DataSearch {
    /// The search a run makes: `--data` (if given), this process's `COHORT_DATA` and
    /// executable, the system-wide share folders and the compiled-in source tree path.
    pub fn from_environment(explicit: Option<&Path>) -> Self {
        DataSearch {
            explicit: explicit.map(Path::to_path_buf),
            env: std::env::var_os("COHORT_DATA").filter(|v| !v.is_empty()),
            exe: std::env::current_exe().ok(),
            fixed: vec![
                PathBuf::from("/usr/local/share/cohort/data"),
                PathBuf::from("/usr/share/cohort/data"),
                compiled_in_data_dir(),
            ],
        }
    }

    /// Every place this search looks, in order, each with why it is looked at.
    pub fn places(&self) -> Vec<(PathBuf, String)> {
        if let Some(dir) = &self.explicit {
            return vec![(dir.clone(), "--data".into())];
        }
        if let Some(dir) = &self.env {
            return vec![(PathBuf::from(dir), "COHORT_DATA".into())];
        }
        let mut places = Vec::new();
        if let Some(bin) = self.exe.as_deref().and_then(Path::parent) {
            let share = bin.parent().unwrap_or(bin).join("share/cohort/data");
            places.push((share, format!("beside the executable, {}/../share/cohort/data", bin.display())));
        }
        for dir in &self.fixed {
            let why = if *dir == compiled_in_data_dir() {
                "the source tree this binary was built from".to_string()
            } else {
                "system-wide".to_string()
            };
            places.push((dir.clone(), why));
        }
        // `<exe>/../share/cohort/data` may be one of the fixed places (an executable in /usr/bin).
        let mut seen = std::collections::HashSet::new();
        places.retain(|(dir, _)| seen.insert(dir.clone()));
        places
    }

    /// The first place that holds every file of `set`, or an error that names each place looked
    /// and what was missing there, and says what to do.
    pub fn find(&self, set: &DataSet) -> Result<PathBuf, String> {
        let mut looked = Vec::new();
        for (dir, why) in self.places() {
            match set.missing_in(&dir) {
                None => return Ok(dir),
                Some(missing) => looked.push(format!("  {} ({why}): no {}", dir.display(), missing.display())),
            }
        }
        let chosen = if self.explicit.is_some() {
            "\n(only --data is looked at when it is given)"
        } else if self.env.is_some() {
            "\n(only COHORT_DATA is looked at when it is set)"
        } else {
            ""
        };
        Err(format!(
            "cannot find the {name} data set ({folder}/ with {files}); looked in:\n{looked}{chosen}\nPass --data DIR or \
             set COHORT_DATA=DIR, where DIR holds {folder}/ (Cohort's source tree has it in scenarios/data/{folder}/), \
             or install it as <prefix>/share/cohort/data/{folder}/ beside <prefix>/bin/cohort-sim",
            name = set.name,
            folder = set.folder,
            files = set.files.join(", "),
            looked = looked.join("\n"),
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_scenario_file_is_bundled_and_every_bundled_model_is_named() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR"));
        for entry in std::fs::read_dir(dir).unwrap() {
            let path = entry.unwrap().path();
            let name = path.file_stem().unwrap().to_str().unwrap().to_string();
            if path.extension().is_some_and(|e| e == "toml") && name != "Cargo" {
                assert_eq!(
                    scenario(&name),
                    Some(std::fs::read_to_string(&path).unwrap().as_str()),
                    "{name}.toml is not in bundled::SCENARIOS"
                );
            }
        }
        for entry in std::fs::read_dir(dir.join("models")).unwrap() {
            let name = format!("models/{}", entry.unwrap().file_name().to_str().unwrap());
            assert!(model(&name).is_some(), "{name} is not in bundled::MODELS");
        }
        assert_eq!(scenario("quickstart.toml"), scenario("quickstart"));
        assert_eq!(scenario("nonesuch"), None);
    }

    /// A data folder with MNIST's four files (empty: only their presence is looked at).
    fn with_mnist(dir: &Path) -> PathBuf {
        for f in MNIST.files {
            std::fs::create_dir_all(dir.join("mnist")).unwrap();
            std::fs::write(dir.join("mnist").join(f), b"").unwrap();
        }
        dir.to_path_buf()
    }

    #[test]
    fn data_is_looked_for_in_order_and_the_error_names_every_place() {
        let root = tempfile::tempdir().unwrap();
        let prefix = root.path().join("prefix");
        let exe = prefix.join("bin/cohort-sim");
        let beside = prefix.join("share/cohort/data");
        let (system, tree) = (root.path().join("system"), root.path().join("tree"));
        let search = |explicit: Option<PathBuf>, env: Option<PathBuf>| DataSearch {
            explicit,
            env: env.map(PathBuf::into_os_string),
            exe: Some(exe.clone()),
            fixed: vec![system.clone(), tree.clone()],
        };

        // Nothing anywhere: every place is named, with the file it lacks and what to do.
        let err = search(None, None).find(&MNIST).unwrap_err();
        for place in [&beside, &system, &tree] {
            assert!(err.contains(&format!("{} (", place.display())), "{err}");
        }
        let order: Vec<usize> =
            [&beside, &system, &tree].iter().map(|p| err.find(&*p.display().to_string()).unwrap()).collect();
        assert!(order.windows(2).all(|w| w[0] < w[1]), "places in search order: {err}");
        assert!(err.contains("MNIST") && err.contains("train-images.idx3-ubyte.gz"), "{err}");
        assert!(err.contains("--data DIR") && err.contains("COHORT_DATA"), "{err}");

        // The first place that has it wins: the source tree last, then system-wide, then beside
        // the executable.
        with_mnist(&tree);
        assert_eq!(search(None, None).find(&MNIST).unwrap(), tree);
        with_mnist(&system);
        assert_eq!(search(None, None).find(&MNIST).unwrap(), system);
        with_mnist(&beside);
        assert_eq!(search(None, None).find(&MNIST).unwrap(), beside);

        // COHORT_DATA, then --data, take over: the only place looked, and it must have the data.
        let env = with_mnist(&root.path().join("env"));
        assert_eq!(search(None, Some(env.clone())).find(&MNIST).unwrap(), env);
        let given = root.path().join("given");
        let err = search(Some(given.clone()), Some(env.clone())).find(&MNIST).unwrap_err();
        assert!(err.contains(&given.display().to_string()) && err.contains("(--data)"), "{err}");
        assert!(!err.contains(&env.display().to_string()) && err.contains("only --data"), "{err}");
        with_mnist(&given);
        assert_eq!(search(Some(given.clone()), Some(env)).find(&MNIST).unwrap(), given);
        let err = search(None, Some(root.path().join("void"))).find(&MNIST).unwrap_err();
        assert!(err.contains("void (COHORT_DATA)") && err.contains("only COHORT_DATA"), "{err}");

        // Each data set is looked for on its own: MNIST here is no Wine Quality.
        let err = search(Some(given), None).find(&WINEQUALITY).unwrap_err();
        assert!(err.contains("winequality-red.csv.gz"), "{err}");
    }
}

//! # cohort-python
//!
//! The native half of the Python package `cohort` (`cohort._native`): a data owner's own
//! training, in Python, answering a Cohort federation's rounds through the same daemon as
//! `cohort-client`. The Python half (`python/cohort/`) turns tensors into NumPy arrays and
//! calls the data owner's `fit`, `evaluate` and `label_counts`; this half does everything else,
//! in Rust, on the data owner's machine:
//!
//! - [`Daemon`]: `client.toml` (identity, server, state directory, privacy budget, policy),
//!   then `cohort_client::daemon` (QUIC with mutual TLS, reconnects, plans, the privacy ledger,
//!   clipping, noise, quantization and SecAgg+ masking) with
//!   `cohort_common::callbacks::CallbackTrainer` as its job runner. The GIL is released while
//!   the daemon runs; a job takes it only for the callback, on the daemon's blocking thread, so
//!   Python training never stalls the connection.
//! - [`PyCallbacks`]: the bridge object's `_fit`, `_evaluate` and `_label_counts`, called with
//!   the GIL; a Python exception becomes the reason the client declines the round (its traceback
//!   goes to stderr).
//! - [`read_safetensors`] and [`model_layout`]: a model file (`cohort-server export`) as named
//!   tensors, and a model spec's named tensors and shapes, for the PyTorch bridge.
//!
//! The Python side's documentation is the package's (`python/cohort/__init__.py`).

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::OnceLock;
use std::time::Duration;

use cohort_common::callbacks::{self, CallbackTrainer, Callbacks, Fitted, NamedTensor, RoundSettings};
use cohort_common::model::ModelSpec;
use cohort_common::wire::TensorBytes;
use pyo3::exceptions::{PyRuntimeError, PyValueError};
use pyo3::prelude::*;
use pyo3::types::{PyBytes, PyList, PyTuple};
use tokio_util::sync::CancellationToken;

/// One tensor for Python: `(name, shape, little-endian float32 bytes)`.
type WireTensor = (String, Vec<usize>, Vec<u8>);

/// How long the waiting thread leaves Python alone between checks for Ctrl-C.
const SIGNAL_POLL: Duration = Duration::from_millis(200);

/// The longest message a Python exception may put in a decline or a log.
const MAX_REASON: usize = 400;

/// A tensor's values from Python's float32 bytes.
fn from_bytes(name: &str, bytes: Vec<u8>) -> Result<Vec<f32>, String> {
    let length = bytes.len();
    TensorBytes::from(bytes)
        .to_f32()
        .map_err(|_| format!("tensor `{name}` has {length} bytes, not a whole number of float32 values"))
}

/// The bridge object (`cohort._Bridge`, in `cohort/__init__.py`), called with the GIL from the
/// daemon's job thread.
pub struct PyCallbacks {
    bridge: Py<PyAny>,
}

impl PyCallbacks {
    /// Calls `method` on the bridge; a Python exception becomes the reason, in words.
    fn call<T>(
        &self,
        method: &str,
        args: impl for<'py> FnOnce(Python<'py>) -> PyResult<Bound<'py, PyTuple>>,
        read: impl for<'py> FnOnce(&Bound<'py, PyAny>) -> PyResult<T>,
    ) -> Result<T, String> {
        Python::attach(|py| {
            let outcome = args(py).and_then(|a| self.bridge.bind(py).call_method1(method, a)).and_then(|r| read(&r));
            outcome.map_err(|err| {
                // The whole traceback for the data owner; one capped line for the decline.
                err.display(py);
                let line = err.to_string();
                cohort_common::peer::escape(
                    &format!("the Python {}: {line}", method.trim_start_matches('_')),
                    MAX_REASON,
                )
            })
        })
    }
}

fn tensors_arg<'py>(py: Python<'py>, params: Vec<NamedTensor>) -> PyResult<Bound<'py, PyList>> {
    let items: Vec<Bound<'py, PyTuple>> = params
        .into_iter()
        .map(|t| (t.name, t.shape, PyBytes::new(py, TensorBytes::from_f32(&t.values).as_bytes())).into_pyobject(py))
        .collect::<PyResult<_>>()?;
    PyList::new(py, items)
}

fn settings_json(settings: &RoundSettings) -> String {
    serde_json::to_string(settings).expect("round settings always serialise")
}

fn counts_by_head(result: &Bound<'_, PyAny>) -> PyResult<BTreeMap<String, Vec<u64>>> {
    result.extract()
}

impl Callbacks for PyCallbacks {
    fn fit(&mut self, params: Vec<NamedTensor>, settings: &RoundSettings) -> Result<Fitted, String> {
        let json = settings_json(settings);
        let (tensors, is_delta, examples, loss) = self.call(
            "_fit",
            |py| (tensors_arg(py, params)?, json).into_pyobject(py),
            |r| r.extract::<(Vec<WireTensor>, bool, u64, Option<f64>)>(),
        )?;
        let tensors = tensors
            .into_iter()
            .map(|(name, shape, bytes)| Ok(NamedTensor { values: from_bytes(&name, bytes)?, name, shape }))
            .collect::<Result<_, String>>()
            .map_err(|e| format!("fit returned {e}"))?;
        Ok(Fitted { tensors, is_delta, examples, loss })
    }

    fn evaluate(
        &mut self,
        params: Vec<NamedTensor>,
        settings: &RoundSettings,
    ) -> Result<BTreeMap<String, Vec<u64>>, String> {
        let json = settings_json(settings);
        self.call("_evaluate", |py| (tensors_arg(py, params)?, json).into_pyobject(py), counts_by_head)
    }

    fn label_counts(&mut self, settings: &RoundSettings) -> Result<BTreeMap<String, Vec<u64>>, String> {
        let json = settings_json(settings);
        self.call("_label_counts", |py| (json,).into_pyobject(py), counts_by_head)
    }
}

fn init_logging() {
    static ONCE: OnceLock<()> = OnceLock::new();
    ONCE.get_or_init(|| {
        let filter = tracing_subscriber::EnvFilter::try_from_env("COHORT_LOG")
            .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
        // Another library of this process may have set one already: keep it.
        let _ = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).try_init();
    });
}

/// A client daemon whose training is Python's: `run()` blocks until `stop()` (from another
/// thread), Ctrl-C, or an error that ends the daemon.
#[pyclass(module = "cohort._native")]
pub struct Daemon {
    config: PathBuf,
    bridge: Py<PyAny>,
    labels: Vec<String>,
    examples: u64,
    device: String,
    stop: CancellationToken,
    /// Whether `run` has been called: a daemon runs once.
    ran: AtomicBool,
}

#[pymethods]
impl Daemon {
    #[new]
    #[pyo3(signature = (config, bridge, labels, examples, device))]
    fn new(config: PathBuf, bridge: Py<PyAny>, labels: Vec<String>, examples: u64, device: String) -> Self {
        Self { config, bridge, labels, examples, device, stop: CancellationToken::new(), ran: Default::default() }
    }

    /// Runs the daemon until `stop()`, Ctrl-C (raised as `KeyboardInterrupt`) or an error
    /// (raised as `RuntimeError` with what to do).
    fn run(&self, py: Python<'_>) -> PyResult<()> {
        if self.ran.swap(true, Ordering::SeqCst) {
            return Err(PyRuntimeError::new_err("this client has run already; make a new one"));
        }
        init_logging();
        let config = cohort_client::config::ClientConfig::load(&self.config)
            .map_err(|e| PyValueError::new_err(e.to_string()))?;
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .worker_threads(2)
            .thread_name("cohort-client")
            .build()
            .map_err(|e| PyRuntimeError::new_err(format!("cannot start the client's runtime: {e}")))?;
        let callbacks = PyCallbacks { bridge: self.bridge.clone_ref(py) };
        let (labels, examples, device) = (self.labels.clone(), self.examples, self.device.clone());
        let (stop, path) = (self.stop.clone(), self.config.clone());
        let mut daemon = runtime.spawn(async move {
            let setup = cohort_client::setup_with_runner(&config, device, move |id, personal| {
                Box::new(
                    CallbackTrainer::new(id, callbacks, labels).with_personal_heads(personal).with_samples(examples),
                )
            })
            .await
            .map_err(|e| e.to_string())?;
            tracing::info!(device = %setup.device_name, server = %setup.server, "starting (training in Python)");
            cohort_client::daemon::run_with_config(setup, stop, &path).await.map_err(|e| e.to_string())
        });
        let outcome = loop {
            // Python is free while the daemon runs; every SIGNAL_POLL the main thread looks for
            // Ctrl-C (Python runs signal handlers on its main thread only).
            let waited = py.detach(|| runtime.block_on(async { tokio::time::timeout(SIGNAL_POLL, &mut daemon).await }));
            match waited {
                Ok(joined) => break Ok(joined),
                Err(_) => {
                    if let Err(interrupt) = py.check_signals() {
                        self.stop.cancel();
                        let _ = py.detach(|| runtime.block_on(&mut daemon));
                        break Err(interrupt);
                    }
                }
            }
        };
        // Without the GIL, whatever ended the daemon: a training job still on the runtime's
        // blocking thread may be waiting for the GIL, and dropping the runtime while holding it
        // would wait for that job for ever. A job still running after 5 s finishes on its own.
        py.detach(|| runtime.shutdown_timeout(Duration::from_secs(5)));
        match outcome? {
            Ok(Ok(())) => Ok(()),
            Ok(Err(why)) => Err(PyRuntimeError::new_err(why)),
            Err(panic) => Err(PyRuntimeError::new_err(format!("the client daemon failed: {panic}"))),
        }
    }

    /// Asks a running daemon to stop (from any thread): it closes its connection cleanly and
    /// `run()` returns.
    fn stop(&self) {
        self.stop.cancel();
    }
}

/// The named tensors of a model file (`cohort-server export`): `(tensors, spec)`, the tensors as
/// `(name, shape, float32 bytes)` in the file's order and the model spec TOML the file carries
/// (`None` if it carries none).
#[pyfunction]
#[allow(clippy::type_complexity)]
fn read_safetensors(
    py: Python<'_>,
    path: PathBuf,
) -> PyResult<(Vec<(String, Vec<usize>, Py<PyBytes>)>, Option<String>)> {
    let bad = |e: String| PyValueError::new_err(format!("{}: {e}", path.display()));
    let bytes = std::fs::read(&path).map_err(|e| bad(e.to_string()))?;
    let spec =
        cohort_common::model::spec_from_safetensors(&bytes).map_err(|e| bad(e.to_string()))?.map(|s| s.to_toml());
    let file = safetensors::SafeTensors::deserialize(&bytes).map_err(|e| bad(e.to_string()))?;
    let mut tensors = Vec::new();
    for (name, view) in file.iter() {
        if view.dtype() != safetensors::Dtype::F32 {
            return Err(bad(format!(
                "tensor `{name}` is {:?}; a Cohort model file holds float32 tensors",
                view.dtype()
            )));
        }
        tensors.push((name.to_string(), view.shape().to_vec(), PyBytes::new(py, view.data()).unbind()));
    }
    Ok((tensors, spec))
}

/// Writes named float32 tensors as a model file that `cohort-server` (a run's `initial_model`)
/// and `cohort-client evaluate` read: `tensors` as `(name, shape, float32 bytes)`, every tensor
/// of the model `spec` (TOML), which the file carries in its metadata.
#[pyfunction]
fn write_safetensors(path: PathBuf, tensors: Vec<WireTensor>, spec: String) -> PyResult<()> {
    let invalid = |e: String| PyValueError::new_err(e);
    let spec = ModelSpec::from_toml(&spec).map_err(|e| invalid(e.to_string()))?;
    let model =
        cohort_common::model::Model::new(&spec, &candle_core::Device::Cpu, 0).map_err(|e| invalid(e.to_string()))?;
    let named = tensors
        .into_iter()
        .map(|(name, shape, bytes)| Ok(NamedTensor { values: from_bytes(&name, bytes)?, name, shape }))
        .collect::<Result<Vec<_>, String>>()
        .map_err(invalid)?;
    let flat = callbacks::join(model.layout(), named).map_err(|e| invalid(format!("the tensors have {e}")))?;
    model.set_flat(&flat).map_err(|e| invalid(e.to_string()))?;
    let bytes = model.to_safetensors().map_err(|e| invalid(e.to_string()))?;
    cohort_io::files::write_atomic(&path, &bytes).map_err(|e| invalid(e.to_string()))
}

/// A model spec's named tensors in wire order: `[(name, shape), ...]`, and its heads:
/// `[(name, classes, personal), ...]`.
#[pyfunction]
#[allow(clippy::type_complexity)]
fn model_layout(spec: &str) -> PyResult<(Vec<(String, Vec<usize>)>, Vec<(String, usize, bool)>)> {
    let spec = ModelSpec::from_toml(spec).map_err(|e| PyValueError::new_err(e.to_string()))?;
    let layout = callbacks::layout_of(&spec).map_err(|e| PyValueError::new_err(e.to_string()))?;
    let tensors = layout.entries().iter().map(|e| (e.name.clone(), e.shape.clone())).collect();
    let heads = spec.heads.iter().map(|h| (h.name.clone(), h.classes, h.personal)).collect();
    Ok((tensors, heads))
}

#[pymodule]
fn _native(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<Daemon>()?;
    m.add_function(wrap_pyfunction!(read_safetensors, m)?)?;
    m.add_function(wrap_pyfunction!(write_safetensors, m)?)?;
    m.add_function(wrap_pyfunction!(model_layout, m)?)?;
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    Ok(())
}

//! ONNX Runtime, loaded at run time (`ort` in load-dynamic mode), and sessions checked against
//! what a stage needs before any row is processed.

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use ort::session::builder::GraphOptimizationLevel;
use ort::session::Session;
use ort::value::{TensorElementType, ValueType};

use crate::error::{Error, Result};

/// Where a model runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Device {
    Cpu,
    Cuda(i32),
}

impl Device {
    /// `cpu`, `cuda` or `cuda:N`.
    pub fn parse(s: &str) -> std::result::Result<Device, String> {
        match s.trim() {
            "cpu" => Ok(Device::Cpu),
            "cuda" => Ok(Device::Cuda(0)),
            other => match other.strip_prefix("cuda:").map(str::parse::<i32>) {
                Some(Ok(n)) if n >= 0 => Ok(Device::Cuda(n)),
                _ => Err(format!("{other:?} is not a device; expected cpu, cuda or cuda:N")),
            },
        }
    }
}

impl std::fmt::Display for Device {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Device::Cpu => write!(f, "cpu"),
            Device::Cuda(n) => write!(f, "cuda:{n}"),
        }
    }
}

/// How a session is built.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SessionOptions {
    pub device: Device,
    /// Threads inside one operator; 0 lets ONNX Runtime choose.
    pub intra_threads: usize,
}

impl Default for SessionOptions {
    fn default() -> Self {
        SessionOptions { device: Device::Cpu, intra_threads: 0 }
    }
}

/// `rel` in the current directory, else beside an ancestor of the executable (a checkout's
/// `target/` build): the first candidate that `ok` accepts.
pub fn in_checkout(rel: &str, ok: impl Fn(&Path) -> bool) -> Option<PathBuf> {
    let mut candidates = vec![PathBuf::from(rel)];
    if let Ok(exe) = std::env::current_exe() {
        candidates.extend(exe.ancestors().skip(1).map(|d| d.join(rel)));
    }
    candidates.into_iter().find(|p| ok(p))
}

/// The ONNX Runtime shared library to load: `ORT_DYLIB_PATH`, else `.ort-gpu/libonnxruntime.so`
/// (`scripts/fetch-ort.sh --gpu`: the onnxruntime-gpu build, which runs CPU sessions too), else
/// `.ort/libonnxruntime.so`, each in the current directory or beside an ancestor of the
/// executable (where the script puts them in a checkout).
pub fn library_path() -> std::result::Result<PathBuf, String> {
    if let Some(p) = std::env::var_os("ORT_DYLIB_PATH") {
        let p = PathBuf::from(p);
        return if p.is_file() { Ok(p) } else { Err(format!("ORT_DYLIB_PATH={} does not exist", p.display())) };
    }
    in_checkout(".ort-gpu/libonnxruntime.so", |p| p.is_file())
        .or_else(|| in_checkout(".ort/libonnxruntime.so", |p| p.is_file()))
        .ok_or_else(|| {
            "the ONNX Runtime library was not found: run `bash scripts/fetch-ort.sh` (it puts \
             .ort/libonnxruntime.so in the checkout; `--gpu` for the CUDA build) or set ORT_DYLIB_PATH to a libonnxruntime.so"
                .to_string()
        })
}

/// What `device: cuda` needs, checked in order; the first thing missing, said plainly.
/// Loads (RTLD_GLOBAL, once) the CUDA libraries `fetch-ort.sh --gpu` put in `cuda/` beside the
/// ONNX Runtime library, so that its CUDA provider finds them without LD_LIBRARY_PATH.
pub fn cuda_ready() -> std::result::Result<(), String> {
    static READY: OnceLock<std::result::Result<(), String>> = OnceLock::new();
    READY
        .get_or_init(|| {
            let lib = library_path()?;
            let dir = lib.parent().unwrap_or(Path::new("."));
            if !dir.join("libonnxruntime_providers_cuda.so").is_file() {
                return Err(format!(
                    "{} is the CPU build of ONNX Runtime (no libonnxruntime_providers_cuda.so beside it): \
                     run `bash scripts/fetch-ort.sh --gpu` for the onnxruntime-gpu build and its CUDA libraries",
                    lib.display()
                ));
            }
            // The driver first: some CUDA libraries (cuDNN's runtime-compiled engines, the CUDA
            // provider itself) link to it, so without it nothing else can load.
            // SAFETY: loading the NVIDIA driver's library runs its initialisers, as any CUDA user does.
            if let Err(e) = unsafe { libloading::os::unix::Library::open(Some("libcuda.so.1"), libc_flags()) } {
                return Err(format!(
                    "the NVIDIA driver's libcuda.so.1 cannot be loaded ({e}): this machine has no usable NVIDIA GPU \
                     (or its driver is not installed); ONNX Runtime's CUDA provider is ready in {}",
                    dir.display()
                ));
            }
            let cuda = dir.join("cuda");
            if cuda.is_dir() {
                preload_dir(&cuda)?;
            }
            Ok(())
        })
        .clone()
}

fn libc_flags() -> std::os::raw::c_int {
    libloading::os::unix::RTLD_NOW | libloading::os::unix::RTLD_GLOBAL
}

/// dlopen every shared library in `dir` with RTLD_GLOBAL, in as many passes as their
/// dependencies on each other need; the ones that never load are an error naming them.
fn preload_dir(dir: &Path) -> std::result::Result<(), String> {
    let mut todo: Vec<PathBuf> = std::fs::read_dir(dir)
        .map_err(|e| format!("cannot list {}: {e}", dir.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.file_name().is_some_and(|n| n.to_string_lossy().contains(".so")))
        .collect();
    todo.sort();
    let mut last_errors = Vec::new();
    while !todo.is_empty() {
        let before = todo.len();
        last_errors.clear();
        todo.retain(|p| {
            // SAFETY: NVIDIA's CUDA libraries from their wheels; loading runs their initialisers.
            match unsafe { libloading::os::unix::Library::open(Some(p), libc_flags()) } {
                Ok(lib) => {
                    // Kept loaded for the life of the process.
                    std::mem::forget(lib);
                    false
                }
                Err(e) => {
                    last_errors.push(format!("{}: {e}", p.display()));
                    true
                }
            }
        });
        if todo.len() == before {
            return Err(format!("CUDA libraries in {} that cannot be loaded: {}", dir.display(), last_errors.join("; ")));
        }
    }
    Ok(())
}

static ENVIRONMENT: OnceLock<std::result::Result<ort::environment::Environment, String>> = OnceLock::new();

/// The process-wide ONNX Runtime environment, loading the library on first use.
pub fn environment() -> Result<&'static ort::environment::Environment> {
    ENVIRONMENT
        .get_or_init(|| {
            let path = library_path()?;
            let builder = ort::init_from(&path).map_err(|e| format!("cannot load {}: {e}", path.display()))?;
            builder.with_name("recap").build().map_err(|e| format!("ONNX Runtime from {}: {e}", path.display()))
        })
        .as_ref()
        .map_err(|e| Error::Usage(e.clone()))
}

/// Open an ONNX file as a session on the chosen device.
pub fn open_session(path: &Path, opts: &SessionOptions) -> Result<Session> {
    if !path.is_file() {
        return Err(Error::model(path, "file not found"));
    }
    let env = environment()?;
    let fail = |e: String| Error::model(path, e);
    let mut builder = Session::builder(env)
        .map_err(|e| fail(e.to_string()))?
        .with_optimization_level(GraphOptimizationLevel::Level3)
        .map_err(|e| fail(e.to_string()))?;
    if opts.intra_threads > 0 {
        builder = builder.with_intra_threads(opts.intra_threads).map_err(|e| fail(e.to_string()))?;
    }
    if let Device::Cuda(id) = opts.device {
        cuda_ready().map_err(|e| fail(format!("device cuda:{id}: {e}; use `device: cpu` otherwise")))?;
        let ep = ort::ep::CUDA::default().with_device_id(id).build().error_on_failure();
        builder = builder.with_execution_providers([ep]).map_err(|e| {
            fail(format!(
                "the CUDA execution provider could not be registered on cuda:{id} ({e}); it needs the \
                 onnxruntime-gpu build of libonnxruntime (`bash scripts/fetch-ort.sh --gpu`) and a GPU with \
                 its driver; use `device: cpu` otherwise"
            ))
        })?;
    }
    builder.commit_from_file(path).map_err(|e| fail(format!("ONNX Runtime cannot load it: {e}")))
}

/// What a stage expects of one tensor.
#[derive(Debug, Clone, Copy)]
pub struct Expect {
    pub name: &'static str,
    pub ty: TensorElementType,
    /// Expected rank; `None` when any rank is accepted.
    pub rank: Option<usize>,
}

pub const fn expect(name: &'static str, ty: TensorElementType, rank: usize) -> Expect {
    Expect { name, ty, rank: Some(rank) }
}

fn describe(vt: &ValueType) -> String {
    match vt {
        ValueType::Tensor { ty, shape, .. } => format!("{ty:?} {:?}", shape.iter().collect::<Vec<_>>()),
        other => format!("{other:?}"),
    }
}

/// Check that a session has the named inputs (or outputs) with the right element type and rank;
/// the error names the file, the tensor, what was expected and what the file has.
pub fn check_io(path: &Path, session: &Session, inputs: &[Expect], outputs: &[Expect]) -> Result<()> {
    let mut problems = Vec::new();
    for (kind, list, have) in [("input", inputs, session.inputs()), ("output", outputs, session.outputs())] {
        for e in list {
            match have.iter().find(|o| o.name() == e.name) {
                None => problems.push(format!(
                    "{kind} `{}` ({:?}) is missing; the file's {kind}s are: {}",
                    e.name,
                    e.ty,
                    have.iter().map(|o| format!("`{}` {}", o.name(), describe(o.dtype()))).collect::<Vec<_>>().join(", ")
                )),
                Some(o) => match o.dtype() {
                    ValueType::Tensor { ty, shape, .. } => {
                        if *ty != e.ty {
                            problems.push(format!("{kind} `{}` has element type {ty:?}; expected {:?}", e.name, e.ty));
                        }
                        if let Some(r) = e.rank {
                            if shape.len() != r {
                                problems.push(format!(
                                    "{kind} `{}` has rank {} ({}); expected rank {r}",
                                    e.name,
                                    shape.len(),
                                    describe(o.dtype())
                                ));
                            }
                        }
                    }
                    other => problems.push(format!("{kind} `{}` is {}; expected a tensor", e.name, describe(other))),
                },
            }
        }
    }
    if problems.is_empty() {
        Ok(())
    } else {
        Err(Error::model(path, problems.join("; ")))
    }
}

/// An ONNX Runtime error, as the text the model stages report.
pub fn run_err(e: impl std::fmt::Display) -> String {
    format!("ONNX Runtime: {e}")
}

/// Static dimensions of a named input (`-1` where dynamic).
pub fn input_shape(session: &Session, name: &str) -> Option<Vec<i64>> {
    session.inputs().iter().find(|o| o.name() == name).and_then(|o| o.dtype().tensor_shape()).map(|s| s.iter().copied().collect())
}

//! What libtorch itself says, for builds with the cargo feature `torch` (the `tch` crate):
//! which GPU backend the linked libtorch has and what it can see ([`report`], for
//! `gpuwarden probe`), and whether libtorch can load a checkpoint file and what tensors it holds
//! ([`verify_checkpoint`], for `gpuwarden checkpoint verify`).
//!
//! It is not how gpuwarden decides which checkpoint to resume from: that is
//! [`crate::checkpoints`], which reads headers and end records only, needs no libtorch and stays
//! cheap on multi-GB files. This module loads every tensor into memory (about twice the file's
//! size, briefly), so it is a tool a person runs, never something the supervisor does per
//! restart. It is also not a Python `torch.load`: libtorch's C++ loader reads only a plain
//! `dict` of tensors (`torch.save({name: tensor})`) and safetensors files; a `state_dict()`
//! (an `OrderedDict`), nested dicts, ints or Python objects make it fail, and that is reported
//! as a limit of libtorch ([`TorchError::Unsupported`]), not as corruption.
//!
//! Every file is checked with [`crate::checkpoints::validate`] before libtorch sees it, because
//! libtorch 2.11 does not fail on a torn `torch.save` zip: it reads past the end of its buffer
//! and the process dies with SIGSEGV (seen with `tests/data/checkpoints/torch_save/torn-*.pt`).

use std::fmt;
use std::path::{Path, PathBuf};

use serde::Serialize;
use tch::{Device, Kind, TchError, Tensor};

use crate::checkpoints::{self, Format};

/// Which GPU backend library of libtorch is loaded into this process.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Backend {
    /// Only `libtorch_cpu.so`: this build cannot use any GPU, whatever the machine has.
    Cpu,
    /// `libtorch_cuda.so`: an NVIDIA (CUDA) build of libtorch.
    Cuda,
    /// `libtorch_hip.so`: a ROCm build. ROCm builds present AMD GPUs through the CUDA API, so
    /// `cuda_available` and `cuda_device_count` describe AMD GPUs there.
    Rocm,
}

/// What the linked libtorch sees on this machine.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct TorchReport {
    pub backend: Backend,
    /// The directory `libtorch_cpu.so` was loaded from (`None` if `/proc/self/maps` could not be
    /// read). Tells which libtorch `LD_LIBRARY_PATH` or the rpath actually picked.
    pub libtorch_dir: Option<PathBuf>,
    /// `torch::cuda::is_available()`: a GPU is visible and its driver initialises.
    pub cuda_available: bool,
    /// `torch::cuda::device_count()`; honours `CUDA_VISIBLE_DEVICES` / `HIP_VISIBLE_DEVICES`.
    pub cuda_device_count: i64,
    /// `torch::cuda::cudnn_is_available()`: CUDA is available and cuDNN loads.
    pub cudnn_available: bool,
    /// The cuDNN version libtorch was built with (e.g. 91900 for 9.19.0), when cuDNN is available.
    pub cudnn_version: Option<i64>,
    /// The CUDA runtime version libtorch was built with (e.g. 13000 for 13.0), on CUDA builds.
    pub cuda_runtime_version: Option<i64>,
    /// libtorch's own HIP device type (`at::kHIP`). False on ROCm builds of PyTorch, which use
    /// the CUDA device type; see [`Backend::Rocm`].
    pub hip: bool,
    /// Threads libtorch uses for CPU work (`at::get_num_threads()`).
    pub cpu_threads: i32,
}

/// Asks the linked libtorch what it sees. Cheap (no tensor is made) but the first call
/// initialises the CUDA driver on a CUDA build, which takes up to a few seconds.
pub fn report() -> TorchReport {
    let maps = std::fs::read_to_string("/proc/self/maps").unwrap_or_default();
    let (backend, libtorch_dir) = backend_from_maps(&maps);
    let cuda_available = tch::Cuda::is_available();
    let cudnn_available = tch::Cuda::cudnn_is_available();
    TorchReport {
        backend,
        libtorch_dir,
        cuda_available,
        cuda_device_count: tch::Cuda::device_count(),
        cudnn_available,
        // Both version queries throw inside libtorch (and tch turns that into a panic) when the
        // CUDA library is not loaded, so they are asked only when it is.
        cudnn_version: cudnn_available.then(tch::utils::version_cudnn),
        cuda_runtime_version: (backend == Backend::Cuda && tch::utils::has_cudart())
            .then(tch::utils::version_cudart),
        hip: tch::utils::has_hip(),
        cpu_threads: tch::utils::get_num_threads(),
    }
}

/// Reads which libtorch libraries are mapped into this process from `/proc/self/maps` text.
///
/// Linking decides this, not the machine: a binary linked without `--no-as-needed` drops
/// `libtorch_cuda.so` and then sees no GPU even on a GPU machine (a classic tch pitfall), so the
/// report names the backend that is really loaded.
fn backend_from_maps(maps: &str) -> (Backend, Option<PathBuf>) {
    let mut backend = Backend::Cpu;
    let mut libtorch_dir = None;
    for line in maps.lines() {
        // The path is the sixth field and may itself contain spaces.
        let Some(path) = line.splitn(6, ' ').nth(5).map(str::trim_start) else {
            continue;
        };
        let path = Path::new(path);
        match path.file_name().and_then(|n| n.to_str()) {
            Some("libtorch_hip.so") => backend = Backend::Rocm,
            Some("libtorch_cuda.so") if backend == Backend::Cpu => backend = Backend::Cuda,
            Some("libtorch_cpu.so") if libtorch_dir.is_none() => {
                libtorch_dir = path.parent().map(Path::to_path_buf);
            }
            _ => {}
        }
    }
    (backend, libtorch_dir)
}

impl fmt::Display for TorchReport {
    /// Two or three lines for `gpuwarden probe`: what libtorch is, what it sees, and a verdict
    /// when it sees no GPU.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let backend = match self.backend {
            Backend::Cpu => "CPU-only build",
            Backend::Cuda => "CUDA build",
            Backend::Rocm => "ROCm build",
        };
        match &self.libtorch_dir {
            Some(dir) => writeln!(f, "libtorch: {backend}, loaded from {}", dir.display())?,
            None => writeln!(f, "libtorch: {backend}")?,
        }
        let gpus = match self.cuda_device_count {
            1 => "1 GPU".to_owned(),
            n => format!("{n} GPUs"),
        };
        write!(
            f,
            "libtorch sees: {gpus} (available: {}), cuDNN: {}, CPU threads: {}",
            yes_no(self.cuda_available),
            match self.cudnn_version {
                Some(v) => format!("yes, {}", cudnn_version_text(v)),
                None => yes_no(self.cudnn_available).to_owned(),
            },
            self.cpu_threads,
        )?;
        if let Some(v) = self.cuda_runtime_version {
            write!(f, ", CUDA runtime {}.{}", v / 1000, v % 1000 / 10)?;
        }
        match (self.backend, self.cuda_available) {
            (Backend::Cpu, _) => write!(
                f,
                "\nnote: this gpuwarden is linked against a CPU-only libtorch, so libtorch sees no \
                 GPU whatever the machine has; rebuild with LIBTORCH pointing at a CUDA or ROCm \
                 libtorch to check GPUs through it"
            ),
            (_, false) => write!(
                f,
                "\nnote: libtorch has GPU support but finds no usable GPU; check the driver \
                 (nvidia-smi / rocm-smi) and CUDA_VISIBLE_DEVICES / HIP_VISIBLE_DEVICES"
            ),
            _ => Ok(()),
        }
    }
}

fn yes_no(b: bool) -> &'static str {
    if b { "yes" } else { "no" }
}

/// cuDNN 9 encodes 9.19.0 as 91900 (major * 10000 + minor * 100 + patch); cuDNN 8 used
/// major * 1000 + minor * 100 + patch (8.9.7 = 8907).
fn cudnn_version_text(v: i64) -> String {
    if v >= 90000 {
        format!("{}.{}.{}", v / 10000, v % 10000 / 100, v % 100)
    } else {
        format!("{}.{}.{}", v / 1000, v % 1000 / 100, v % 100)
    }
}

/// What libtorch found in a checkpoint file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct CheckpointSummary {
    pub path: PathBuf,
    /// `torch.save zip` or `safetensors`.
    pub format: String,
    /// Sorted by name.
    pub tensors: Vec<TensorSummary>,
    /// Sum of the tensors' `bytes` (those of a known dtype).
    pub total_bytes: u64,
}

impl fmt::Display for CheckpointSummary {
    /// A heading line, then one line per tensor: name, dtype, shape, bytes.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let count = match self.tensors.len() {
            1 => "1 tensor".to_owned(),
            n => format!("{n} tensors"),
        };
        write!(
            f,
            "{}: {}, {count}, {} bytes, loaded by libtorch on the CPU",
            self.path.display(),
            self.format,
            self.total_bytes
        )?;
        let width = self.tensors.iter().map(|t| t.name.len()).max().unwrap_or(0);
        for t in &self.tensors {
            let shape: Vec<String> = t.shape.iter().map(i64::to_string).collect();
            let bytes = t.bytes.map_or_else(|| "?".to_owned(), |b| b.to_string());
            write!(
                f,
                "\n  {:<width$}  {:<9} {:<16} {bytes:>10}",
                t.name,
                t.dtype,
                format!("[{}]", shape.join(", ")),
            )?;
        }
        Ok(())
    }
}

/// One tensor of a checkpoint.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct TensorSummary {
    pub name: String,
    pub shape: Vec<i64>,
    /// PyTorch's name for the dtype (`float32`, `bfloat16`, ...), or `scalar type N` for a dtype
    /// this tch version does not know.
    pub dtype: String,
    /// Elements times element size; `None` for an unknown dtype.
    pub bytes: Option<u64>,
}

/// Why libtorch could not verify a checkpoint.
#[derive(Debug, thiserror::Error)]
pub enum TorchError {
    /// The file failed gpuwarden's completeness check, so libtorch was not asked to load it
    /// (libtorch crashes on a torn zip instead of failing).
    #[error(
        "{} is not a complete checkpoint: {reason}; libtorch was not asked to load it. Resume from \
         an earlier checkpoint",
        path.display()
    )]
    NotComplete { path: PathBuf, reason: String },
    /// A checkpoint directory (HF Trainer, DeepSpeed, DCP) rather than one file.
    #[error(
        "{} is a {format} checkpoint directory; libtorch loads one file at a time: pass a file \
         inside it (for example its model.safetensors or a *.pt file)",
        path.display()
    )]
    Directory { path: PathBuf, format: Format },
    /// A complete file whose content libtorch's C++ loader cannot read.
    #[error(
        "{} is complete, but libtorch cannot load it: {why}. This is a limit of libtorch's C++ \
         loader, not corruption; to inspect it, use Python: torch.load(path, map_location=\"cpu\")",
        path.display()
    )]
    Unsupported { path: PathBuf, why: String },
    /// libtorch failed for another reason; `detail` is libtorch's message, first line only.
    #[error(
        "libtorch failed to load {}: {detail}. gpuwarden's own check found the file complete; \
         if Python's torch.load(path, map_location=\"cpu\") also fails, the file is damaged",
        path.display()
    )]
    Load { path: PathBuf, detail: String },
}

/// Loads the checkpoint file at `path` with libtorch, on the CPU (tensors saved from a GPU are
/// mapped to the CPU, so this works on a machine without one), and lists its tensors.
///
/// Loads: `torch.save` zip files holding a plain `dict` of tensors, and safetensors files.
/// Everything else gets a [`TorchError`] that says which of these it is: not complete (torn),
/// a directory, a content libtorch cannot read (`state_dict()` `OrderedDict`s, nested dicts,
/// ints, Python objects, the legacy pre-zip format), or another libtorch failure.
pub fn verify_checkpoint(path: &Path) -> Result<CheckpointSummary, TorchError> {
    let format = checkpoints::validate(path).map_err(|e| TorchError::NotComplete {
        path: path.to_path_buf(),
        reason: e.reason,
    })?;
    let loaded = match format {
        Format::TorchZip => Tensor::loadz_multi_with_device(path, Device::Cpu),
        Format::Safetensors => Tensor::read_safetensors(path),
        Format::TorchLegacy => {
            return Err(TorchError::Unsupported {
                path: path.to_path_buf(),
                why: "it is in torch.save's legacy format (_use_new_zipfile_serialization=False), \
                      which only Python reads; libtorch reads the zip format that torch.save \
                      writes by default"
                    .to_owned(),
            });
        }
        Format::HfTrainer | Format::DeepSpeed | Format::Dcp => {
            return Err(TorchError::Directory {
                path: path.to_path_buf(),
                format,
            });
        }
    };
    let mut tensors = loaded.map_err(|e| classify_load_error(path, &e))?;
    // libtorch hands a torch.save dict back through a std::map and safetensors through a hash
    // map, so neither keeps the file's order: sort by name for a stable listing.
    tensors.sort_by(|a, b| a.0.cmp(&b.0));
    let tensors = tensors
        .iter()
        .map(|(name, tensor)| summarize(name, tensor))
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| TorchError::Load {
            path: path.to_path_buf(),
            detail: first_line(&e.to_string()),
        })?;
    Ok(CheckpointSummary {
        path: path.to_path_buf(),
        format: format.to_string(),
        total_bytes: tensors.iter().filter_map(|t| t.bytes).sum(),
        tensors,
    })
}

fn summarize(name: &str, tensor: &Tensor) -> Result<TensorSummary, TchError> {
    let shape = tensor.size();
    let elements: u64 = shape.iter().map(|&d| d.unsigned_abs()).product();
    let (dtype, bytes) = match tensor.f_kind() {
        Ok(kind) => (
            dtype_name(kind).to_owned(),
            Some(elements * kind.elt_size_in_bytes() as u64),
        ),
        Err(TchError::UnknownKind(code)) => (format!("scalar type {code}"), None),
        Err(e) => return Err(e),
    };
    Ok(TensorSummary {
        name: name.to_owned(),
        shape,
        dtype,
        bytes,
    })
}

/// PyTorch's Python name for a dtype, which is what the user wrote in their training code.
fn dtype_name(kind: Kind) -> &'static str {
    match kind {
        Kind::Uint8 => "uint8",
        Kind::Int8 => "int8",
        Kind::Int16 => "int16",
        Kind::Int => "int32",
        Kind::Int64 => "int64",
        Kind::Half => "float16",
        Kind::Float => "float32",
        Kind::Double => "float64",
        Kind::ComplexHalf => "complex32",
        Kind::ComplexFloat => "complex64",
        Kind::ComplexDouble => "complex128",
        Kind::Bool => "bool",
        Kind::QInt8 => "qint8",
        Kind::QUInt8 => "quint8",
        Kind::QInt32 => "qint32",
        Kind::BFloat16 => "bfloat16",
        Kind::Float8e5m2 => "float8_e5m2",
        Kind::Float8e4m3fn => "float8_e4m3fn",
        Kind::Float8e5m2fnuz => "float8_e5m2fnuz",
        Kind::Float8e4m3fnuz => "float8_e4m3fnuz",
    }
}

/// Turns libtorch's exception text (one line, then a C++ backtrace) into a [`TorchError`].
///
/// The messages below are what libtorch 2.11's `torch::jit::_load_parameters` says for the real
/// files in `tests/data/checkpoints` that were saved complete; none of them means the file is
/// damaged, only that it holds more than a flat dict of tensors.
fn classify_load_error(path: &Path, error: &TchError) -> TorchError {
    let message = first_line(&error.to_string());
    let why = if message.contains("Expected GenericDict but got None") {
        // A state_dict() is a collections.OrderedDict; libtorch's unpickler stands a None in
        // for that class, so the first item stored into it fails.
        Some("it holds a state_dict() (collections.OrderedDict), which libtorch's unpickler cannot rebuild; it reads only a plain dict of tensors, as saved by torch.save({name: tensor for ...})".to_owned())
    } else if let Some(got) = message
        .split_once("Expected Tensor but got ")
        .map(|(_, got)| got.trim())
    {
        Some(format!(
            "it holds a value that is not a tensor ({got}) where libtorch expects a plain dict of tensors, as saved by torch.save({{name: tensor for ...}})"
        ))
    } else if message.contains("is not supported in the parser") {
        Some(format!(
            "it holds a pickled Python object ({message}), which only Python can rebuild"
        ))
    } else if message.contains("Unrecognized data format") {
        Some("libtorch does not recognise the file's format".to_owned())
    } else {
        None
    };
    match why {
        Some(why) => TorchError::Unsupported {
            path: path.to_path_buf(),
            why,
        },
        None => TorchError::Load {
            path: path.to_path_buf(),
            detail: message,
        },
    }
}

/// The first line of a libtorch message, without tch's `Internal torch error: ` prefix; the
/// rest is a C++ backtrace of libtorch's internals, useless to the user.
fn first_line(message: &str) -> String {
    let line = message.lines().next().unwrap_or_default();
    line.strip_prefix("Internal torch error: ")
        .unwrap_or(line)
        .trim()
        .to_owned()
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    /// The real checkpoints written by PyTorch 2.11, Lightning, transformers and safetensors
    /// (see its README.md).
    fn data(rel: &str) -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("tests/data/checkpoints")
            .join(rel)
    }

    fn unsupported_why(rel: &str) -> String {
        match verify_checkpoint(&data(rel)) {
            Err(TorchError::Unsupported { why, .. }) => why,
            other => panic!("{rel}: expected Unsupported, got {other:?}"),
        }
    }

    #[test]
    fn safetensors_file_lists_its_tensors_with_shapes_dtypes_and_bytes() {
        let summary = verify_checkpoint(&data("safetensors/model.safetensors")).unwrap();
        assert_eq!(summary.format, "safetensors");
        let listed: Vec<(&str, &[i64], &str)> = summary
            .tensors
            .iter()
            .map(|t| (t.name.as_str(), t.shape.as_slice(), t.dtype.as_str()))
            .collect();
        assert_eq!(
            listed,
            [
                ("0.bias", &[8][..], "float32"),
                ("0.weight", &[8, 19, 5][..], "float32"),
                ("3.bias", &[2][..], "float32"),
                ("3.weight", &[2, 480][..], "float32"),
            ]
        );
        assert_eq!(summary.tensors[1].bytes, Some(8 * 19 * 5 * 4));
        // (8 + 760 + 2 + 960) float32 values: the file's 7224 bytes less header and metadata.
        assert_eq!(summary.total_bytes, 1730 * 4);
    }

    /// A plain dict of CUDA tensors, written by PyTorch 2.11 on an H200 (tests/data/libtorch):
    /// the one torch.save layout libtorch reads, mapped to the CPU here.
    #[test]
    fn flat_dict_of_cuda_tensors_loads_on_the_cpu() {
        let path =
            Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/libtorch/flat-dict-cuda.pt");
        let summary = verify_checkpoint(&path).unwrap();
        assert_eq!(summary.format, "torch.save zip");
        assert_eq!(summary.tensors.len(), 24);
        // What Python's torch.load reports for the same file: sum of numel * element_size.
        assert_eq!(summary.total_bytes, 6672);
        let find = |name: &str| summary.tensors.iter().find(|t| t.name == name).unwrap();
        let spatial = find("features.2.weight");
        assert_eq!(
            (spatial.shape.as_slice(), spatial.dtype.as_str()),
            (&[16, 1, 19, 1][..], "float32")
        );
        assert_eq!(find("extra.bf16").dtype, "bfloat16");
        assert_eq!(find("extra.half").bytes, Some(8));
        let counter = find("features.1.num_batches_tracked");
        assert_eq!((counter.shape.len(), counter.dtype.as_str()), (0, "int64"));
        assert_eq!(counter.bytes, Some(8));
        let names: Vec<&str> = summary.tensors.iter().map(|t| t.name.as_str()).collect();
        assert!(names.is_sorted(), "{names:?}");

        let text = summary.to_string();
        let mut lines = text.lines();
        let heading = lines.next().unwrap();
        assert!(heading.ends_with("flat-dict-cuda.pt: torch.save zip, 24 tensors, 6672 bytes, loaded by libtorch on the CPU"), "{heading}");
        let spatial_line = lines.find(|l| l.contains("features.2.weight")).unwrap();
        let fields: Vec<&str> = spatial_line.split_whitespace().collect();
        assert_eq!(
            fields,
            [
                "features.2.weight",
                "float32",
                "[16,",
                "1,",
                "19,",
                "1]",
                "1216"
            ]
        );
        assert_eq!(text.lines().count(), 25);
    }

    #[test]
    fn hf_trainer_weights_load_from_the_file_but_not_the_directory() {
        let summary = verify_checkpoint(&data("hf/checkpoint-3/model.safetensors")).unwrap();
        assert_eq!(summary.tensors.len(), 25);
        assert!(
            summary
                .tensors
                .iter()
                .any(|t| t.name == "bert.embeddings.word_embeddings.weight" && t.shape == [50, 16])
        );
        let err = verify_checkpoint(&data("hf/checkpoint-3")).unwrap_err();
        assert!(matches!(
            err,
            TorchError::Directory {
                format: Format::HfTrainer,
                ..
            }
        ));
        assert!(err.to_string().contains("pass a file inside it"), "{err}");
    }

    #[test]
    fn dcp_directory_is_refused_as_a_directory() {
        let err = verify_checkpoint(&data("dcp/step-15")).unwrap_err();
        assert!(
            matches!(
                err,
                TorchError::Directory {
                    format: Format::Dcp,
                    ..
                }
            ),
            "{err:?}"
        );
    }

    /// Regression: libtorch 2.11 segfaults on these files (its zip reader runs past the end of
    /// the buffer); reaching the assertions at all proves they never got to libtorch.
    #[test]
    fn torn_files_are_reported_as_torn_without_reaching_libtorch() {
        for rel in [
            "torch_save/torn-step00017.pt",
            "torch_save/torn-tail-step00018.pt",
            "safetensors/torn.safetensors",
        ] {
            let err = verify_checkpoint(&data(rel)).unwrap_err();
            assert!(
                matches!(err, TorchError::NotComplete { .. }),
                "{rel}: {err:?}"
            );
            assert!(err.to_string().contains("earlier checkpoint"), "{err}");
        }
    }

    #[test]
    fn missing_file_says_so() {
        let err = verify_checkpoint(&data("torch_save/no-such-file.pt")).unwrap_err();
        assert!(err.to_string().contains("does not exist"), "{err}");
    }

    #[test]
    fn state_dict_checkpoints_are_a_libtorch_limit_not_corruption() {
        for rel in [
            "torch_save/ckpt-step00015.pt",
            // Storages tagged cuda:0: mapped to the CPU, then the same OrderedDict limit.
            "torch_save/cuda-tensors-step00020.pt",
            "lightning/epoch=0-step=4.ckpt",
            "lightning/last.ckpt",
        ] {
            let why = unsupported_why(rel);
            assert!(
                why.contains("state_dict() (collections.OrderedDict)"),
                "{rel}: {why}"
            );
        }
        let err = verify_checkpoint(&data("torch_save/ckpt-step00015.pt")).unwrap_err();
        let text = err.to_string();
        assert!(text.contains("not corruption"), "{text}");
        assert!(text.contains("map_location"), "{text}");
        // libtorch's "INTERNAL ASSERT FAILED ... please report a bug" and its C++ backtrace are
        // noise for the user.
        assert!(
            !text.contains("report a bug") && !text.contains("frame #"),
            "{text}"
        );
    }

    #[test]
    fn non_tensor_values_and_python_objects_are_named() {
        assert!(unsupported_why("zip64/zip64-step00030.pt").contains("not a tensor (Int)"));
        assert!(
            unsupported_why("hf/checkpoint-3/optimizer.pt").contains("not a tensor (GenericDict)")
        );
        assert!(
            unsupported_why("hf/checkpoint-3/scheduler.pt").contains("not a tensor (GenericList)")
        );
        let why = unsupported_why("hf/checkpoint-3/training_args.bin");
        assert!(
            why.contains("pickled Python object") && why.contains("transformers"),
            "{why}"
        );
    }

    #[test]
    fn legacy_format_is_refused_before_libtorch() {
        assert!(unsupported_why("torch_save/legacy-step00010.pt").contains("legacy format"));
    }

    #[test]
    fn other_libtorch_failures_keep_libtorch_first_line_only() {
        // rng_state.pth holds numpy state, which the C++ unpickler trips over in its own way.
        match verify_checkpoint(&data("hf/checkpoint-3/rng_state.pth")).unwrap_err() {
            TorchError::Load { detail, .. } => {
                assert!(!detail.contains('\n') && !detail.is_empty(), "{detail}");
                assert!(!detail.starts_with("Internal torch error"), "{detail}");
            }
            other => panic!("expected Load, got {other:?}"),
        }
    }

    #[test]
    fn report_is_consistent_with_the_linked_libtorch() {
        let report = report();
        let dir = report
            .libtorch_dir
            .clone()
            .expect("libtorch_cpu.so is mapped");
        assert!(dir.join("libtorch_cpu.so").exists(), "{}", dir.display());
        assert_eq!(report.cuda_available, report.cuda_device_count > 0);
        assert!(report.cpu_threads >= 1);
        let text = report.to_string();
        let json = serde_json::to_value(&report).unwrap();
        if report.backend == Backend::Cpu {
            assert!(!report.cuda_available && report.cudnn_version.is_none());
            assert!(
                text.contains("CPU-only build") && text.contains("rebuild"),
                "{text}"
            );
            assert_eq!(json["backend"], "cpu");
        }
        assert!(text.contains(&dir.display().to_string()), "{text}");
    }

    #[test]
    fn backend_is_read_from_the_mapped_libraries() {
        let cpu = "7f00-7f01 r-xp 00000000 fd:00 12 /opt/libtorch/lib/libtorch_cpu.so\n\
                   7f02-7f03 r--p 00000000 fd:00 13 /opt/libtorch/lib/libc10.so\n\
                   7ffd-7ffe rw-p 00000000 00:00 0                          [stack]\n";
        assert_eq!(
            backend_from_maps(cpu),
            (Backend::Cpu, Some(PathBuf::from("/opt/libtorch/lib")))
        );
        let cuda = format!(
            "{cpu}7f04-7f05 r-xp 00000000 fd:00 14   /my envs/torch/lib/libtorch_cuda.so\n"
        );
        assert_eq!(backend_from_maps(&cuda).0, Backend::Cuda);
        // ROCm wheels load libtorch_hip.so (and no libtorch_cuda.so); either order wins.
        let rocm = format!("{cpu}7f06-7f07 r-xp 00000000 fd:00 15 /r/lib/libtorch_hip.so\n");
        assert_eq!(backend_from_maps(&rocm).0, Backend::Rocm);
        assert_eq!(backend_from_maps(""), (Backend::Cpu, None));
    }

    #[test]
    fn cudnn_versions_read_as_people_write_them() {
        assert_eq!(cudnn_version_text(91900), "9.19.0");
        assert_eq!(cudnn_version_text(8907), "8.9.7");
    }
}

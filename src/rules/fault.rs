//! The vocabulary of a fault: which stream a line came from, what class of fault it is, how bad
//! it is and what the supervisor should do about it, and the `Fault` record that a matched line
//! becomes.
//!
//! This file only names things. It does not load rule files or match lines (see `file.rs` and
//! `mod.rs`), and it does not decide policy such as restart budgets or grace periods: that lives in
//! the supervisor, which reads `default_action`, `escalates_on_repeat` and `skips_gpu_tiers` here.

use std::collections::BTreeMap;
use std::fmt;

use serde::{Deserialize, Serialize};

/// Where a line came from. A rule lists the streams it applies to, so a rule written for kernel
/// log lines never fires on the job's stderr and the other way round.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Stream {
    /// The job's standard output.
    Stdout,
    /// The job's standard error.
    Stderr,
    /// The kernel log (`/dev/kmsg`).
    Kernel,
    /// The output of a GPU tool such as `rocm-smi` or `nvidia-smi`.
    Tool,
    /// Not a rule stream: the job's exit status itself (a crash signal is evidence of a fault
    /// whatever the logs said). No rule names it; `ALL` leaves it out.
    Exit,
    /// Not a rule stream: the absence of progress (no output and no new checkpoint for the
    /// stall timeout). No rule names it; `ALL` leaves it out.
    Progress,
}

impl Stream {
    /// Every stream, in the order of their index (`stream as usize`).
    pub const ALL: [Stream; 4] = [Stream::Stdout, Stream::Stderr, Stream::Kernel, Stream::Tool];

    /// The name used in rule files and in JSON output.
    pub fn as_str(self) -> &'static str {
        match self {
            Stream::Stdout => "stdout",
            Stream::Stderr => "stderr",
            Stream::Kernel => "kernel",
            Stream::Tool => "tool",
            Stream::Exit => "exit",
            Stream::Progress => "progress",
        }
    }

    /// The stream with this rule-file name, if there is one.
    pub fn from_name(name: &str) -> Option<Stream> {
        Stream::ALL.into_iter().find(|s| s.as_str() == name)
    }
}

impl fmt::Display for Stream {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// How bad a fault is.
///
/// The order of the variants matters: it is the derived `Ord`, lowest first. When several rules
/// match one line, the one with the highest severity wins, so reordering these changes which rule
/// classifies a line.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Severity {
    Info,
    Warning,
    Error,
    Critical,
}

impl Severity {
    /// Every severity, lowest first.
    pub const ALL: [Severity; 4] = [
        Severity::Info,
        Severity::Warning,
        Severity::Error,
        Severity::Critical,
    ];

    /// The name used in rule files and in JSON output.
    pub fn as_str(self) -> &'static str {
        match self {
            Severity::Info => "info",
            Severity::Warning => "warning",
            Severity::Error => "error",
            Severity::Critical => "critical",
        }
    }

    /// The severity with this rule-file name, if there is one.
    pub fn from_name(name: &str) -> Option<Severity> {
        Severity::ALL.into_iter().find(|s| s.as_str() == name)
    }
}

impl fmt::Display for Severity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What the supervisor should do about a fault.
///
/// The order of the variants matters: it is the derived `Ord`, mildest first. When several faults
/// hit one attempt, the supervisor keeps the highest action, so a `Stop` is never downgraded to a
/// `Restart` by a later, milder fault.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Action {
    /// Record the fault; keep the job running.
    Note,
    /// Stop the job and start it again on the same tier.
    Restart,
    /// Stop the job and start it again one step down the fallback ladder.
    Fallback,
    /// Stop the job and do not start it again: retrying cannot help.
    Stop,
}

impl Action {
    /// Every action, mildest first.
    pub const ALL: [Action; 4] = [
        Action::Note,
        Action::Restart,
        Action::Fallback,
        Action::Stop,
    ];

    /// The name used in rule files and in JSON output.
    pub fn as_str(self) -> &'static str {
        match self {
            Action::Note => "note",
            Action::Restart => "restart",
            Action::Fallback => "fallback",
            Action::Stop => "stop",
        }
    }

    /// The action with this rule-file name, if there is one.
    pub fn from_name(name: &str) -> Option<Action> {
        Action::ALL.into_iter().find(|a| a.as_str() == name)
    }
}

impl fmt::Display for Action {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The kind of fault a rule recognises. The table in `corpus/CLASSES.md` describes each class
/// with real examples; the class decides the default action.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FaultClass {
    /// The GPU touched memory it may not: page/VM/MMU faults, illegal or misaligned address.
    GpuMemoryFault,
    /// A shader or engine exception that is not plainly a memory fault.
    GpuException,
    /// No usable kernel for this GPU's architecture.
    GpuUnsupportedKernel,
    /// The GPU stopped making progress.
    GpuHang,
    /// The driver reset the GPU; work on it is lost.
    GpuReset,
    /// The GPU is gone or needs a reset or reboot.
    GpuLost,
    /// Uncorrectable memory errors, row remapping, page retirement.
    GpuEcc,
    /// NVLink, NVSwitch, XGMI or peer-memory errors.
    GpuInterconnect,
    /// GPU memory exhausted.
    GpuOom,
    /// A GPU library or runtime call failed.
    GpuRuntimeError,
    /// The kernel driver or firmware failed.
    GpuDriverError,
    /// No GPU can be used at all.
    GpuUnavailable,
    /// The job's own device-side assertion: a bug the CPU will hit too.
    DeviceAssert,
    /// NCCL/RCCL errors and collective timeouts.
    CollectiveFailure,
    /// The kernel's OOM killer took a process.
    HostOom,
    /// The job crashed without a GPU-specific message.
    ProcessCrash,
    /// The job stopped making progress (no output, no new checkpoint for the stall timeout)
    /// on a tier without a GPU: a deadlock or a stuck data loader rather than a GPU hang. No
    /// rule file names it; the supervisor's stall timeout raises it.
    JobStalled,
}

impl FaultClass {
    /// Every class, in the order of `CLASSES.md`.
    pub const ALL: [FaultClass; 17] = [
        FaultClass::GpuMemoryFault,
        FaultClass::GpuException,
        FaultClass::GpuUnsupportedKernel,
        FaultClass::GpuHang,
        FaultClass::GpuReset,
        FaultClass::GpuLost,
        FaultClass::GpuEcc,
        FaultClass::GpuInterconnect,
        FaultClass::GpuOom,
        FaultClass::GpuRuntimeError,
        FaultClass::GpuDriverError,
        FaultClass::GpuUnavailable,
        FaultClass::DeviceAssert,
        FaultClass::CollectiveFailure,
        FaultClass::HostOom,
        FaultClass::ProcessCrash,
        FaultClass::JobStalled,
    ];

    /// The name used in rule files and in JSON output (`gpu_memory_fault`).
    pub fn as_str(self) -> &'static str {
        match self {
            FaultClass::GpuMemoryFault => "gpu_memory_fault",
            FaultClass::GpuException => "gpu_exception",
            FaultClass::GpuUnsupportedKernel => "gpu_unsupported_kernel",
            FaultClass::GpuHang => "gpu_hang",
            FaultClass::GpuReset => "gpu_reset",
            FaultClass::GpuLost => "gpu_lost",
            FaultClass::GpuEcc => "gpu_ecc",
            FaultClass::GpuInterconnect => "gpu_interconnect",
            FaultClass::GpuOom => "gpu_oom",
            FaultClass::GpuRuntimeError => "gpu_runtime_error",
            FaultClass::GpuDriverError => "gpu_driver_error",
            FaultClass::GpuUnavailable => "gpu_unavailable",
            FaultClass::DeviceAssert => "device_assert",
            FaultClass::CollectiveFailure => "collective_failure",
            FaultClass::HostOom => "host_oom",
            FaultClass::ProcessCrash => "process_crash",
            FaultClass::JobStalled => "job_stalled",
        }
    }

    /// The class with this rule-file name, if there is one.
    pub fn from_name(name: &str) -> Option<FaultClass> {
        FaultClass::ALL.into_iter().find(|c| c.as_str() == name)
    }

    /// The action for a fault of this class when its rule names none (`CLASSES.md`).
    ///
    /// Excluding a lost, ECC-failing or badly linked device, and moving to a safer setup after an
    /// OOM, are both one step down the fallback ladder, which is why they map to `Fallback`.
    pub fn default_action(self) -> Action {
        match self {
            FaultClass::GpuMemoryFault
            | FaultClass::GpuException
            | FaultClass::GpuUnsupportedKernel
            | FaultClass::GpuLost
            | FaultClass::GpuEcc
            | FaultClass::GpuInterconnect
            | FaultClass::GpuOom
            | FaultClass::GpuDriverError
            | FaultClass::GpuUnavailable => Action::Fallback,
            FaultClass::GpuHang
            | FaultClass::GpuReset
            | FaultClass::GpuRuntimeError
            | FaultClass::CollectiveFailure
            | FaultClass::HostOom
            | FaultClass::ProcessCrash
            | FaultClass::JobStalled => Action::Restart,
            FaultClass::DeviceAssert => Action::Stop,
        }
    }

    /// For the classes that get one plain restart: the action to take when the same class hits
    /// again on the same tier. A hang or a crash may be a fluke once; twice, the tier is suspect.
    /// A host OOM that repeats will repeat on every tier, so it stops instead.
    pub fn escalates_on_repeat(self) -> Option<Action> {
        match self {
            FaultClass::GpuHang
            | FaultClass::GpuRuntimeError
            | FaultClass::CollectiveFailure
            | FaultClass::ProcessCrash => Some(Action::Fallback),
            FaultClass::HostOom => Some(Action::Stop),
            _ => None,
        }
    }

    /// Whether a fault of this class, when it names GPUs, says something against those GPUs
    /// rather than against the job or the setup: then the ladder's first step down is to hide
    /// them and keep training on the others (issue 14). An OOM, a crash or a collective timeout
    /// naming `cuda:1` is the job's size or a peer's trouble, not GPU 1's.
    pub fn blames_the_device(self) -> bool {
        matches!(
            self,
            FaultClass::GpuMemoryFault
                | FaultClass::GpuException
                | FaultClass::GpuUnsupportedKernel
                | FaultClass::GpuHang
                | FaultClass::GpuReset
                | FaultClass::GpuLost
                | FaultClass::GpuEcc
                | FaultClass::GpuInterconnect
                | FaultClass::GpuDriverError
                | FaultClass::GpuUnavailable
        )
    }

    /// Whether a fault of this class rules out every GPU tier on the same architecture (or every
    /// GPU tier at all): no kernel image for this GPU, or no usable GPU. Retrying on the same kind
    /// of GPU cannot help, so the ladder jumps past those tiers.
    pub fn skips_gpu_tiers(self) -> bool {
        matches!(
            self,
            FaultClass::GpuUnsupportedKernel | FaultClass::GpuUnavailable
        )
    }
}

impl fmt::Display for FaultClass {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A line that a rule recognised: what the supervisor acts on and what the journal records.
#[derive(Clone, Debug, Serialize)]
pub struct Fault {
    /// The id of the rule that won.
    pub rule: String,
    pub class: FaultClass,
    pub severity: Severity,
    /// The rule's action, or its class's default action when the rule names none.
    pub action: Action,
    pub stream: Stream,
    /// The line as matched (without a trailing `\r` or `\n`).
    pub line: String,
    /// The named groups of the rule's regex that took part in the match (pid, process, pci,
    /// node, xid, address).
    pub captures: BTreeMap<String, String>,
    /// What a person can do about it.
    pub advice: String,
    /// For a kernel-log line: the record's facility (`kernel`, or `user` for a record written
    /// into /dev/kmsg from user space).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub facility: Option<String>,
    /// For a line from outside the job's own output: why it was judged to concern the job.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub attribution: Option<String>,
    /// The GPUs of the attempt the fault names (a PCI address, a KFD node, a `cuda:N`), as the
    /// job sees them; empty when it names none. Filled in by the executor
    /// (`crate::devices::named`), never by a rule.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub gpus: Vec<crate::gpu::JobGpu>,
}

#[cfg(test)]
impl Fault {
    /// A critical fault with the `fallback` action, no advice and nothing attributed yet: what
    /// the tests of the modules that read faults (`devices`, `supervisor::outside`) start from.
    pub(crate) fn for_test(
        rule: &str,
        class: FaultClass,
        stream: Stream,
        line: &str,
        captures: &[(&str, &str)],
    ) -> Fault {
        Fault {
            rule: rule.to_string(),
            class,
            severity: Severity::Critical,
            action: Action::Fallback,
            stream,
            line: line.to_string(),
            captures: captures
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            advice: String::new(),
            facility: None,
            attribution: None,
            gpus: Vec::new(),
        }
    }
}

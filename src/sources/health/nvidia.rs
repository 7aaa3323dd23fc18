//! NVIDIA GPUs through `nvidia-smi --query-gpu=... --format=csv,noheader,nounits`: one call
//! gives the inventory and one sample of every GPU (about 20 ms on an H100 machine).
//!
//! nvidia-smi reports trouble in three ways, and all three are health, not parse errors:
//! - in a field: `[N/A]` and `[Not Supported]` (not reported: ECC on a GeForce card), versus
//!   `[Unknown Error]`, `ERR!` and `[GPU is lost]` (the driver failed to read it);
//! - as a line instead of a row: `Unable to determine the device handle for GPU 0000:0B:00.0:
//!   Unknown Error` (or `: GPU is lost. Reboot the system to recover this GPU`);
//! - as the whole output: `NVIDIA-SMI has failed because it couldn't communicate with the NVIDIA
//!   driver`, `Failed to initialize NVML: Driver/library version mismatch`.
//!
//! A call that hangs is the sampler's business (see `tool`). The parser also reads the output
//! with a header and units (`--format=csv`), mapping columns by name, since that is how such
//! output is usually posted and saved.

use std::sync::OnceLock;

use regex::Regex;

use super::{
    EccCount, GpuSample, HealthFaultKind, Problem, Reading, SourceKind, Value, normalize_pci,
    parse_number,
};
use crate::gpu::{Gpu, Vendor};
use crate::rules::FaultClass;

/// The fields asked for, in order.
pub const QUERY_FIELDS: [&str; 12] = [
    "index",
    "uuid",
    "name",
    "pci.bus_id",
    "compute_cap",
    "memory.used",
    "memory.total",
    "utilization.gpu",
    "temperature.gpu",
    "power.draw",
    "ecc.errors.uncorrected.volatile.total",
    "driver_version",
];

/// The arguments of one sampling call.
pub fn query_args() -> Vec<String> {
    vec![
        format!("--query-gpu={}", QUERY_FIELDS.join(",")),
        "--format=csv,noheader,nounits".to_owned(),
    ]
}

const MIB: f64 = 1024.0 * 1024.0;

/// What one call of nvidia-smi told: the inventory and the reading.
#[derive(Clone, Debug, PartialEq)]
pub struct NvidiaOutput {
    pub gpus: Vec<Gpu>,
    pub reading: Reading,
}

/// Parses nvidia-smi's standard output and standard error of one query call.
pub fn parse_query(stdout: &str, stderr: &str) -> NvidiaOutput {
    let mut out = NvidiaOutput {
        gpus: Vec::new(),
        reading: Reading::new(SourceKind::NvidiaSmi),
    };
    let mut columns: Option<Vec<String>> = None;
    let mut rows = 0u32;
    for line in stdout.lines().chain(stderr.lines()) {
        let line = line.trim();
        if line.is_empty() {
            continue;
        }
        if let Some(problem) = message_problem(line) {
            if problem.pci.is_none() {
                // The driver could not be reached at all: no GPU answered.
                out.reading.answered = false;
            }
            out.reading.problems.push(problem);
            continue;
        }
        if line.starts_with("No devices were found") || is_continuation(line) {
            continue;
        }
        let fields: Vec<&str> = line.split(',').map(str::trim).collect();
        if fields.len() < 3 {
            out.reading.notes.push(format!(
                "nvidia-smi printed a line gpuwarden does not know: {line}"
            ));
            continue;
        }
        if columns.is_none() && is_header(&fields) {
            columns = Some(fields.iter().map(|f| column_name(f)).collect());
            continue;
        }
        let row = Row {
            fields: &fields,
            columns: columns.as_deref(),
        };
        match row.parse(rows) {
            Some((gpu, sample, lost)) => {
                if let Some(problem) = lost {
                    out.reading.problems.push(problem);
                }
                out.gpus.push(gpu);
                out.reading.gpus.push(sample);
                rows += 1;
            }
            None => out.reading.notes.push(format!(
                "nvidia-smi printed a row without a GPU index: {line}"
            )),
        }
    }
    out
}

/// The problem a whole-line message of nvidia-smi stands for, if it is one.
fn message_problem(line: &str) -> Option<Problem> {
    static HANDLE: OnceLock<Option<Regex>> = OnceLock::new();
    let handle = HANDLE.get_or_init(|| {
        Regex::new(r"Unable to determine the device handle for GPU ?([0-9A-Fa-f]+:[0-9A-Fa-f]+:[0-9A-Fa-f]+\.[0-9A-Fa-f])").ok()
    });
    if let Some(caps) = handle.as_ref().and_then(|re| re.captures(line)) {
        let lost = line.contains("GPU is lost");
        return Some(Problem {
            class: if lost {
                FaultClass::GpuLost
            } else {
                FaultClass::GpuUnavailable
            },
            kind: HealthFaultKind::ToolReported,
            pci: caps.get(1).and_then(|m| normalize_pci(m.as_str())),
            message: format!("nvidia-smi: {line}"),
        });
    }
    let unreachable = line.starts_with("NVIDIA-SMI has failed")
        || line.starts_with("Failed to initialize NVML")
        || line.contains("couldn't communicate with the NVIDIA driver");
    unreachable.then(|| Problem {
        class: FaultClass::GpuUnavailable,
        kind: HealthFaultKind::ToolReported,
        pci: None,
        message: format!("nvidia-smi: {line}"),
    })
}

/// The second line of nvidia-smi's "couldn't communicate" message, when it is split.
fn is_continuation(line: &str) -> bool {
    line.starts_with("Make sure that the latest NVIDIA driver")
}

/// A header row: its first field names a query field rather than holding a value.
fn is_header(fields: &[&str]) -> bool {
    let first = column_name(fields[0]);
    QUERY_FIELDS.contains(&first.as_str())
        || ["name", "gpu_name", "pci.bus_id", "gpu_bus_id"].contains(&first.as_str())
}

/// A header cell without its unit: `memory.total [MiB]` -> `memory.total`.
fn column_name(cell: &str) -> String {
    let name = cell.split(" [").next().unwrap_or(cell).trim();
    // nvidia-smi accepts aliases and prints its own name in the header.
    match name {
        "gpu_name" => "name",
        "gpu_bus_id" => "pci.bus_id",
        other => other,
    }
    .to_owned()
}

struct Row<'a> {
    fields: &'a [&'a str],
    /// Column names when the output had a header; the query's order otherwise.
    columns: Option<&'a [String]>,
}

impl Row<'_> {
    fn get(&self, name: &str) -> Option<&str> {
        let pos = match self.columns {
            Some(cols) => cols.iter().position(|c| c == name)?,
            None => QUERY_FIELDS.iter().position(|c| *c == name)?,
        };
        self.fields.get(pos).copied()
    }

    fn value(&self, name: &str) -> Value<f64> {
        match self.get(name) {
            Some(cell) => cell_value(cell),
            None => Value::Unknown,
        }
    }

    /// A text field (name, UUID, compute capability, driver version), unless it is missing,
    /// not reported or an error.
    fn text(&self, name: &str) -> Option<String> {
        self.get(name)
            .filter(|c| !not_reported(c) && !matches!(cell_value(c), Value::Error(_)))
            .map(str::to_owned)
    }

    /// The inventory record and the sample of one row; `row` is the index to use when the
    /// output has no index column. Also a problem when a field says the GPU is lost.
    fn parse(&self, row: u32) -> Option<(Gpu, GpuSample, Option<Problem>)> {
        let index = match self.get("index") {
            Some(cell) => cell.parse().ok()?,
            None => row,
        };
        let pci = self.get("pci.bus_id").and_then(normalize_pci);
        let mib = |v: Value<f64>| match v {
            Value::Known(m) => Value::Known((m * MIB) as u64),
            Value::Unknown => Value::Unknown,
            Value::Error(e) => Value::Error(e),
        };
        let gpu = Gpu {
            vendor: Vendor::Nvidia,
            index,
            name: self.text("name"),
            pci: pci.clone(),
            device_id: None,
            kfd_node: None,
            render_minor: None,
            gfx_target: None,
            compute_capability: self.text("compute_cap"),
            uuid: self.text("uuid"),
            vram_total_bytes: mib(self.value("memory.total")).known(),
            driver_version: self.text("driver_version"),
        };
        let mut sample = GpuSample::blank(&gpu);
        sample.utilization_percent = self.value("utilization.gpu");
        sample.vram_used_bytes = mib(self.value("memory.used"));
        sample.vram_total_bytes = mib(self.value("memory.total"));
        sample.temperature_c = self.value("temperature.gpu");
        sample.power_w = self.value("power.draw");
        let ecc = match self.value("ecc.errors.uncorrected.volatile.total") {
            Value::Known(n) => Value::Known(n as u64),
            Value::Unknown => Value::Unknown,
            Value::Error(e) => Value::Error(e),
        };
        if !matches!(ecc, Value::Unknown) {
            sample.ecc.push(EccCount {
                block: "volatile total".to_owned(),
                uncorrectable: ecc,
                correctable: Value::Unknown,
            });
        }
        let lost = self
            .fields
            .iter()
            .any(|f| f.contains("GPU is lost"))
            .then(|| Problem {
                class: FaultClass::GpuLost,
                kind: HealthFaultKind::ToolReported,
                pci: pci.clone(),
                message: format!(
                    "nvidia-smi reports GPU {index}{} as lost",
                    pci.as_deref()
                        .map(|p| format!(" ({p})"))
                        .unwrap_or_default()
                ),
            });
        Some((gpu, sample, lost))
    }
}

/// One cell: a number (a unit after it is dropped: `20 %`, `5934 MiB`), not reported, or an
/// error the driver gave.
fn cell_value(cell: &str) -> Value<f64> {
    let cell = cell.trim();
    if not_reported(cell) {
        return Value::Unknown;
    }
    if cell == "ERR!" {
        return Value::Error(cell.to_owned());
    }
    if cell.starts_with('[') && cell.ends_with(']') {
        // `[Unknown Error]`, `[GPU is lost]`, `[GPU requires reset]`: the driver failed.
        return Value::Error(cell.to_owned());
    }
    let number = cell.split_whitespace().next().unwrap_or(cell);
    match parse_number(number) {
        Some(v) => Value::Known(v),
        None => Value::Unknown,
    }
}

/// The ways nvidia-smi says a field is not reported (normal for this GPU, not a failure).
fn not_reported(cell: &str) -> bool {
    matches!(
        cell.trim(),
        "" | "N/A" | "[N/A]" | "[Not Supported]" | "[Insufficient Permissions]"
    )
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::sources::health::fixture;

    #[test]
    fn the_query_asks_for_every_field_in_order() {
        let args = query_args();
        assert_eq!(
            args[0],
            "--query-gpu=index,uuid,name,pci.bus_id,compute_cap,memory.used,memory.total,\
             utilization.gpu,temperature.gpu,power.draw,ecc.errors.uncorrected.volatile.total,\
             driver_version"
        );
        assert_eq!(args[1], "--format=csv,noheader,nounits");
    }

    #[test]
    fn rows_of_a_real_h200_machine() {
        let out = parse_query(&fixture("nvidia-smi-query-gpu-gpuwarden-h200.txt"), "");
        let r = &out.reading;
        assert!(r.answered);
        assert!(r.problems.is_empty() && r.notes.is_empty(), "{r:?}");
        assert!(!out.gpus.is_empty());
        let g = &out.gpus[0];
        assert_eq!(g.vendor, Vendor::Nvidia);
        assert_eq!(g.index, 0);
        assert_eq!(g.name.as_deref(), Some("NVIDIA H200"));
        assert_eq!(g.compute_capability.as_deref(), Some("9.0"));
        assert!(g.uuid.as_deref().unwrap().starts_with("GPU-"));
        assert_eq!(g.pci.as_deref(), Some("0000:00:06.0"));
        assert_eq!(g.vram_total_bytes, Some(143_771 * 1024 * 1024));
        assert_eq!(g.driver_version.as_deref(), Some("580.159.04"));
        let s = &r.gpus[0];
        assert_eq!(s.utilization_percent, Value::Known(0.0));
        assert_eq!(s.vram_used_bytes, Value::Known(0));
        assert_eq!(s.temperature_c, Value::Known(39.0));
        assert_eq!(s.power_w, Value::Known(127.79));
        assert_eq!(s.arch.as_deref(), Some("9.0"));
        assert_eq!(s.ecc[0].uncorrectable, Value::Known(0));

        // The same call with header and units (`--format=csv`) reads the same.
        let with_header = parse_query(&fixture("nvidia-smi-query-gpu-csv-gpuwarden-h200.txt"), "");
        assert_eq!(with_header.gpus, out.gpus);
        assert_eq!(
            with_header.reading.gpus[0].temperature_c,
            Value::Known(39.0)
        );
        assert_eq!(with_header.reading.gpus[0].power_w, Value::Known(127.81));
    }

    #[test]
    fn output_with_header_and_units_is_read_by_column_name() {
        let out = parse_query(&fixture("nvidia-smi-query-gpu-csv-rtx2060.txt"), "");
        assert_eq!(out.gpus.len(), 1);
        let g = &out.gpus[0];
        assert_eq!(g.name.as_deref(), Some("GeForce RTX 2060"));
        assert_eq!(g.pci.as_deref(), Some("0000:09:00.0"));
        assert_eq!(g.driver_version.as_deref(), Some("460.91.03"));
        assert_eq!(g.vram_total_bytes, Some(5934 * 1024 * 1024));
        let s = &out.reading.gpus[0];
        assert_eq!(s.utilization_percent, Value::Known(20.0));
        assert_eq!(s.vram_used_bytes, Value::Known(682 * 1024 * 1024));
        assert_eq!(s.temperature_c, Value::Known(36.0));
        assert_eq!(s.power_w, Value::Unknown, "not asked for in that call");
        assert!(s.ecc.is_empty());
    }

    #[test]
    fn bad_state_messages_are_problems_of_the_right_class() {
        let text = fixture("nvidia-smi-bad-state-messages.txt");
        let problems: Vec<Problem> = text
            .lines()
            .filter(|l| !l.starts_with('#'))
            .flat_map(|l| parse_query(l, "").reading.problems)
            .collect();
        let classes: Vec<(FaultClass, Option<&str>)> = problems
            .iter()
            .map(|p| (p.class, p.pci.as_deref()))
            .collect();
        assert_eq!(
            classes,
            [
                (FaultClass::GpuUnavailable, Some("0000:0b:00.0")),
                (FaultClass::GpuUnavailable, Some("0000:07:00.0")),
                (FaultClass::GpuLost, Some("0000:02:00.0")),
                (FaultClass::GpuUnavailable, Some("0000:09:00.0")),
                (FaultClass::GpuUnavailable, None),
                (FaultClass::GpuUnavailable, None),
                (FaultClass::GpuUnavailable, None),
            ]
        );
        // The lone `[Unknown Error]` line (a one-field query) is a field, not a message.
        let lone = parse_query("[Unknown Error]\n", "");
        assert!(lone.reading.problems.is_empty());
        assert!(lone.gpus.is_empty());
    }

    #[test]
    fn a_driver_that_cannot_be_reached_means_no_gpu_answered() {
        let out = parse_query(
            "",
            "NVIDIA-SMI has failed because it couldn't communicate with the NVIDIA driver. \
             Make sure that the latest NVIDIA driver is installed and running.\n",
        );
        assert!(!out.reading.answered);
        assert_eq!(out.reading.problems[0].class, FaultClass::GpuUnavailable);
    }

    #[test]
    fn field_errors_are_errors_and_na_is_unknown() {
        // The V100 row of nvidia-smi-table-err-power-v100-partial.txt (power `ERR!`), as the
        // query would print it.
        let line = "1, GPU-x, Tesla V100-PCIE-16GB, 00008ED0:00:00.0, 7.0, 593, 16160, 0, 29, \
                    ERR!, [N/A], 470.82.01";
        let out = parse_query(line, "");
        let s = &out.reading.gpus[0];
        assert_eq!(s.power_w, Value::Error("ERR!".into()));
        assert_eq!(s.temperature_c, Value::Known(29.0));
        assert!(s.ecc.is_empty(), "[N/A] ECC is a card without ECC");
        assert_eq!(s.device.pci.as_deref(), Some("8ed0:00:00.0"));
        assert_eq!(s.errors(), [("power", "ERR!")]);

        let lost = "0, [Unknown Error], [Unknown Error], 00000000:02:00.0, [Unknown Error], \
                    [GPU is lost], [GPU is lost], [GPU is lost], [GPU is lost], [GPU is lost], \
                    [GPU is lost], 550.54.15";
        let out = parse_query(lost, "");
        assert_eq!(out.reading.problems.len(), 1);
        assert_eq!(out.reading.problems[0].class, FaultClass::GpuLost);
        assert_eq!(out.gpus[0].name, None);
        assert!(!out.reading.gpus[0].answers());
    }
}

//! AMD GPUs through `amd-smi metric --json` (ROCm 6 and later), the newer of the AMD tools and
//! the second path next to `rocm_smi`.
//!
//! amd-smi's JSON is a list of GPUs (`[{"gpu": 0, "usage": {...}, "power": {...}}]`; newer
//! versions wrap it as `{"gpu_data": [...]}`) whose numbers come as `{"value": 42, "unit": "%"}`
//! or as the bare string `"N/A"`, mixed in one list. Its plain output (`GPU: 0` then indented
//! `POWER:` / `SOCKET_POWER: 11 W` lines) is the same tree with the keys upper-cased, so it is
//! read into the same shape and goes through the same extraction: that also covers
//! `amd-smi metric -w`, which never prints JSON.
//!
//! `amd-smi metric` does not give PCI addresses; `amd-smi list` does (`BDF:`), and
//! [`parse_list`] reads it for the inventory.
//!
//! Not here: running the tool (the sampler), judging the values (the tracker).

use serde_json::{Map, Value as Json};

use super::{EccCount, GpuSample, Reading, SourceKind, Value, normalize_pci, parse_number};
use crate::gpu::{Gpu, Vendor};

/// The arguments of one sampling call.
pub const METRIC_ARGS: [&str; 7] = [
    "metric",
    "--usage",
    "--power",
    "--temperature",
    "--mem-usage",
    "--ecc",
    "--json",
];

/// The arguments of the inventory call.
pub const LIST_ARGS: [&str; 2] = ["list", "--json"];

/// What one `amd-smi metric` call told.
#[derive(Clone, Debug, PartialEq)]
pub struct AmdSmiOutput {
    pub gpus: Vec<Gpu>,
    pub reading: Reading,
}

/// Parses `amd-smi metric` output, JSON or plain. `known` is the inventory from
/// [`parse_list`] (PCI address and UUID by GPU index); it may be empty.
pub fn parse_metric(text: &str, known: &[Gpu]) -> AmdSmiOutput {
    let mut out = AmdSmiOutput {
        gpus: Vec::new(),
        reading: Reading::new(SourceKind::AmdSmi),
    };
    let Some(entries) = gpu_entries(text, &mut out.reading) else {
        out.reading.answered = false;
        return out;
    };
    for (pos, entry) in entries.iter().enumerate() {
        let index = entry
            .get("gpu")
            .and_then(Json::as_u64)
            .and_then(|i| u32::try_from(i).ok())
            .unwrap_or(pos as u32);
        let base = known.iter().find(|g| g.index == index);
        let vram_total = bytes(path(entry, &["mem_usage", "total_vram"]));
        let gpu = Gpu {
            vendor: Vendor::Amd,
            index,
            name: base.and_then(|g| g.name.clone()),
            pci: base.and_then(|g| g.pci.clone()),
            device_id: base.and_then(|g| g.device_id),
            kfd_node: None,
            render_minor: None,
            gfx_target: None,
            compute_capability: None,
            uuid: base.and_then(|g| g.uuid.clone()),
            vram_total_bytes: vram_total.known(),
            driver_version: base.and_then(|g| g.driver_version.clone()),
        };
        let mut s = GpuSample::blank(&gpu);
        s.utilization_percent = number(path(entry, &["usage", "gfx_activity"]));
        s.vram_used_bytes = bytes(path(entry, &["mem_usage", "used_vram"]));
        s.vram_total_bytes = vram_total;
        s.temperature_c = number(path(entry, &["temperature", "edge"]));
        s.hotspot_c = number(path(entry, &["temperature", "hotspot"]));
        // The key moved between versions: `socket_power` (6.x), `average_socket_power`,
        // `current_socket_power` (newer, on different cards).
        s.power_w = [
            "socket_power",
            "average_socket_power",
            "current_socket_power",
        ]
        .iter()
        .map(|k| number(path(entry, &["power", k])))
        .find(Value::is_known)
        .unwrap_or(Value::Unknown);
        s.ecc = ecc_counts(entry);
        out.gpus.push(gpu);
        out.reading.gpus.push(s);
    }
    out
}

/// The inventory of `amd-smi list` (JSON or plain): index, PCI address (`bdf`) and UUID.
pub fn parse_list(text: &str) -> Vec<Gpu> {
    let mut scratch = Reading::new(SourceKind::AmdSmi);
    let Some(entries) = gpu_entries(text, &mut scratch) else {
        return Vec::new();
    };
    entries
        .iter()
        .enumerate()
        .map(|(pos, e)| Gpu {
            vendor: Vendor::Amd,
            index: e
                .get("gpu")
                .and_then(Json::as_u64)
                .and_then(|i| u32::try_from(i).ok())
                .unwrap_or(pos as u32),
            name: None,
            pci: e.get("bdf").and_then(Json::as_str).and_then(normalize_pci),
            device_id: None,
            kfd_node: None,
            render_minor: None,
            gfx_target: None,
            compute_capability: None,
            uuid: e
                .get("uuid")
                .and_then(Json::as_str)
                .filter(|u| *u != "N/A")
                .map(str::to_owned),
            vram_total_bytes: None,
            driver_version: None,
        })
        .collect()
}

/// The per-GPU objects of the output, JSON or plain; `None` (with a note) when there are none.
fn gpu_entries(text: &str, reading: &mut Reading) -> Option<Vec<Map<String, Json>>> {
    let json_start = text
        .lines()
        .scan(0, |offset, line| {
            let at = *offset;
            *offset += line.len() + 1;
            Some((at, line.trim_start()))
        })
        .find(|(_, l)| l.starts_with('[') || l.starts_with('{'))
        .map(|(at, _)| at);
    if let Some(start) = json_start {
        let mut stream = serde_json::Deserializer::from_str(&text[start..]).into_iter::<Json>();
        return match stream.next() {
            Some(Ok(doc)) => {
                let list = match doc {
                    Json::Array(list) => list,
                    Json::Object(mut map) => match map.remove("gpu_data") {
                        Some(Json::Array(list)) => list,
                        _ => vec![Json::Object(map)],
                    },
                    _ => Vec::new(),
                };
                Some(
                    list.into_iter()
                        .filter_map(|v| match v {
                            Json::Object(m) => Some(m),
                            _ => None,
                        })
                        .collect(),
                )
            }
            Some(Err(e)) => {
                reading
                    .notes
                    .push(format!("amd-smi printed JSON gpuwarden cannot read ({e})"));
                None
            }
            None => None,
        };
    }
    let entries = parse_plain(text);
    if entries.is_empty() {
        let said = text.lines().map(str::trim).find(|l| !l.is_empty());
        reading.notes.push(match said {
            Some(line) => format!("amd-smi printed no GPU data: {line}"),
            None => "amd-smi printed nothing".to_owned(),
        });
        return None;
    }
    Some(entries)
}

/// Reads amd-smi's plain output into the JSON shape: `GPU: 0` starts an object, `KEY:` alone
/// opens a nested one (by indentation), `KEY: 11 W` becomes `{"value": 11, "unit": "W"}`,
/// `N/A` stays a string, keys are lower-cased. Lines before the first `GPU:`, wrapped list
/// continuations and `...` are skipped.
fn parse_plain(text: &str) -> Vec<Map<String, Json>> {
    let mut gpus: Vec<Map<String, Json>> = Vec::new();
    // The open nested objects: (indentation, key path).
    let mut stack: Vec<(usize, String)> = Vec::new();
    for line in text.lines() {
        let indent = line.len() - line.trim_start().len();
        let trimmed = line.trim();
        let Some((key, rest)) = trimmed.split_once(':') else {
            continue;
        };
        let (key, rest) = (key.trim(), rest.trim());
        if indent == 0 {
            if key == "GPU" {
                let mut gpu = Map::new();
                if let Ok(n) = rest.parse::<u64>() {
                    gpu.insert("gpu".to_owned(), Json::from(n));
                }
                gpus.push(gpu);
                stack.clear();
            }
            continue;
        }
        let Some(gpu) = gpus.last_mut() else {
            continue;
        };
        while stack.last().is_some_and(|(i, _)| *i >= indent) {
            stack.pop();
        }
        let Some(obj) = object_at(gpu, &stack) else {
            continue;
        };
        let key = key.to_lowercase();
        if rest.is_empty() {
            obj.insert(key.clone(), Json::Object(Map::new()));
            stack.push((indent, key));
        } else {
            obj.insert(key, plain_value(rest));
        }
    }
    gpus
}

/// The nested object that `path` names inside `obj`, created as needed; `None` if a value that
/// is not an object is in the way.
fn object_at<'a>(
    mut obj: &'a mut Map<String, Json>,
    path: &[(usize, String)],
) -> Option<&'a mut Map<String, Json>> {
    for (_, key) in path {
        obj = obj
            .entry(key.clone())
            .or_insert_with(|| Json::Object(Map::new()))
            .as_object_mut()?;
    }
    Some(obj)
}

/// `11 W` -> `{"value": 11, "unit": "W"}`, `0` -> `0`, anything else stays a string.
fn plain_value(text: &str) -> Json {
    let mut parts = text.split_whitespace();
    let first = parts.next().unwrap_or_default();
    let unit = parts.next();
    match (
        first
            .parse::<f64>()
            .ok()
            .and_then(serde_json::Number::from_f64),
        unit,
        parts.next(),
    ) {
        (Some(n), Some(unit), None) => {
            let mut m = Map::new();
            m.insert("value".to_owned(), Json::Number(n));
            m.insert("unit".to_owned(), Json::from(unit));
            Json::Object(m)
        }
        (Some(n), None, _) => Json::Number(n),
        _ => Json::from(text),
    }
}

fn path<'a>(entry: &'a Map<String, Json>, keys: &[&str]) -> Option<&'a Json> {
    let (first, rest) = keys.split_first()?;
    rest.iter().try_fold(entry.get(*first)?, |v, k| v.get(*k))
}

/// A number as amd-smi writes it: bare, `{"value": .., "unit": ..}`, or `"N/A"`.
fn number(v: Option<&Json>) -> Value<f64> {
    let v = match v {
        Some(Json::Object(m)) => m.get("value"),
        other => other,
    };
    match v {
        Some(Json::Number(n)) => Value::from_option(n.as_f64()),
        Some(Json::String(s)) => Value::from_option(parse_number(s)),
        _ => Value::Unknown,
    }
}

/// A memory size in bytes; amd-smi's `MB` are MiB (it divides bytes by 1024²).
fn bytes(v: Option<&Json>) -> Value<u64> {
    let unit = v
        .and_then(|v| v.get("unit"))
        .and_then(Json::as_str)
        .unwrap_or("MB");
    let scale = match unit {
        "B" => 1.0,
        "KB" => 1024.0,
        "GB" => 1024.0 * 1024.0 * 1024.0,
        _ => 1024.0 * 1024.0,
    };
    match number(v) {
        Value::Known(n) if n >= 0.0 => Value::Known((n * scale) as u64),
        _ => Value::Unknown,
    }
}

/// The totals (`ecc.total_uncorrectable_count`) and the per-block counters
/// (`ecc_blocks.UMC.uncorrectable_count`).
fn ecc_counts(entry: &Map<String, Json>) -> Vec<EccCount> {
    let count = |v: Option<&Json>| match number(v) {
        Value::Known(n) if n >= 0.0 => Value::Known(n as u64),
        _ => Value::Unknown,
    };
    let mut out = Vec::new();
    if let Some(ecc) = entry.get("ecc").and_then(Json::as_object) {
        let total = EccCount {
            block: "total".to_owned(),
            uncorrectable: count(ecc.get("total_uncorrectable_count")),
            correctable: count(ecc.get("total_correctable_count")),
        };
        if total.uncorrectable.is_known() || total.correctable.is_known() {
            out.push(total);
        }
    }
    if let Some(blocks) = entry.get("ecc_blocks").and_then(Json::as_object) {
        for (block, v) in blocks {
            let c = EccCount {
                block: block.to_lowercase(),
                uncorrectable: count(v.get("uncorrectable_count")),
                correctable: count(v.get("correctable_count")),
            };
            if c.uncorrectable.is_known() || c.correctable.is_known() {
                out.push(c);
            }
        }
    }
    out
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::sources::health::fixture;

    #[test]
    fn json_usage_of_a_w7700_mixing_values_and_na() {
        // The stored excerpt is cut inside the long `jpeg_activity` list; closed right before
        // that key, the rest is parsed as posted.
        let text = fixture("amd-smi-metric-u-json-w7700-partial.txt");
        let out = parse_metric(&text, &[]);
        assert!(!out.reading.answered, "the cut document is no reading");
        let cut = text.find("\"jpeg_activity\"").unwrap();
        let closed = format!("{}\"end\": 0}}}}]", &text[..cut]);
        let out = parse_metric(&closed, &[]);
        assert!(out.reading.answered);
        let s = &out.reading.gpus[0];
        assert_eq!(s.device.index, Some(0));
        assert_eq!(s.utilization_percent, Value::Known(42.0));
        assert_eq!(s.power_w, Value::Unknown, "not asked for in that call");
    }

    #[test]
    fn plain_power_output_of_two_navi_gpus() {
        let out = parse_metric(&fixture("amd-smi-metric-power-navi.txt"), &[]);
        let powers: Vec<_> = out.reading.gpus.iter().map(|s| s.power_w.clone()).collect();
        assert_eq!(powers, [Value::Known(11.0), Value::Known(17.0)]);
        assert_eq!(out.reading.gpus[1].device.index, Some(1));
    }

    #[test]
    fn plain_output_with_wrapped_lists_still_reads_usage_and_power() {
        let out = parse_metric(&fixture("amd-smi-metric-plain-partial.txt"), &[]);
        let s = &out.reading.gpus[0];
        assert_eq!(s.utilization_percent, Value::Known(0.0));
        assert_eq!(s.power_w, Value::Known(20.0));
    }

    #[test]
    fn ecc_blocks_and_totals() {
        let out = parse_metric(&fixture("amd-smi-metric-ecc-block.txt"), &[]);
        let blocks: Vec<&str> = out.reading.gpus[0]
            .ecc
            .iter()
            .map(|e| e.block.as_str())
            .collect();
        assert_eq!(
            blocks,
            [
                "gfx",
                "hdp",
                "mmhub",
                "pcie_bif",
                "sdma",
                "umc",
                "xgmi_wafl"
            ],
            "every block, in name order"
        );
        assert!(
            out.reading.gpus[0]
                .ecc
                .iter()
                .all(|e| e.uncorrectable == Value::Known(0))
        );
        let out = parse_metric(&fixture("amd-smi-metric-ecc-ecc-blocks.txt"), &[]);
        let e = &out.reading.gpus[0].ecc;
        assert_eq!(e[0].block, "total");
        assert_eq!(e[0].uncorrectable, Value::Known(0));
        let blocks: Vec<&str> = e.iter().map(|c| c.block.as_str()).collect();
        assert_eq!(
            blocks,
            ["total", "sdma", "umc"],
            "the `...` line is skipped"
        );
    }

    #[test]
    fn the_list_gives_pci_addresses_that_metric_samples_carry() {
        let text = fixture("amd-smi-list-and-static-780m-partial.txt");
        let list_part = text.split("----").next().unwrap();
        let known = parse_list(list_part);
        assert_eq!(known[0].pci.as_deref(), Some("0000:65:00.0"));
        assert_eq!(
            known[0].uuid.as_deref(),
            Some("00ff1900-0000-1000-8000-000000000000")
        );
        let out = parse_metric(&fixture("amd-smi-metric-power-navi.txt"), &known);
        assert_eq!(
            out.reading.gpus[0].device.pci.as_deref(),
            Some("0000:65:00.0")
        );
        assert_eq!(out.reading.gpus[1].device.pci, None);
    }

    #[test]
    fn watch_mode_prints_no_data_and_that_is_a_note() {
        let out = parse_metric("    'CTRL' + 'C' to stop watching output:\n", &[]);
        assert!(!out.reading.answered);
        assert_eq!(out.reading.notes.len(), 1);
        assert!(
            out.reading.notes[0].contains("CTRL"),
            "{:?}",
            out.reading.notes
        );
    }

    #[test]
    fn gpu_data_wrapper_of_newer_versions() {
        let json = r#"{"gpu_data": [{"gpu": 3, "power": {"socket_power": {"value": 250, "unit": "W"}},
            "temperature": {"edge": {"value": 40, "unit": "C"}, "hotspot": "N/A"},
            "mem_usage": {"total_vram": {"value": 196592, "unit": "MB"}, "used_vram": {"value": 283, "unit": "MB"}}}]}"#;
        let out = parse_metric(json, &[]);
        let s = &out.reading.gpus[0];
        assert_eq!(s.device.index, Some(3));
        assert_eq!(s.power_w, Value::Known(250.0));
        assert_eq!(s.temperature_c, Value::Known(40.0));
        assert_eq!(s.hotspot_c, Value::Unknown);
        assert_eq!(s.vram_total_bytes, Value::Known(196_592 * 1024 * 1024));
        assert_eq!(s.vram_used_bytes, Value::Known(283 * 1024 * 1024));
    }
}

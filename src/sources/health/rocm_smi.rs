//! AMD GPUs through `rocm-smi --json`: the second path, for when the amdgpu sysfs files cannot
//! be read directly. rocm-smi takes 0.7 to 3 s a call on real systems and can hang after a
//! crash, so the sampler calls it rarely and always with a deadline.
//!
//! The JSON is an object of cards (`"card0": {"GPU use (%)": "0", ...}`) plus `"system"`;
//! every value is a string, and `"N/A"` means not reported. Older and newer rocm-smi name a few
//! fields differently (`Average Graphics Package Power (W)` on a discrete GPU, `Current Socket
//! Graphics Package Power (W)` on an APU); both are read. In bad states rocm-smi prints no JSON
//! at all (`WARNING: No JSON data to report` for `--showrasinfo`) or a truncated document: the
//! reading then says the source did not answer, with a note, and nothing panics.
//!
//! GPU index: the order of the `cardN` keys (by number), which is the DRM card order and can
//! differ from ROCm's KFD order on machines with several kinds of GPU; prefer `amd_sysfs`.
//! Not here: RAS counters (`--showrasinfo` has no JSON form in the rocm-smi versions seen).

use serde_json::{Map, Value as Json};

use super::{GpuSample, Reading, SourceKind, Value, normalize_pci, parse_number};
use crate::gpu::{Gpu, Vendor};

/// The arguments of one sampling call: utilization, VRAM, temperatures, power, PCI address and
/// device id, as JSON.
pub const SAMPLE_ARGS: [&str; 8] = [
    "--json",
    "--showuse",
    "--showmeminfo",
    "vram",
    "--showtemp",
    "--showpower",
    "--showbus",
    "--showid",
];

/// What one call of rocm-smi told: the inventory and the reading.
#[derive(Clone, Debug, PartialEq)]
pub struct RocmSmiOutput {
    pub gpus: Vec<Gpu>,
    pub reading: Reading,
}

/// Parses the standard output of `rocm-smi --json ...`. Text before the JSON (warnings some
/// versions print on stdout) and after it is ignored.
pub fn parse_json(stdout: &str) -> RocmSmiOutput {
    let mut out = RocmSmiOutput {
        gpus: Vec::new(),
        reading: Reading::new(SourceKind::RocmSmi),
    };
    let Some(doc) = first_json_object(stdout, &mut out.reading) else {
        out.reading.answered = false;
        return out;
    };
    let driver_version = doc
        .get("system")
        .and_then(|s| s.get("Driver version"))
        .and_then(Json::as_str)
        .map(str::to_owned);
    let mut cards: Vec<(u32, &Map<String, Json>)> = doc
        .iter()
        .filter_map(|(key, v)| Some((key.strip_prefix("card")?.parse().ok()?, v.as_object()?)))
        .collect();
    cards.sort_unstable_by_key(|(n, _)| *n);
    for (index, (_, card)) in cards.into_iter().enumerate() {
        let text = |key: &str| card.get(key).and_then(Json::as_str);
        let number = |keys: &[&str]| -> Value<f64> {
            keys.iter()
                .find_map(|k| text(k))
                .map_or(Value::Unknown, |t| Value::from_option(parse_number(t)))
        };
        let bytes = |keys: &[&str]| -> Value<u64> {
            match number(keys) {
                Value::Known(v) if v >= 0.0 => Value::Known(v as u64),
                _ => Value::Unknown,
            }
        };
        // `Card series` is the product name where pci.ids knows the card; without pci.ids
        // rocm-smi prints the vendor id there instead.
        let name = text("Card series")
            .filter(|s| !s.starts_with("0x") && *s != "N/A")
            .or_else(|| text("Device Name").filter(|s| *s != "N/A"))
            .map(str::to_owned);
        let device_id = ["GPU ID", "Device ID"]
            .iter()
            .find_map(|k| text(k))
            .and_then(|t| u16::from_str_radix(t.trim_start_matches("0x"), 16).ok());
        let vram_total = bytes(&["VRAM Total Memory (B)"]);
        let gpu = Gpu {
            vendor: Vendor::Amd,
            index: index as u32,
            name,
            pci: text("PCI Bus").and_then(normalize_pci),
            device_id,
            kfd_node: None,
            render_minor: None,
            gfx_target: None,
            compute_capability: None,
            uuid: None,
            vram_total_bytes: vram_total.known(),
            driver_version: driver_version.clone(),
        };
        let mut s = GpuSample::blank(&gpu);
        s.utilization_percent = number(&["GPU use (%)"]);
        s.vram_used_bytes = bytes(&["VRAM Total Used Memory (B)"]);
        s.vram_total_bytes = vram_total;
        s.temperature_c = number(&["Temperature (Sensor edge) (C)"]);
        s.hotspot_c = number(&["Temperature (Sensor junction) (C)"]);
        s.power_w = number(&[
            "Average Graphics Package Power (W)",
            "Current Socket Graphics Package Power (W)",
        ]);
        out.gpus.push(gpu);
        out.reading.gpus.push(s);
    }
    out
}

/// The first JSON object in `text`, or `None` with a note saying what came instead.
fn first_json_object(text: &str, reading: &mut Reading) -> Option<Map<String, Json>> {
    let Some(start) = text.find('{') else {
        let said = text.lines().map(str::trim).find(|l| !l.is_empty());
        reading.notes.push(match said {
            Some(line) => format!("rocm-smi printed no JSON: {line}"),
            None => "rocm-smi printed nothing".to_owned(),
        });
        return None;
    };
    let mut stream = serde_json::Deserializer::from_str(&text[start..]).into_iter::<Json>();
    match stream.next() {
        Some(Ok(Json::Object(map))) => Some(map),
        Some(Ok(_)) => None,
        Some(Err(e)) => {
            reading
                .notes
                .push(format!("rocm-smi printed JSON gpuwarden cannot read ({e})"));
            None
        }
        None => None,
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::sources::health::amd_sysfs::AmdSysfs;
    use crate::sources::health::{fixture, sysfs_tree_with_kernel_links};
    use std::process::Command;

    /// Debian's rocm-smi 5.2.3 reads sysfs itself. Bind-mounted over `/sys` in a private mount
    /// namespace (with a private `/dev/shm` for its lock files), the simulated tree is a GPU to
    /// it too, and what it reports must be what `amd_sysfs` reads. Where rocm-smi, `unshare` or
    /// the privilege to mount is missing it says so loudly, and under CI (`CI=true`, where
    /// `.ci/run` installs rocm-smi) that is a failure. Once rocm-smi ran, no JSON is a failure
    /// everywhere: that is what a broken simulated tree gives.
    #[test]
    fn the_real_rocm_smi_reads_the_simulated_tree_as_amd_sysfs_does() {
        let skip = |why: String| {
            let ci = std::env::var("CI").is_ok_and(|v| v == "true" || v == "1");
            assert!(!ci, "cannot compare with the real rocm-smi under CI: {why}");
            eprintln!(
                "SKIPPED the_real_rocm_smi_reads_the_simulated_tree_as_amd_sysfs_does: {why}"
            );
        };
        let installed = std::env::var_os("PATH")
            .is_some_and(|p| std::env::split_paths(&p).any(|dir| dir.join("rocm-smi").is_file()));
        if !installed {
            return skip("rocm-smi is not installed (apt-get install rocm-smi)".into());
        }
        let tmp = tempfile::tempdir().unwrap();
        let tree = tmp.path().join("sys");
        sysfs_tree_with_kernel_links(&tree);
        // The marker tells a namespace that could not be set up from a rocm-smi that ran.
        let script = r#"root=$1; shift; mount --bind "$root" /sys && mount -t tmpfs none /dev/shm && echo GPUWARDEN-MOUNTED >&2 && exec rocm-smi "$@""#;
        let out = match Command::new("unshare")
            .args(["-m", "--propagation", "private", "sh", "-c", script, "sh"])
            .arg(&tree)
            .args(SAMPLE_ARGS)
            .output()
        {
            Ok(out) => out,
            Err(e) => return skip(format!("cannot run unshare: {e}")),
        };
        let stderr = String::from_utf8_lossy(&out.stderr);
        if !stderr.contains("GPUWARDEN-MOUNTED") {
            return skip(format!(
                "cannot mount the simulated tree in a private namespace (needs root): {}",
                stderr.trim()
            ));
        }
        assert!(
            String::from_utf8_lossy(&out.stdout).contains('{'),
            "rocm-smi ran over the simulated tree and printed no JSON (a broken tree?):\nstdout: {}\nstderr: {stderr}",
            String::from_utf8_lossy(&out.stdout)
        );
        let theirs = parse_json(&String::from_utf8_lossy(&out.stdout));
        let ours = AmdSysfs::discover(&tree, &[]);
        let mine = ours.sample();
        assert_eq!(theirs.reading.gpus.len(), mine.gpus.len());
        let (t, m) = (&theirs.reading.gpus[0], &mine.gpus[0]);
        assert_eq!(t.device.pci, m.device.pci);
        assert_eq!(theirs.gpus[0].device_id, ours.gpus()[0].device_id);
        assert_eq!(t.utilization_percent, m.utilization_percent);
        assert_eq!(t.vram_used_bytes, m.vram_used_bytes);
        assert_eq!(t.vram_total_bytes, m.vram_total_bytes);
        assert_eq!(t.temperature_c, m.temperature_c);
        assert_eq!(t.hotspot_c, m.hotspot_c);
        assert_eq!(t.power_w, m.power_w);
    }

    #[test]
    fn a_radeon_7900_xtx_reading() {
        let out = parse_json(&fixture(
            "rocm-smi-json-showtemp-showuse-showpower-vram-7900xtx.txt",
        ));
        let r = &out.reading;
        assert!(r.answered && r.notes.is_empty());
        let s = &r.gpus[0];
        assert_eq!(s.device.index, Some(0));
        assert_eq!(s.temperature_c, Value::Known(49.0));
        assert_eq!(s.hotspot_c, Value::Known(49.0));
        assert_eq!(s.power_w, Value::Known(19.0));
        assert_eq!(s.utilization_percent, Value::Known(0.0));
        assert_eq!(s.vram_total_bytes, Value::Known(25_753_026_560));
        assert_eq!(s.vram_used_bytes, Value::Known(794_341_376));
    }

    #[test]
    fn an_mi250_full_reading_names_the_card_its_bus_and_driver() {
        let out = parse_json(&fixture("rocm-smi-a-json-mi250.txt"));
        let g = &out.gpus[0];
        assert_eq!(
            g.name.as_deref(),
            Some("AMD INSTINCT MI250 (MCM) OAM AC MBA")
        );
        assert_eq!(g.pci.as_deref(), Some("0000:2f:00.0"));
        assert_eq!(g.device_id, Some(0x740c));
        assert_eq!(g.driver_version.as_deref(), Some("6.2.4"));
        let s = &out.reading.gpus[0];
        assert_eq!(s.power_w, Value::Known(89.0));
        assert_eq!(s.temperature_c, Value::Known(32.0));
        assert_eq!(s.hotspot_c, Value::Known(35.0));
        assert_eq!(
            s.vram_used_bytes,
            Value::Unknown,
            "not asked for in that call"
        );
    }

    #[test]
    fn an_apu_reports_socket_power_and_a_truncated_document_is_no_crash() {
        // The stored 780M output is cut mid-document: no reading, a note, no panic.
        let out = parse_json(&fixture("rocm-smi-a-json-780m-partial.txt"));
        assert!(!out.reading.answered);
        assert!(
            out.reading.notes[0].contains("cannot read"),
            "{:?}",
            out.reading.notes
        );
        // Closed where the excerpt ends, the same output reads the APU's socket power.
        let text = fixture("rocm-smi-a-json-780m-partial.txt");
        let cut = text.rfind("\"PFP firmware version\"").unwrap();
        let closed = format!("{}\"end\": \"\"}}}}", &text[..cut]);
        let out = parse_json(&closed);
        let s = &out.reading.gpus[0];
        assert_eq!(s.power_w, Value::Known(7.222));
        assert_eq!(s.utilization_percent, Value::Known(19.0));
        assert_eq!(out.gpus[0].name.as_deref(), Some("Phoenix3"));
        assert_eq!(out.gpus[0].pci.as_deref(), Some("0000:c4:00.0"));
    }

    #[test]
    fn percentages_and_na_are_not_mistaken_for_bytes() {
        let text = fixture("rocm-smi-json-showmemuse-rx6800.txt");
        let docs: Vec<&str> = text.split("# ---").skip(1).collect();
        for doc in docs {
            let out = parse_json(doc);
            assert!(out.reading.answered);
            assert_eq!(out.reading.gpus.len(), 2, "card0 and card1");
            for s in &out.reading.gpus {
                assert_eq!(s.vram_used_bytes, Value::Unknown);
                assert_eq!(s.utilization_percent, Value::Unknown);
            }
        }
    }

    #[test]
    fn no_json_at_all_is_a_note_not_a_crash() {
        let out = parse_json("WARNING: No JSON data to report\n");
        assert!(!out.reading.answered);
        assert!(out.gpus.is_empty());
        assert_eq!(
            out.reading.notes,
            ["rocm-smi printed no JSON: WARNING: No JSON data to report"]
        );
        assert!(!parse_json("").reading.answered);
        // The odd outputs of rocm-smi and amd-smi, fed whole.
        let out = parse_json(&fixture("amd-smi-rocm-smi-odd-outputs.txt"));
        assert!(!out.reading.answered);
    }

    #[test]
    fn cards_are_indexed_by_number_not_by_text() {
        let json = r#"{"card10": {"GPU use (%)": "7"}, "card2": {"GPU use (%)": "5"}}"#;
        let out = parse_json(json);
        let uses: Vec<Value<f64>> = out
            .reading
            .gpus
            .iter()
            .map(|s| s.utilization_percent.clone())
            .collect();
        assert_eq!(uses, [Value::Known(5.0), Value::Known(7.0)]);
    }
}

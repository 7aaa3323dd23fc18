//! AMD GPUs read straight from the amdgpu driver's sysfs files: the inventory (which GPUs, in
//! ROCm's order, with their gfx target) once at start, then a cheap sample per GPU.
//!
//! The index of a GPU is its position among the GPU nodes of the KFD topology
//! (`class/kfd/kfd/topology/nodes/N`), which is the order the ROCm runtime enumerates devices in
//! and what `HIP_VISIBLE_DEVICES` counts. Each KFD node is matched to its DRM card
//! (`class/drm/cardN/device`) by render minor (`drm_render_minor`, the `renderD128` of the card)
//! or by PCI address (`domain` and `location_id` = bus << 8 | device << 3 | function). The
//! card's directory holds the live numbers: `gpu_busy_percent`, `mem_info_vram_used`,
//! `hwmon/hwmon*/temp*_input` and `power1_average` (µW, or `power1_input` on newer kernels),
//! and on data-centre cards the RAS counters `ras/*_err_count` (`ue: N` / `ce: N`).
//!
//! Every path is resolved once at discovery, so a sample is a few open/read/close calls and no
//! directory walk. The root is configurable (`--sysfs-root`) so tests run on a simulated tree.
//!
//! Not here: running `rocm-smi` (see `rocm_smi`), deciding what a change means (see `tracker`),
//! noticing GPUs hot-plugged after start (the inventory is taken once).

use std::collections::BTreeMap;
use std::fs::{self, File};
use std::io::{self, Read};
use std::path::{Path, PathBuf};

use super::{
    DeviceRef, EccCount, GpuProcess, GpuSample, Reading, SourceKind, Value, normalize_pci,
    parse_pci,
};
use crate::gpu::{Gpu, Vendor};

/// Where libdrm keeps the table of AMD marketing names (`73BF, C3, AMD Radeon RX 6800`), in the
/// order they are tried. The second is where AMD's own packages put it.
pub const AMDGPU_IDS_PATHS: [&str; 2] = [
    "/usr/share/libdrm/amdgpu.ids",
    "/opt/amdgpu/share/libdrm/amdgpu.ids",
];

const AMD_VENDOR: u16 = 0x1002;

/// The inventory of the AMD GPUs under `root` (normally `/sys`), in ROCm's order, with
/// marketing names from the system's `amdgpu.ids`. Empty when there are none or `root` holds no
/// amdgpu sysfs at all.
pub fn discover(root: &Path) -> Vec<Gpu> {
    let ids: Vec<PathBuf> = AMDGPU_IDS_PATHS.iter().map(PathBuf::from).collect();
    AmdSysfs::discover(root, &ids).gpus()
}

/// The AMD GPUs found under one sysfs root, ready to be sampled.
#[derive(Debug)]
pub struct AmdSysfs {
    devices: Vec<AmdDevice>,
}

/// One GPU and the files that tell its state.
#[derive(Debug)]
struct AmdDevice {
    gpu: Gpu,
    /// The PCI device directory (symlinks resolved); its disappearance means the GPU is gone.
    dir: Option<PathBuf>,
    /// The KFD node directory, the presence check of a node without a DRM card.
    kfd_dir: PathBuf,
    busy: Option<PathBuf>,
    vram_used: Option<PathBuf>,
    temp_edge: Option<PathBuf>,
    temp_junction: Option<PathBuf>,
    power: Option<PathBuf>,
    ras: Vec<(String, PathBuf)>,
}

/// A DRM card of vendor AMD.
#[derive(Debug)]
struct Card {
    dir: PathBuf,
    pci: Option<String>,
    render_minors: Vec<u64>,
}

impl AmdSysfs {
    /// Walks `root` once. `amdgpu_ids` are the marketing-name tables to try (the first that can
    /// be read wins); none readable just leaves names unknown.
    pub fn discover(root: &Path, amdgpu_ids: &[PathBuf]) -> AmdSysfs {
        let cards = amd_cards(root);
        let nodes = kfd_gpu_nodes(root);
        let names = amdgpu_ids.iter().find_map(|p| fs::read_to_string(p).ok());
        let driver_version = read_trimmed(&root.join("module/amdgpu/version"));

        let mut devices = Vec::new();
        if nodes.is_empty() {
            // No KFD topology (the driver runs without compute support): the cards are still
            // worth watching, in card order, though ROCm could not use them.
            for (index, card) in cards.iter().enumerate() {
                let kfd_dir = root.join("class/kfd/kfd/topology/nodes");
                devices.push(AmdDevice::new(
                    index as u32,
                    Some(card),
                    None,
                    kfd_dir,
                    names.as_deref(),
                ));
            }
        } else {
            for (index, node) in nodes.iter().enumerate() {
                let card = cards
                    .iter()
                    .find(|c| {
                        node.render_minor
                            .is_some_and(|m| c.render_minors.contains(&m))
                    })
                    .or_else(|| {
                        cards.iter().find(|c| {
                            c.pci.as_deref().and_then(pci_location) == node.pci_location()
                        })
                    });
                devices.push(AmdDevice::new(
                    index as u32,
                    card,
                    Some(node),
                    node.dir.clone(),
                    names.as_deref(),
                ));
            }
        }
        for d in &mut devices {
            d.gpu.driver_version = driver_version.clone();
        }
        AmdSysfs { devices }
    }

    /// The inventory, in index order.
    pub fn gpus(&self) -> Vec<Gpu> {
        self.devices.iter().map(|d| d.gpu.clone()).collect()
    }

    pub fn is_empty(&self) -> bool {
        self.devices.is_empty()
    }

    /// One reading of every GPU.
    pub fn sample(&self) -> Reading {
        let mut reading = Reading::new(SourceKind::AmdSysfs);
        let mut buf = [0u8; 256];
        reading.gpus = self.devices.iter().map(|d| d.sample(&mut buf)).collect();
        reading
    }
}

impl AmdDevice {
    fn new(
        index: u32,
        card: Option<&Card>,
        node: Option<&KfdNode>,
        kfd_dir: PathBuf,
        names: Option<&str>,
    ) -> AmdDevice {
        let dir = card.map(|c| fs::canonicalize(&c.dir).unwrap_or_else(|_| c.dir.clone()));
        let existing = |name: &str| dir.as_ref().map(|d| d.join(name)).filter(|p| p.exists());
        let device_id = dir
            .as_ref()
            .and_then(|d| read_hex(&d.join("device")))
            .or_else(|| node.and_then(|n| n.device_id))
            .and_then(|v| u16::try_from(v).ok());
        let revision = dir.as_ref().and_then(|d| read_hex(&d.join("revision")));
        let name = match (names, device_id, revision) {
            (Some(table), Some(dev), Some(rev)) => marketing_name(table, dev, rev as u32),
            _ => None,
        };
        let pci = card
            .and_then(|c| c.pci.clone())
            .or_else(|| node.and_then(KfdNode::pci_address));
        let (temp_edge, temp_junction, power) = match dir.as_ref().and_then(|d| hwmon_dir(d)) {
            Some(hwmon) => {
                let (edge, junction) = temperature_inputs(&hwmon);
                let power = ["power1_average", "power1_input"]
                    .iter()
                    .map(|f| hwmon.join(f))
                    .find(|p| p.exists());
                (edge, junction, power)
            }
            None => (None, None, None),
        };
        let ras = dir.as_ref().map(|d| ras_counters(d)).unwrap_or_default();
        let vram_total = dir
            .as_ref()
            .and_then(|d| read_trimmed(&d.join("mem_info_vram_total")))
            .and_then(|s| s.parse().ok());
        AmdDevice {
            gpu: Gpu {
                vendor: Vendor::Amd,
                index,
                name,
                pci,
                device_id,
                kfd_node: node.map(|n| n.id),
                render_minor: node
                    .and_then(|n| n.render_minor)
                    .and_then(|m| u32::try_from(m).ok()),
                gfx_target: node.and_then(|n| n.gfx_target_version).and_then(gfx_target),
                compute_capability: None,
                uuid: None,
                vram_total_bytes: vram_total,
                driver_version: None,
            },
            busy: existing("gpu_busy_percent"),
            vram_used: existing("mem_info_vram_used"),
            dir,
            kfd_dir,
            temp_edge,
            temp_junction,
            power,
            ras,
        }
    }

    fn sample(&self, buf: &mut [u8; 256]) -> GpuSample {
        let mut s = GpuSample::blank(&self.gpu);
        let mut missing = false;
        let mut read = |path: &Option<PathBuf>| -> Option<i64> {
            let path = path.as_ref()?;
            match read_small(path, buf) {
                Ok(text) => text.trim().parse().ok(),
                Err(e) => {
                    missing |= e.kind() == io::ErrorKind::NotFound;
                    None
                }
            }
        };
        let busy = read(&self.busy);
        let used = read(&self.vram_used);
        let edge = read(&self.temp_edge);
        let junction = read(&self.temp_junction);
        let power = read(&self.power);
        let presence = self.dir.as_ref().unwrap_or(&self.kfd_dir);
        // A file that vanished, or a device with no readable file at all: look whether the
        // device itself is still there. Read errors of a present device (the driver answers
        // EPERM while it resets the GPU) only make the values unknown.
        if (missing || busy.is_none() && used.is_none() && edge.is_none() && power.is_none())
            && !presence.exists()
        {
            s.present = false;
            s.vram_total_bytes = Value::Unknown;
            return s;
        }
        s.utilization_percent = Value::from_option(busy.map(|v| v as f64));
        s.vram_used_bytes = Value::from_option(used.and_then(|v| u64::try_from(v).ok()));
        // hwmon temperatures are millidegrees Celsius, power is microwatts.
        s.temperature_c = Value::from_option(edge.map(|v| v as f64 / 1000.0));
        s.hotspot_c = Value::from_option(junction.map(|v| v as f64 / 1000.0));
        s.power_w = Value::from_option(power.map(|v| v as f64 / 1e6));
        s.ecc = self
            .ras
            .iter()
            .map(|(block, path)| {
                let (ue, ce) = match read_small(path, buf) {
                    Ok(text) => parse_ras_count(text),
                    Err(_) => (None, None),
                };
                EccCount {
                    block: block.clone(),
                    uncorrectable: Value::from_option(ue),
                    correctable: Value::from_option(ce),
                }
            })
            .collect();
        s
    }
}

/// A KFD topology node that is a GPU.
#[derive(Debug)]
struct KfdNode {
    id: u32,
    dir: PathBuf,
    gfx_target_version: Option<u64>,
    render_minor: Option<u64>,
    domain: Option<u64>,
    location_id: Option<u64>,
    device_id: Option<u64>,
}

impl KfdNode {
    fn pci_location(&self) -> Option<(u32, u32)> {
        Some((
            u32::try_from(self.domain.unwrap_or(0)).ok()?,
            u32::try_from(self.location_id?).ok()?,
        ))
    }

    fn pci_address(&self) -> Option<String> {
        let (domain, loc) = self.pci_location()?;
        normalize_pci(&format!(
            "{domain:04x}:{:02x}:{:02x}.{:x}",
            loc >> 8,
            (loc >> 3) & 0x1f,
            loc & 0x7
        ))
    }
}

/// The GPU nodes of the KFD topology under `root`, in node order.
fn kfd_gpu_nodes(root: &Path) -> Vec<KfdNode> {
    let base = root.join("class/kfd/kfd/topology/nodes");
    let Ok(entries) = fs::read_dir(&base) else {
        return Vec::new();
    };
    let mut ids: Vec<u32> = entries
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse().ok())
        .collect();
    // Numeric order: node 10 comes after node 9, not after node 1.
    ids.sort_unstable();
    ids.into_iter()
        .filter_map(|id| {
            let dir = base.join(id.to_string());
            let text = fs::read_to_string(dir.join("properties")).ok()?;
            let props = parse_properties(&text);
            let gpu_id = read_trimmed(&dir.join("gpu_id")).and_then(|s| s.parse::<u64>().ok());
            // A CPU node has no SIMDs (and gpu_id 0); an APU's combined node has both cores
            // and SIMDs, and is a GPU to ROCm.
            let is_gpu = props.get("simd_count").is_some_and(|&n| n > 0) && gpu_id != Some(0);
            is_gpu.then(|| KfdNode {
                id,
                gfx_target_version: props.get("gfx_target_version").copied().filter(|&v| v > 0),
                render_minor: props.get("drm_render_minor").copied().filter(|&v| v > 0),
                domain: props.get("domain").copied(),
                location_id: props.get("location_id").copied(),
                device_id: props.get("device_id").copied(),
                dir,
            })
        })
        .collect()
}

/// The `name value` lines of a KFD `properties` file.
fn parse_properties(text: &str) -> BTreeMap<&str, u64> {
    text.lines()
        .filter_map(|line| {
            let (k, v) = line.split_once(' ')?;
            Some((k, v.trim().parse().ok()?))
        })
        .collect()
}

/// The gfx target of a KFD `gfx_target_version`: major * 10000 + minor * 100 + stepping, with
/// minor and stepping written in hex (`100300` -> `gfx1030`, `90010` -> `gfx90a`).
pub fn gfx_target(version: u64) -> Option<String> {
    if version == 0 {
        return None;
    }
    let major = version / 10000;
    let minor = (version / 100) % 100;
    let stepping = version % 100;
    (minor < 16 && stepping < 16).then(|| format!("gfx{major}{minor:x}{stepping:x}"))
}

/// The DRM cards of vendor AMD under `root`, in card order (`card0`, `card1`, ...; connector
/// entries such as `card0-DP-1` are not cards).
fn amd_cards(root: &Path) -> Vec<Card> {
    let base = root.join("class/drm");
    let Ok(entries) = fs::read_dir(&base) else {
        return Vec::new();
    };
    let mut numbered: Vec<(u32, PathBuf)> = entries
        .flatten()
        .filter_map(|e| {
            let name = e.file_name();
            let n = name.to_str()?.strip_prefix("card")?.parse().ok()?;
            Some((n, e.path()))
        })
        .collect();
    numbered.sort_unstable_by_key(|(n, _)| *n);
    numbered
        .into_iter()
        .filter_map(|(_, path)| {
            let dir = path.join("device");
            let vendor = read_hex(&dir.join("vendor"))?;
            (vendor == u64::from(AMD_VENDOR)).then(|| Card {
                pci: pci_of(&dir),
                render_minors: render_minors(&dir),
                dir,
            })
        })
        .collect()
}

/// The PCI address of a device directory: `PCI_SLOT_NAME` in its `uevent`, else the name of the
/// directory its `device` link points at.
fn pci_of(device_dir: &Path) -> Option<String> {
    let from_uevent = fs::read_to_string(device_dir.join("uevent"))
        .ok()
        .and_then(|text| {
            text.lines()
                .find_map(|l| l.strip_prefix("PCI_SLOT_NAME="))
                .and_then(normalize_pci)
        });
    from_uevent.or_else(|| {
        let real = fs::canonicalize(device_dir).ok()?;
        normalize_pci(real.file_name()?.to_str()?)
    })
}

/// `(domain, location_id)` of a PCI address, as KFD writes them.
fn pci_location(pci: &str) -> Option<(u32, u32)> {
    let (domain, bus, dev, func) = parse_pci(pci)?;
    Some((
        domain,
        (u32::from(bus) << 8) | (u32::from(dev) << 3) | u32::from(func),
    ))
}

/// The minors of the `renderD*` nodes of a card's device.
fn render_minors(device_dir: &Path) -> Vec<u64> {
    let Ok(entries) = fs::read_dir(device_dir.join("drm")) else {
        return Vec::new();
    };
    entries
        .flatten()
        .filter_map(|e| {
            e.file_name()
                .to_str()?
                .strip_prefix("renderD")?
                .parse()
                .ok()
        })
        .collect()
}

/// The amdgpu hwmon directory of a device (`hwmon/hwmonN`).
fn hwmon_dir(device_dir: &Path) -> Option<PathBuf> {
    let mut dirs: Vec<PathBuf> = fs::read_dir(device_dir.join("hwmon"))
        .ok()?
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.join("name").exists())
        .collect();
    dirs.sort();
    dirs.into_iter().next()
}

/// The `edge` and `junction` temperature inputs of a hwmon directory. Without labels the first
/// sensor is taken as the edge one, as amdgpu numbers it.
fn temperature_inputs(hwmon: &Path) -> (Option<PathBuf>, Option<PathBuf>) {
    let mut edge = None;
    let mut junction = None;
    for n in 1..=8 {
        let input = hwmon.join(format!("temp{n}_input"));
        if !input.exists() {
            continue;
        }
        match read_trimmed(&hwmon.join(format!("temp{n}_label"))).as_deref() {
            Some("edge") => edge = Some(input),
            Some("junction") => junction = Some(input),
            Some(_) => {}
            None if n == 1 => edge = Some(input),
            None => {}
        }
    }
    (edge, junction)
}

/// The RAS error counters of a device (`ras/umc_err_count` -> block `umc`), sorted by block.
fn ras_counters(device_dir: &Path) -> Vec<(String, PathBuf)> {
    let Ok(entries) = fs::read_dir(device_dir.join("ras")) else {
        return Vec::new();
    };
    let mut out: Vec<(String, PathBuf)> = entries
        .flatten()
        .filter_map(|e| {
            let name = e.file_name();
            let block = name.to_str()?.strip_suffix("_err_count")?.to_owned();
            Some((block, e.path()))
        })
        .collect();
    out.sort();
    out
}

/// The `ue: N` and `ce: N` lines of a RAS counter file (newer kernels add `de: N`, deferred
/// errors, which are not counted as uncorrectable).
pub fn parse_ras_count(text: &str) -> (Option<u64>, Option<u64>) {
    let mut ue = None;
    let mut ce = None;
    for line in text.lines() {
        if let Some((key, value)) = line.split_once(':') {
            let value = value.trim().parse().ok();
            match key.trim() {
                "ue" => ue = value,
                "ce" => ce = value,
                _ => {}
            }
        }
    }
    (ue, ce)
}

/// The marketing name of `device`/`revision` in an `amdgpu.ids` table (lines
/// `73BF,\tC3,\tAMD Radeon RX 6800`; `#` comments and the version line are skipped).
pub fn marketing_name(table: &str, device: u16, revision: u32) -> Option<String> {
    table.lines().find_map(|line| {
        if line.starts_with('#') {
            return None;
        }
        let mut parts = line.splitn(3, ',');
        let dev = u16::from_str_radix(parts.next()?.trim(), 16).ok()?;
        let rev = u32::from_str_radix(parts.next()?.trim(), 16).ok()?;
        let name = parts.next()?.trim();
        (dev == device && rev == revision && !name.is_empty()).then(|| name.to_owned())
    })
}

/// Reads a small file (a sysfs attribute) into `buf` with one open and as few reads as it
/// takes, without allocating.
fn read_small<'b>(path: &Path, buf: &'b mut [u8; 256]) -> io::Result<&'b str> {
    let mut file = File::open(path)?;
    let mut len = 0;
    while len < buf.len() {
        match file.read(&mut buf[len..]) {
            Ok(0) => break,
            Ok(n) => len += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    std::str::from_utf8(&buf[..len]).map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))
}

fn read_trimmed(path: &Path) -> Option<String> {
    let text = fs::read_to_string(path).ok()?;
    let text = text.trim();
    (!text.is_empty()).then(|| text.to_owned())
}

/// A `0x1002`-style sysfs attribute.
fn read_hex(path: &Path) -> Option<u64> {
    let text = read_trimmed(path)?;
    u64::from_str_radix(text.trim_start_matches("0x"), 16).ok()
}

/// One pass over KFD's process directory: every process with VRAM on a known GPU, biggest
/// first.
pub fn kfd_processes(procs: &Path, ids: &[(DeviceRef, String)]) -> Vec<(DeviceRef, GpuProcess)> {
    let mut found = Vec::new();
    let Ok(entries) = std::fs::read_dir(procs) else {
        return found;
    };
    for entry in entries.flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|p| p.parse::<u32>().ok())
        else {
            continue;
        };
        let name = std::fs::read_to_string(format!("/proc/{pid}/comm"))
            .ok()
            .map(|n| n.trim().to_string());
        for (device, id) in ids {
            let Ok(text) = std::fs::read_to_string(entry.path().join(format!("vram_{id}"))) else {
                continue;
            };
            let Ok(vram_bytes) = text.trim().parse::<u64>() else {
                continue;
            };
            found.push((
                device.clone(),
                GpuProcess {
                    pid,
                    name: name.clone(),
                    vram_bytes,
                },
            ));
        }
    }
    found.sort_by(|a, b| {
        b.1.vram_bytes
            .cmp(&a.1.vram_bytes)
            .then(a.1.pid.cmp(&b.1.pid))
    });
    found
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::sources::health::{DEVICE_DIR as DEVICE, copy_tree, sysfs_tree as tree};

    /// The names table: a real excerpt of Debian's `amdgpu.ids`, its `# source:` line dropped.
    fn ids_file(dir: &Path) -> PathBuf {
        let text = fs::read_to_string(
            Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/tools/amdgpu-ids-navi21.txt"),
        )
        .unwrap();
        let body: String = text
            .lines()
            .filter(|l| !l.starts_with("# source:"))
            .map(|l| format!("{l}\n"))
            .collect();
        let path = dir.join("amdgpu.ids");
        fs::write(&path, body).unwrap();
        path
    }

    #[test]
    fn the_simulated_rx6800_is_found_with_rocm_index_gfx_target_and_name() {
        let tmp = tempfile::tempdir().unwrap();
        let ids = ids_file(tmp.path());
        let amd = AmdSysfs::discover(&tree(), &[ids]);
        let gpus = amd.gpus();
        assert_eq!(gpus.len(), 1, "one GPU node; node 0 is the CPU");
        let g = &gpus[0];
        assert_eq!(g.vendor, Vendor::Amd);
        assert_eq!(g.index, 0);
        assert_eq!(g.kfd_node, Some(1), "HSA errors name it node-1");
        assert_eq!(g.gfx_target.as_deref(), Some("gfx1030"));
        assert_eq!(g.pci.as_deref(), Some("0000:0b:00.0"));
        assert_eq!(g.device_id, Some(0x73bf));
        assert_eq!(g.name.as_deref(), Some("AMD Radeon RX 6800"));
        assert_eq!(g.vram_total_bytes, Some(17_163_091_968));
    }

    #[test]
    fn the_kernel_layout_with_links_reads_the_same() {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path().join("sys");
        crate::sources::health::sysfs_tree_with_kernel_links(&root);
        assert!(
            fs::symlink_metadata(root.join("class/drm/card0"))
                .unwrap()
                .is_symlink()
        );
        let linked = AmdSysfs::discover(&root, &[]);
        let plain = AmdSysfs::discover(&tree(), &[]);
        assert_eq!(linked.gpus(), plain.gpus());
        assert_eq!(linked.sample().gpus, plain.sample().gpus);
    }

    #[test]
    fn a_sample_reads_the_live_numbers() {
        let amd = AmdSysfs::discover(&tree(), &[]);
        let r = amd.sample();
        assert!(r.answered);
        let s = &r.gpus[0];
        assert!(s.present);
        assert_eq!(s.name, None, "no names table given");
        assert_eq!(s.arch.as_deref(), Some("gfx1030"));
        assert_eq!(s.utilization_percent, Value::Known(0.0));
        assert_eq!(s.vram_used_bytes, Value::Known(17_453_056));
        assert_eq!(s.vram_total_bytes, Value::Known(17_163_091_968));
        assert_eq!(s.temperature_c, Value::Known(49.0));
        assert_eq!(s.hotspot_c, Value::Known(49.0));
        assert_eq!(s.power_w, Value::Known(19.0));
        assert!(s.ecc.is_empty(), "a consumer card has no RAS counters");
    }

    #[test]
    fn a_removed_device_samples_as_gone_and_a_resetting_one_as_unknown() {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path().join("sys");
        copy_tree(&tree(), &root);
        let amd = AmdSysfs::discover(&root, &[]);
        assert!(amd.sample().gpus[0].present);

        // A read error of a device that is still there is no disappearance.
        fs::remove_file(root.join(DEVICE).join("gpu_busy_percent")).unwrap();
        let s = &amd.sample().gpus[0];
        assert!(s.present);
        assert_eq!(s.utilization_percent, Value::Unknown);
        assert_eq!(s.vram_used_bytes, Value::Known(17_453_056));

        fs::remove_dir_all(root.join(DEVICE)).unwrap();
        let s = &amd.sample().gpus[0];
        assert!(!s.present);
        assert_eq!(s.device.pci.as_deref(), Some("0000:0b:00.0"));
    }

    #[test]
    fn ras_counters_are_read_per_block() {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path().join("sys");
        copy_tree(&tree(), &root);
        let ras = root.join(DEVICE).join("ras");
        fs::create_dir(&ras).unwrap();
        fs::write(ras.join("umc_err_count"), "ue: 0\nce: 3\n").unwrap();
        fs::write(ras.join("gfx_err_count"), "ue: 0\nce: 0\nde: 0\n").unwrap();
        fs::write(ras.join("features"), "feature mask: 0x0\n").unwrap();
        let amd = AmdSysfs::discover(&root, &[]);
        let s = &amd.sample().gpus[0];
        let blocks: Vec<&str> = s.ecc.iter().map(|e| e.block.as_str()).collect();
        assert_eq!(blocks, ["gfx", "umc"]);
        assert_eq!(s.ecc[1].uncorrectable, Value::Known(0));
        assert_eq!(s.ecc[1].correctable, Value::Known(3));
    }

    #[test]
    fn kfd_nodes_match_cards_by_pci_address_when_there_is_no_render_minor() {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path().join("sys");
        copy_tree(&tree(), &root);
        let props = root.join("class/kfd/kfd/topology/nodes/1/properties");
        let text = fs::read_to_string(&props)
            .unwrap()
            .replace("drm_render_minor 128", "drm_render_minor 0");
        fs::write(&props, text).unwrap();
        let gpus = AmdSysfs::discover(&root, &[]).gpus();
        assert_eq!(gpus[0].pci.as_deref(), Some("0000:0b:00.0"));
        assert_eq!(gpus[0].vram_total_bytes, Some(17_163_091_968));
    }

    #[test]
    fn no_amdgpu_sysfs_means_no_gpus() {
        let tmp = tempfile::tempdir().unwrap();
        assert!(discover(tmp.path()).is_empty());
        assert!(discover(&tmp.path().join("missing")).is_empty());
    }

    #[test]
    fn gfx_targets_from_kfd_versions() {
        assert_eq!(gfx_target(100300).as_deref(), Some("gfx1030"));
        assert_eq!(gfx_target(90010).as_deref(), Some("gfx90a"));
        assert_eq!(gfx_target(90402).as_deref(), Some("gfx942"));
        assert_eq!(gfx_target(90006).as_deref(), Some("gfx906"));
        assert_eq!(gfx_target(110001).as_deref(), Some("gfx1101"));
        assert_eq!(gfx_target(0), None);
    }

    #[test]
    fn ras_count_lines() {
        assert_eq!(parse_ras_count("ue: 2\nce: 17\n"), (Some(2), Some(17)));
        assert_eq!(parse_ras_count("ue: 0\nce: 0\nde: 5\n"), (Some(0), Some(0)));
        assert_eq!(parse_ras_count("garbage"), (None, None));
    }
}

//! A simulated GPU for `demo --ui`: the Radeon RX 6800 sysfs tree the tests use
//! (`tests/data/sysfs`, embedded at build time), written to a directory, and kept moving while
//! the demo runs so the GPU panel tells the story: busy while the job trains on the `gpu` tier,
//! idle and cooling once it has fallen back to the CPU.
//!
//! Not for anything but the demo: nothing here reads a real GPU.

use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::{self, JoinHandle};
use std::time::Duration;

use crate::snapshot::{Board, JobState};

/// The files of the tree, relative to the sysfs root.
const FILES: &[(&str, &str)] = &[
    (
        "class/drm/card0/uevent",
        include_str!("../../tests/data/sysfs/class/drm/card0/uevent"),
    ),
    (
        "class/drm/renderD128/uevent",
        include_str!("../../tests/data/sysfs/class/drm/renderD128/uevent"),
    ),
    (
        "class/drm/version",
        include_str!("../../tests/data/sysfs/class/drm/version"),
    ),
    (
        "class/kfd/kfd/topology/generation_id",
        include_str!("../../tests/data/sysfs/class/kfd/kfd/topology/generation_id"),
    ),
    (
        "class/kfd/kfd/topology/nodes/0/gpu_id",
        include_str!("../../tests/data/sysfs/class/kfd/kfd/topology/nodes/0/gpu_id"),
    ),
    (
        "class/kfd/kfd/topology/nodes/0/io_links/0/properties",
        include_str!("../../tests/data/sysfs/class/kfd/kfd/topology/nodes/0/io_links/0/properties"),
    ),
    (
        "class/kfd/kfd/topology/nodes/0/mem_banks/0/properties",
        include_str!(
            "../../tests/data/sysfs/class/kfd/kfd/topology/nodes/0/mem_banks/0/properties"
        ),
    ),
    (
        "class/kfd/kfd/topology/nodes/0/name",
        include_str!("../../tests/data/sysfs/class/kfd/kfd/topology/nodes/0/name"),
    ),
    (
        "class/kfd/kfd/topology/nodes/0/properties",
        include_str!("../../tests/data/sysfs/class/kfd/kfd/topology/nodes/0/properties"),
    ),
    (
        "class/kfd/kfd/topology/nodes/1/gpu_id",
        include_str!("../../tests/data/sysfs/class/kfd/kfd/topology/nodes/1/gpu_id"),
    ),
    (
        "class/kfd/kfd/topology/nodes/1/io_links/0/properties",
        include_str!("../../tests/data/sysfs/class/kfd/kfd/topology/nodes/1/io_links/0/properties"),
    ),
    (
        "class/kfd/kfd/topology/nodes/1/mem_banks/0/properties",
        include_str!(
            "../../tests/data/sysfs/class/kfd/kfd/topology/nodes/1/mem_banks/0/properties"
        ),
    ),
    (
        "class/kfd/kfd/topology/nodes/1/name",
        include_str!("../../tests/data/sysfs/class/kfd/kfd/topology/nodes/1/name"),
    ),
    (
        "class/kfd/kfd/topology/nodes/1/properties",
        include_str!("../../tests/data/sysfs/class/kfd/kfd/topology/nodes/1/properties"),
    ),
    (
        "class/kfd/kfd/topology/system_properties",
        include_str!("../../tests/data/sysfs/class/kfd/kfd/topology/system_properties"),
    ),
    (
        "devices/pci0000:00/0000:00:03.1/0000:0b:00.0/class",
        include_str!("../../tests/data/sysfs/devices/pci0000:00/0000:00:03.1/0000:0b:00.0/class"),
    ),
    (
        "devices/pci0000:00/0000:00:03.1/0000:0b:00.0/device",
        include_str!("../../tests/data/sysfs/devices/pci0000:00/0000:00:03.1/0000:0b:00.0/device"),
    ),
    (
        "devices/pci0000:00/0000:00:03.1/0000:0b:00.0/drm/card0/uevent",
        include_str!(
            "../../tests/data/sysfs/devices/pci0000:00/0000:00:03.1/0000:0b:00.0/drm/card0/uevent"
        ),
    ),
    (
        "devices/pci0000:00/0000:00:03.1/0000:0b:00.0/drm/renderD128/uevent",
        include_str!(
            "../../tests/data/sysfs/devices/pci0000:00/0000:00:03.1/0000:0b:00.0/drm/renderD128/uevent"
        ),
    ),
    (
        "devices/pci0000:00/0000:00:03.1/0000:0b:00.0/gpu_busy_percent",
        include_str!(
            "../../tests/data/sysfs/devices/pci0000:00/0000:00:03.1/0000:0b:00.0/gpu_busy_percent"
        ),
    ),
    (
        "devices/pci0000:00/0000:00:03.1/0000:0b:00.0/hwmon/hwmon3/in0_input",
        include_str!(
            "../../tests/data/sysfs/devices/pci0000:00/0000:00:03.1/0000:0b:00.0/hwmon/hwmon3/in0_input"
        ),
    ),
    (
        "devices/pci0000:00/0000:00:03.1/0000:0b:00.0/hwmon/hwmon3/in0_label",
        include_str!(
            "../../tests/data/sysfs/devices/pci0000:00/0000:00:03.1/0000:0b:00.0/hwmon/hwmon3/in0_label"
        ),
    ),
    (
        "devices/pci0000:00/0000:00:03.1/0000:0b:00.0/hwmon/hwmon3/name",
        include_str!(
            "../../tests/data/sysfs/devices/pci0000:00/0000:00:03.1/0000:0b:00.0/hwmon/hwmon3/name"
        ),
    ),
    (
        "devices/pci0000:00/0000:00:03.1/0000:0b:00.0/hwmon/hwmon3/power1_average",
        include_str!(
            "../../tests/data/sysfs/devices/pci0000:00/0000:00:03.1/0000:0b:00.0/hwmon/hwmon3/power1_average"
        ),
    ),
    (
        "devices/pci0000:00/0000:00:03.1/0000:0b:00.0/hwmon/hwmon3/power1_cap",
        include_str!(
            "../../tests/data/sysfs/devices/pci0000:00/0000:00:03.1/0000:0b:00.0/hwmon/hwmon3/power1_cap"
        ),
    ),
    (
        "devices/pci0000:00/0000:00:03.1/0000:0b:00.0/hwmon/hwmon3/temp1_input",
        include_str!(
            "../../tests/data/sysfs/devices/pci0000:00/0000:00:03.1/0000:0b:00.0/hwmon/hwmon3/temp1_input"
        ),
    ),
    (
        "devices/pci0000:00/0000:00:03.1/0000:0b:00.0/hwmon/hwmon3/temp1_label",
        include_str!(
            "../../tests/data/sysfs/devices/pci0000:00/0000:00:03.1/0000:0b:00.0/hwmon/hwmon3/temp1_label"
        ),
    ),
    (
        "devices/pci0000:00/0000:00:03.1/0000:0b:00.0/hwmon/hwmon3/temp2_input",
        include_str!(
            "../../tests/data/sysfs/devices/pci0000:00/0000:00:03.1/0000:0b:00.0/hwmon/hwmon3/temp2_input"
        ),
    ),
    (
        "devices/pci0000:00/0000:00:03.1/0000:0b:00.0/hwmon/hwmon3/temp2_label",
        include_str!(
            "../../tests/data/sysfs/devices/pci0000:00/0000:00:03.1/0000:0b:00.0/hwmon/hwmon3/temp2_label"
        ),
    ),
    (
        "devices/pci0000:00/0000:00:03.1/0000:0b:00.0/hwmon/hwmon3/temp3_input",
        include_str!(
            "../../tests/data/sysfs/devices/pci0000:00/0000:00:03.1/0000:0b:00.0/hwmon/hwmon3/temp3_input"
        ),
    ),
    (
        "devices/pci0000:00/0000:00:03.1/0000:0b:00.0/hwmon/hwmon3/temp3_label",
        include_str!(
            "../../tests/data/sysfs/devices/pci0000:00/0000:00:03.1/0000:0b:00.0/hwmon/hwmon3/temp3_label"
        ),
    ),
    (
        "devices/pci0000:00/0000:00:03.1/0000:0b:00.0/mem_info_vram_total",
        include_str!(
            "../../tests/data/sysfs/devices/pci0000:00/0000:00:03.1/0000:0b:00.0/mem_info_vram_total"
        ),
    ),
    (
        "devices/pci0000:00/0000:00:03.1/0000:0b:00.0/mem_info_vram_used",
        include_str!(
            "../../tests/data/sysfs/devices/pci0000:00/0000:00:03.1/0000:0b:00.0/mem_info_vram_used"
        ),
    ),
    (
        "devices/pci0000:00/0000:00:03.1/0000:0b:00.0/revision",
        include_str!(
            "../../tests/data/sysfs/devices/pci0000:00/0000:00:03.1/0000:0b:00.0/revision"
        ),
    ),
    (
        "devices/pci0000:00/0000:00:03.1/0000:0b:00.0/uevent",
        include_str!("../../tests/data/sysfs/devices/pci0000:00/0000:00:03.1/0000:0b:00.0/uevent"),
    ),
    (
        "devices/pci0000:00/0000:00:03.1/0000:0b:00.0/vbios_version",
        include_str!(
            "../../tests/data/sysfs/devices/pci0000:00/0000:00:03.1/0000:0b:00.0/vbios_version"
        ),
    ),
    (
        "devices/pci0000:00/0000:00:03.1/0000:0b:00.0/vendor",
        include_str!("../../tests/data/sysfs/devices/pci0000:00/0000:00:03.1/0000:0b:00.0/vendor"),
    ),
    (
        "module/amdgpu/initstate",
        include_str!("../../tests/data/sysfs/module/amdgpu/initstate"),
    ),
];

/// The PCI device directory of the simulated card.
const DEVICE: &str = "devices/pci0000:00/0000:00:03.1/0000:0b:00.0";

/// Writes the tree under `dir` and returns the sysfs root to sample.
pub fn rx6800(dir: &Path) -> io::Result<PathBuf> {
    let root = dir.join("simulated-sysfs");
    for (path, text) in FILES {
        let file = root.join(path);
        if let Some(parent) = file.parent() {
            std::fs::create_dir_all(parent)?;
        }
        std::fs::write(file, text)?;
    }
    for node in ["card0", "renderD128"] {
        let class = root.join("class/drm").join(node);
        std::fs::create_dir_all(&class)?;
        let link = class.join("device");
        if std::fs::symlink_metadata(&link).is_err() {
            std::os::unix::fs::symlink(format!("../../../{DEVICE}"), link)?;
        }
    }
    Ok(root)
}

/// Keeps the simulated card's numbers moving with the demo job; stops when dropped.
#[derive(Debug)]
pub struct Animation {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
    /// Removed when the animation ends: the directory the tree was written in.
    dir: PathBuf,
}

impl Drop for Animation {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Starts moving the numbers of the tree that [`rx6800`] wrote in `dir` after what `board`
/// says of the job. The directory is removed when the animation is dropped.
pub fn animate(dir: &Path, board: &Board) -> io::Result<Animation> {
    let root = dir.join("simulated-sysfs");
    let stop = Arc::new(AtomicBool::new(false));
    let device = root.join(DEVICE);
    let hwmon = device.join("hwmon/hwmon3");
    let (flag, board) = (Arc::clone(&stop), board.clone());
    let thread = thread::Builder::new()
        .name("demo-gpu".into())
        .spawn(move || {
            let mut temperature = 49.0f64;
            let mut tick = 0u32;
            while !flag.load(Ordering::SeqCst) {
                let busy = board
                    .read()
                    .job
                    .is_some_and(|j| j.state == JobState::Running && j.device != "cpu");
                tick += 1;
                let (util, vram, power) = if busy {
                    (88 + (tick * 7) % 11, 9_663_676_416u64, 187)
                } else {
                    (0, 17_453_056, 19)
                };
                let target = if busy { 78.0 } else { 49.0 };
                temperature += (target - temperature) * 0.25;
                let write = |path: PathBuf, value: String| {
                    let _ = std::fs::write(path, value);
                };
                write(device.join("gpu_busy_percent"), format!("{util}\n"));
                write(device.join("mem_info_vram_used"), format!("{vram}\n"));
                let milli = (temperature * 1000.0) as u64;
                write(hwmon.join("temp1_input"), format!("{milli}\n"));
                write(hwmon.join("temp2_input"), format!("{}\n", milli + 9000));
                write(
                    hwmon.join("power1_average"),
                    format!("{}\n", power * 1_000_000),
                );
                thread::sleep(Duration::from_millis(500));
            }
        })?;
    Ok(Animation {
        stop,
        thread: Some(thread),
        dir: dir.to_path_buf(),
    })
}

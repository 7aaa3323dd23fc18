//! Reading the GPUs' memory for the wait before a GPU attempt that follows a faulted one
//! (`supervisor::memory` decides; this only reads):
//!
//! - AMD: the processes holding VRAM on each GPU from KFD
//!   (`<sysfs>/class/kfd/kfd/proc/<pid>/vram_<gpu_id>`), and the GPU's `mem_info_vram_used`,
//!   compared with a reading taken when the ended attempt started;
//! - NVIDIA: the processes holding memory from `nvidia-smi --query-compute-apps` (the call the
//!   documentation gives for it; 20 ms on an H100, FACTS.md), bounded in time.
//!
//! It also keeps, per attempt, the processes the executor knew of it (the leader and the
//! members the process tree saw), which is what "the ended attempt's memory" means.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use super::{Event, Executor, lock};
use crate::gpu::{Gpu, JobGpu, Vendor};
use crate::process::{self, Ended, Keep};
use crate::sources::health::DeviceRef;
use crate::sources::health::amd_sysfs::AmdSysfs;
use crate::supervisor::Supervisor;
use crate::supervisor::memory::GpuMemory;

/// How often the GPUs are read while the run waits.
pub(super) const MEMORY_POLL: Duration = Duration::from_millis(200);

/// The longest an nvidia-smi call may take here: a wedged driver can hang it (FACTS.md), and the
/// wait it serves is bounded anyway.
const NVIDIA_SMI_TIMEOUT: Duration = Duration::from_secs(3);

/// What the wait needs to remember across attempts, and the means to read the GPUs.
#[derive(Debug, Default)]
pub(super) struct MemoryWatch {
    /// The sysfs root (`--sysfs-root`; `/sys` unless given).
    pub(super) root: PathBuf,
    /// The AMD GPUs under `root`, found at the first reading.
    amd: Option<AmdSysfs>,
    /// VRAM used on each GPU (by inventory key) when each attempt started.
    before: HashMap<u32, Vec<(usize, u64)>>,
    /// The processes known of each attempt: its leader first.
    pids: HashMap<u32, Vec<u32>>,
    /// When the GPUs were last read for the wait.
    pub(super) read_at: Option<Instant>,
}

impl MemoryWatch {
    /// Reads under `root` (`--sysfs-root`), `/sys` where none is given.
    pub(super) fn new(root: Option<PathBuf>) -> MemoryWatch {
        MemoryWatch {
            root: root.unwrap_or_else(|| PathBuf::from("/sys")),
            ..MemoryWatch::default()
        }
    }

    /// VRAM used on `gpus` now (AMD, from sysfs), by inventory key.
    fn vram_used(&mut self, machine: &[Gpu], gpus: &[usize]) -> Vec<(usize, u64)> {
        let root = &self.root;
        let amd = self
            .amd
            .get_or_insert_with(|| AmdSysfs::discover(root, &[]));
        if amd.is_empty() {
            return Vec::new();
        }
        let reading = amd.sample();
        gpus.iter()
            .filter_map(|&key| {
                let gpu = machine.get(key)?;
                let sample = reading
                    .gpus
                    .iter()
                    .find(|s| s.device.pci.is_some() && s.device.pci == gpu.pci)?;
                Some((key, sample.vram_used_bytes.known()?))
            })
            .collect()
    }
}

impl Executor<'_> {
    /// Notes what the wait after `attempt` will compare with: VRAM used on its GPUs as it
    /// starts.
    pub(super) fn memory_before(&mut self, attempt: u32, sight: &[JobGpu]) {
        if self.plan.gpu_memory_wait.is_none() || sight.is_empty() {
            return;
        }
        let keys: Vec<usize> = sight.iter().map(|g| g.key).collect();
        let used = self.memory.vram_used(&self.gpus, &keys);
        self.memory.before.insert(attempt, used);
    }

    /// Notes `attempt`'s leader, the first of its processes.
    pub(super) fn memory_leader(&mut self, attempt: u32, pid: u32) {
        self.memory.pids.insert(attempt, vec![pid]);
    }

    /// Adds the members the process tree saw in `attempt`'s group (called before the group is
    /// forgotten).
    pub(super) fn memory_members(&mut self, attempt: u32, pgid: u32) {
        let seen = lock(&self.view).members_of(pgid);
        let pids = self.memory.pids.entry(attempt).or_default();
        for pid in seen {
            if !pids.contains(&pid) {
                pids.push(pid);
            }
        }
    }

    /// One turn of the event loop for the wait: reads the GPUs while the supervisor waits for
    /// their memory; returns `timeout` shortened to the next reading, or zero when a reading
    /// went to `pending` (it waits for no input: the supervisor hears it at once).
    pub(super) fn memory_step(
        &mut self,
        sup: &Supervisor,
        now: Instant,
        pending: &mut Vec<Event>,
        timeout: Duration,
    ) -> Duration {
        let Some((ended, gpus)) = sup.memory_wait() else {
            self.memory.read_at = None;
            return timeout;
        };
        let gpus = gpus.to_vec();
        let before = pending.len();
        let next = self.read_gpu_memory(ended, &gpus, now, pending);
        match pending.len() > before {
            true => Duration::ZERO,
            false => timeout.min(next),
        }
    }

    /// While the supervisor waits for GPU memory: reads the GPUs every [`MEMORY_POLL`] and
    /// answers with the reading; returns how long the loop may sleep before the next.
    fn read_gpu_memory(
        &mut self,
        ended: u32,
        gpus: &[JobGpu],
        now: Instant,
        pending: &mut Vec<Event>,
    ) -> Duration {
        if let Some(at) = self.memory.read_at {
            let since = now.saturating_duration_since(at);
            if since < MEMORY_POLL {
                return MEMORY_POLL - since;
            }
        }
        self.memory.read_at = Some(now);
        let keys: Vec<usize> = gpus.iter().map(|g| g.key).collect();
        let used = self.memory.vram_used(&self.gpus, &keys);
        let before = self.memory.before.get(&ended).cloned().unwrap_or_default();
        let kfd = kfd_holders(&self.memory.root, &self.gpus, &keys);
        let nvidia = gpus
            .iter()
            .any(|g| g.vendor == Vendor::Nvidia)
            .then(nvidia_holders)
            .flatten();
        let reading = gpus
            .iter()
            .map(|g| {
                let machine = self.gpus.get(g.key);
                let holders = match g.vendor {
                    Vendor::Nvidia => nvidia.as_ref().map(|apps| {
                        apps.iter()
                            .filter(|(_, _, bus)| same_slot(Some(bus), g.pci.as_deref()))
                            .map(|(pid, bytes, _)| (*pid, *bytes))
                            .collect()
                    }),
                    _ => kfd.get(&g.key).cloned(),
                };
                let find =
                    |list: &[(usize, u64)]| list.iter().find(|(k, _)| *k == g.key).map(|(_, b)| *b);
                GpuMemory {
                    index: g.index,
                    holders,
                    used: find(&used),
                    before: find(&before),
                    total: machine.and_then(|m| m.vram_total_bytes),
                }
            })
            .collect();
        pending.push(Event::GpuMemory {
            ended,
            pids: self.memory.pids.get(&ended).cloned().unwrap_or_default(),
            gpus: reading,
        });
        MEMORY_POLL
    }
}

/// The processes holding VRAM on each AMD GPU of `keys`, from KFD; a GPU whose KFD id cannot be
/// read, or a machine without KFD's process directory, has none listed (`None`: unknown).
fn kfd_holders(root: &Path, machine: &[Gpu], keys: &[usize]) -> HashMap<usize, Vec<(u32, u64)>> {
    let procs = root.join("class/kfd/kfd/proc");
    let mut out = HashMap::new();
    if !procs.is_dir() {
        return out;
    }
    for &key in keys {
        let Some(gpu) = machine.get(key).filter(|g| g.vendor == Vendor::Amd) else {
            continue;
        };
        let Some(node) = gpu.kfd_node else {
            continue;
        };
        let id_file = root.join(format!("class/kfd/kfd/topology/nodes/{node}/gpu_id"));
        let Ok(id) = std::fs::read_to_string(id_file) else {
            continue;
        };
        let ids = [(DeviceRef::of(gpu), id.trim().to_string())];
        let held = crate::sources::health::amd_sysfs::kfd_processes(&procs, &ids)
            .into_iter()
            .map(|(_, p)| (p.pid, p.vram_bytes))
            .collect();
        out.insert(key, held);
    }
    out
}

/// `nvidia-smi --query-compute-apps=pid,used_memory,gpu_bus_id`: each compute process with the
/// memory it holds and the PCI bus id of its GPU; `None` when nvidia-smi is not there or fails.
fn nvidia_holders() -> Option<Vec<(u32, u64, String)>> {
    let program = super::progress::on_path("nvidia-smi")?;
    let mut cmd = Command::new(program);
    cmd.args([
        "--query-compute-apps=pid,used_memory,gpu_bus_id",
        "--format=csv,noheader,nounits",
    ])
    .env("LC_ALL", "C");
    let run = process::run_captured(
        cmd,
        Keep::First(1 << 20),
        Keep::First(4096),
        Instant::now() + NVIDIA_SMI_TIMEOUT,
        &|| false,
    )
    .ok()?;
    match run.ended {
        Ended::Exited(Some(status)) if status.success() => {}
        // Collected by the subreaper's reaping: the output is whole if it parses.
        Ended::Exited(None) => {}
        _ => return None,
    }
    parse_compute_apps(&String::from_utf8_lossy(&run.stdout))
}

/// The CSV of `--query-compute-apps=pid,used_memory,gpu_bus_id --format=csv,noheader,nounits`:
/// `12345, 1024, 00000000:01:00.0` (MiB). `[N/A]` memory (seen under some drivers and in
/// containers) counts as holding some. `None` for text that is not this CSV at all.
pub fn parse_compute_apps(text: &str) -> Option<Vec<(u32, u64, String)>> {
    let mut out = Vec::new();
    for line in text.lines().map(str::trim).filter(|l| !l.is_empty()) {
        if line.starts_with("No running") {
            continue;
        }
        let fields: Vec<&str> = line.split(',').map(str::trim).collect();
        let [pid, mib, bus] = fields[..] else {
            return None;
        };
        let pid: u32 = pid.parse().ok()?;
        crate::attribution::pci_slot(bus)?;
        let bytes = match mib.parse::<u64>() {
            Ok(mib) => mib << 20,
            Err(_) => 1,
        };
        out.push((pid, bytes, bus.to_string()));
    }
    Some(out)
}

fn same_slot(a: Option<&String>, b: Option<&str>) -> bool {
    let slot = |t: &str| crate::attribution::pci_slot(t);
    matches!((a.and_then(|t| slot(t)), b.and_then(slot)), (Some(x), Some(y)) if x == y)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn compute_apps_of_a_real_h100() {
        // Captured by scripts/nvidia-captures.sh on an H100 (driver 580.159.04) while two
        // PyTorch processes held 3 GiB and 5 GiB tensors: the exact query gpuwarden makes.
        let text =
            crate::sources::health::fixture("nvidia-smi-query-compute-apps-gpuwarden-h100-580.txt");
        let apps = parse_compute_apps(&text).unwrap();
        assert_eq!(
            apps,
            [
                (437, 5730 << 20, "00000000:00:06.0".to_string()),
                (436, 3682 << 20, "00000000:00:06.0".to_string()),
            ]
        );
        assert!(same_slot(Some(&apps[0].2), Some("0000:00:06.0")));
    }

    #[test]
    fn compute_apps_csv_as_nvidia_smi_prints_it() {
        // The processes of `nvidia-smi-default-470-with-processes.txt` (corpus), in the CSV
        // form of --query-compute-apps (pid, MiB, bus id), and a `[N/A]` memory field.
        let text = "3279, 35, 00000000:01:00.0\n8090, 155, 00000000:01:00.0\n10010, [N/A], 00000000:01:00.0\n";
        let apps = parse_compute_apps(text).unwrap();
        assert_eq!(apps.len(), 3);
        assert_eq!(apps[0], (3279, 35 << 20, "00000000:01:00.0".to_string()));
        assert_eq!(apps[2].1, 1);
        assert!(same_slot(Some(&apps[0].2), Some("0000:01:00.0")));
        assert!(!same_slot(Some(&apps[0].2), Some("0000:02:00.0")));
        assert_eq!(parse_compute_apps("").unwrap(), []);
        assert_eq!(
            parse_compute_apps("No running processes found\n").unwrap(),
            []
        );
        assert_eq!(parse_compute_apps("NVIDIA-SMI has failed\n"), None);
        // Another query's answer (an nvidia-smi that ignores the query) is not this CSV.
        let gpu_query = "0, GPU-7f3c1e52-0000-4e1b-9d2a-000000000000, NVIDIA H100 80GB HBM3, 00000000:3B:00.0, 9.0";
        assert_eq!(parse_compute_apps(gpu_query), None);
    }
}

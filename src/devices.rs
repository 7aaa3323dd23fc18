//! Which GPUs the job sees, by what ordinal, and which of them a fault names (issue 14).
//!
//! A job does not see the machine's GPUs as the machine lists them: `ROCR_VISIBLE_DEVICES`,
//! `HIP_VISIBLE_DEVICES` and `CUDA_VISIBLE_DEVICES` select and reorder them, and the job then
//! numbers what is left from 0 (`cuda:0`, `cuda:1`, on AMD and NVIDIA alike in PyTorch). Faults
//! name GPUs in the machine's terms (a PCI address in a kernel line or a health sample, a KFD
//! node in an HSA error, a render node) or in the job's (`cuda:1` in a rank's traceback). This
//! module maps both to one [`JobGpu`], and writes the variables that hide excluded GPUs from the
//! next attempt while keeping the user's own selection and order.
//!
//! Everything here is a pure function of the inventory (`crate::probe::inventory`) and an
//! environment; the executor gathers both, the supervisor decides what to exclude.
//!
//! `CUDA_DEVICE_ORDER`: nvidia-smi numbers GPUs in PCI bus order; CUDA does so only under
//! `CUDA_DEVICE_ORDER=PCI_BUS_ID`, and by default puts the fastest GPU first. On a machine whose
//! NVIDIA GPUs are all the same model the two orders agree. Where they may not (mixed models
//! without `PCI_BUS_ID`), [`Sight::certain`] is false: a `cuda:N` is then not mapped to a GPU
//! (a PCI address still is), and the variables gpuwarden writes name GPUs by UUID, which
//! means the same GPU in either order.

use std::collections::BTreeMap;
use std::ffi::OsString;

use crate::gpu::{Gpu, JobGpu, PciAddress, Vendor};
use crate::rules::{Fault, Stream};

/// The variables that select GPUs, in the order the runtimes apply them.
pub const VISIBLE_VARS: [&str; 3] = [
    "ROCR_VISIBLE_DEVICES",
    "HIP_VISIBLE_DEVICES",
    "CUDA_VISIBLE_DEVICES",
];

/// The variables this module reads: the selection, and CUDA's numbering order.
const READ_VARS: [&str; 4] = [
    "ROCR_VISIBLE_DEVICES",
    "HIP_VISIBLE_DEVICES",
    "CUDA_VISIBLE_DEVICES",
    "CUDA_DEVICE_ORDER",
];

/// The relevant variables of an environment (`get` answers for one name), decoded lossily.
pub type GpuEnv = BTreeMap<String, String>;

/// Reads the variables that decide which GPUs a job sees.
pub fn read_env(get: impl Fn(&str) -> Option<OsString>) -> GpuEnv {
    READ_VARS
        .iter()
        .filter_map(|name| get(name).map(|v| (name.to_string(), v.to_string_lossy().into_owned())))
        .collect()
}

/// What one attempt sees of the machine's GPUs.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Sight {
    /// The GPUs the job sees, in its ordinal order (AMD first where a machine has both, each
    /// vendor numbered from 0 as its runtime numbers them).
    pub gpus: Vec<JobGpu>,
    /// Whether the job's ordinals are known for sure (see the module documentation).
    pub certain: bool,
}

impl Sight {
    /// `{gpus}`: the vendor indexes of the GPUs the job sees, in its order (`0,2`).
    pub fn list(&self) -> String {
        self.gpus
            .iter()
            .map(|g| g.index.to_string())
            .collect::<Vec<_>>()
            .join(",")
    }

    /// `{nproc}`: one process per GPU the job sees; 1 where it sees none (a CPU tier, or a
    /// machine whose GPUs gpuwarden could not list), so `torchrun --nproc-per-node {nproc}`
    /// still starts one worker.
    pub fn nproc(&self) -> usize {
        self.gpus.len().max(1)
    }
}

/// The GPUs of `machine` a job sees under `env`, with the ordinal it knows each by.
///
/// The selection is the one [`crate::probe::visible`] applies (`crate::probe::by_runtime`): AMD
/// by `ROCR_VISIBLE_DEVICES`, then `HIP_VISIBLE_DEVICES` (or `CUDA_VISIBLE_DEVICES`); NVIDIA by
/// `CUDA_VISIBLE_DEVICES`. Lists are read as the runtimes read them: indexes or UUIDs, in the
/// order given, stopping at the first entry that names no GPU.
pub fn sight(machine: &[Gpu], env: &GpuEnv) -> Sight {
    let (amd, nvidia) = crate::probe::by_runtime(machine, env);
    let pci_order = env
        .get("CUDA_DEVICE_ORDER")
        .is_some_and(|v| v.trim() == "PCI_BUS_ID");
    let all_nvidia: Vec<&Gpu> = machine
        .iter()
        .filter(|g| g.vendor == Vendor::Nvidia)
        .collect();
    let one_model = all_nvidia
        .windows(2)
        .all(|w| w[0].name.is_some() && w[0].name == w[1].name);
    let certain = pci_order || one_model;
    // The inventory key of a GPU the selection kept: its place in `machine`.
    let key = |g: &Gpu| machine.iter().position(|m| std::ptr::eq(m, g));
    let job = |list: Vec<&Gpu>| {
        list.into_iter()
            .enumerate()
            .filter_map(|(ordinal, g)| {
                Some(JobGpu {
                    key: key(g)?,
                    vendor: g.vendor,
                    index: g.index,
                    ordinal: ordinal as u32,
                    pci: g.pci.clone(),
                })
            })
            .collect::<Vec<_>>()
    };
    let mut gpus = job(amd);
    gpus.extend(job(nvidia));
    Sight { gpus, certain }
}

/// The variables that make the job see `seen` less the GPUs `exclude` (inventory keys), in the
/// same order: what an attempt runs with once a GPU was excluded.
///
/// AMD GPUs are selected by `ROCR_VISIBLE_DEVICES` (the lowest layer; it takes the KFD-order
/// index), and `HIP_VISIBLE_DEVICES`/`CUDA_VISIBLE_DEVICES`, where they were in effect, become
/// `0..n`, positions in that list, so an old selection is never applied twice. NVIDIA GPUs are
/// selected by `CUDA_VISIBLE_DEVICES`: indexes, or UUIDs where the user gave UUIDs or CUDA's
/// numbering may differ from nvidia-smi's. A vendor with no GPU left gets `-1`.
pub fn narrowed(
    machine: &[Gpu],
    seen: &Sight,
    exclude: &[usize],
    env: &GpuEnv,
) -> Vec<(String, String)> {
    let keep = |vendor: Vendor| -> Vec<&JobGpu> {
        seen.gpus
            .iter()
            .filter(|g| g.vendor == vendor && !exclude.contains(&g.key))
            .collect()
    };
    let (amd, nvidia) = (keep(Vendor::Amd), keep(Vendor::Nvidia));
    let has = |vendor: Vendor| machine.iter().any(|g| g.vendor == vendor);
    let list = |ids: Vec<String>| {
        if ids.is_empty() {
            "-1".to_string()
        } else {
            ids.join(",")
        }
    };
    let positions = |n: usize| list((0..n).map(|i| i.to_string()).collect());
    let mut out = Vec::new();
    if has(Vendor::Amd) {
        out.push((
            "ROCR_VISIBLE_DEVICES".to_string(),
            list(amd.iter().map(|g| g.index.to_string()).collect()),
        ));
        if env.contains_key("HIP_VISIBLE_DEVICES")
            || env.contains_key("CUDA_VISIBLE_DEVICES")
            || has(Vendor::Nvidia)
        {
            // Where HIP would otherwise read CUDA_VISIBLE_DEVICES meant for NVIDIA, or an old
            // HIP list would select again among the new ROCr list.
            out.push(("HIP_VISIBLE_DEVICES".to_string(), positions(amd.len())));
        }
    }
    if has(Vendor::Nvidia) {
        let user_uuids = env
            .get("CUDA_VISIBLE_DEVICES")
            .is_some_and(|v| v.contains("GPU-"));
        let uuid = |g: &&JobGpu| machine.get(g.key).and_then(|m| m.uuid.clone());
        let by_uuid = (user_uuids || !seen.certain) && nvidia.iter().all(|g| uuid(g).is_some());
        let ids = nvidia
            .iter()
            .map(|g| match by_uuid {
                true => uuid(g).unwrap_or_default(),
                false => g.index.to_string(),
            })
            .collect();
        out.push(("CUDA_VISIBLE_DEVICES".to_string(), list(ids)));
    } else if env.contains_key("CUDA_VISIBLE_DEVICES") {
        out.push(("CUDA_VISIBLE_DEVICES".to_string(), positions(amd.len())));
    }
    out
}

/// The GPUs among `seen` that `fault` names, as the attempt sees them; empty when it names
/// none of them (or none at all).
///
/// What names a GPU, the first that is there: a PCI address (`pci`: kernel lines, Xids, health
/// samples), a KFD node (`node`: `Memory access fault by GPU node-2`), a render node
/// (`renderD129` in the line), the vendor index of a health fault (`gpu`), and in the job's own
/// output a device ordinal (`cuda:1`), only where ordinals are [`Sight::certain`].
pub fn named(fault: &Fault, machine: &[Gpu], seen: &Sight) -> Vec<JobGpu> {
    let pick = |matches: &dyn Fn(&Gpu, &JobGpu) -> bool| -> Vec<JobGpu> {
        seen.gpus
            .iter()
            .filter(|j| machine.get(j.key).is_some_and(|g| matches(g, j)))
            .cloned()
            .collect()
    };
    if let Some(pci) = fault.captures.get("pci") {
        let Some(slot) = PciAddress::parse(pci).map(PciAddress::slot) else {
            return Vec::new();
        };
        return pick(&|g, _| {
            g.pci
                .as_deref()
                .and_then(PciAddress::parse)
                .is_some_and(|p| p.slot() == slot)
        });
    }
    if let Some(node) = fault
        .captures
        .get("node")
        .and_then(|n| n.trim().parse::<u32>().ok())
    {
        return pick(&|g, _| g.vendor == Vendor::Amd && g.kfd_node == Some(node));
    }
    if let Some(minor) = render_minor(&fault.line) {
        return pick(&|g, _| g.render_minor == Some(minor));
    }
    if let Some(index) = fault
        .captures
        .get("gpu")
        .and_then(|n| n.trim().parse::<u32>().ok())
    {
        let found = pick(&|g, _| g.index == index);
        // On a machine with GPUs of both vendors an index alone is ambiguous.
        return if found.len() == 1 { found } else { Vec::new() };
    }
    if matches!(fault.stream, Stream::Stdout | Stream::Stderr)
        && seen.certain
        && let Some(ordinals) = cuda_ordinals(&fault.line)
    {
        return pick(&|_, j| ordinals.contains(&j.ordinal));
    }
    Vec::new()
}

/// The minor of a `renderD129` in a line.
fn render_minor(line: &str) -> Option<u32> {
    let at = line.find("renderD")?;
    digits(&line[at + "renderD".len()..])
}

/// The ordinals of every `cuda:N` in a line (`Expected all tensors to be on the same device,
/// but found at least two devices, cuda:0 and cuda:1` names both).
fn cuda_ordinals(line: &str) -> Option<Vec<u32>> {
    let found: Vec<u32> = line
        .match_indices("cuda:")
        .filter_map(|(at, _)| digits(&line[at + "cuda:".len()..]))
        .collect();
    (!found.is_empty()).then_some(found)
}

fn digits(text: &str) -> Option<u32> {
    let end = text
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(text.len());
    text[..end].parse().ok()
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::rules::FaultClass;

    fn amd(index: u32, pci: &str) -> Gpu {
        Gpu {
            kfd_node: Some(index + 1),
            render_minor: Some(128 + index),
            gfx_target: Some("gfx1030".into()),
            ..Gpu::for_test(Vendor::Amd, index, "AMD Radeon RX 6800", pci)
        }
    }

    fn nvidia(index: u32, pci: &str, name: &str) -> Gpu {
        Gpu {
            compute_capability: Some("9.0".into()),
            uuid: Some(format!("GPU-{index}{index}{index}-uuid")),
            ..Gpu::for_test(Vendor::Nvidia, index, name, pci)
        }
    }

    fn env(vars: &[(&str, &str)]) -> GpuEnv {
        vars.iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    fn two_amd() -> Vec<Gpu> {
        vec![amd(0, "0000:0b:00.0"), amd(1, "0000:0c:00.0")]
    }

    fn fault(stream: Stream, line: &str, captures: &[(&str, &str)]) -> Fault {
        Fault::for_test("r", FaultClass::GpuLost, stream, line, captures)
    }

    fn indexes(s: &Sight) -> Vec<(u32, u32)> {
        s.gpus.iter().map(|g| (g.index, g.ordinal)).collect()
    }

    #[test]
    fn every_gpu_in_machine_order_without_variables() {
        let s = sight(&two_amd(), &GpuEnv::new());
        assert_eq!(indexes(&s), [(0, 0), (1, 1)]);
        assert_eq!(s.list(), "0,1");
        assert_eq!(s.nproc(), 2);
        assert!(s.certain);
    }

    #[test]
    fn the_users_selection_and_order_give_the_ordinals() {
        let m = two_amd();
        let s = sight(&m, &env(&[("HIP_VISIBLE_DEVICES", "1,0")]));
        assert_eq!(indexes(&s), [(1, 0), (0, 1)]);
        // ROCR first, then HIP among what ROCR left.
        let s = sight(
            &m,
            &env(&[("ROCR_VISIBLE_DEVICES", "1"), ("HIP_VISIBLE_DEVICES", "0")]),
        );
        assert_eq!(indexes(&s), [(1, 0)]);
        let s = sight(&m, &env(&[("CUDA_VISIBLE_DEVICES", "-1")]));
        assert!(s.gpus.is_empty());
        assert_eq!(s.nproc(), 1);
        assert_eq!(s.list(), "");
    }

    #[test]
    fn cuda_ordinals_are_uncertain_for_mixed_models_without_pci_bus_order() {
        let m = vec![
            nvidia(0, "0000:3b:00.0", "NVIDIA H100"),
            nvidia(1, "0000:86:00.0", "NVIDIA A100"),
        ];
        assert!(!sight(&m, &GpuEnv::new()).certain);
        assert!(sight(&m, &env(&[("CUDA_DEVICE_ORDER", "PCI_BUS_ID")])).certain);
        let same = vec![
            nvidia(0, "0000:3b:00.0", "NVIDIA H100"),
            nvidia(1, "0000:86:00.0", "NVIDIA H100"),
        ];
        assert!(sight(&same, &GpuEnv::new()).certain);
    }

    #[test]
    fn narrowing_keeps_the_users_order_and_hides_the_excluded() {
        let m = two_amd();
        let e = GpuEnv::new();
        let s = sight(&m, &e);
        assert_eq!(
            narrowed(&m, &s, &[1], &e),
            [("ROCR_VISIBLE_DEVICES".to_string(), "0".to_string())]
        );
        // The user's HIP list was 1,0: GPU 0 goes, GPU 1 stays as the job's only device.
        let e = env(&[("HIP_VISIBLE_DEVICES", "1,0")]);
        let s = sight(&m, &e);
        let vars = narrowed(&m, &s, &[0], &e);
        assert_eq!(
            vars,
            [
                ("ROCR_VISIBLE_DEVICES".to_string(), "1".to_string()),
                ("HIP_VISIBLE_DEVICES".to_string(), "0".to_string())
            ]
        );
        let after = sight(&m, &vars.into_iter().collect());
        assert_eq!(indexes(&after), [(1, 0)]);
    }

    #[test]
    fn narrowing_nvidia_uses_indexes_or_uuids() {
        let m = vec![
            nvidia(0, "0000:3b:00.0", "NVIDIA H100"),
            nvidia(1, "0000:86:00.0", "NVIDIA H100"),
            nvidia(2, "0000:af:00.0", "NVIDIA H100"),
        ];
        let e = env(&[("CUDA_VISIBLE_DEVICES", "2,0,1")]);
        let s = sight(&m, &e);
        assert_eq!(indexes(&s), [(2, 0), (0, 1), (1, 2)]);
        let vars = narrowed(&m, &s, &[0], &e);
        assert_eq!(
            vars,
            [("CUDA_VISIBLE_DEVICES".to_string(), "2,1".to_string())]
        );
        let e = env(&[("CUDA_VISIBLE_DEVICES", "GPU-111-uuid,GPU-000-uuid")]);
        let s = sight(&m, &e);
        assert_eq!(indexes(&s), [(1, 0), (0, 1)]);
        assert_eq!(
            narrowed(&m, &s, &[1], &e),
            [(
                "CUDA_VISIBLE_DEVICES".to_string(),
                "GPU-000-uuid".to_string()
            )]
        );
    }

    #[test]
    fn a_fault_names_gpus_by_pci_node_render_minor_index_or_ordinal() {
        let m = two_amd();
        let s = sight(&m, &GpuEnv::new());
        let keys = |f: &Fault| -> Vec<u32> { named(f, &m, &s).iter().map(|g| g.index).collect() };
        let xid = fault(Stream::Kernel, "NVRM: Xid", &[("pci", "PCI:0000:0c:00")]);
        assert_eq!(keys(&xid), [1]);
        let other = fault(Stream::Kernel, "", &[("pci", "0000:86:00.0")]);
        assert!(keys(&other).is_empty());
        let hsa = fault(
            Stream::Stderr,
            "Memory access fault by GPU node-1",
            &[("node", "1")],
        );
        assert_eq!(keys(&hsa), [0]);
        let render = fault(Stream::Stderr, "cannot open /dev/dri/renderD129: EIO", &[]);
        assert_eq!(keys(&render), [1]);
        let health = fault(Stream::Tool, "ue rose", &[("gpu", "1")]);
        assert_eq!(keys(&health), [1]);
        let rank = fault(
            Stream::Stderr,
            "[rank1]: torch.AcceleratorError: CUDA error on cuda:1",
            &[],
        );
        assert_eq!(keys(&rank), [1]);
        let none = fault(
            Stream::Stderr,
            "CUDA error: unspecified launch failure",
            &[],
        );
        assert!(keys(&none).is_empty());
        // A kernel line's `cuda:1` is not the job's numbering.
        let kernel = fault(Stream::Kernel, "cuda:1", &[]);
        assert!(keys(&kernel).is_empty());
    }

    #[test]
    fn an_ordinal_is_the_jobs_numbering_after_its_selection() {
        let m = two_amd();
        let s = sight(&m, &env(&[("ROCR_VISIBLE_DEVICES", "1")]));
        let f = fault(Stream::Stderr, "error on cuda:0", &[]);
        let found = named(&f, &m, &s);
        assert_eq!(found.len(), 1);
        assert_eq!((found[0].index, found[0].ordinal), (1, 0));
        assert_eq!(
            found[0].to_string(),
            "GPU 1 (0000:0c:00.0, the job's cuda:0)"
        );
        // A GPU the job does not see is not one of its GPUs.
        let f = fault(Stream::Kernel, "", &[("pci", "0000:0b:00.0")]);
        assert!(named(&f, &m, &s).is_empty());
    }
}

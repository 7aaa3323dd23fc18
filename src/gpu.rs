//! What gpuwarden knows about one GPU of this machine: the inventory record that the health
//! readers (`sources::health`) fill in from sysfs or a vendor tool, and that the pre-flight probe
//! (`probe`) and the quirks judge.
//!
//! This file only names things. Reading sysfs or running tools is `sources::health`'s job;
//! deciding whether a GPU is safe to use is `probe`'s.

use serde::Serialize;

/// Who made the GPU (PCI vendor 0x1002 is AMD, 0x10de NVIDIA).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Vendor {
    Amd,
    Nvidia,
}

impl Vendor {
    /// The vendor of a PCI vendor id (`0x1002`, `0x10de`), if it makes GPUs we know.
    pub fn from_pci_id(id: u16) -> Option<Vendor> {
        match id {
            0x1002 => Some(Vendor::Amd),
            0x10de => Some(Vendor::Nvidia),
            _ => None,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Vendor::Amd => "amd",
            Vendor::Nvidia => "nvidia",
        }
    }
}

/// One GPU as found on this machine. Fields a source cannot tell stay `None`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Gpu {
    pub vendor: Vendor,
    /// The index the vendor's runtime would give it by default (AMD: order of KFD GPU nodes;
    /// NVIDIA: nvidia-smi's index), which is what `*_VISIBLE_DEVICES` numbers refer to.
    pub index: u32,
    /// A marketing name when one is known ("AMD Radeon RX 6800", "NVIDIA H100 80GB HBM3").
    pub name: Option<String>,
    /// PCI address in sysfs form, lowercase: `0000:03:00.0`.
    pub pci: Option<String>,
    /// PCI device id (`0x73bf`).
    pub device_id: Option<u16>,
    /// AMD: the KFD topology node (`/sys/class/kfd/kfd/topology/nodes/N`), as `node-N` in HSA errors.
    pub kfd_node: Option<u32>,
    /// AMD: the gfx target, `gfx1030` (from `gfx_target_version 100300`).
    pub gfx_target: Option<String>,
    /// NVIDIA: compute capability, `9.0`.
    pub compute_capability: Option<String>,
    /// NVIDIA: the GPU's UUID (`GPU-...`), which `CUDA_VISIBLE_DEVICES` may name.
    pub uuid: Option<String>,
    pub vram_total_bytes: Option<u64>,
    /// The kernel driver's version where the source tells it (NVIDIA driver, amdgpu module).
    pub driver_version: Option<String>,
}

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
    /// AMD: the DRM render node's minor (`/dev/dri/renderD128` is 128), from the KFD topology.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub render_minor: Option<u32>,
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

#[cfg(test)]
impl Gpu {
    /// A GPU with a name and a PCI address and nothing else known: what tests start from,
    /// setting the fields they care about with `..Gpu::for_test(...)`.
    pub(crate) fn for_test(vendor: Vendor, index: u32, name: &str, pci: &str) -> Gpu {
        Gpu {
            vendor,
            index,
            name: Some(name.into()),
            pci: Some(pci.into()),
            device_id: None,
            kfd_node: None,
            render_minor: None,
            gfx_target: None,
            compute_capability: None,
            uuid: None,
            vram_total_bytes: None,
            driver_version: None,
        }
    }
}

/// One GPU as one attempt of the job sees it: which GPU of the machine, and the device
/// ordinal (`cuda:N`, HIP's device N) the job knows it by once `*_VISIBLE_DEVICES` are applied.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct JobGpu {
    /// Which GPU of the machine: its place in gpuwarden's inventory, stable for the whole run.
    /// Only gpuwarden uses it; the journal names the GPU by the fields below.
    #[serde(skip)]
    pub key: usize,
    pub vendor: Vendor,
    /// The vendor's own index (KFD order on AMD, nvidia-smi's index on NVIDIA): what the
    /// `*_VISIBLE_DEVICES` variables and the `{gpus}` placeholder list.
    pub index: u32,
    /// What the job calls it: `cuda:ORDINAL` in PyTorch, on AMD and NVIDIA alike.
    pub ordinal: u32,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pci: Option<String>,
}

impl std::fmt::Display for JobGpu {
    /// `GPU 1 (0000:0c:00.0, the job's cuda:1)`.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "GPU {} (", self.index)?;
        if let Some(pci) = &self.pci {
            write!(f, "{pci}, ")?;
        }
        write!(f, "the job's cuda:{})", self.ordinal)
    }
}

/// A PCI address as sysfs, tools and kernel lines spell it: `0000:03:00.0`, `00000000:3B:00.0`
/// (nvidia-smi), `PCI:0000:00:06` (NVRM, without the function), `3b:00.1` (no domain).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct PciAddress {
    pub domain: u32,
    pub bus: u8,
    pub device: u8,
    /// Absent where the spelling leaves it out (NVRM).
    pub function: Option<u8>,
}

impl PciAddress {
    /// Parses any of the spellings above (hex digits in either case); `None` for anything else.
    pub fn parse(text: &str) -> Option<PciAddress> {
        let text = text.trim();
        let text = text.strip_prefix("PCI:").unwrap_or(text);
        let (head, function) = match text.split_once('.') {
            Some((head, function)) => (head, Some(u8::from_str_radix(function, 16).ok()?)),
            None => (text, None),
        };
        let hex = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_hexdigit());
        let parts: Vec<&str> = head.split(':').collect();
        let (domain, bus, device) = match parts.as_slice() {
            [domain, bus, device] if hex(domain) => {
                (u32::from_str_radix(domain, 16).ok()?, *bus, *device)
            }
            [bus, device] => (0, *bus, *device),
            _ => return None,
        };
        if !hex(bus) || !hex(device) {
            return None;
        }
        Some(PciAddress {
            domain,
            bus: u8::from_str_radix(bus, 16).ok()?,
            device: u8::from_str_radix(device, 16).ok()?,
            function,
        })
    }

    /// Domain, bus and device: what names one GPU whatever the spelling (NVRM leaves the
    /// function out).
    pub fn slot(self) -> (u32, u8, u8) {
        (self.domain, self.bus, self.device)
    }
}

impl std::fmt::Display for PciAddress {
    /// The sysfs spelling, lowercase, function 0 where none was given: `0000:03:00.0`.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{:04x}:{:02x}:{:02x}.{:x}",
            self.domain,
            self.bus,
            self.device,
            self.function.unwrap_or(0)
        )
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn pci_addresses_of_every_spelling_name_the_same_slot() {
        let slot = Some((0, 0x3b, 0));
        for text in [
            "0000:3b:00.0",
            "00000000:3B:00.0",
            "PCI:0000:3b:00",
            "3b:00.1",
        ] {
            assert_eq!(
                PciAddress::parse(text).map(PciAddress::slot),
                slot,
                "{text}"
            );
        }
        assert_eq!(
            PciAddress::parse("0001:03:00.0").map(PciAddress::slot),
            Some((1, 3, 0))
        );
        let odd = PciAddress::parse("00008ED0:00:00.0").unwrap();
        assert_eq!(odd.to_string(), "8ed0:00:00.0");
        assert_eq!(
            PciAddress::parse("PCI:0000:00:06").unwrap().to_string(),
            "0000:00:06.0"
        );
        for bad in [
            "card0",
            "0000:zz:00.0",
            "GPU0000:07:00.0",
            "",
            "0000:03:00.x",
            "1:2:3:4",
        ] {
            assert_eq!(PciAddress::parse(bad), None, "{bad}");
        }
    }
}

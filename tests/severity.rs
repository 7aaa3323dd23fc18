//! Severity read from the line, not only from the code (issue 13): NVIDIA's NVLink Xids say
//! Fatal or Nonfatal in the line itself, Xid 154 names the recovery action it asks for, and the
//! same Xid may or may not name the process it concerns.

use gpuwarden::rules::{Action, FaultClass, RuleSet, Severity, Stream};

fn kernel(line: &str) -> gpuwarden::rules::Fault {
    RuleSet::builtin()
        .expect("built-in rules load")
        .classify(Stream::Kernel, line)
        .unwrap_or_else(|| panic!("no rule for {line}"))
}

#[test]
fn a_nonfatal_nvlink_xid_is_noted_and_a_fatal_one_acts() {
    for code in 144..=150 {
        let nonfatal = kernel(&format!(
            "NVRM: Xid (PCI:0000:01:00): {code}, NETIR_BER_EVENT Nonfatal XC0 i0 Link 03 (0x00000001 0x00000000 0x00000000 0x00000000 0x00000000 0x00000000)"
        ));
        assert_eq!(nonfatal.class, FaultClass::GpuInterconnect, "{code}");
        assert_eq!(nonfatal.severity, Severity::Warning, "{code}");
        assert_eq!(
            nonfatal.action,
            Action::Note,
            "{code}: a healthy job must keep running"
        );
        let fatal = kernel(&format!(
            "NVRM: Xid (PCI:0000:01:00): {code}, NETIR_LINK_EVT Fatal XC0 i0 Link 00 (0x026001c6 0x00000000 0x00000000 0x00000000 0x00000000 0x00000000)"
        ));
        assert_eq!(fatal.severity, Severity::Error, "{code}");
        assert!(fatal.action > Action::Restart, "{code}: {:?}", fatal.action);
        // A line that does not say is acted on.
        let bare = kernel(&format!("NVRM: Xid (PCI:0000:01:00): {code}"));
        assert_eq!(bare.rule, format!("xid-{code}"));
    }
    // Real lines (leptonai/gpud#1160 and #1174; the second one pads with spaces).
    let line = "NVRM: Xid (PCI:0000:01:00): 144, SAW_MVB Nonfatal XC0 i0 Link 0 (0x00000001 0x00000008 0x00000000 0x00000000 0x00000000 0x00000000)";
    assert_eq!(kernel(line).action, Action::Note);
    let line = "Sep 19 10:30:06 coastline-turtle-cn02 kernel: NVRM: Xid (PCI:0018:01:00): 149, NETIR_INT  Fatal   XC0 i0 Link -1";
    assert_eq!(kernel(line).rule, "xid-149");
}

#[test]
fn xid_154_acts_on_the_recovery_action_it_names() {
    let reboot = kernel(
        "NVRM: Xid (PCI:0000:02:00): 154, GPU recovery action changed from 0x0 (None) to 0x2 (Node Reboot Required)",
    );
    assert_eq!(reboot.class, FaultClass::GpuLost);
    assert_eq!(reboot.severity, Severity::Critical);
    let cleared = kernel(
        "NVRM: Xid (PCI:0000:02:00): 154, GPU recovery action changed from 0x2 (Node Reboot Required) to 0x0 (None)",
    );
    assert_eq!(cleared.rule, "xid-154-cleared");
    assert_eq!(cleared.action, Action::Note);
}

/// Xid 13 and 31 keep their class and severity with or without a process: NVIDIA resolves both
/// the same way. Only the pid changes, and with it whose fault it is: `pid='<unknown>'` (and
/// `pid=0`) give no pid, so attribution goes by the device.
#[test]
fn xid_13_and_31_name_the_process_only_when_the_line_does() {
    let with = kernel(
        "NVRM: Xid (PCI:0000:00:06): 31, pid=447, name=python3, channel 0x0000000a, intr 00000000. MMU Fault: ENGINE GRAPHICS GPC1 GPCCLIENT_T1_8 faulted @ 0x7f7c_9fe00000. Fault is of type FAULT_PDE ACCESS_TYPE_VIRT_WRITE",
    );
    assert_eq!(with.captures.get("pid").map(String::as_str), Some("447"));
    assert_eq!(
        with.captures.get("process").map(String::as_str),
        Some("python3")
    );
    for line in [
        "NVRM: Xid (PCI:0000:cb:00): 13, pid='<unknown>', name=<unknown>, Graphics SM Warp Exception on (GPC 7, TPC 7, SM 0): Illegal Instruction Parameter",
        "NVRM: Xid (PCI:0000:08:00): 31, Ch 00000001, engmask 00000101, intr 10000000",
        "NVRM: Xid (PCI:0000:0c:00): 31, pid=0, Ch 00000053, intr 10000000.",
    ] {
        let without = kernel(line);
        assert!(!without.captures.contains_key("pid"), "{line}");
        assert_eq!(without.severity, Severity::Critical, "{line}");
        assert!(without.captures.contains_key("pci"), "{line}");
    }
}

#[test]
fn a_gpu_fallen_off_the_bus_is_found_with_a_short_bus_id() {
    let lost = kernel("NVRM: GPU 18:00.0: GPU has fallen off the bus.");
    assert_eq!(lost.class, FaultClass::GpuLost);
    assert_eq!(
        lost.captures.get("pci").map(String::as_str),
        Some("18:00.0")
    );
}

//! Unit tests of the rules module: the built-in catalog against real lines, the loading errors
//! against the fixture files in `tests/rules/`, and the ordering that policy depends on.
//!
//! Not here: whether the supervisor acts on a fault (supervisor tests) or what the CLI prints
//! (integration tests of the binary).

use std::fs;
use std::path::{Path, PathBuf};

use super::*;

/// The repository root. `file!()` is this file's path as rustc got it: relative to the package
/// root when the crate is built in place, absolute when the module is compiled from elsewhere.
fn repo_root() -> PathBuf {
    Path::new(file!())
        .ancestors()
        .nth(3)
        .map(Path::to_path_buf)
        .unwrap()
}

fn fixtures() -> PathBuf {
    repo_root().join("tests/rules")
}

fn builtin() -> RuleSet {
    RuleSet::builtin().unwrap()
}

/// A rule set from TOML text, as if it were one file named `test.toml`.
fn from_text(text: &str) -> Result<RuleSet, RuleError> {
    RuleSet::build(file::parse("test.toml", text)?)
}

/// One `[[rule]]` table for the stderr stream, in the eight lines a rule file would give it
/// (header first, so a test that puts it after a blank line knows it starts on line 2). Tests
/// that need more fields (counterexamples) add their lines after it.
fn stderr_rule(
    id: &str,
    class: &str,
    regex: &str,
    severity: &str,
    advice: &str,
    examples: &[&str],
) -> String {
    let examples: Vec<String> = examples.iter().map(|e| format!("\"{e}\"")).collect();
    format!(
        "[[rule]]\nid = \"{id}\"\nclass = \"{class}\"\nstreams = [\"stderr\"]\n\
         regex = '{regex}'\nseverity = \"{severity}\"\nadvice = \"{advice}\"\n\
         examples = [{}]\n",
        examples.join(", ")
    )
}

/// The fault the built-in rules find in `line`; the line must have one.
#[track_caller]
fn builtin_fault(stream: Stream, line: &str) -> Fault {
    builtin()
        .classify(stream, line)
        .unwrap_or_else(|| panic!("no fault for {line:?}"))
}

/// Whether `rules` find a fault in `line` on stderr.
fn fires(rules: &RuleSet, line: &str) -> bool {
    rules.classify(Stream::Stderr, line).is_some()
}

/// Asserts that no rule fires on any of `lines`, whatever stream they come on.
#[track_caller]
fn assert_no_fault<'a>(rules: &RuleSet, lines: impl IntoIterator<Item = &'a str>) {
    for line in lines {
        for stream in Stream::ALL {
            let fault = rules.classify(stream, line);
            assert!(fault.is_none(), "{line:?} on {stream}: {fault:?}");
        }
    }
}

// ---- vocabulary ----

#[test]
fn severity_orders_from_info_to_critical() {
    // classify keeps the highest severity, so this order decides which rule wins.
    assert!(Severity::Info < Severity::Warning);
    assert!(Severity::Warning < Severity::Error);
    assert!(Severity::Error < Severity::Critical);
    let mut shuffled = [
        Severity::Critical,
        Severity::Info,
        Severity::Error,
        Severity::Warning,
    ];
    shuffled.sort();
    assert_eq!(shuffled, Severity::ALL);
}

#[test]
fn action_orders_from_note_to_stop() {
    // The supervisor keeps the highest action of one attempt: a stop must beat a restart.
    assert!(Action::Note < Action::Restart);
    assert!(Action::Restart < Action::Fallback);
    assert!(Action::Fallback < Action::Stop);
    assert_eq!(
        [Action::Restart, Action::Stop, Action::Fallback]
            .into_iter()
            .max(),
        Some(Action::Stop)
    );
}

#[test]
fn names_round_trip_and_match_serde() {
    assert_eq!(FaultClass::ALL.len(), 17);
    for class in FaultClass::ALL {
        assert_eq!(FaultClass::from_name(class.as_str()), Some(class));
        assert_eq!(class.to_string(), class.as_str());
        let json = serde_json::to_string(&class).unwrap();
        assert_eq!(json, format!("\"{}\"", class.as_str()));
        assert_eq!(serde_json::from_str::<FaultClass>(&json).unwrap(), class);
    }
    for stream in Stream::ALL {
        assert_eq!(Stream::from_name(stream.as_str()), Some(stream));
        assert_eq!(
            serde_json::to_string(&stream).unwrap(),
            format!("\"{stream}\"")
        );
        assert_eq!(Stream::ALL[stream as usize], stream);
    }
    for severity in Severity::ALL {
        assert_eq!(Severity::from_name(severity.as_str()), Some(severity));
        assert_eq!(
            serde_json::to_string(&severity).unwrap(),
            format!("\"{severity}\"")
        );
    }
    for action in Action::ALL {
        assert_eq!(Action::from_name(action.as_str()), Some(action));
        assert_eq!(
            serde_json::to_string(&action).unwrap(),
            format!("\"{action}\"")
        );
    }
    assert_eq!(Stream::Kernel.to_string(), "kernel");
    assert_eq!(FaultClass::from_name("kmsg"), None);
}

#[test]
fn class_policies_follow_the_class_table() {
    use FaultClass::*;
    assert_eq!(GpuMemoryFault.default_action(), Action::Fallback);
    assert_eq!(GpuOom.default_action(), Action::Fallback);
    assert_eq!(GpuReset.default_action(), Action::Restart);
    assert_eq!(DeviceAssert.default_action(), Action::Stop);
    for class in [GpuHang, GpuRuntimeError, CollectiveFailure, ProcessCrash] {
        assert_eq!(class.default_action(), Action::Restart, "{class}");
        assert_eq!(
            class.escalates_on_repeat(),
            Some(Action::Fallback),
            "{class}"
        );
    }
    assert_eq!(HostOom.default_action(), Action::Restart);
    assert_eq!(HostOom.escalates_on_repeat(), Some(Action::Stop));
    let escalating = FaultClass::ALL
        .iter()
        .filter(|c| c.escalates_on_repeat().is_some())
        .count();
    assert_eq!(escalating, 5);
    let skipping: Vec<FaultClass> = FaultClass::ALL
        .into_iter()
        .filter(|c| c.skips_gpu_tiers())
        .collect();
    assert_eq!(skipping, [GpuUnsupportedKernel, GpuUnavailable]);
}

// ---- the built-in catalog ----

#[test]
fn builtin_rules_load_and_pass_their_own_check() {
    let rules = builtin();
    let failures: Vec<String> = rules.check().iter().map(ToString::to_string).collect();
    assert!(failures.is_empty(), "{failures:#?}");
    assert!(rules.rules().len() >= 9);
    for rule in rules.rules() {
        assert!(rule.origin.file.starts_with("rules/"), "{:?}", rule.origin);
        assert!(!rule.examples().is_empty(), "{}", rule.id);
        assert!(!rule.counterexamples().is_empty(), "{}", rule.id);
    }
}

#[test]
fn every_rule_file_in_the_repository_is_embedded() {
    let mut on_disk: Vec<String> = fs::read_dir(repo_root().join("rules"))
        .unwrap()
        .map(|entry| entry.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|name| name.ends_with(".toml") && name != QUIRKS_FILE)
        .map(|name| format!("rules/{name}"))
        .collect();
    on_disk.sort();
    let mut embedded: Vec<String> = BUILTIN.iter().map(|(name, _)| name.to_string()).collect();
    embedded.sort();
    assert_eq!(on_disk, embedded);
}

#[test]
fn builtin_origins_point_at_rule_headers() {
    let rules = builtin();
    let rule = rules.rule("hsa-memory-access-fault").unwrap();
    let text = BUILTIN
        .iter()
        .find(|(name, _)| *name == rule.origin.file)
        .map(|(_, text)| *text)
        .unwrap();
    let header = text.lines().nth(rule.origin.line - 1).unwrap();
    assert_eq!(header, "[[rule]]");
    let id_line = text.lines().nth(rule.origin.line).unwrap();
    assert_eq!(id_line, "id = \"hsa-memory-access-fault\"");
}

/// Real lines (corpus/lines.jsonl and the seed report) with the rule, class and captures they must
/// give.
#[test]
fn classify_picks_the_rule_class_and_captures_of_real_lines() {
    let rules = builtin();
    /// A line, the rule and class it must get, and the captures it must give.
    type Case = (&'static str, &'static str, FaultClass, Captures);
    type Captures = &'static [(&'static str, &'static str)];
    let cases: &[Case] = &[
        (
            "Memory access fault by GPU node-1 (Agent handle: 0x5570f8146df0) on address 0x7ff96a9ac000. Reason: Page not present or supervisor privilege",
            "hsa-memory-access-fault",
            FaultClass::GpuMemoryFault,
            &[("node", "1"), ("address", "0x7ff96a9ac000")],
        ),
        (
            "Memory access fault by GPU node-2 (Agent handle: 0x63155be5d980) on address (nil). Reason: Unknown.",
            "hsa-memory-access-fault",
            FaultClass::GpuMemoryFault,
            &[("node", "2"), ("address", "(nil)")],
        ),
        (
            "hipErrorInvalidDeviceFunction: device kernel image is invalid",
            "hip-invalid-device-function",
            FaultClass::GpuUnsupportedKernel,
            &[],
        ),
        (
            "HIP error: Invalid device function",
            "hip-invalid-device-function",
            FaultClass::GpuUnsupportedKernel,
            &[],
        ),
        (
            "RuntimeError: CUDA error: an illegal memory access was encountered",
            "cuda-illegal-address",
            FaultClass::GpuMemoryFault,
            &[],
        ),
        (
            "torch.AcceleratorError: HIP error: an illegal memory access was encountered",
            "hip-illegal-address",
            FaultClass::GpuMemoryFault,
            &[],
        ),
        (
            "torch.OutOfMemoryError: HIP out of memory. Tried to allocate 1.88 GiB. GPU 0 has a total capacity of 23.98 GiB of which 1.70 GiB is free.",
            "torch-out-of-memory",
            FaultClass::GpuOom,
            &[],
        ),
        (
            "torch.cuda.OutOfMemoryError: CUDA out of memory. Tried to allocate 1.70 GiB. GPU 0 has a total capacty of 6.00 GiB of which 0 bytes is free.",
            "torch-out-of-memory",
            FaultClass::GpuOom,
            &[],
        ),
        (
            "ERROR: HIPError(code hipErrorOutOfMemory, out of memory)",
            "hip-out-of-memory",
            FaultClass::GpuOom,
            &[],
        ),
        (
            "RuntimeError: CUDA error: device-side assert triggered",
            "device-side-assert",
            FaultClass::DeviceAssert,
            &[],
        ),
        (
            "/pytorch/aten/src/THCUNN/ClassNLLCriterion.cu:108: cunn_ClassNLLCriterion_updateOutput_kernel: block: [0,0,0], thread: [0,0,0] Assertion `t >= 0 && t < n_classes` failed.",
            "gpu-kernel-assertion",
            FaultClass::DeviceAssert,
            &[],
        ),
    ];
    for &(line, rule, class, captures) in cases {
        let fault = rules
            .classify(Stream::Stderr, line)
            .unwrap_or_else(|| panic!("no fault for {line:?}"));
        assert_eq!(fault.rule, rule, "{line:?}");
        assert_eq!(fault.class, class, "{line:?}");
        assert_eq!(fault.stream, Stream::Stderr);
        assert_eq!(fault.line, line);
        let expected: BTreeMap<String, String> = captures
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        assert_eq!(fault.captures, expected, "{line:?}");
        assert!(!fault.advice.is_empty());
    }
}

#[test]
fn actions_come_from_the_rule_or_the_class() {
    let assert_fault = builtin_fault(
        Stream::Stdout,
        "RuntimeError: CUDA error: device-side assert triggered",
    );
    assert_eq!(assert_fault.action, Action::Stop);
    // hip-out-of-memory names no action: gpu_oom's default applies.
    assert!(builtin().rule("hip-out-of-memory").is_some());
    let oom = builtin_fault(
        Stream::Stderr,
        "ERROR: HIPError(code hipErrorOutOfMemory, out of memory)",
    );
    assert_eq!(oom.action, FaultClass::GpuOom.default_action());
}

#[test]
fn captures_hold_only_groups_that_took_part() {
    // The seed report prints the fault with its address but without `Reason:`; a line with only
    // the node must still classify, with just the node captured.
    let fault = builtin_fault(
        Stream::Stderr,
        "Memory access fault by GPU node-1 (Agent handle: 0x7f8a4c000000) on address 0x7f8a3a000000",
    );
    assert_eq!(
        fault.captures.get("address").map(String::as_str),
        Some("0x7f8a3a000000")
    );
    let fault = builtin_fault(Stream::Stderr, "Memory access fault by GPU node-3");
    assert_eq!(fault.captures.len(), 1);
    assert_eq!(fault.captures.get("node").map(String::as_str), Some("3"));
}

#[test]
fn hint_lines_around_an_error_are_not_faults() {
    // These accompany the real error line; firing on them would count one fault twice or, for
    // the DSA hint, stop a job that had no device-side assert.
    let hints = [
        "CUDA kernel errors might be asynchronously reported at some other API call, so the stacktrace below might be incorrect.",
        "For debugging consider passing CUDA_LAUNCH_BLOCKING=1.",
        "(WorkerDict pid=2862157) For debugging consider passing CUDA_LAUNCH_BLOCKING=1",
        "Compile with `TORCH_USE_CUDA_DSA` to enable device-side assertions.",
        "Compile with TORCH_USE_HIP_DSA to enable device-side assertions.",
        "Complie with 'TORCH_USE_HIP_DSA' to enable device-side assertions.",
        "HIP kernel errors might be asynchronously reported at some other API call, so the stacktrace below might be incorrect.",
        "For debugging consider passing AMD_SERIALIZE_KERNEL=3",
        "Device-side assertion tracking was not enabled by user.",
        "Search for `hipErrorIllegalAddress' in https://rocm.docs.amd.com/projects/HIP/en/latest/index.html for more information.",
        "Exception raised from c10_cuda_check_implementation at ../c10/cuda/CUDAException.cpp:44 (most recent call first):",
    ];
    assert_no_fault(&builtin(), hints);
}

#[test]
fn benign_corpus_lines_are_not_faults() {
    let text = fs::read_to_string(fixtures().join("benign.txt")).unwrap();
    let lines: Vec<&str> = text
        .lines()
        .filter(|line| !line.starts_with('#') && !line.trim().is_empty())
        .collect();
    assert!(lines.len() > 150, "benign.txt lost its lines");
    assert_no_fault(&builtin(), lines);
}

#[test]
fn rules_fire_only_on_their_streams() {
    let rules = RuleSet::load(&[fixtures().join("valid")]).unwrap();
    // The built-in stderr rule, and (alone, so no built-in Xid rule takes its line) the fixture's
    // kernel rule.
    let fixture = RuleSet::from_dir(&fixtures().join("valid")).unwrap();
    // A job's stderr line is not a kernel log line.
    let hsa = "Memory access fault by GPU node-2 (Agent handle: 0x38b6960) on address 0x1000. Reason: Page not present or supervisor privilege.";
    assert!(rules.classify(Stream::Stderr, hsa).is_some());
    assert!(rules.classify(Stream::Stdout, hsa).is_some());
    assert!(rules.classify(Stream::Kernel, hsa).is_none());
    assert!(rules.classify(Stream::Tool, hsa).is_none());
    // And the other way round: the fixture's kernel rule does not fire on the job's output.
    let xid = "NVRM: Xid (PCI:0000:9b:00): 119, pid=1263500, name=cache_mgr_main, Timeout after 6s of waiting for RPC response from GPU4 GSP! Expected function 76 (GSP_RM_CONTROL) (0x20801813 0x4c).";
    assert!(rules.classify(Stream::Stderr, xid).is_none());
    assert!(fixture.classify(Stream::Stderr, xid).is_none());
    let fault = fixture.classify(Stream::Kernel, xid).unwrap();
    assert_eq!(fault.rule, "fixture-nvrm-xid-gsp-timeout");
    assert_eq!(fault.class, FaultClass::GpuHang);
    assert_eq!(fault.action, Action::Restart, "gpu_hang's default action");
    let captures: Vec<(&str, &str)> = fault
        .captures
        .iter()
        .map(|(k, v)| (k.as_str(), v.as_str()))
        .collect();
    assert_eq!(
        captures,
        [
            ("pci", "0000:9b:00"),
            ("pid", "1263500"),
            ("process", "cache_mgr_main"),
            ("xid", "119")
        ]
    );
    assert!(rules.check().is_empty(), "{:?}", rules.check());
}

#[test]
fn extra_directories_come_after_the_builtin_rules() {
    let rules = RuleSet::load(&[fixtures().join("valid")]).unwrap();
    let builtin_count = builtin().rules().len();
    assert_eq!(rules.rules().len(), builtin_count + 1);
    assert_eq!(
        rules.rules()[builtin_count].id,
        "fixture-nvrm-xid-gsp-timeout"
    );
    assert!(
        rules.rules()[builtin_count]
            .origin
            .file
            .ends_with("valid/nvidia-kernel.toml")
    );
    // from_dir is only that directory.
    let only = RuleSet::from_dir(&fixtures().join("valid")).unwrap();
    assert_eq!(only.rules().len(), 1);
}

#[test]
fn a_line_matched_by_two_rules_goes_to_the_higher_severity_then_the_earlier_rule() {
    // Real ROCm 7 line: both the HIP rule and the CUDA rule match at the same severity, and the
    // HIP rule is defined first (amd-runtime.toml loads before cuda-runtime.toml).
    let rules = builtin();
    let line = "CUDA error: an illegal memory access was encountered (hipErrorIllegalAddress)";
    assert!(rules.rule("cuda-illegal-address").unwrap().is_match(line));
    assert_eq!(
        rules.classify(Stream::Stderr, line).unwrap().rule,
        "hip-illegal-address"
    );

    // Three rules that all match one line: a warning first, then two errors.
    let launch = "RuntimeError: CUDA error: unspecified launch failure";
    let text = [
        ("first-warning", "launch failure", "warning", "a"),
        ("second-error", "unspecified launch", "error", "b"),
        ("third-error", "CUDA error", "error", "c"),
    ]
    .map(|(id, regex, severity, advice)| {
        stderr_rule(id, "gpu_runtime_error", regex, severity, advice, &[launch])
    })
    .join("\n");
    let rules = from_text(&text).unwrap();
    let fault = rules.classify(Stream::Stderr, launch).unwrap();
    assert_eq!(fault.rule, "second-error");
    assert_eq!(fault.severity, Severity::Error);
    assert_eq!(fault.advice, "b");
}

#[test]
fn a_trailing_carriage_return_is_ignored() {
    let fault = builtin_fault(
        Stream::Stderr,
        "RuntimeError: CUDA error: device-side assert triggered\r",
    );
    assert_eq!(
        fault.line,
        "RuntimeError: CUDA error: device-side assert triggered"
    );
    // The `$`-anchored regex below only matches once the `\r` is gone.
    let anchored = from_text(&stderr_rule(
        "anchored",
        "process_crash",
        r"Aborted \(core dumped\)$",
        "error",
        "a",
        &["Aborted (core dumped)"],
    ))
    .unwrap();
    assert!(fires(&anchored, "Aborted (core dumped)\r"));
    assert!(fires(&anchored, "Aborted (core dumped)\r\n"));
}

#[test]
fn faults_serialize_with_rule_file_names() {
    let fault = builtin_fault(
        Stream::Stderr,
        "Memory access fault by GPU node-2 (Agent handle: 0x38b6960) on address 0x1000. Reason: Page not present or supervisor privilege.",
    );
    let json: serde_json::Value = serde_json::to_value(&fault).unwrap();
    assert_eq!(json["rule"], "hsa-memory-access-fault");
    assert_eq!(json["class"], "gpu_memory_fault");
    assert_eq!(json["severity"], "critical");
    assert_eq!(json["action"], "fallback");
    assert_eq!(json["stream"], "stderr");
    assert_eq!(json["captures"]["node"], "2");
    assert_eq!(json["captures"]["address"], "0x1000");
}

// ---- check ----

#[test]
fn check_reports_examples_that_miss_and_counterexamples_that_hit() {
    let rule = stderr_rule(
        "too-narrow",
        "gpu_oom",
        "CUDA out of memory",
        "error",
        "a",
        &[
            "RuntimeError: CUDA out of memory. Tried to allocate 12.50 MiB",
            "torch.OutOfMemoryError: HIP out of memory. Tried to allocate 3.31 GiB.",
        ],
    );
    let counter = r#"counterexamples = ["CUDA out of memory (a counterexample that matches)"]"#;
    let rules = from_text(&format!("\n{rule}{counter}\n")).unwrap();
    let failures: Vec<String> = rules.check().iter().map(ToString::to_string).collect();
    assert_eq!(
        failures,
        [
            "test.toml:2: rule `too-narrow`: example \"torch.OutOfMemoryError: HIP out of memory. Tried to allocate 3.31 GiB.\" does not match",
            "test.toml:2: rule `too-narrow`: counterexample \"CUDA out of memory (a counterexample that matches)\" matches",
        ]
    );
}

#[test]
fn check_reports_examples_that_another_class_takes() {
    // The second rule starts on line 11: a blank line, eight of the first rule, a blank line.
    let any = stderr_rule(
        "any-cuda-error",
        "gpu_runtime_error",
        "CUDA error",
        "critical",
        "a",
        &["RuntimeError: CUDA error: unspecified launch failure"],
    );
    let assert = stderr_rule(
        "assert",
        "device_assert",
        "device-side assert triggered",
        "error",
        "b",
        &["RuntimeError: CUDA error: device-side assert triggered"],
    );
    let rules = from_text(&format!("\n{any}\n{assert}")).unwrap();
    let failures = rules.check();
    assert_eq!(failures.len(), 1, "{failures:?}");
    assert_eq!(failures[0].rule, "assert");
    assert_eq!(failures[0].origin.line, 11);
    assert!(
        failures[0].problem.contains(
            "on stderr rule `any-cuda-error` (test.toml:2) wins with class gpu_runtime_error"
        ),
        "{}",
        failures[0].problem
    );
}

#[test]
fn check_shortens_long_examples_in_messages() {
    let long = "x".repeat(300);
    let text = stderr_rule("long", "gpu_oom", "y", "error", "a", &[&long]);
    let failures = from_text(&text).unwrap().check();
    assert_eq!(failures.len(), 1);
    assert!(failures[0].problem.len() < 160, "{}", failures[0].problem);
    assert!(failures[0].problem.contains("...\" does not match"));
}

// ---- loading errors ----

/// The directory of invalid rule fixtures, and its `.toml` files in name order.
fn invalid_fixtures() -> (PathBuf, Vec<PathBuf>) {
    let dir = fixtures().join("invalid");
    let mut paths: Vec<PathBuf> = fs::read_dir(&dir)
        .unwrap()
        .map(|entry| entry.unwrap().path())
        .filter(|path| path.extension().is_some_and(|e| e == "toml"))
        .collect();
    paths.sort();
    (dir, paths)
}

/// Reads the `# Expect: LINE: TEXT` line of a fixture.
fn expectation(path: &Path) -> (usize, String) {
    let text = fs::read_to_string(path).unwrap();
    assert!(
        text.lines().any(|l| l.starts_with("# Tests")),
        "{} must say what it tests",
        path.display()
    );
    let expect = text
        .lines()
        .find_map(|l| l.strip_prefix("# Expect: "))
        .unwrap_or_else(|| panic!("{} has no `# Expect:` line", path.display()));
    let (line, _) = expect.split_once(':').unwrap();
    (line.parse().unwrap(), expect.to_string())
}

#[test]
fn each_invalid_fixture_fails_at_its_file_and_line() {
    let (dir, paths) = invalid_fixtures();
    assert!(paths.len() >= 18, "fixtures missing from {}", dir.display());
    for path in paths {
        let (line, expect) = expectation(&path);
        let err = RuleSet::from_files(std::slice::from_ref(&path))
            .err()
            .unwrap_or_else(|| panic!("{} loaded without error", path.display()));
        let message = err.to_string();
        let wanted = format!("{}:{expect}", path.display());
        assert!(
            message.starts_with(&wanted),
            "\n  got:    {message}\n  wanted: {wanted}..."
        );
        // Every message says what to do after the `;`.
        assert!(message.contains("; "), "{message}");
        let location = err.location().unwrap();
        assert_eq!(location.line, line, "{message}");
        assert_eq!(location.file, path.display().to_string());
    }
}

#[test]
fn from_dir_stops_at_the_first_invalid_file() {
    // Sorted by name, bad-id.toml is the first file of the directory.
    let err = RuleSet::from_dir(&fixtures().join("invalid")).unwrap_err();
    assert!(
        err.to_string()
            .contains("bad-id.toml:5: invalid id `CUDA_OOM`"),
        "{err}"
    );
}

#[test]
fn check_dir_reports_every_invalid_file() {
    let (dir, paths) = invalid_fixtures();
    let check = RuleSet::check_dir(&dir);
    assert_eq!(check.files, paths.len());
    assert_eq!(check.rules, 0);
    assert!(check.failures.is_empty(), "{:?}", check.failures);
    assert!(!check.passed());
    // One error per file, in file order, each the one the file expects.
    let messages: Vec<String> = check.errors.iter().map(ToString::to_string).collect();
    assert_eq!(messages.len(), paths.len(), "{messages:#?}");
    for (path, message) in paths.iter().zip(&messages) {
        let (_, expect) = expectation(path);
        let wanted = format!("{}:{expect}", path.display());
        assert!(
            message.starts_with(&wanted),
            "\n  got:    {message}\n  wanted: {wanted}..."
        );
    }
}

/// Writes a rule file with one rule into `dir`.
fn write_rule(dir: &Path, file: &str, id: &str, regex: &str, example: &str) {
    let text = stderr_rule(id, "gpu_oom", regex, "error", "a", &[example]);
    fs::write(dir.join(file), text).unwrap();
}

#[test]
fn check_dir_checks_the_good_files_beside_broken_ones() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    write_rule(
        root,
        "a-good.toml",
        "oom",
        "out of memory",
        "CUDA out of memory",
    );
    // Loads, but its example does not match.
    write_rule(
        root,
        "b-wrong.toml",
        "hip-oom",
        "HIP out of",
        "CUDA out of memory",
    );
    // Does not load.
    write_rule(root, "c-broken.toml", "bad", "(", "x");
    // Loads on its own, but reuses a-good.toml's id.
    write_rule(root, "d-dup.toml", "oom", "OOM", "OOM killer");
    fs::write(root.join("notes.txt"), "not a rule file").unwrap();

    let check = RuleSet::check_dir(root);
    assert_eq!((check.files, check.rules), (4, 2));
    let errors: Vec<String> = check.errors.iter().map(ToString::to_string).collect();
    assert_eq!(errors.len(), 2, "{errors:#?}");
    let file = |name: &str| root.join(name).display().to_string();
    assert!(
        errors[0].starts_with(&format!(
            "{}:5: rule `bad`: invalid regex",
            file("c-broken.toml")
        )),
        "{}",
        errors[0]
    );
    assert!(
        errors[1].starts_with(&format!(
            "{}:1: rule `oom`: duplicate rule id, already defined at {}:1;",
            file("d-dup.toml"),
            file("a-good.toml")
        )),
        "{}",
        errors[1]
    );
    assert_eq!(check.failures.len(), 1, "{:?}", check.failures);
    assert_eq!(check.failures[0].rule, "hip-oom");
    assert!(check.failures[0].problem.contains("does not match"));
    assert!(!check.passed());
}

#[test]
fn check_dir_reports_duplicates_across_files_and_still_checks_both_files() {
    let dir = fixtures().join("duplicate");
    let check = RuleSet::check_dir(&dir);
    assert_eq!((check.files, check.rules), (2, 1));
    assert_eq!(check.errors.len(), 1);
    let second = dir.join("b-second.toml");
    let (_, expect) = expectation(&second);
    let message = check.errors[0].to_string();
    assert!(
        message.starts_with(&format!("{}:{expect}", second.display())),
        "{message}"
    );
    assert!(check.failures.is_empty(), "{:?}", check.failures);
}

#[test]
fn check_dir_passes_a_valid_directory_and_fails_a_missing_one() {
    let check = RuleSet::check_dir(&fixtures().join("valid"));
    assert!(check.passed(), "{:?} {:?}", check.errors, check.failures);
    assert_eq!(check.files, 1);
    assert!(check.rules >= 1);

    let missing = fixtures().join("no-such-directory");
    let check = RuleSet::check_dir(&missing);
    assert_eq!((check.files, check.rules), (0, 0));
    assert_eq!(check.errors.len(), 1);
    assert!(matches!(check.errors[0], RuleError::Read { .. }));
}

#[test]
fn check_builtin_checks_every_builtin_file() {
    let check = RuleSet::check_builtin();
    assert!(check.passed(), "{:?} {:?}", check.errors, check.failures);
    assert_eq!(check.files, BUILTIN.len());
    let set = builtin();
    assert_eq!(check.rules, set.rules().len() + set.contexts().len());
}

#[test]
fn duplicate_ids_across_two_files_name_both() {
    let dir = fixtures().join("duplicate");
    let err = RuleSet::from_dir(&dir).unwrap_err();
    let first = dir.join("a-first.toml");
    let second = dir.join("b-second.toml");
    let (_, expect) = expectation(&second);
    let message = err.to_string();
    assert!(
        message.starts_with(&format!("{}:{expect}", second.display())),
        "{message}"
    );
    assert!(
        message.contains(&format!("already defined at {}:4;", first.display())),
        "{message}"
    );
    match err {
        RuleError::DuplicateId { at, first: origin } => {
            assert_eq!(at.line, 6);
            assert_eq!(origin.line, 4);
        }
        other => panic!("wrong error: {other}"),
    }
}

#[test]
fn a_user_rule_may_not_reuse_a_builtin_id() {
    let dir = fixtures().join("duplicate-builtin");
    let path = dir.join("local.toml");
    let (_, expect) = expectation(&path);
    let message = RuleSet::load(&[dir]).unwrap_err().to_string();
    assert!(
        message.starts_with(&format!("{}:{expect}", path.display())),
        "{message}"
    );
    // Without the built-in rules the same file is fine.
    assert!(RuleSet::from_files(&[path]).is_ok());
}

#[test]
fn a_missing_directory_is_a_read_error_naming_it() {
    let dir = fixtures().join("no-such-directory");
    let err = RuleSet::load(std::slice::from_ref(&dir)).unwrap_err();
    assert!(matches!(err, RuleError::Read { .. }));
    assert!(err.location().is_none());
    let message = err.to_string();
    assert!(
        message.starts_with(&format!("{}: cannot read rules:", dir.display())),
        "{message}"
    );
}

#[test]
fn inline_table_rules_get_their_line_too() {
    // `rule = [{...}]` is the same data as `[[rule]]`; errors and origins still find the line.
    let text = "rule = [\n  { id = \"a\", class = \"gpu_oom\", streams = [\"stderr\"], regex = 'x', severity = \"error\", advice = \"a\", examples = [\"x\"] },\n  { id = \"b\", class = \"nope\", streams = [\"stderr\"], regex = 'x', severity = \"error\", advice = \"a\", examples = [\"x\"] },\n]\n";
    let message = from_text(text).unwrap_err().to_string();
    assert!(
        message.starts_with("test.toml:3: rule `b`: unknown class `nope`"),
        "{message}"
    );
}

#[test]
fn an_empty_rule_set_classifies_nothing() {
    let rules = from_text("# only a comment\n").unwrap();
    assert!(rules.rules().is_empty());
    assert!(rules.classify(Stream::Stderr, "anything").is_none());
    assert!(rules.check().is_empty());
}

#[test]
fn word_boundaries_work_next_to_non_ascii_text() {
    let rule = stderr_rule(
        "bounded",
        "gpu_oom",
        r"\bout of memory\b",
        "error",
        "a",
        &["CUDA error: out of memory"],
    );
    let rules = from_text(&format!(
        "{rule}counterexamples = [\"timeout of memory checks\"]\n"
    ))
    .unwrap();
    assert!(rules.check().is_empty(), "{:?}", rules.check());
    assert_eq!(rules.rules()[0].regex(), r"\bout of memory\b");
    let progress = "▎▎▎ 7/233 [11:56<6:25:43] ".repeat(300);
    assert!(rules.classify(Stream::Stderr, &progress).is_none());
    let line = format!("{progress}▎ out of memory ▎");
    assert!(rules.classify(Stream::Stderr, &line).is_some());
    // ASCII semantics: a non-ASCII letter is not a word character, so it bounds a word.
    assert!(rules.classify(Stream::Stderr, "éout of memory").is_some());
}

#[test]
fn classes_and_case_folding_are_ascii_and_non_ascii_literals_still_match() {
    let rules = from_text(&stderr_rule(
        "folded",
        "gpu_oom",
        r"(?i)out of memory on (?P<process>\w+) \d+ µs",
        "error",
        "a",
        &["CUDA Out Of Memory on python3 12 µs"],
    ))
    .unwrap();
    assert!(rules.check().is_empty(), "{:?}", rules.check());
    let fault = rules
        .classify(Stream::Stderr, "OUT OF MEMORY on trainer 7 µs")
        .unwrap();
    assert_eq!(fault.captures["process"], "trainer");
    // `\w` and `\d` are ASCII: a non-ASCII word or digit does not match them.
    assert!(!fires(&rules, "out of memory on träiner 7 µs"));
    assert!(!fires(&rules, "out of memory on x ٣ µs"));
}

//! The pre-flight probe end to end: `gpuwarden probe` over simulated machines (a sysfs tree and a
//! filesystem root with or without ROCm), and `gpuwarden run` starting where the known GPU
//! problems of rules/quirks.toml say, or where `--force-gpu-unsafe` insists.
#![allow(clippy::unwrap_used)]

// For its SIGINT reset only: the journals here are compared record by record.
mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

const BIN: &str = env!("CARGO_BIN_EXE_gpuwarden");

/// The variables the probe reads; every test starts with none of them set.
const PROBE_VARS: [&str; 6] = [
    "HSA_OVERRIDE_GFX_VERSION",
    "PYTORCH_ROCM_ARCH",
    "ROCR_VISIBLE_DEVICES",
    "HIP_VISIBLE_DEVICES",
    "CUDA_VISIBLE_DEVICES",
    "ROCM_PATH",
];

/// The simulated sysfs of one AMD Radeon RX 6800 (gfx1030) kept with the health readers' tests.
fn rx6800_sysfs() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/sysfs")
}

/// A simulated machine: a sysfs tree and a filesystem root, both in one temporary directory.
struct Machine {
    dir: tempfile::TempDir,
}

impl Machine {
    fn new() -> Machine {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(dir.path().join("sys")).unwrap();
        std::fs::create_dir_all(dir.path().join("root")).unwrap();
        Machine { dir }
    }

    fn sys(&self) -> PathBuf {
        self.dir.path().join("sys")
    }

    fn root(&self) -> PathBuf {
        self.dir.path().join("root")
    }

    fn write(&self, rel: &str, text: &str) {
        let path = self.dir.path().join(rel);
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(path, text).unwrap();
    }

    /// Installs ROCm `version` as `/opt/rocm-VERSION`, with `/opt/rocm` linking to it.
    fn with_rocm(self, version: &str) -> Machine {
        self.write(
            &format!("root/opt/rocm-{version}/.info/version"),
            &format!("{version}-120\n"),
        );
        std::os::unix::fs::symlink(
            self.root().join(format!("opt/rocm-{version}")),
            self.root().join("opt/rocm"),
        )
        .unwrap();
        self
    }

    /// One AMD GPU (PCI device 0x73bf) on KFD node 1 and DRM card 0, with the KFD
    /// `gfx_target_version` given (100300 is gfx1030).
    fn with_amd_gpu(self, gfx_target_version: u32) -> Machine {
        self.write(
            "sys/class/kfd/kfd/topology/nodes/0/properties",
            "cpu_cores_count 16\nsimd_count 0\ngfx_target_version 0\nvendor_id 0\ndevice_id 0\n",
        );
        self.write("sys/class/kfd/kfd/topology/nodes/0/gpu_id", "0\n");
        self.write(
            "sys/class/kfd/kfd/topology/nodes/1/properties",
            &format!(
                "cpu_cores_count 0\nsimd_count 120\ngfx_target_version {gfx_target_version}\n\
                 vendor_id 4098\ndevice_id 29631\nlocation_id 768\ndomain 0\ndrm_render_minor 128\n"
            ),
        );
        self.write("sys/class/kfd/kfd/topology/nodes/1/gpu_id", "48417\n");
        self.write("sys/class/drm/card0/device/vendor", "0x1002\n");
        self.write("sys/class/drm/card0/device/device", "0x73bf\n");
        self.write(
            "sys/class/drm/card0/device/uevent",
            "DRIVER=amdgpu\nPCI_SLOT_NAME=0000:03:00.0\n",
        );
        self
    }

    /// `gpuwarden ARGS` pointed at this machine's root and `sysfs`, with a clean environment.
    fn gpuwarden(&self, sysfs: &Path, args: &[&str], env: &[(&str, &str)]) -> Output {
        let mut cmd = Command::new(BIN);
        cmd.current_dir(self.dir.path()).arg(args[0]);
        cmd.arg("--sysfs-root")
            .arg(sysfs)
            .arg("--root")
            .arg(self.root());
        cmd.args(&args[1..]).stdin(Stdio::null());
        for var in PROBE_VARS {
            cmd.env_remove(var);
        }
        for (k, v) in env {
            cmd.env(k, v);
        }
        cmd.output().unwrap()
    }

    fn probe(&self, sysfs: &Path, args: &[&str], env: &[(&str, &str)]) -> Output {
        let mut all = vec!["probe"];
        all.extend_from_slice(args);
        self.gpuwarden(sysfs, &all, env)
    }

    fn probe_json(&self, sysfs: &Path, args: &[&str], env: &[(&str, &str)]) -> serde_json::Value {
        let mut all = vec!["--json"];
        all.extend_from_slice(args);
        let out = self.probe(sysfs, &all, env);
        assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
        serde_json::from_slice(&out.stdout).unwrap()
    }

    /// `gpuwarden run` of a job that prints its tier and device; its command line names EEGNeX
    /// when `eegnex` is true.
    fn run(&self, sysfs: &Path, extra: &[&str], eegnex: bool) -> Output {
        let mut args = vec!["run", "--run-dir", "run"];
        args.extend_from_slice(extra);
        args.extend_from_slice(&[
            "--",
            "/bin/sh",
            "-c",
            "echo tier=$GPUWARDEN_TIER device=$GPUWARDEN_DEVICE",
            if eegnex {
                "train_eegnex"
            } else {
                "train_sam_tcn"
            },
        ]);
        self.gpuwarden(sysfs, &args, &[])
    }

    fn journal(&self) -> Vec<serde_json::Value> {
        std::fs::read_to_string(self.dir.path().join("run/journal.jsonl"))
            .unwrap()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect()
    }

    fn preflight(&self) -> Option<serde_json::Value> {
        self.journal()
            .into_iter()
            .find(|r| r["event"] == "preflight")
    }
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

fn applies(json: &serde_json::Value, quirk: &str) -> bool {
    json["quirks"]
        .as_array()
        .unwrap()
        .iter()
        .find(|q| q["quirk"] == quirk)
        .unwrap_or_else(|| panic!("no quirk {quirk} in {json}"))["applies"]
        == true
}

const EEGNEX_QUIRK: &str = "rdna-rocm62-eegnex-spatial-conv";
const RDNA_WARNING: &str = "rdna-rocm62-memory-faults";

#[test]
fn a_machine_without_a_gpu_says_no_gpu_found_and_exits_0() {
    let m = Machine::new();
    let out = m.probe(&m.sys(), &[], &[]);
    let stdout = text(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    assert!(
        stdout.starts_with("no GPU found; no known GPU problem applies\n"),
        "{stdout}"
    );
    assert!(stdout.contains("\nGPUs\n  no GPU found\n"), "{stdout}");
    assert!(stdout.contains("  ROCm           not found\n"), "{stdout}");
    assert!(
        stdout.contains("  HSA_OVERRIDE_GFX_VERSION  (unset)\n"),
        "{stdout}"
    );
    assert!(text(&out.stderr).is_empty(), "{}", text(&out.stderr));

    let json = m.probe_json(&m.sys(), &[], &[]);
    assert_eq!(json["gpus"], serde_json::json!([]));
    assert!(json["env"]["HSA_OVERRIDE_GFX_VERSION"].is_null());
    assert!(!applies(&json, EEGNEX_QUIRK));
    assert!(!applies(&json, RDNA_WARNING));
}

#[test]
fn the_rx6800_tree_under_rocm_6_2_4_is_the_seed_s_known_bad_card() {
    let m = Machine::new().with_rocm("6.2.4");
    let sysfs = rx6800_sysfs();
    let out = m.probe(&sysfs, &[], &[]);
    let stdout = text(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    assert!(
        stdout.starts_with("1 GPU; 2 known GPU problems apply\n"),
        "{stdout}"
    );
    let gpu_line = stdout.lines().find(|l| l.starts_with("  amd 0  ")).unwrap();
    assert!(gpu_line.contains("  gfx1030  0000:0b:00.0  "), "{gpu_line}");
    assert!(gpu_line.contains("KFD node 1"), "{gpu_line}");
    let rocm = m.root().join("opt/rocm/.info/version");
    assert!(
        stdout.contains(&format!("  ROCm           6.2.4      {}\n", rocm.display())),
        "{stdout}"
    );
    assert!(
        stdout.contains(&format!("  APPLIES {EEGNEX_QUIRK} (rules/quirks.toml:")),
        "{stdout}"
    );
    assert!(
        stdout.contains(
            ", for commands matching `(?i)eegnex`: `gpuwarden run` starts on tier `cpu`\n"
        ),
        "{stdout}"
    );
    assert!(stdout.contains("    - ROCm 6.2.4 is >=6.2\n"), "{stdout}");

    let json = m.probe_json(&sysfs, &[], &[]);
    assert_eq!(json["gpus"][0]["vendor"], "amd");
    assert_eq!(json["gpus"][0]["gfx_target"], "gfx1030");
    assert_eq!(json["gpus"][0]["device_id"], 0x73bf);
    assert_eq!(json["gpus"][0]["visible"], true);
    assert_eq!(json["software"]["rocm"][0]["version"], "6.2.4");
    assert!(applies(&json, EEGNEX_QUIRK));
    assert!(applies(&json, RDNA_WARNING));
}

#[test]
fn rocm_6_1_is_before_the_regression() {
    let m = Machine::new().with_rocm("6.1.2");
    let out = m.probe(&rx6800_sysfs(), &[], &[]);
    let stdout = text(&out.stdout);
    assert!(
        stdout.starts_with("1 GPU; no known GPU problem applies\n"),
        "{stdout}"
    );
    assert!(
        stdout.contains(&format!(
            "  does not apply: {EEGNEX_QUIRK} (rules/quirks.toml:"
        )),
        "{stdout}"
    );
    assert!(stdout.contains("): ROCm 6.1.2 is not >=6.2\n"), "{stdout}");
}

#[test]
fn a_tree_of_our_own_judged_by_gfx_target_and_override() {
    // gfx1030 without any ROCm found: assumed affected.
    let m = Machine::new().with_amd_gpu(100300);
    let json = m.probe_json(&m.sys(), &[], &[]);
    assert_eq!(json["gpus"][0]["gfx_target"], "gfx1030");
    assert_eq!(json["gpus"][0]["pci"], "0000:03:00.0");
    assert!(applies(&json, EEGNEX_QUIRK));
    let reasons = json["quirks"][0]["reasons"].to_string();
    assert!(
        reasons.contains("the ROCm version was not found"),
        "{reasons}"
    );

    // CDNA (gfx90a) is not affected, even with gfx1030 in the build's target list.
    let m = Machine::new().with_amd_gpu(90010).with_rocm("6.2.4");
    let json = m.probe_json(&m.sys(), &[], &[("PYTORCH_ROCM_ARCH", "gfx90a;gfx1030")]);
    assert_eq!(json["gpus"][0]["gfx_target"], "gfx90a");
    assert!(!applies(&json, EEGNEX_QUIRK));
    assert_eq!(json["env"]["PYTORCH_ROCM_ARCH"], "gfx90a;gfx1030");

    // RDNA3 (gfx1100) run as gfx1030 by HSA_OVERRIDE_GFX_VERSION is.
    let m = Machine::new().with_amd_gpu(110000).with_rocm("6.2.4");
    let json = m.probe_json(&m.sys(), &[], &[("HSA_OVERRIDE_GFX_VERSION", "10.3.0")]);
    assert!(applies(&json, EEGNEX_QUIRK));
    let reasons = json["quirks"][0]["reasons"].to_string();
    assert!(
        reasons.contains("HSA_OVERRIDE_GFX_VERSION=10.3.0 makes ROCm run GPU 0"),
        "{reasons}"
    );
    // ... unless the GPU is hidden from jobs.
    let json = m.probe_json(
        &m.sys(),
        &[],
        &[
            ("HSA_OVERRIDE_GFX_VERSION", "10.3.0"),
            ("HIP_VISIBLE_DEVICES", "-1"),
        ],
    );
    assert_eq!(json["gpus"][0]["visible"], false);
    assert!(!applies(&json, EEGNEX_QUIRK));
}

#[test]
fn a_command_after_the_double_dash_is_judged_as_run_would() {
    let m = Machine::new().with_rocm("6.2.4");
    let json = m.probe_json(&rx6800_sysfs(), &["--", "python", "train_eegnex.py"], &[]);
    assert_eq!(json["job"], "python train_eegnex.py");
    assert!(applies(&json, EEGNEX_QUIRK));
    assert!(json["quirks"][0]["only_for_jobs"].is_null());

    let json = m.probe_json(&rx6800_sysfs(), &["--", "python", "train_sam.py"], &[]);
    assert!(!applies(&json, EEGNEX_QUIRK));
    assert!(applies(&json, RDNA_WARNING));
}

#[test]
fn a_broken_quirk_file_is_a_usage_error_naming_its_line() {
    let m = Machine::new();
    m.write(
        "mine.toml",
        "[[quirk]]\nid = \"mine\"\nsummary = \"s\"\nvendor = \"amd\"\ngfx_targets = [\"gfx1030\"]\nrocm = \"6.2+\"\nadvice = \"a\"\nexamples = [{ gfx = \"gfx1030\" }]\n",
    );
    let file = m.dir.path().join("mine.toml");
    let out = m.probe(&m.sys(), &["--quirks", file.to_str().unwrap()], &[]);
    assert_eq!(out.status.code(), Some(2));
    let stderr = text(&out.stderr);
    assert!(
        stderr.contains(&format!(
            "{}:6: quirk `mine`: invalid `rocm` requirement `6.2+`",
            file.display()
        )),
        "{stderr}"
    );
    assert!(out.stdout.is_empty());

    // Fixed, it is judged with the built-in ones.
    std::fs::write(
        &file,
        "[[quirk]]\nid = \"mine\"\nsummary = \"s\"\nvendor = \"amd\"\ngfx_targets = [\"gfx1030\"]\nrocm = \">=6.0\"\nadvice = \"a\"\nexamples = [{ gfx = \"gfx1030\" }]\n",
    )
    .unwrap();
    let json = m.probe_json(&rx6800_sysfs(), &["--quirks", file.to_str().unwrap()], &[]);
    assert!(applies(&json, "mine"));
}

#[test]
fn run_starts_an_eegnex_job_on_the_cpu_and_says_how_to_override() {
    let m = Machine::new().with_rocm("6.2.4");
    let out = m.run(&rx6800_sysfs(), &[], true);
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{stderr}");
    assert_eq!(text(&out.stdout), "tier=cpu device=cpu\n");
    assert!(
        stderr.contains(&format!(
            "gpuwarden: starting on tier `cpu`, skipping `gpu`: known GPU problem `{EEGNEX_QUIRK}`"
        )),
        "{stderr}"
    );
    assert!(
        stderr.contains("gpuwarden:   to start on the GPU anyway, pass --force-gpu-unsafe"),
        "{stderr}"
    );

    let journal = m.journal();
    assert_eq!(journal[0]["event"], "run_started");
    assert_eq!(journal[0]["ladder"], serde_json::json!(["cpu"]));
    let preflight = m.preflight().unwrap();
    assert_eq!(preflight["decision"], "moved");
    assert_eq!(preflight["start_tier"], "cpu");
    assert_eq!(preflight["skipped_tiers"], serde_json::json!(["gpu"]));
    assert_eq!(preflight["quirks"][0]["quirk"], EEGNEX_QUIRK);
    let started = journal
        .iter()
        .find(|r| r["event"] == "attempt_started")
        .unwrap();
    assert_eq!(started["tier"], "cpu");
}

#[test]
fn force_gpu_unsafe_starts_on_the_gpu_and_journals_the_override() {
    let m = Machine::new().with_rocm("6.2.4");
    let out = m.run(&rx6800_sysfs(), &["--force-gpu-unsafe"], true);
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{stderr}");
    assert_eq!(text(&out.stdout), "tier=gpu device=cuda\n");
    assert!(
        stderr.contains("gpuwarden: warning: --force-gpu-unsafe: starting on tier `gpu` although it would start on `cpu`"),
        "{stderr}"
    );
    let preflight = m.preflight().unwrap();
    assert_eq!(preflight["decision"], "forced");
    assert_eq!(preflight["start_tier"], "gpu");
}

#[test]
fn other_jobs_start_on_the_gpu_with_a_warning() {
    let m = Machine::new().with_rocm("6.2.4");
    let out = m.run(&rx6800_sysfs(), &[], false);
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{stderr}");
    assert_eq!(text(&out.stdout), "tier=gpu device=cuda\n");
    assert!(
        stderr.contains(&format!(
            "gpuwarden: warning: known GPU problem `{RDNA_WARNING}`"
        )),
        "{stderr}"
    );
    let preflight = m.preflight().unwrap();
    assert_eq!(preflight["decision"], "clear");
    assert_eq!(preflight["quirks"][0]["quirk"], RDNA_WARNING);
}

#[test]
fn a_ladder_without_the_safe_tier_does_not_start_the_job() {
    let m = Machine::new().with_rocm("6.2.4");
    let out = m.run(&rx6800_sysfs(), &["--ladder", "gpu"], true);
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(out.stdout.is_empty());
    assert!(
        stderr.contains("It says to start on tier `cpu`, which the ladder (gpu) does not have; the job was not started. Add the tier (e.g. --ladder gpu,cpu), or pass --force-gpu-unsafe"),
        "{stderr}"
    );
    assert!(!m.dir.path().join("run").exists());
}

#[test]
fn without_a_gpu_run_goes_on_as_planned() {
    let m = Machine::new();
    let out = m.run(&m.sys(), &[], true);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    assert_eq!(text(&out.stdout), "tier=gpu device=cuda\n");
    // Nothing to say: the journal is as it was before the probe existed.
    assert!(m.preflight().is_none());
    assert_eq!(m.journal()[1]["event"], "attempt_started");

    // A ladder that starts on the CPU needs no probe at all.
    let m = Machine::new().with_rocm("6.2.4");
    let out = m.run(&rx6800_sysfs(), &["--ladder", "cpu"], true);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    assert_eq!(text(&out.stdout), "tier=cpu device=cpu\n");
    assert!(m.preflight().is_none());
}

//! Snapshot tests of the layouts: a fixed [`Snapshot`] drawn into a `TestBackend`, compared as
//! plain text with `tests/data/ui/*.txt`. `UPDATE_UI_SNAPSHOTS=1 cargo test --lib ui` rewrites
//! the files after a deliberate change (read the diff before committing it).
#![allow(clippy::unwrap_used)]

use std::path::PathBuf;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use ratatui::Terminal;
use ratatui::backend::TestBackend;
use ratatui::buffer::Buffer;

use super::*;
use crate::gpu::{Gpu, Vendor};
use crate::rules::FaultClass;
use crate::snapshot::{FaultNote, GpuProcess, JobInfo, JobState, KernelState, Snapshot};
use crate::sources::health::{EccCount, GpuSample, Value};

/// 2026-12-05 09:30:00 UTC.
fn wall() -> SystemTime {
    UNIX_EPOCH + Duration::from_secs(1_796_463_000)
}

fn rx6800() -> GpuSample {
    let gpu = Gpu {
        kfd_node: Some(1),
        gfx_target: Some("gfx1030".into()),
        vram_total_bytes: Some(17_163_091_968),
        ..Gpu::for_test(Vendor::Amd, 0, "AMD Radeon RX 6800", "0000:0b:00.0")
    };
    let mut s = GpuSample::blank(&gpu);
    s.utilization_percent = Value::Known(37.0);
    s.vram_used_bytes = Value::Known(9_663_676_416);
    s.temperature_c = Value::Known(71.0);
    s.hotspot_c = Value::Known(83.0);
    s.power_w = Value::Known(187.0);
    s
}

fn a100() -> GpuSample {
    let gpu = Gpu {
        compute_capability: Some("8.0".into()),
        vram_total_bytes: Some(85_899_345_920),
        ..Gpu::for_test(Vendor::Nvidia, 1, "NVIDIA A100-SXM4-80GB", "0000:41:00.0")
    };
    let mut s = GpuSample::blank(&gpu);
    s.utilization_percent = Value::Known(98.0);
    s.vram_used_bytes = Value::Known(83_000_000_000);
    s.temperature_c = Value::Known(91.0);
    s.power_w = Value::Error("[Unknown Error]".into());
    s.ecc = vec![EccCount {
        block: "total".into(),
        uncorrectable: Value::Known(2),
        correctable: Value::Known(14),
    }];
    s
}

/// Two GPUs with a minute of history (a ramp and a wave), two faults, the kernel log followed.
fn scene(base: Instant) -> Snapshot {
    let mut snap = Snapshot::default();
    for i in 0..60u32 {
        let mut a = rx6800();
        a.utilization_percent = Value::Known(f64::from((i * 7) % 100));
        a.temperature_c = Value::Known(50.0 + f64::from(i) / 3.0);
        let mut b = a100();
        b.utilization_percent = Value::Known(if i % 10 < 5 { 95.0 } else { 40.0 });
        snap.add_sample(&[a, b], base + Duration::from_secs(u64::from(i)));
    }
    snap.add_sample(&[rx6800(), a100()], base + Duration::from_secs(60));
    snap.gpus[0].processes = vec![
        GpuProcess {
            pid: 4242,
            name: Some("python3".into()),
            vram_bytes: 8_589_934_592,
        },
        GpuProcess {
            pid: 977,
            name: None,
            vram_bytes: 268_435_456,
        },
    ];
    snap.sources.health = vec!["amdgpu sysfs".into(), "nvidia-smi".into()];
    snap.sources.kernel = KernelState::Following;
    snap.add_fault(FaultNote {
        at: wall() - Duration::from_secs(95),
        class: FaultClass::GpuHang,
        rule: "amdgpu_ring_timeout".into(),
        severity: Severity::Error,
        source: "kernel".into(),
        line: "amdgpu 0000:0b:00.0: amdgpu: ring gfx_0.0.0 timeout, signaled seq=1234, emitted seq=1236".into(),
        attempt: None,
        reason: Some("no job on that GPU".into()),
        count: 1,
    });
    snap.add_fault(FaultNote {
        at: wall() - Duration::from_secs(12),
        class: FaultClass::GpuMemoryFault,
        rule: "nvidia_xid_31".into(),
        severity: Severity::Critical,
        source: "kernel".into(),
        line: "NVRM: Xid (PCI:0000:41:00): 31, pid=4242, name=python3, channel 0x0000000a".into(),
        attempt: None,
        reason: None,
        count: 3,
    });
    snap
}

fn view(base: Instant, title: &str) -> View {
    let mut v = View::new(title);
    v.now = base + Duration::from_millis(60_400);
    v.wall = wall();
    v
}

fn text(buffer: &Buffer) -> String {
    let width = buffer.area.width as usize;
    let mut out = String::new();
    for row in buffer.content.chunks(width) {
        let line: String = row.iter().map(|c| c.symbol()).collect();
        out.push_str(line.trim_end());
        out.push('\n');
    }
    out
}

fn render(snap: &Snapshot, view: &View, width: u16, height: u16) -> String {
    let mut terminal = Terminal::new(TestBackend::new(width, height)).unwrap();
    terminal.draw(|f| draw(f, snap, view)).unwrap();
    text(terminal.backend().buffer())
}

/// Compares with `tests/data/ui/<name>.txt`, or writes it under `UPDATE_UI_SNAPSHOTS=1`.
fn check(name: &str, rendered: &str) {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/data/ui")
        .join(format!("{name}.txt"));
    if std::env::var_os("UPDATE_UI_SNAPSHOTS").is_some() {
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(&path, rendered).unwrap();
        return;
    }
    let expected = std::fs::read_to_string(&path).unwrap_or_else(|e| {
        panic!(
            "{}: {e}; run `UPDATE_UI_SNAPSHOTS=1 cargo test --lib ui` to create it",
            path.display()
        )
    });
    assert!(
        expected == rendered,
        "{name} changed.\n--- expected ({})\n{expected}\n--- rendered\n{rendered}\nrun `UPDATE_UI_SNAPSHOTS=1 cargo test --lib ui` if the change is intended",
        path.display()
    );
}

#[test]
fn watch_at_100x30() {
    let base = Instant::now();
    let out = render(&scene(base), &view(base, "watch"), 100, 30);
    assert!(out.contains("AMD Radeon RX 6800"), "{out}");
    assert!(out.contains("gfx1030") && out.contains("8.0"), "{out}");
    assert!(out.contains("37%") && out.contains("98%"), "{out}");
    assert!(out.contains("python3 4242 8.0G"), "KFD processes: {out}");
    check("watch-100x30", &out);
}

#[test]
fn watch_at_80x24() {
    let base = Instant::now();
    let out = render(&scene(base), &view(base, "watch"), 80, 24);
    assert!(out.contains("gfx1030") && out.contains("37%"), "{out}");
    assert!(out.contains("x3"), "the storm count is shown: {out}");
    check("watch-80x24", &out);
}

fn job_scene(base: Instant) -> Snapshot {
    let mut snap = scene(base);
    snap.gpus.truncate(1);
    snap.job = Some(JobInfo {
        command: vec![
            "python".into(),
            "train.py".into(),
            "--device".into(),
            "cuda".into(),
        ],
        state: JobState::Running,
        attempt: 2,
        tier: "cpu".into(),
        device: "cpu".into(),
        pid: Some(31337),
        started: Some(wall() - Duration::from_secs(754)),
        restarts: 1,
        max_restarts: 5,
        resumed_from: Some("ckpt/step-15.pt".into()),
        gpus: Vec::new(),
        excluded: Vec::new(),
        last_checkpoint: Some(("ckpt/step-20.pt".into(), wall() - Duration::from_secs(42))),
        run_dir: "gpuwarden-runs/x".into(),
    });
    for i in 15..40 {
        snap.add_output(
            false,
            format!("step {i} loss {:.3}", 1.0 / f64::from(i)).as_bytes(),
        );
    }
    snap.add_output(true, b"warning: falling back to the CPU");
    snap
}

#[test]
fn run_at_100x30() {
    let base = Instant::now();
    let out = render(&job_scene(base), &view(base, "run"), 100, 30);
    assert!(out.contains("attempt 2 on cpu"), "{out}");
    assert!(
        out.contains("step 39 loss"),
        "the newest output line is shown: {out}"
    );
    check("run-100x30", &out);
}

#[test]
fn run_at_80x24() {
    let base = Instant::now();
    let out = render(&job_scene(base), &view(base, "run"), 80, 24);
    assert!(out.contains("pid 31337"), "{out}");
    check("run-80x24", &out);
}

#[test]
fn tiny_and_empty_screens_do_not_panic() {
    let base = Instant::now();
    for (w, h) in [(1, 1), (20, 5), (80, 24), (200, 60)] {
        render(&Snapshot::default(), &view(base, "watch"), w, h);
        render(&job_scene(base), &view(base, "run"), w, h);
        let mut help = view(base, "run");
        help.help = true;
        render(&job_scene(base), &help, w, h);
    }
    let out = render(&Snapshot::default(), &view(base, "watch"), 80, 24);
    assert!(out.contains("no GPU found"), "{out}");
}

#[test]
fn stop_needs_a_confirmation_and_only_y_confirms() {
    let mut v = View::new("run");
    assert_eq!(key(&mut v, 's', false, true), Key::Nothing);
    assert!(v.confirm_stop);
    assert_eq!(key(&mut v, 'n', false, true), Key::Nothing);
    assert!(!v.confirm_stop);
    assert_eq!(key(&mut v, 's', false, true), Key::Nothing);
    assert_eq!(key(&mut v, 'y', false, true), Key::Stop);
    assert_eq!(key(&mut v, 'c', true, true), Key::Interrupt);
    // No job, no stop.
    let mut w = View::new("watch");
    assert_eq!(key(&mut w, 's', false, false), Key::Nothing);
    assert!(!w.confirm_stop);
    assert_eq!(key(&mut w, 'q', false, false), Key::Quit);
    assert_eq!(key(&mut w, 'c', true, false), Key::Quit);
    assert_eq!(key(&mut w, 'p', false, false), Key::Nothing);
    assert!(w.paused);
}

#[test]
fn a_fallback_needs_a_confirmation_and_only_in_a_run() {
    let mut v = View::new("run");
    assert_eq!(key(&mut v, 'f', false, true), Key::Nothing);
    assert!(v.confirm_fallback && !v.confirm_stop);
    assert_eq!(key(&mut v, 'f', false, true), Key::Nothing, "f again is no");
    assert!(!v.confirm_fallback);
    assert_eq!(key(&mut v, 'f', false, true), Key::Nothing);
    assert_eq!(key(&mut v, 'y', false, true), Key::Fallback);
    assert!(!v.confirm_fallback);
    let mut w = View::new("watch");
    assert_eq!(key(&mut w, 'f', false, false), Key::Nothing);
    assert!(!w.confirm_fallback);
}

#[test]
fn kfd_processes_are_read_per_gpu_biggest_first() {
    let dir = tempfile::tempdir().unwrap();
    let procs = dir.path().join("proc");
    for (pid, file, bytes) in [
        ("100", "vram_38442", "1048576"),
        ("200", "vram_38442", "4194304"),
        ("200", "vram_999", "7"),
        ("300", "vram_12345", "5"),
        ("self", "vram_38442", "1"),
    ] {
        std::fs::create_dir_all(procs.join(pid)).unwrap();
        std::fs::write(procs.join(pid).join(file), bytes).unwrap();
    }
    let gpu = rx6800().device;
    let found =
        crate::sources::health::amd_sysfs::kfd_processes(&procs, &[(gpu.clone(), "38442".into())]);
    let seen: Vec<(u32, u64)> = found.iter().map(|(_, p)| (p.pid, p.vram_bytes)).collect();
    assert_eq!(seen, vec![(200, 4_194_304), (100, 1_048_576)]);
    assert!(found.iter().all(|(d, _)| *d == gpu));
}

#[test]
fn an_excluded_gpu_says_so_in_its_row_and_the_job_panel() {
    let base = Instant::now();
    let mut snap = job_scene(base);
    let pci = snap.gpus[0].sample.device.pci.clone();
    let gpu = |index: u32, ordinal: u32, pci: Option<String>| crate::gpu::JobGpu {
        key: index as usize,
        vendor: crate::gpu::Vendor::Amd,
        index,
        ordinal,
        pci,
    };
    if let Some(job) = &mut snap.job {
        job.excluded = vec![gpu(0, 1, pci)];
        job.gpus = vec![gpu(1, 0, Some("0000:0c:00.0".into()))];
    }
    let out = render(&snap, &view(base, "run"), 100, 30);
    assert!(out.contains(" 0 EXCLUDED AMD Radeon"), "{out}");
    assert!(out.contains("GPUs 1 (excluded 0)"), "{out}");
    // Without the exclusion, the same screen says nothing of it.
    let out = render(&job_scene(base), &view(base, "run"), 100, 30);
    assert!(!out.contains("EXCLUDED"), "{out}");
}

#[test]
fn eight_gpus_on_a_small_screen_say_how_many_are_not_shown() {
    let base = Instant::now();
    let mut snap = job_scene(base);
    let samples: Vec<GpuSample> = (0..8)
        .map(|i| {
            let mut s = a100();
            s.device.index = Some(i);
            s.device.pci = Some(format!("0000:{:02x}:00.0", 0x41 + i));
            s
        })
        .collect();
    snap.gpus.clear();
    snap.add_sample(&samples, base);
    let out = render(&snap, &view(base, "run"), 80, 24);
    assert!(out.contains("more GPU(s)"), "{out}");
    assert!(
        out.contains("attempt 2 on cpu"),
        "the job panel stays: {out}"
    );
    let out = render(&snap, &view(base, "watch"), 100, 40);
    assert!(
        out.contains(" 7 NVIDIA A100"),
        "all eight fit in 40 rows: {out}"
    );
}

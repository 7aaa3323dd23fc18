//! `gpuwarden watch`: GPU health live in the terminal, or one sample (`--once`) as a table or
//! JSON for scripts.

use std::io::Write;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use gpuwarden::executor::{Request, Requests, Watch};
use gpuwarden::exit;
use gpuwarden::rules::RuleSet;
use gpuwarden::snapshot::Board;
use gpuwarden::sources::health::{GpuSample, HealthConfig, Value};
use gpuwarden::ui::{self, View, collect};

use super::error;
use crate::cli::WatchArgs;

/// How long `--once` waits for the slowest source (a hung nvidia-smi is killed at 10 s).
const ONCE_DEADLINE: Duration = Duration::from_secs(12);

pub fn watch(args: WatchArgs) -> i32 {
    let health = HealthConfig {
        interval: Duration::from_secs_f64(args.interval),
        sysfs_root: args.sysfs_root.clone(),
        ..HealthConfig::default()
    };
    if args.once {
        return once(health, args.json);
    }
    if let Some(why) = ui::terminal::unusable() {
        error(format_args!(
            "the live display needs a terminal ({why}); `gpuwarden watch --once [--json]` prints one sample instead"
        ));
        return exit::USAGE;
    }
    let rules = match RuleSet::load(&args.rules) {
        Ok(r) => Arc::new(r),
        Err(e) => {
            error(e);
            return exit::USAGE;
        }
    };
    let kernel = super::kernel_source(args.no_kernel_log, args.kernel_log);
    // SIGTERM, SIGHUP or SIGINT (from outside: in raw mode Ctrl-C is a key) end the display
    // like `q`, so the terminal is given back instead of left raw on the alternate screen.
    // Blocked before the collectors start, so that no thread of theirs takes the signal.
    let (tx, signals) = std::sync::mpsc::sync_channel(4);
    let caught = gpuwarden::process::block_signals()
        .and_then(|()| gpuwarden::process::spawn_signal_thread(tx, |sig| sig));
    if let Err(e) = caught {
        error(format_args!(
            "cannot catch signals ({e}); a kill leaves the terminal raw"
        ));
    }
    let board = Board::new();
    let collector = match collect::start(&board, Some(health), kernel, rules) {
        Ok(c) => c,
        Err(e) => {
            error(format_args!("cannot start the GPU health collectors: {e}"));
            return exit::INTERNAL;
        }
    };
    // Only the signals that end a run end the display: SIGWINCH comes with every resize of the
    // terminal (and SIGUSR1/2, SIGCONT are a run's to pass on), since the signal thread catches
    // them for `run` (0613c1f).
    let signalled = || signals.try_iter().any(|sig| !sig.forward_only());
    let shown = ui::terminal::run(&board, View::new("watch"), false, signalled, |_| {});
    collector.stop();
    match shown {
        Ok(()) => exit::SUCCESS,
        Err(e) => {
            error(format_args!("the terminal failed: {e}"));
            exit::INTERNAL
        }
    }
}

fn once(health: HealthConfig, json: bool) -> i32 {
    let reading = match collect::one_reading(health, ONCE_DEADLINE) {
        Ok(r) => r,
        Err(e) => {
            error(format_args!("cannot start the GPU health sampler: {e}"));
            return exit::INTERNAL;
        }
    };
    let mut out = std::io::stdout().lock();
    let written = if json {
        let value = serde_json::json!({
            "sources": reading.sources,
            "gpus": reading.gpus,
            "notes": reading.notes,
        });
        writeln!(out, "{value}")
    } else {
        write_table(&mut out, &reading)
    };
    // A closed pipe (`| head`) is not an error worth a message.
    let _ = written;
    exit::SUCCESS
}

fn mib(v: &Value<u64>) -> String {
    shown(v, |b| format!("{:.0}", b as f64 / (1u64 << 20) as f64))
}

fn shown<T: Copy>(v: &Value<T>, f: impl Fn(T) -> String) -> String {
    match v {
        Value::Known(x) => f(*x),
        Value::Unknown => "-".into(),
        Value::Error(text) => format!("ERR({text})"),
    }
}

fn ecc(sample: &GpuSample) -> String {
    if sample.ecc.is_empty() {
        return "-".into();
    }
    let ue: u64 = sample
        .ecc
        .iter()
        .filter_map(|c| c.uncorrectable.known())
        .sum();
    let ce: u64 = sample
        .ecc
        .iter()
        .filter_map(|c| c.correctable.known())
        .sum();
    format!("{ue}/{ce}")
}

fn write_table(out: &mut impl Write, reading: &collect::OneReading) -> std::io::Result<()> {
    if reading.gpus.is_empty() {
        writeln!(out, "no GPU found")?;
    } else {
        writeln!(
            out,
            "{:<4} {:<24} {:<8} {:>5} {:>17} {:>6} {:>7} {:>9}",
            "GPU", "NAME", "ARCH", "UTIL", "VRAM USED/TOTAL", "TEMP", "POWER", "ECC UE/CE"
        )?;
    }
    for g in &reading.gpus {
        let index = g.device.index.map_or("?".into(), |i| i.to_string());
        let name: String = g
            .name
            .as_deref()
            .unwrap_or("unknown")
            .chars()
            .take(24)
            .collect();
        let vram = format!(
            "{}/{} MiB",
            mib(&g.vram_used_bytes),
            mib(&g.vram_total_bytes)
        );
        writeln!(
            out,
            "{:<4} {:<24} {:<8} {:>5} {:>17} {:>6} {:>7} {:>9}",
            index,
            name,
            g.arch.as_deref().unwrap_or("-"),
            shown(&g.utilization_percent, |u| format!("{u:.0}%")),
            vram,
            shown(&g.temperature_c, |c| format!("{c:.0}C")),
            shown(&g.power_w, |w| format!("{w:.0}W")),
            ecc(g),
        )?;
    }
    let names: Vec<&str> = reading.sources.iter().map(|s| s.as_str()).collect();
    if !names.is_empty() {
        writeln!(out, "source: {}", names.join(", "))?;
    }
    for note in &reading.notes {
        writeln!(out, "note: {note}")?;
    }
    Ok(())
}

/// How long the display stays up after the run has ended, so its last state can be seen.
const LINGER: Duration = Duration::from_millis(1500);

/// Runs `run` (the supervision) with the readers of its board: the health history
/// (`health.jsonl`, whenever health is sampled, i.e. `sysfs_root` is given) and the live display
/// when `ui` is asked for and there is a terminal. The display runs on its own thread; while it
/// is up, the job's output and gpuwarden's lines go to its output pane, and gpuwarden's lines
/// are printed once it closes (at the end of the run, or at `q`, after which the run goes on as
/// without it). `requests` carries what keys ask of the run beyond a signal (`f`).
pub fn around_run<T>(
    board: &Board,
    ui: bool,
    sysfs_root: Option<std::path::PathBuf>,
    requests: Requests,
    run: impl FnOnce() -> T,
) -> T {
    let _history = sysfs_root
        .is_some()
        .then(|| ui::history::start(board).ok())
        .flatten();
    if !ui {
        return run();
    }
    if let Some(why) = ui::terminal::unusable() {
        gpuwarden::voice::say(&format!(
            "--ui: the live display needs a terminal ({why}); supervising without it"
        ));
        return run();
    }
    let ended: Arc<Mutex<Option<Instant>>> = Arc::default();
    // The GPUs' processes (KFD): the executor's health events do not carry them.
    let _processes = sysfs_root
        .and_then(|root| collect::ProcessPoller::spawn(board, &root, Duration::from_secs(2)).ok());
    ui::console::take(board);
    let display = {
        let board = board.clone();
        let ended = Arc::clone(&ended);
        std::thread::Builder::new()
            .name("display".into())
            .spawn(move || {
                let over = || {
                    ended
                        .lock()
                        .unwrap_or_else(PoisonError::into_inner)
                        .is_some_and(|at| at.elapsed() >= LINGER)
                };
                let shown = ui::terminal::run(&board, View::new("run"), true, over, |key| {
                    ask(key, &requests)
                });
                let said = ui::console::give_back();
                let mut err = std::io::stderr().lock();
                if let Err(e) = shown {
                    let _ = writeln!(
                        err,
                        "gpuwarden: the live display failed ({e}); supervising without it"
                    );
                }
                for line in said {
                    let _ = err.write_all(line.as_bytes());
                }
            })
    };
    let display = match display {
        Ok(thread) => Some(thread),
        Err(e) => {
            let _ = ui::console::give_back();
            gpuwarden::voice::say(&format!(
                "--ui: cannot start the live display ({e}); supervising without it"
            ));
            None
        }
    };
    let result = run();
    *ended.lock().unwrap_or_else(PoisonError::into_inner) = Some(Instant::now());
    if let Some(thread) = display {
        let _ = thread.join();
    }
    result
}

/// Carries out what a key asks of the run: the same signal the user could send, so the
/// supervisor handles it exactly as it would that signal; a forced fallback, which no signal
/// says, goes in as a request.
fn ask(key: ui::Key, requests: &Requests) {
    use nix::sys::signal::{Signal, kill};
    let signal = match key {
        ui::Key::Stop => Signal::SIGTERM,
        ui::Key::Interrupt => Signal::SIGINT,
        ui::Key::Fallback => {
            requests.send(Request::ForceFallback);
            return;
        }
        ui::Key::Quit | ui::Key::Nothing => return,
    };
    let _ = kill(nix::unistd::Pid::this(), signal);
}

/// What `demo` watches: nothing without `--ui`; with it, the GPUs of `sysfs_root`, or a
/// simulated RX 6800 (kept moving with the demo job) written to a temporary directory. The
/// animation stops, and the directory goes, when the second value is dropped.
pub fn demo_watch(
    ui: bool,
    sysfs_root: Option<std::path::PathBuf>,
) -> (Watch, Option<ui::simulated::Animation>) {
    let mut watch = Watch::default();
    if !ui {
        return (watch, None);
    }
    let mut animation = None;
    let root = match sysfs_root {
        Some(root) => Some(root),
        None => {
            let dir =
                std::env::temp_dir().join(format!("gpuwarden-demo-gpu-{}", std::process::id()));
            match ui::simulated::rx6800(&dir) {
                Ok(root) => {
                    animation = ui::simulated::animate(&dir, &watch.board).ok();
                    Some(root)
                }
                Err(e) => {
                    error(format_args!(
                        "cannot write the demo's simulated GPU under {}: {e}",
                        dir.display()
                    ));
                    None
                }
            }
        }
    };
    watch.health = root.map(|sysfs_root| HealthConfig {
        sysfs_root,
        // The demo's GPU is the simulated one only: no vendor tool is asked.
        nvidia_smi: "/nonexistent/nvidia-smi".into(),
        nvml: None,
        rocm_smi: "/nonexistent/rocm-smi".into(),
        amd_smi: "/nonexistent/amd-smi".into(),
        ..HealthConfig::default()
    });
    (watch, animation)
}

//! The health history of a run: `health.jsonl` in the run directory, so the morning after a run
//! can see what the GPUs did (was it hot before the fault? was VRAM full?).
//!
//! A reader of the board like the display: a thread takes the GPUs' latest samples once a
//! second and writes one JSON line per GPU when it changed noticeably or [`EVERY`] has passed
//! since that GPU's last line. The file is bounded ([`MAX_BYTES`]); past that a last line says
//! so and nothing more is written. Losing it never touches the run: a write error stops the
//! history, not the supervision.
//!
//! Each line is the GPU's sample as `watch --once --json` prints it, plus `at` (RFC 3339).

use std::fs::File;
use std::io::{self, Write};
use std::path::PathBuf;
use std::sync::{Arc, Condvar, Mutex, PoisonError};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant, SystemTime};

use crate::snapshot::Board;
use crate::sources::health::{DeviceRef, GpuSample};

/// A GPU's line at least this often, changed or not.
pub const EVERY: Duration = Duration::from_secs(10);

/// The most the file may hold.
pub const MAX_BYTES: u64 = 64 << 20;

/// How often the board is looked at.
const POLL: Duration = Duration::from_secs(1);

/// Whether `now` differs enough from `before` to be worth a line before [`EVERY`] is up: a
/// GPU that came or went, new ECC errors, utilisation by 10 points, temperature by 3 °C, VRAM
/// by 5% of the card, power by 20%.
pub fn changed(before: &GpuSample, now: &GpuSample) -> bool {
    fn moved(a: Option<f64>, b: Option<f64>, by: f64) -> bool {
        match (a, b) {
            (Some(a), Some(b)) => (a - b).abs() >= by,
            (None, None) => false,
            _ => true,
        }
    }
    let vram = |s: &GpuSample| s.vram_used_bytes.known().map(|b| b as f64);
    let total = now.vram_total_bytes.known().unwrap_or(u64::MAX) as f64;
    let power_step = before.power_w.known().unwrap_or(0.0).abs() * 0.2;
    before.present != now.present
        || before.ecc != now.ecc
        || moved(
            before.utilization_percent.known(),
            now.utilization_percent.known(),
            10.0,
        )
        || moved(before.temperature_c.known(), now.temperature_c.known(), 3.0)
        || moved(vram(before), vram(now), total * 0.05)
        || moved(
            before.power_w.known(),
            now.power_w.known(),
            power_step.max(1.0),
        )
}

/// What the writer remembers of each GPU: its last line's sample and time.
#[derive(Debug, Default)]
pub struct Tracker {
    last: Vec<(DeviceRef, GpuSample, Instant)>,
}

impl Tracker {
    /// The samples due a line at `now`, and remembers them as written.
    pub fn due(&mut self, samples: &[GpuSample], now: Instant) -> Vec<GpuSample> {
        let mut out = Vec::new();
        for s in samples {
            match self.last.iter_mut().find(|(d, _, _)| *d == s.device) {
                Some((_, before, at)) => {
                    if now.saturating_duration_since(*at) >= EVERY || changed(before, s) {
                        *before = s.clone();
                        *at = now;
                        out.push(s.clone());
                    }
                }
                None => {
                    self.last.push((s.device.clone(), s.clone(), now));
                    out.push(s.clone());
                }
            }
        }
        out
    }
}

/// One line of the file; `excluded` marks a GPU hidden from the job after a fault.
pub fn line(sample: &GpuSample, at: SystemTime, excluded: bool) -> String {
    let mut value = serde_json::to_value(sample).unwrap_or_default();
    if let Some(map) = value.as_object_mut() {
        map.insert(
            "at".into(),
            serde_json::Value::String(crate::time::rfc3339(at)),
        );
        if excluded {
            map.insert("excluded".into(), serde_json::Value::Bool(true));
        }
    }
    format!("{value}\n")
}

/// The running writer; stops when dropped.
#[derive(Debug)]
pub struct History {
    stop: Arc<(Mutex<bool>, Condvar)>,
    thread: Option<JoinHandle<()>>,
}

impl Drop for History {
    fn drop(&mut self) {
        let (lock, wake) = &*self.stop;
        *lock.lock().unwrap_or_else(PoisonError::into_inner) = true;
        wake.notify_all();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Starts writing `health.jsonl` into the run directory that `board`'s job names, once it
/// names one.
pub fn start(board: &Board) -> io::Result<History> {
    let stop: Arc<(Mutex<bool>, Condvar)> = Arc::default();
    let (flag, board) = (Arc::clone(&stop), board.clone());
    let thread = thread::Builder::new()
        .name("health-history".into())
        .spawn(move || write_loop(&board, &flag))?;
    Ok(History {
        stop,
        thread: Some(thread),
    })
}

fn write_loop(board: &Board, flag: &(Mutex<bool>, Condvar)) {
    let (lock, wake) = flag;
    let mut file: Option<(File, u64)> = None;
    let mut tracker = Tracker::default();
    let mut marked: Vec<DeviceRef> = Vec::new();
    let mut stopped = lock.lock().unwrap_or_else(PoisonError::into_inner);
    while !*stopped {
        // The lock is held for the copy of the samples only.
        type Copy = (Option<PathBuf>, Vec<GpuSample>, Vec<DeviceRef>);
        let (run_dir, samples, excluded): Copy = board.update(|s| {
            (
                s.job
                    .as_ref()
                    .map(|j| j.run_dir.clone())
                    .filter(|d| !d.as_os_str().is_empty()),
                s.gpus.iter().map(|g| g.sample.clone()).collect(),
                s.gpus
                    .iter()
                    .map(|g| &g.sample.device)
                    .filter(|d| s.job.as_ref().is_some_and(|j| j.excludes(d)))
                    .cloned()
                    .collect(),
            )
        });
        if file.is_none()
            && let Some(dir) = run_dir
        {
            match File::options()
                .create(true)
                .append(true)
                .open(dir.join("health.jsonl"))
            {
                Ok(f) => file = Some((f, 0)),
                // No history, and no second try: the run goes on without it.
                Err(_) => return,
            }
        }
        if let Some((f, written)) = &mut file {
            let mut text = String::new();
            let mut due = tracker.due(&samples, Instant::now());
            // A GPU just excluded from the job gets a line saying so at once.
            for sample in &samples {
                if excluded.contains(&sample.device) && !marked.contains(&sample.device) {
                    marked.push(sample.device.clone());
                    if !due.iter().any(|d| d.device == sample.device) {
                        due.push(sample.clone());
                    }
                }
            }
            for sample in due {
                let out = excluded.contains(&sample.device);
                text.push_str(&line(&sample, SystemTime::now(), out));
            }
            if *written + text.len() as u64 > MAX_BYTES {
                let _ = f.write_all(
                    format!(
                        "{{\"at\":\"{}\",\"truncated\":\"health.jsonl reached {} MiB; no more samples are written\"}}\n",
                        crate::time::rfc3339(SystemTime::now()),
                        MAX_BYTES >> 20
                    )
                    .as_bytes(),
                );
                return;
            }
            if !text.is_empty() {
                if f.write_all(text.as_bytes()).is_err() {
                    return;
                }
                *written += text.len() as u64;
            }
        }
        stopped = wake
            .wait_timeout(stopped, POLL)
            .unwrap_or_else(PoisonError::into_inner)
            .0;
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::gpu::{Gpu, Vendor};
    use crate::sources::health::Value;

    fn sample(util: f64, temp: f64) -> GpuSample {
        let gpu = Gpu {
            gfx_target: Some("gfx1030".into()),
            vram_total_bytes: Some(17_163_091_968),
            ..Gpu::for_test(Vendor::Amd, 0, "AMD Radeon RX 6800", "0000:0b:00.0")
        };
        let mut s = GpuSample::blank(&gpu);
        s.utilization_percent = Value::Known(util);
        s.temperature_c = Value::Known(temp);
        s
    }

    #[test]
    fn a_line_on_a_noticeable_change_or_every_ten_seconds() {
        let mut t = Tracker::default();
        let t0 = Instant::now();
        let at = |s: u64| t0 + Duration::from_secs(s);
        assert_eq!(t.due(&[sample(50.0, 60.0)], at(0)).len(), 1, "the first");
        assert!(
            t.due(&[sample(55.0, 61.0)], at(1)).is_empty(),
            "small moves"
        );
        assert_eq!(t.due(&[sample(65.0, 61.0)], at(2)).len(), 1, "util +15");
        assert_eq!(t.due(&[sample(65.0, 64.5)], at(3)).len(), 1, "temp +3.5");
        assert!(t.due(&[sample(65.0, 64.5)], at(12)).is_empty());
        assert_eq!(t.due(&[sample(65.0, 64.5)], at(13)).len(), 1, "10 s later");
        let mut gone = sample(65.0, 64.5);
        gone.present = false;
        assert_eq!(t.due(&[gone], at(14)).len(), 1, "gone");
    }

    #[test]
    fn a_line_is_the_sample_with_its_time() {
        let text = line(
            &sample(42.0, 49.0),
            SystemTime::UNIX_EPOCH + Duration::from_secs(1_796_463_000),
            false,
        );
        let v: serde_json::Value = serde_json::from_str(&text).unwrap();
        assert!(v.get("excluded").is_none());
        assert_eq!(v["utilization_percent"], 42.0);
        assert_eq!(v["temperature_c"], 49.0);
        assert_eq!(v["device"]["index"], 0);
        assert!(v["at"].as_str().unwrap().starts_with("2026-12-05T"));
        assert!(text.ends_with('\n') && !text[..text.len() - 1].contains('\n'));
        let excluded = line(&sample(0.0, 40.0), SystemTime::UNIX_EPOCH, true);
        let v: serde_json::Value = serde_json::from_str(&excluded).unwrap();
        assert_eq!(v["excluded"], true);
    }
}

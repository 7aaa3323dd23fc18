//! What one NVIDIA health sample costs through NVML versus one `nvidia-smi --query-gpu` call,
//! on a machine with an NVIDIA GPU: `cargo build --release --example nvml_vs_smi`, then
//! `target/release/examples/nvml_vs_smi [REPEATS]` there (it needs no Rust toolchain).
//!
//! Both sides do what the health sampler does each second: NVML reads every GPU's readings and
//! its process list through the already-open library; nvidia-smi is started, prints the CSV
//! query, and its output is parsed. Opening NVML (loading the library, `nvmlInit`) happens once
//! per run and is timed apart. Plain repetitions, then min, median and mean: enough to compare
//! milliseconds with microseconds.

use std::ffi::OsStr;
use std::process::Command;
use std::time::{Duration, Instant};

use gpuwarden::sources::health::{nvidia, nvml};

fn main() {
    let repeats: usize = std::env::args()
        .nth(1)
        .and_then(|n| n.parse().ok())
        .unwrap_or(20);

    let start = Instant::now();
    match nvml::open(OsStr::new(nvml::LIBRARY)) {
        Ok(mut reader) => {
            println!("nvml open (load + init): {:.2} ms", ms(start.elapsed()));
            let first = Instant::now();
            let out = reader.read();
            println!("nvml first sample: {:.3} ms", ms(first.elapsed()));
            for s in &out.reading.gpus {
                println!(
                    "nvml gpu {}: {}",
                    s.device,
                    serde_json::to_string(s).unwrap_or_default()
                );
            }
            let times = time(repeats, || {
                std::hint::black_box(reader.read());
            });
            report("nvml sample", &times);
        }
        Err(e) => println!("nvml: {e}"),
    }

    let args = nvidia::query_args();
    let times = time(repeats, || {
        match Command::new("nvidia-smi").args(&args).output() {
            Ok(out) => {
                std::hint::black_box(nvidia::parse_query(
                    &String::from_utf8_lossy(&out.stdout),
                    &String::from_utf8_lossy(&out.stderr),
                ));
            }
            Err(e) => println!("nvidia-smi: {e}"),
        }
    });
    report("nvidia-smi call", &times);
}

fn time(repeats: usize, mut f: impl FnMut()) -> Vec<Duration> {
    (0..repeats.max(1))
        .map(|_| {
            let t = Instant::now();
            f();
            t.elapsed()
        })
        .collect()
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

fn report(what: &str, times: &[Duration]) {
    let mut sorted = times.to_vec();
    sorted.sort();
    let mean = times.iter().sum::<Duration>() / times.len() as u32;
    println!(
        "{what}: n={} min {:.3} ms, median {:.3} ms, mean {:.3} ms",
        times.len(),
        ms(sorted[0]),
        ms(sorted[sorted.len() / 2]),
        ms(mean)
    );
}

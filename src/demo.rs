//! The built-in demo training job behind `gpuwarden demo`: a tiny but real EEG classifier.
//!
//! gpuwarden re-executes itself with a hidden subcommand that lands in [`run`]. The job trains a
//! miniature of the EEGNeX spatial convolution from the seed report (a learned filter over the 19
//! electrodes of the 10-20 system, then log-power and a logistic unit) on synthetic EEG: pink-ish
//! noise everywhere, plus a 10 Hz alpha burst over O1, O2 and Pz in class-1 trials. It prints one
//! line per step, writes real safetensors checkpoints atomically, resumes from them, and on a GPU
//! device dies at a chosen step exactly the way the ROCm HSA runtime does (the stderr line, then
//! SIGABRT), so the whole supervise-fault-resume loop can be shown on a laptop without a GPU.
//!
//! It is not a benchmark and not a model anyone should use: there is no GPU code here, the
//! "device" only decides whether the scripted fault can fire. Everything is deterministic in
//! `seed`: each step's mini-batch is derived from `(seed, step)`, and a checkpoint holds the
//! weights and the Adam moments exactly as they are kept in memory (`f32`), so a run resumed from
//! step 15 retraces the uninterrupted run bit for bit.

use std::fs::{self, File};
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::time::Duration;

/// The 19 electrodes in the 10-20 order the seed project's EEGNeX input used.
pub const CHANNELS: [&str; 19] = [
    "Fp1", "Fp2", "F7", "F3", "Fz", "F4", "F8", "T3", "C3", "Cz", "C4", "T4", "T5", "P3", "Pz",
    "P4", "T6", "O1", "O2",
];
const N_CH: usize = CHANNELS.len();
/// Trainable numbers: the spatial filter, then the head's slope and bias.
const N_PARAMS: usize = N_CH + 2;
/// One second of signal at 128 Hz per trial.
const SAMPLES: usize = 128;
const SAMPLE_RATE_HZ: f64 = 128.0;
const ALPHA_HZ: f64 = 10.0;
/// Where the alpha burst shows (O1, O2 fully, Pz a little weaker), by index into [`CHANNELS`].
const ALPHA_CHANNELS: [(usize, f64); 3] = [(17, 1.0), (18, 1.0), (14, 0.7)];
/// Mean peak burst amplitude relative to the unit-variance background. Chosen so that 40 steps
/// take the loss from ln 2 to about 0.25: weaker bursts make a dull demo, stronger a trivial one.
const ALPHA_AMPLITUDE: f64 = 4.0;
/// Share of the background common to all electrodes (reference, volume conduction), which a
/// good spatial filter learns to cancel.
const COMMON_MODE: f64 = 0.5;
const BATCH: usize = 32;
const EVAL_TRIALS: usize = 128;
const LEARNING_RATE: f64 = 0.1;
/// The head's initial slope: "more power means more alpha" is the one prior the model gets.
/// With a zero slope the filter's gradient (proportional to it) starts at zero and some seeds
/// sit on that saddle for the whole run.
const INITIAL_SLOPE: f32 = 0.2;
/// Keeps `ln(p)` finite if the filter ever collapses to zero.
const EPS: f64 = 1e-6;
/// A real checkpoint of this job is about 500 bytes; refuse to slurp anything absurd.
const MAX_CHECKPOINT_BYTES: u64 = 1 << 20;

/// What the hidden demo subcommand was asked to do.
#[derive(Clone, Debug)]
pub struct DemoJob {
    /// `"cpu"` (any case) runs on the CPU tier; anything else ("cuda", "cuda:0", "hip") counts as
    /// a GPU tier, where the scripted fault can fire.
    pub device: String,
    /// A checkpoint file written by this job to continue from.
    pub resume: Option<PathBuf>,
    /// Where checkpoints go; created if missing.
    pub checkpoint_dir: PathBuf,
    /// Total training steps, numbered from 1.
    pub steps: u32,
    /// Write a checkpoint after every step that is a multiple of this.
    pub checkpoint_every: u32,
    /// On a non-cpu device, die like the HSA runtime when this step is about to start.
    pub fault_at_step: Option<u32>,
    /// Sleep after each step so a human can watch the dashboard; zero in tests.
    pub step_delay: Duration,
    pub seed: u64,
}

/// How the run went. Losses and accuracy are measured on a fixed held-out set of synthetic
/// trials (the same for every run with the same seed), so a fresh and a resumed run can be
/// compared number for number; the per-step lines show the noisier mini-batch figures.
#[derive(Clone, Debug, PartialEq)]
pub struct DemoSummary {
    /// Held-out loss of the weights this run started from (fresh or restored).
    pub first_loss: f64,
    /// Held-out loss after the last step.
    pub final_loss: f64,
    /// Held-out accuracy after the last step, in 0..=1.
    pub final_accuracy: f64,
    /// The checkpoint step this run continued from, if it resumed.
    pub resumed_from_step: Option<u32>,
}

/// A checkpoint as read back from disk: the whole training state after `step`.
#[derive(Clone, Debug, PartialEq)]
pub struct Checkpoint {
    pub step: u32,
    pub seed: u64,
    /// The spatial filter, one weight per electrode in [`CHANNELS`] order.
    pub spatial: [f32; N_CH],
    /// The logistic head: slope on log-power, then bias.
    pub head: [f32; 2],
    /// Adam's first and second moments for `spatial` then `head`.
    pub adam_m: [f32; N_PARAMS],
    pub adam_v: [f32; N_PARAMS],
}

#[derive(Debug, thiserror::Error)]
pub enum DemoError {
    #[error("invalid demo job: {reason}")]
    InvalidJob { reason: String },
    #[error("cannot create checkpoint directory {}: {source}; pick a writable checkpoint directory", dir.display())]
    CheckpointDir { dir: PathBuf, source: io::Error },
    #[error("cannot write checkpoint {}: {source}; check free space and permissions", path.display())]
    WriteCheckpoint { path: PathBuf, source: io::Error },
    #[error("cannot read checkpoint {}: {source}; check the path, or start fresh", path.display())]
    ReadCheckpoint { path: PathBuf, source: io::Error },
    #[error("checkpoint {} is not usable: {reason}; resume from an earlier checkpoint or start fresh", path.display())]
    InvalidCheckpoint { path: PathBuf, reason: String },
    #[error("checkpoint {} was written with seed {checkpoint_seed} but this job has seed {job_seed}; rerun with seed {checkpoint_seed} or start fresh", path.display())]
    SeedMismatch {
        path: PathBuf,
        checkpoint_seed: u64,
        job_seed: u64,
    },
    #[error("training diverged at step {step} (the loss is not finite); this is a bug in the demo")]
    Diverged { step: u32 },
    #[error("cannot write progress to stdout: {0}")]
    Output(#[source] io::Error),
}

/// Train as `job` says, printing progress to stdout. Returns when all steps are done; when the
/// scripted fault fires the process aborts instead and this never returns.
pub fn run(job: &DemoJob) -> Result<DemoSummary, DemoError> {
    run_to(job, &mut io::stdout())
}

/// [`run`] with the progress lines going to `out` (tests read them back).
pub fn run_to(job: &DemoJob, out: &mut dyn Write) -> Result<DemoSummary, DemoError> {
    if job.steps == 0 {
        return Err(DemoError::InvalidJob {
            reason: "steps must be at least 1".into(),
        });
    }
    if job.checkpoint_every == 0 {
        return Err(DemoError::InvalidJob {
            reason: "checkpoint_every must be at least 1".into(),
        });
    }
    fs::create_dir_all(&job.checkpoint_dir).map_err(|source| DemoError::CheckpointDir {
        dir: job.checkpoint_dir.clone(),
        source,
    })?;
    let on_gpu = !job.device.eq_ignore_ascii_case("cpu");

    let (mut model, start_step, resumed_from_step) = match &job.resume {
        Some(path) => {
            let ckpt = read_checkpoint(path)?;
            if ckpt.seed != job.seed {
                return Err(DemoError::SeedMismatch {
                    path: path.clone(),
                    checkpoint_seed: ckpt.seed,
                    job_seed: job.seed,
                });
            }
            say(
                out,
                format_args!(
                    "[demo] resuming from {} at step {}  (device={}, {} steps, seed {})",
                    crate::voice::shown_path(path),
                    ckpt.step,
                    job.device,
                    job.steps,
                    job.seed
                ),
            )?;
            let step = ckpt.step;
            (Model::from(ckpt), step.saturating_add(1), Some(step))
        }
        None => {
            say(
                out,
                format_args!(
                    "[demo] starting fresh at step 1  (device={}, {} steps, seed {})",
                    job.device, job.steps, job.seed
                ),
            )?;
            (Model::init(job.seed), 1, None)
        }
    };

    let eval = Batch::generate(job.seed, Stream::Eval, EVAL_TRIALS);
    let first_loss = model.evaluate(&eval).loss;

    for step in start_step..=job.steps {
        if on_gpu && job.fault_at_step == Some(step) {
            // Whatever the job printed so far must reach the supervisor before we die.
            out.flush().map_err(DemoError::Output)?;
            die_like_hsa_runtime();
        }
        let batch = Batch::generate(job.seed, Stream::Step(step), BATCH);
        let result = model.evaluate(&batch);
        if !result.loss.is_finite() {
            return Err(DemoError::Diverged { step });
        }
        model.adam_step(&result.grad, step);
        say(
            out,
            format_args!(
                "[demo] step {step}/{}  loss {:.4}  acc {:.2}  device={}",
                job.steps, result.loss, result.accuracy, job.device
            ),
        )?;
        if step % job.checkpoint_every == 0 {
            let path = write_checkpoint(&job.checkpoint_dir, &model.checkpoint(step, job.seed))?;
            say(
                out,
                format_args!("[demo] saved {}", crate::voice::shown_path(&path)),
            )?;
        }
        if !job.step_delay.is_zero() {
            std::thread::sleep(job.step_delay);
        }
    }

    let last = model.evaluate(&eval);
    say(
        out,
        format_args!(
            "[demo] done  held-out loss {:.4} -> {:.4}  acc {:.2}",
            first_loss, last.loss, last.accuracy
        ),
    )?;
    Ok(DemoSummary {
        first_loss,
        final_loss: last.loss,
        final_accuracy: last.accuracy,
        resumed_from_step,
    })
}

/// One progress line, flushed at once: the supervisor reads our stdout through a pipe, where
/// it would otherwise sit in a buffer and the dashboard would show nothing until the end.
fn say(out: &mut dyn Write, line: std::fmt::Arguments<'_>) -> Result<(), DemoError> {
    writeln!(out, "{line}")
        .and_then(|()| out.flush())
        .map_err(DemoError::Output)
}

/// The line ROCr prints before aborting on an RDNA page fault, as in the seed report (EEGNeX
/// spatial convolutions over 19 channels on gfx1010/gfx1030).
pub const HSA_FAULT_LINE: &str = "Memory access fault by GPU node-1 (Agent handle: 0x55d3c1e8a2b0) on address 0x7f8a3a000000. Reason: Page not present or supervisor privilege.";

/// Die the way the HSA runtime does: the fault line on stderr, then SIGABRT. Core dumps are
/// switched off first so that each scripted fault does not leave a core file behind.
fn die_like_hsa_runtime() -> ! {
    let mut stderr = io::stderr().lock();
    // If stderr is gone there is nobody to tell; the abort below is the signal that matters.
    let _ = writeln!(stderr, "{HSA_FAULT_LINE}");
    let _ = stderr.flush();
    drop(stderr);
    let _ = nix::sys::resource::setrlimit(nix::sys::resource::Resource::RLIMIT_CORE, 0, 0);
    std::process::abort()
}

// ---------------------------------------------------------------------------------------------
// Deterministic randomness

/// splitmix64: tiny, fast, and good enough to make noise; the point is determinism in `seed`.
struct Rng {
    state: u64,
    spare_normal: Option<f64>,
}

impl Rng {
    fn new(seed: u64) -> Self {
        Rng {
            state: seed,
            spare_normal: None,
        }
    }

    fn next_u64(&mut self) -> u64 {
        self.state = self.state.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.state;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in [0, 1), from 53 random bits.
    fn uniform(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 * (1.0 / (1u64 << 53) as f64)
    }

    /// Zero mean, unit variance, uniform: cheap white noise. [`pink_noise`] sums many of these
    /// through its filters, so the result is close to Gaussian anyway, at a fraction of the cost
    /// of Box-Muller (this keeps a 40-step run far under a second even in a debug build).
    fn white(&mut self) -> f64 {
        (self.uniform() - 0.5) * 12f64.sqrt()
    }

    /// Standard normal by Box-Muller, keeping the second value of each pair.
    fn normal(&mut self) -> f64 {
        if let Some(z) = self.spare_normal.take() {
            return z;
        }
        let u1 = 1.0 - self.uniform(); // in (0, 1], so ln stays finite
        let u2 = self.uniform();
        let r = (-2.0 * u1.ln()).sqrt();
        let theta = std::f64::consts::TAU * u2;
        self.spare_normal = Some(r * theta.sin());
        r * theta.cos()
    }
}

/// Independent random streams of one seed: the initial weights, the held-out set, and one
/// mini-batch per step. Deriving a step's batch from `(seed, step)` alone is what lets a
/// resumed run see exactly the data the interrupted one would have seen.
#[derive(Clone, Copy)]
enum Stream {
    Init,
    Eval,
    Step(u32),
}

fn stream_rng(seed: u64, stream: Stream) -> Rng {
    let tag = match stream {
        Stream::Init => 1u64 << 40,
        Stream::Eval => 2u64 << 40,
        Stream::Step(step) => (3u64 << 40) | u64::from(step),
    };
    // One splitmix round over the mixed input, so that nearby seeds and nearby steps give
    // unrelated streams rather than shifted copies of one another.
    let mut mix = Rng::new(seed ^ tag.wrapping_mul(0xD1B5_4A32_D192_ED03));
    Rng::new(mix.next_u64())
}

// ---------------------------------------------------------------------------------------------
// Synthetic EEG
//
// The hot loops below use plain indexing on purpose: iterator adaptor chains are ~40x slower
// in the unoptimised builds that `cargo test` uses, and the tests run whole trainings.

/// Trials stored channel-major: `x[(trial * N_CH + c) * SAMPLES + t]`.
struct Batch {
    x: Vec<f64>,
    labels: Vec<f64>,
}

impl Batch {
    /// Balanced classes: even trials are rest (0), odd trials carry an alpha burst (1).
    fn generate(seed: u64, stream: Stream, trials: usize) -> Batch {
        let mut rng = stream_rng(seed, stream);
        let mut x = vec![0.0; trials * N_CH * SAMPLES];
        let mut labels = Vec::with_capacity(trials);
        let mut common = [0.0; SAMPLES];
        let own = (1.0 - COMMON_MODE * COMMON_MODE).sqrt();
        for (i, trial) in x.chunks_exact_mut(N_CH * SAMPLES).enumerate() {
            let alpha = i % 2 == 1;
            labels.push(if alpha { 1.0 } else { 0.0 });
            pink_noise(&mut rng, &mut common);
            for channel in trial.chunks_exact_mut(SAMPLES) {
                pink_noise(&mut rng, channel);
                for (v, c) in channel.iter_mut().zip(common) {
                    *v = *v * own + c * COMMON_MODE;
                }
            }
            if alpha {
                add_alpha_burst(&mut rng, trial);
            }
        }
        Batch { x, labels }
    }

    fn trials(&self) -> impl Iterator<Item = (&[f64], f64)> {
        self.x
            .chunks_exact(N_CH * SAMPLES)
            .zip(self.labels.iter().copied())
    }
}

/// Roughly 1/f noise with unit variance: white noise through three one-pole low-passes with
/// corners spread over the EEG band, plus a little of the white noise itself. The filter
/// states start from their stationary spread so the first samples need no warm-up.
fn pink_noise(rng: &mut Rng, out: &mut [f64]) {
    const POLES: [f64; 3] = [0.99, 0.9, 0.5];
    const GAINS: [f64; 3] = [0.1, 0.3, 0.8];
    const WHITE: f64 = 0.5;
    let mut variance = WHITE * WHITE;
    let mut state = [0.0; 3];
    for k in 0..3 {
        let stationary = GAINS[k] * GAINS[k] / (1.0 - POLES[k] * POLES[k]);
        variance += stationary;
        state[k] = rng.white() * stationary.sqrt();
    }
    let scale = 1.0 / variance.sqrt();
    for v in out.iter_mut() {
        let white = rng.white();
        state[0] = POLES[0] * state[0] + GAINS[0] * white;
        state[1] = POLES[1] * state[1] + GAINS[1] * white;
        state[2] = POLES[2] * state[2] + GAINS[2] * white;
        *v = (state[0] + state[1] + state[2] + WHITE * white) * scale;
    }
}

/// A 10 Hz burst under a Hann window of 0.4 to 0.8 s at a random place, phase and strength,
/// over the occipital electrodes.
fn add_alpha_burst(rng: &mut Rng, trial: &mut [f64]) {
    let len = 51 + (rng.uniform() * 52.0) as usize; // 51..=102 samples
    let start = (rng.uniform() * (SAMPLES - len + 1) as f64) as usize;
    let phase = rng.uniform() * std::f64::consts::TAU;
    let amplitude = ALPHA_AMPLITUDE * (0.6 + 0.8 * rng.uniform());
    let omega = std::f64::consts::TAU * ALPHA_HZ / SAMPLE_RATE_HZ;
    for k in 0..len {
        let t = start + k;
        let hann = 0.5 - 0.5 * (std::f64::consts::TAU * k as f64 / (len - 1) as f64).cos();
        let value = amplitude * hann * (omega * t as f64 + phase).sin();
        for (channel, gain) in ALPHA_CHANNELS {
            trial[channel * SAMPLES + t] += gain * value;
        }
    }
}

// ---------------------------------------------------------------------------------------------
// The model: s(t) = sum_c w_c x_c(t); p = mean_t s(t)^2; z = a ln(p + eps) + b;
// loss = binary cross-entropy of sigmoid(z). Gradients by hand, Adam on mini-batches.

/// Weights and optimiser state, all `f32` as in the checkpoint, so saving loses nothing.
struct Model {
    spatial: [f32; N_CH],
    /// `[a, b]`.
    head: [f32; 2],
    adam_m: [f32; N_PARAMS],
    adam_v: [f32; N_PARAMS],
}

struct Evaluation {
    loss: f64,
    accuracy: f64,
    /// d loss / d (spatial, a, b), averaged over the batch.
    grad: [f64; N_PARAMS],
}

impl Model {
    /// A small random filter (so no electrode is favoured) and a head that says 50/50.
    fn init(seed: u64) -> Model {
        let mut rng = stream_rng(seed, Stream::Init);
        let mut spatial = [0.0f32; N_CH];
        for w in &mut spatial {
            *w = (rng.normal() * 0.3) as f32;
        }
        Model {
            spatial,
            head: [INITIAL_SLOPE, 0.0],
            adam_m: [0.0; N_PARAMS],
            adam_v: [0.0; N_PARAMS],
        }
    }

    fn checkpoint(&self, step: u32, seed: u64) -> Checkpoint {
        Checkpoint {
            step,
            seed,
            spatial: self.spatial,
            head: self.head,
            adam_m: self.adam_m,
            adam_v: self.adam_v,
        }
    }

    /// Mean loss, accuracy and the mean gradient over `batch`.
    fn evaluate(&self, batch: &Batch) -> Evaluation {
        let w = self.spatial.map(f64::from);
        let (a, b) = (f64::from(self.head[0]), f64::from(self.head[1]));
        let mut grad = [0.0; N_PARAMS];
        let (mut loss, mut correct) = (0.0, 0usize);
        let mut s = [0.0; SAMPLES];
        for (x, y) in batch.trials() {
            s.fill(0.0);
            for (c, xc) in x.chunks_exact(SAMPLES).enumerate() {
                for t in 0..SAMPLES {
                    s[t] += w[c] * xc[t];
                }
            }
            let mut p = 0.0;
            for v in s {
                p += v * v;
            }
            p /= SAMPLES as f64;
            let log_p = (p + EPS).ln();
            let z = a * log_p + b;
            // Cross-entropy from the logit, in the form that cannot overflow:
            // softplus(z) - y z.
            loss += z.max(0.0) - y * z + (-z.abs()).exp().ln_1p();
            let prob = 1.0 / (1.0 + (-z).exp());
            if (prob >= 0.5) == (y == 1.0) {
                correct += 1;
            }
            let dz = prob - y;
            grad[N_CH] += dz * log_p;
            grad[N_CH + 1] += dz;
            // dz/dw_c = a / (p + eps) * dp/dw_c, and dp/dw_c = 2/T sum_t s(t) x_c(t).
            let dw = dz * a / (p + EPS) * 2.0 / SAMPLES as f64;
            for (c, xc) in x.chunks_exact(SAMPLES).enumerate() {
                let mut dot = 0.0;
                for t in 0..SAMPLES {
                    dot += s[t] * xc[t];
                }
                grad[c] += dw * dot;
            }
        }
        let n = batch.labels.len() as f64;
        Evaluation {
            loss: loss / n,
            accuracy: correct as f64 / n,
            grad: grad.map(|g| g / n),
        }
    }

    /// One Adam update after the gradient of 1-based `step`. Adam rather than plain SGD because
    /// the gradients differ in scale by orders of magnitude (the filter's is proportional to the
    /// head's slope, which starts small); Adam moves every weight by about the learning rate.
    fn adam_step(&mut self, grad: &[f64; N_PARAMS], step: u32) {
        const B1: f64 = 0.9;
        const B2: f64 = 0.999;
        let t = i32::try_from(step).unwrap_or(i32::MAX);
        let (c1, c2) = (1.0 - B1.powi(t), 1.0 - B2.powi(t));
        let weights = self.spatial.iter_mut().chain(self.head.iter_mut());
        let moments = self.adam_m.iter_mut().zip(self.adam_v.iter_mut());
        for ((w, g), (m, v)) in weights.zip(grad).zip(moments) {
            // Round the moments to f32 before using them, exactly as a resumed run reads them.
            *m = (B1 * f64::from(*m) + (1.0 - B1) * g) as f32;
            *v = (B2 * f64::from(*v) + (1.0 - B2) * g * g) as f32;
            let m_hat = f64::from(*m) / c1;
            let v_hat = f64::from(*v) / c2;
            *w = (f64::from(*w) - LEARNING_RATE * m_hat / (v_hat.sqrt() + 1e-8)) as f32;
        }
    }
}

impl From<Checkpoint> for Model {
    fn from(ckpt: Checkpoint) -> Model {
        Model {
            spatial: ckpt.spatial,
            head: ckpt.head,
            adam_m: ckpt.adam_m,
            adam_v: ckpt.adam_v,
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Checkpoints: real safetensors, written atomically.

/// `ckpt-step00015.safetensors`: zero-padded so that names sort by step.
pub fn checkpoint_file_name(step: u32) -> String {
    format!("ckpt-step{step:05}.safetensors")
}

/// The tensors of a checkpoint, in file order.
const TENSOR_NAMES: [&str; 4] = ["spatial", "head", "adam_m", "adam_v"];

impl Checkpoint {
    /// The tensors' values, in the order of [`TENSOR_NAMES`].
    fn tensors(&self) -> [&[f32]; 4] {
        [&self.spatial, &self.head, &self.adam_m, &self.adam_v]
    }

    fn tensors_mut(&mut self) -> [&mut [f32]; 4] {
        [
            &mut self.spatial,
            &mut self.head,
            &mut self.adam_m,
            &mut self.adam_v,
        ]
    }

    /// The safetensors bytes: 8-byte little-endian header length, the JSON header (padded with
    /// spaces to a multiple of 8, as the reference writer does), then the raw little-endian data.
    pub fn to_safetensors(&self) -> Vec<u8> {
        let mut header = serde_json::Map::new();
        header.insert(
            "__metadata__".into(),
            serde_json::json!({ "step": self.step.to_string(), "seed": self.seed.to_string() }),
        );
        let mut data = Vec::new();
        for (name, values) in TENSOR_NAMES.into_iter().zip(self.tensors()) {
            let start = data.len();
            for v in values {
                data.extend_from_slice(&v.to_le_bytes());
            }
            header.insert(
                name.into(),
                serde_json::json!({
                    "dtype": "F32",
                    "shape": [values.len()],
                    "data_offsets": [start, data.len()],
                }),
            );
        }
        let mut header = serde_json::Value::Object(header).to_string();
        let padded = header.len().next_multiple_of(8);
        header.extend(std::iter::repeat_n(' ', padded - header.len()));
        let mut bytes = Vec::with_capacity(8 + header.len() + data.len());
        bytes.extend_from_slice(&(header.len() as u64).to_le_bytes());
        bytes.extend_from_slice(header.as_bytes());
        bytes.extend_from_slice(&data);
        bytes
    }

    /// Parse and fully validate safetensors bytes written by [`Checkpoint::to_safetensors`].
    /// The error says what is wrong, for [`DemoError::InvalidCheckpoint`].
    pub fn from_safetensors(bytes: &[u8]) -> Result<Checkpoint, String> {
        let Some((len_bytes, rest)) = bytes.split_first_chunk::<8>() else {
            return Err(format!(
                "it is {} bytes, too short for the 8-byte safetensors header length (torn write?)",
                bytes.len()
            ));
        };
        let header_len = u64::from_le_bytes(*len_bytes);
        if header_len > rest.len() as u64 {
            return Err(format!(
                "its header claims {header_len} bytes but only {} follow (torn write?)",
                rest.len()
            ));
        }
        let (header, data) = rest.split_at(header_len as usize);
        let header: serde_json::Value = serde_json::from_slice(header)
            .map_err(|e| format!("its safetensors header is not valid JSON ({e})"))?;
        let header = header
            .as_object()
            .ok_or("its safetensors header is not a JSON object")?;

        let meta = header
            .get("__metadata__")
            .and_then(|m| m.as_object())
            .ok_or("its header has no __metadata__; it was not written by the gpuwarden demo")?;
        let meta_number = |key: &str| -> Result<u64, String> {
            meta.get(key)
                .and_then(|v| v.as_str())
                .and_then(|v| v.parse::<u64>().ok())
                .ok_or(format!("__metadata__.{key} is missing or not a number"))
        };
        let step = u32::try_from(meta_number("step")?)
            .map_err(|_| "__metadata__.step does not fit in 32 bits".to_string())?;
        let seed = meta_number("seed")?;

        let mut ckpt = Checkpoint {
            step,
            seed,
            spatial: [0.0; N_CH],
            head: [0.0; 2],
            adam_m: [0.0; N_PARAMS],
            adam_v: [0.0; N_PARAMS],
        };
        if let Some(other) = header
            .keys()
            .find(|k| *k != "__metadata__" && !TENSOR_NAMES.contains(&k.as_str()))
        {
            return Err(format!(
                "it holds an unexpected tensor {other:?}; it was not written by the gpuwarden demo"
            ));
        }
        let mut data_end = 0;
        for (name, slot) in TENSOR_NAMES.into_iter().zip(ckpt.tensors_mut()) {
            data_end = data_end.max(read_f32_tensor(header, data, name, slot)?);
        }
        if data.len() != data_end {
            return Err(format!(
                "{} data bytes follow the header but its tensors end at byte {data_end}",
                data.len()
            ));
        }
        let finite = |values: &[f32]| values.iter().all(|v| v.is_finite());
        if !ckpt.tensors().into_iter().all(finite) {
            return Err("it holds non-finite numbers".into());
        }
        Ok(ckpt)
    }
}

/// Fill `slot` from the F32 tensor `name` of shape `[slot.len()]`; returns where its data ends.
fn read_f32_tensor(
    header: &serde_json::Map<String, serde_json::Value>,
    data: &[u8],
    name: &str,
    slot: &mut [f32],
) -> Result<usize, String> {
    let n = slot.len();
    let entry = header
        .get(name)
        .ok_or(format!("tensor {name:?} is missing"))?;
    if entry.get("dtype").and_then(|d| d.as_str()) != Some("F32") {
        return Err(format!("tensor {name:?} is not F32"));
    }
    let shape: Option<Vec<u64>> = entry
        .get("shape")
        .and_then(|s| s.as_array())
        .map(|dims| dims.iter().filter_map(|d| d.as_u64()).collect());
    if shape != Some(vec![n as u64]) {
        return Err(format!("tensor {name:?} does not have shape [{n}]"));
    }
    let offsets: Vec<usize> = entry
        .get("data_offsets")
        .and_then(|o| o.as_array())
        .map(|o| {
            o.iter()
                .filter_map(|v| v.as_u64().and_then(|v| usize::try_from(v).ok()))
                .collect()
        })
        .unwrap_or_default();
    let &[start, end] = offsets.as_slice() else {
        return Err(format!("tensor {name:?} has no valid data_offsets"));
    };
    if end.checked_sub(start) != Some(n * 4) {
        return Err(format!(
            "tensor {name:?} has data_offsets [{start}, {end}], not {} bytes long",
            n * 4
        ));
    }
    let raw = data.get(start..end).ok_or(format!(
        "tensor {name:?} ends at data byte {end} but only {} data bytes follow the header (torn write?)",
        data.len()
    ))?;
    for (v, chunk) in slot.iter_mut().zip(raw.chunks_exact(4)) {
        *v = f32::from_le_bytes([chunk[0], chunk[1], chunk[2], chunk[3]]);
    }
    Ok(end)
}

/// Write `<name>.tmp`, fsync it, rename it over `<name>`, fsync the directory: a crash at any
/// moment leaves either no new file or a complete one, never a torn checkpoint under the
/// final name (the failure the design's "a checkpoint is only as good as its last byte" is about).
fn write_checkpoint(dir: &Path, ckpt: &Checkpoint) -> Result<PathBuf, DemoError> {
    let name = checkpoint_file_name(ckpt.step);
    let path = dir.join(&name);
    let tmp = dir.join(format!("{name}.tmp"));
    let bytes = ckpt.to_safetensors();
    let written = (|| {
        let mut file = File::create(&tmp)?;
        file.write_all(&bytes)?;
        file.sync_all()?;
        drop(file);
        fs::rename(&tmp, &path)?;
        File::open(dir)?.sync_all()
    })();
    if let Err(source) = written {
        // Best effort: a stale .tmp harms nobody but clutters the user's directory.
        let _ = fs::remove_file(&tmp);
        return Err(DemoError::WriteCheckpoint { path, source });
    }
    Ok(path)
}

/// Read and fully validate a checkpoint written by this job.
pub fn read_checkpoint(path: &Path) -> Result<Checkpoint, DemoError> {
    let read_error = |source| DemoError::ReadCheckpoint {
        path: path.to_path_buf(),
        source,
    };
    let invalid = |reason: String| DemoError::InvalidCheckpoint {
        path: path.to_path_buf(),
        reason,
    };
    let len = fs::metadata(path).map_err(read_error)?.len();
    if len > MAX_CHECKPOINT_BYTES {
        return Err(invalid(format!(
            "it is {len} bytes, far larger than a demo checkpoint; is it from another job?"
        )));
    }
    let bytes = fs::read(path).map_err(read_error)?;
    Checkpoint::from_safetensors(&bytes).map_err(invalid)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn job(dir: &Path, device: &str) -> DemoJob {
        DemoJob {
            device: device.into(),
            resume: None,
            checkpoint_dir: dir.to_path_buf(),
            steps: 40,
            checkpoint_every: 5,
            fault_at_step: None,
            step_delay: Duration::ZERO,
            seed: 7,
        }
    }

    /// Run in-process, returning the summary and the progress lines.
    fn run_capturing(job: &DemoJob) -> (Result<DemoSummary, DemoError>, Vec<String>) {
        let mut out = Vec::new();
        let result = run_to(job, &mut out);
        let text = String::from_utf8(out).unwrap();
        (result, text.lines().map(str::to_owned).collect())
    }

    /// The step numbers of the `[demo] step N/M ...` lines, in order.
    fn steps_printed(lines: &[String]) -> Vec<u32> {
        lines
            .iter()
            .filter_map(|l| l.strip_prefix("[demo] step "))
            .map(|rest| rest.split('/').next().unwrap().parse().unwrap())
            .collect()
    }

    /// The batch loss printed on the line for `step`.
    fn printed_loss(lines: &[String], step: u32) -> f64 {
        let prefix = format!("[demo] step {step}/");
        let line = lines.iter().find(|l| l.starts_with(&prefix)).unwrap();
        let loss = line.split("loss ").nth(1).unwrap();
        loss.split_whitespace().next().unwrap().parse().unwrap()
    }

    fn files_in(dir: &Path) -> Vec<String> {
        let mut names: Vec<String> = fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        names.sort();
        names
    }

    #[test]
    fn forty_steps_learn_the_alpha_burst() {
        for seed in [1, 7, 42] {
            let dir = tempfile::tempdir().unwrap();
            let job = DemoJob {
                seed,
                ..job(dir.path(), "cuda")
            };
            // How long it takes is the demo's pace, not a property to test on a loaded machine
            // (a timed assertion failed with five compilers beside it).
            let (summary, lines) = run_capturing(&job);
            let summary = summary.unwrap();
            assert!(
                (summary.first_loss - 2f64.ln()).abs() < 0.1,
                "seed {seed}: an untrained model should be near chance: {summary:?}"
            );
            assert!(summary.final_loss < 0.35, "seed {seed}: {summary:?}");
            assert!(summary.final_accuracy > 0.85, "seed {seed}: {summary:?}");
            assert_eq!(summary.resumed_from_step, None);
            assert_eq!(steps_printed(&lines), (1..=40).collect::<Vec<_>>());
            assert!(printed_loss(&lines, 40) < printed_loss(&lines, 1) - 0.3);
        }
    }

    #[test]
    fn progress_lines_have_the_documented_shape() {
        let dir = tempfile::tempdir().unwrap();
        let (summary, lines) = run_capturing(&DemoJob {
            steps: 3,
            ..job(dir.path(), "cuda:0")
        });
        summary.unwrap();
        assert_eq!(
            lines[0],
            "[demo] starting fresh at step 1  (device=cuda:0, 3 steps, seed 7)"
        );
        let step = &lines[1];
        assert!(step.starts_with("[demo] step 1/3  loss 0."), "{step}");
        assert!(step.ends_with("  device=cuda:0"), "{step}");
        assert!(step.contains("  acc 0."), "{step}");
        assert!(lines.last().unwrap().starts_with("[demo] done"));
    }

    #[test]
    fn checkpoints_are_atomic_valid_safetensors_at_every_nth_step() {
        let dir = tempfile::tempdir().unwrap();
        let (summary, lines) = run_capturing(&DemoJob {
            steps: 23,
            ..job(&dir.path().join("created/on/demand"), "cpu")
        });
        summary.unwrap();
        let ckpt_dir = dir.path().join("created/on/demand");
        let expected: Vec<String> = [5, 10, 15, 20]
            .iter()
            .map(|s| format!("ckpt-step{s:05}.safetensors"))
            .collect();
        // No .tmp left behind, and no checkpoint for the unfinished interval after step 20.
        assert_eq!(files_in(&ckpt_dir), expected);

        for (name, step) in expected.iter().zip([5u32, 10, 15, 20]) {
            let path = ckpt_dir.join(name);
            assert!(lines.contains(&format!("[demo] saved {}", path.display())));
            // Check the layout by hand, independently of `from_safetensors`.
            let bytes = fs::read(&path).unwrap();
            let header_len = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
            let header: serde_json::Value =
                serde_json::from_slice(&bytes[8..8 + header_len]).unwrap();
            assert_eq!(header["__metadata__"]["step"], step.to_string());
            assert_eq!(header["__metadata__"]["seed"], "7");
            assert_eq!(header["spatial"]["dtype"], "F32");
            assert_eq!(header["spatial"]["shape"], serde_json::json!([19]));
            assert_eq!(header["head"]["shape"], serde_json::json!([2]));
            let max_offset = header
                .as_object()
                .unwrap()
                .values()
                .filter_map(|t| t.get("data_offsets"))
                .map(|o| o[1].as_u64().unwrap() as usize)
                .max()
                .unwrap();
            assert_eq!(bytes.len(), 8 + header_len + max_offset);
            assert_eq!(header_len % 8, 0, "data should start 8-byte aligned");
            // The spatial tensor's bytes are the little-endian weights.
            let start = header["spatial"]["data_offsets"][0].as_u64().unwrap() as usize;
            let first = &bytes[8 + header_len + start..][..4];
            let ckpt = read_checkpoint(&path).unwrap();
            assert_eq!(
                f32::from_le_bytes(first.try_into().unwrap()),
                ckpt.spatial[0]
            );
            assert_eq!(ckpt.step, step);
        }
    }

    #[test]
    fn resume_from_step_15_continues_at_16_and_ends_where_an_uninterrupted_run_does() {
        let first = tempfile::tempdir().unwrap();
        let (whole, _) = run_capturing(&job(first.path(), "cpu"));
        let whole = whole.unwrap();

        let second = tempfile::tempdir().unwrap();
        let ckpt = first.path().join("ckpt-step00015.safetensors");
        let (resumed, lines) = run_capturing(&DemoJob {
            resume: Some(ckpt.clone()),
            ..job(second.path(), "cpu")
        });
        let resumed = resumed.unwrap();

        assert!(
            lines[0].starts_with(&format!(
                "[demo] resuming from {} at step 15",
                ckpt.display()
            )),
            "{}",
            lines[0]
        );
        assert_eq!(steps_printed(&lines), (16..=40).collect::<Vec<_>>());
        assert_eq!(resumed.resumed_from_step, Some(15));
        // The restored weights are already better than chance...
        assert!(resumed.first_loss < whole.first_loss - 0.05, "{resumed:?}");
        // ...and with the optimiser state restored too, the result is the same run's result.
        assert_eq!(resumed.final_loss, whole.final_loss);
        assert_eq!(resumed.final_accuracy, whole.final_accuracy);
        assert_eq!(
            files_in(second.path()),
            ["00020", "00025", "00030", "00035", "00040"]
                .map(|s| format!("ckpt-step{s}.safetensors"))
        );
        assert_eq!(
            fs::read(second.path().join("ckpt-step00040.safetensors")).unwrap(),
            fs::read(first.path().join("ckpt-step00040.safetensors")).unwrap()
        );
    }

    #[test]
    fn torn_or_foreign_checkpoints_are_refused_with_the_file_and_the_reason() {
        let dir = tempfile::tempdir().unwrap();
        let (summary, _) = run_capturing(&DemoJob {
            steps: 5,
            ..job(dir.path(), "cpu")
        });
        summary.unwrap();
        let good = fs::read(dir.path().join("ckpt-step00005.safetensors")).unwrap();
        let header_len = u64::from_le_bytes(good[..8].try_into().unwrap()) as usize;

        let mut trailing = good.clone();
        trailing.extend_from_slice(&[0; 4]);
        let mut not_json = good.clone();
        not_json[8] = b'#';
        let mut nan = good.clone();
        let end = nan.len();
        nan[end - 4..].copy_from_slice(&f32::NAN.to_le_bytes());
        let cases: Vec<(&str, Vec<u8>, &str)> = vec![
            ("empty", Vec::new(), "too short"),
            ("half the length", good[..4].to_vec(), "too short"),
            (
                "header cut",
                good[..8 + header_len - 3].to_vec(),
                "torn write",
            ),
            ("data cut", good[..good.len() - 1].to_vec(), "torn write"),
            ("trailing bytes", trailing, "tensors end at byte"),
            ("not json", not_json, "not valid JSON"),
            ("nan weight", nan, "non-finite"),
        ];
        for (what, bytes, reason) in cases {
            let path = dir.path().join(format!("{what}.safetensors"));
            fs::write(&path, &bytes).unwrap();
            let (result, lines) = run_capturing(&DemoJob {
                resume: Some(path.clone()),
                ..job(dir.path(), "cpu")
            });
            let err = result.unwrap_err();
            assert!(
                matches!(&err, DemoError::InvalidCheckpoint { path: p, .. } if *p == path),
                "{what}: {err:?}"
            );
            let message = err.to_string();
            assert!(
                message.contains(&path.display().to_string()),
                "{what}: {message}"
            );
            assert!(message.contains(reason), "{what}: {message}");
            assert!(
                message.contains("resume from an earlier checkpoint"),
                "{message}"
            );
            assert!(steps_printed(&lines).is_empty(), "{what}: trained anyway");
        }

        let missing = dir.path().join("nope.safetensors");
        let (result, _) = run_capturing(&DemoJob {
            resume: Some(missing.clone()),
            ..job(dir.path(), "cpu")
        });
        assert!(matches!(result, Err(DemoError::ReadCheckpoint { path, .. }) if path == missing));

        let (result, _) = run_capturing(&DemoJob {
            resume: Some(dir.path().join("ckpt-step00005.safetensors")),
            seed: 8,
            ..job(dir.path(), "cpu")
        });
        let err = result.unwrap_err();
        assert!(matches!(
            err,
            DemoError::SeedMismatch {
                checkpoint_seed: 7,
                job_seed: 8,
                ..
            }
        ));
        assert!(err.to_string().contains("rerun with seed 7"), "{err}");
    }

    #[test]
    fn nonsense_jobs_are_refused_before_training() {
        let dir = tempfile::tempdir().unwrap();
        for bad in [
            DemoJob {
                steps: 0,
                ..job(dir.path(), "cpu")
            },
            DemoJob {
                checkpoint_every: 0,
                ..job(dir.path(), "cpu")
            },
        ] {
            let (result, lines) = run_capturing(&bad);
            assert!(
                matches!(result, Err(DemoError::InvalidJob { .. })),
                "{result:?}"
            );
            assert!(lines.is_empty());
        }
    }

    #[test]
    fn the_fault_never_fires_on_the_cpu_or_on_a_step_already_behind_us() {
        let dir = tempfile::tempdir().unwrap();
        let (summary, lines) = run_capturing(&DemoJob {
            fault_at_step: Some(17),
            ..job(dir.path(), "CPU")
        });
        summary.unwrap();
        assert_eq!(steps_printed(&lines).len(), 40);

        let (summary, lines) = run_capturing(&DemoJob {
            fault_at_step: Some(12),
            resume: Some(dir.path().join("ckpt-step00015.safetensors")),
            ..job(dir.path(), "cuda")
        });
        summary.unwrap();
        assert_eq!(steps_printed(&lines), (16..=40).collect::<Vec<_>>());
    }

    /// Where the fault test's child process puts its checkpoints; set only in that child.
    const FAULT_CHILD_DIR: &str = "GPUWARDEN_DEMO_FAULT_CHILD_DIR";

    /// The child side of the fault test below: the test binary re-runs itself with only this
    /// test selected, and the demo aborts the process from inside it.
    #[test]
    #[ignore = "entry point of a child process started by the fault test"]
    fn fault_child() {
        let Some(dir) = std::env::var_os(FAULT_CHILD_DIR) else {
            return;
        };
        let result = run(&DemoJob {
            fault_at_step: Some(17),
            ..job(Path::new(&dir), "cuda")
        });
        panic!("the scripted fault did not fire: {result:?}");
    }

    #[test]
    fn on_a_gpu_the_fault_prints_the_hsa_line_and_dies_by_sigabrt() {
        use std::os::unix::process::ExitStatusExt;

        let dir = tempfile::tempdir().unwrap();
        // module_path!() is "<crate>::demo::tests"; the test harness wants the path without
        // the crate name.
        let module = module_path!().split_once("::").unwrap().1;
        let output = std::process::Command::new(std::env::current_exe().unwrap())
            .args(["--exact", &format!("{module}::fault_child")])
            .args(["--ignored", "--nocapture", "--test-threads=1"])
            .env(FAULT_CHILD_DIR, dir.path())
            .output()
            .unwrap();
        let stdout = String::from_utf8_lossy(&output.stdout);
        let stderr = String::from_utf8_lossy(&output.stderr);

        assert_eq!(
            output.status.signal(),
            Some(nix::sys::signal::Signal::SIGABRT as i32),
            "status {:?}\nstdout:\n{stdout}\nstderr:\n{stderr}",
            output.status
        );
        assert!(
            stderr.lines().any(|l| l == HSA_FAULT_LINE),
            "stderr:\n{stderr}"
        );
        let lines: Vec<String> = stdout.lines().map(str::to_owned).collect();
        assert_eq!(
            steps_printed(&lines),
            (1..=16).collect::<Vec<_>>(),
            "{stdout}"
        );
        assert_eq!(
            files_in(dir.path()),
            ["00005", "00010", "00015"].map(|s| format!("ckpt-step{s}.safetensors"))
        );
    }
}

//! `gpuwarden demo`, which supervises the built-in demo job, and `__demo-job`, that job itself.

use std::ffi::OsString;
use std::io::Write;
use std::time::{Duration, SystemTime};

use gpuwarden::config;
use gpuwarden::exit;

use super::run::supervise;
use super::{current_dir, error};
use crate::cli::{DemoArgs, DemoJobArgs};

pub fn demo(args: DemoArgs) -> i32 {
    let exe = match std::env::current_exe() {
        Ok(exe) => exe,
        Err(e) => {
            error(format_args!("cannot find the gpuwarden executable: {e}"));
            return exit::INTERNAL;
        }
    };
    let explicit_run_dir = args.run_dir.is_some();
    let mut command: Vec<OsString> = vec![exe.into()];
    command.extend(
        [
            "__demo-job",
            "--device",
            "{device}",
            "--resume",
            "{checkpoint}",
            "--checkpoint-dir",
            config::DEMO_CHECKPOINTS,
        ]
        .map(OsString::from),
    );
    for (flag, value) in [
        ("--steps", args.steps.to_string()),
        ("--fault-at-step", args.fault_at_step.to_string()),
        ("--step-ms", args.step_ms.to_string()),
    ] {
        command.push(flag.into());
        command.push(value.into());
    }
    let Some(cwd) = current_dir() else {
        return exit::USAGE;
    };
    let stamp = gpuwarden::time::compact(SystemTime::now());
    let plan = config::demo_plan(command, args.run_dir, &cwd, &stamp);
    let _ = writeln!(
        std::io::stderr(),
        "gpuwarden demo: a small EEG model trains on the `gpu` tier, hits the HSA memory access \
         fault of ROCm on RDNA GPUs at step {}, and gpuwarden resumes it on the `cpu` tier from \
         its last checkpoint.\n",
        args.fault_at_step
    );
    // The demo's fault is simulated: the probe has no say in it.
    let (watch, _gpu) = super::watch::demo_watch(args.ui, args.sysfs_root);
    supervise(&plan, explicit_run_dir, None, watch, args.ui)
}

/// `__demo-job`: the demo's training job, run by `demo` as the supervised command.
pub fn demo_job(args: DemoJobArgs) -> i32 {
    let job = gpuwarden::demo::DemoJob {
        device: args.device,
        resume: args.resume,
        checkpoint_dir: args.checkpoint_dir,
        steps: args.steps,
        checkpoint_every: args.checkpoint_every,
        fault_at_step: args.fault_at_step,
        step_delay: Duration::from_millis(args.step_ms),
        seed: args.seed,
    };
    match gpuwarden::demo::run(&job) {
        // The job prints its own progress and final line.
        Ok(_) => exit::SUCCESS,
        Err(e) => {
            eprintln!("[demo] error: {e}");
            1
        }
    }
}

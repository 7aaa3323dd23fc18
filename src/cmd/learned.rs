//! `gpuwarden run`'s use of learned tiers (`gpuwarden::learned`): before the run, start past the
//! tiers that faulted for this job on this machine (or forget them, `--forget`); after it, note
//! what the run's journal teaches.

use std::path::Path;

use gpuwarden::config::Plan;
use gpuwarden::gpu::Gpu;
use gpuwarden::learned::{self, Fingerprint, Memory};
use gpuwarden::probe::{self, Software};
use gpuwarden::snapshot::Board;

/// The job's memory, held from the start of the run to its end.
pub struct Learning {
    memory: Memory,
    job: Fingerprint,
}

/// Reads the memory and moves the start of `plan.ladder` past the tiers that faulted (unless
/// the run is `resumed`: it goes on where it stopped). `None` where there is no state directory
/// or its file cannot be read (said).
pub fn before(
    plan: &mut Plan,
    gpus: &[Gpu],
    root: &Path,
    forget: bool,
    resumed: bool,
) -> Option<Learning> {
    let dir = learned::state_dir()?;
    let software = Software::detect(root, &probe::read_env(|n| std::env::var_os(n)));
    let job = Fingerprint::new(&plan.command, gpus, &software);
    let mut memory = match Memory::load(&dir) {
        Ok(m) => m,
        Err(e) => {
            super::error(format_args!(
                "cannot read the learned tiers in {}: {e}; this run starts without them (move the file away to start afresh)",
                dir.join("tiers.json").display()
            ));
            return None;
        }
    };
    if forget {
        if memory.forget(&job)
            && let Err(e) = memory.save()
        {
            super::error(format_args!(
                "cannot write {}: {e}",
                memory.path().display()
            ));
        }
        gpuwarden::voice::say("--forget: what earlier runs taught about this job is forgotten");
    } else if !resumed {
        let names: Vec<String> = plan.ladder.iter().map(|t| t.name.clone()).collect();
        if let Some((start, why)) = memory
            .tiers(&job)
            .and_then(|known| learned::start(&names, known))
        {
            plan.ladder.drain(..start);
            plan.warnings.push(why);
        }
    }
    Some(Learning { memory, job })
}

/// Notes what the run's journal teaches about its tiers.
pub fn after(mut learning: Learning, board: &Board) {
    let Some(run_dir) = board.read().job.map(|j| j.run_dir) else {
        return;
    };
    let Ok(lessons) = learned::lessons(&run_dir.join("journal.jsonl"), &run_dir) else {
        return;
    };
    if lessons.is_empty() {
        return;
    }
    learning.memory.learn(&learning.job, lessons);
    if let Err(e) = learning.memory.save() {
        super::error(format_args!(
            "cannot write the learned tiers to {}: {e}",
            learning.memory.path().display()
        ));
    }
}

//! The `gpuwarden` binary: parse the command line and hand each subcommand to its module in
//! `cmd`, which calls the library and answers the exit code.

mod cli;
mod cmd;

use gpuwarden::exit;

use cli::{CheckpointCommand, Command};

fn main() {
    let cli = cli::parse();
    // Before any thread exists (sources, the signal thread, the display): every thread must inherit
    // the blocked mask, or a SIGTERM could land on one of them and kill gpuwarden outright
    // instead of being forwarded to the job.
    if matches!(
        cli.command,
        Command::Run(_) | Command::Demo(_) | Command::Resume(_)
    ) && let Err(e) = gpuwarden::process::block_signals()
    {
        cmd::error(format_args!("cannot block signals for forwarding: {e}"));
        std::process::exit(exit::INTERNAL);
    }
    let code = match cli.command {
        Command::Run(args) => cmd::run::run(args),
        Command::Demo(args) => cmd::demo::demo(args),
        Command::Scan(args) => cmd::scan::scan(args),
        Command::Rules(command) => cmd::rules::rules(command),
        Command::Checkpoint(CheckpointCommand::Verify { file, json }) => {
            cmd::checkpoint::verify(&file, json)
        }
        Command::Probe(args) => cmd::probe::probe(args),
        Command::Resume(args) => cmd::resume::resume(&args.run_dir),
        Command::Drill(args) => cmd::drill::drill(&args.run_dir, args.kind),
        Command::Report(args) => cmd::report::report(&args.run_dir, args.json),
        Command::Watch(args) => cmd::watch::watch(args),
        Command::Guard => gpuwarden::process::guard_main(gpuwarden::executor::GUARD_GRACE),
        Command::DemoJob(args) => cmd::demo::demo_job(args),
    };
    std::process::exit(code);
}

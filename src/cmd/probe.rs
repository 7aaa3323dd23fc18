//! `gpuwarden probe`: this machine's GPUs, GPU software and the known problems that apply, as a
//! report or JSON, with what libtorch sees when built with the `torch` feature.

use std::io::Write;

use gpuwarden::exit;
use gpuwarden::probe::{self, Probe};
use gpuwarden::quirks::QuirkSet;

use super::error;
use crate::cli::ProbeArgs;

/// The report, or its JSON. A machine without a GPU is not an error.
pub fn probe(args: ProbeArgs) -> i32 {
    let quirks = match QuirkSet::load(&args.machine.quirks) {
        Ok(q) => q,
        Err(e) => {
            error(e);
            return exit::USAGE;
        }
    };
    let (gpus, notes) = probe::inventory(&args.machine.sysfs_root, &args.machine.root);
    let job = (!args.command.is_empty()).then(|| probe::command_line(&args.command));
    let found = Probe::gather(gpus, notes, &args.machine.root, &quirks, job.as_deref());
    let text = if args.json {
        let with_torch = serde_json::to_value(&found).map(|mut value| {
            if let Some(map) = value.as_object_mut() {
                map.insert("libtorch".to_string(), torch_json());
            }
            value
        });
        match with_torch.and_then(|v| serde_json::to_string_pretty(&v)) {
            Ok(json) => json + "\n",
            Err(e) => {
                error(format_args!("cannot write the probe as JSON: {e}"));
                return exit::INTERNAL;
            }
        }
    } else {
        format!("{}\n{}\n", found.render().trim_end(), torch_section())
    };
    // A closed stdout (`| head`) is not worth a panic.
    let _ = std::io::stdout().write_all(text.as_bytes());
    exit::SUCCESS
}

/// What libtorch sees, for `probe --json`: its report, or `null` without the `torch` feature.
fn torch_json() -> serde_json::Value {
    #[cfg(feature = "torch")]
    {
        serde_json::to_value(gpuwarden::torch::report()).unwrap_or(serde_json::Value::Null)
    }
    #[cfg(not(feature = "torch"))]
    {
        serde_json::Value::Null
    }
}

/// The torch section of `gpuwarden probe`. Only `probe` may call it: asking libtorch loads the
/// CUDA driver into gpuwarden, which must not happen in the supervisor.
fn torch_section() -> String {
    #[cfg(feature = "torch")]
    {
        gpuwarden::torch::report().to_string()
    }
    #[cfg(not(feature = "torch"))]
    {
        "libtorch: not built in (build with --features torch to ask libtorch; docs/torch.md)"
            .to_owned()
    }
}

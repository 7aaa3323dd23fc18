//! `gpuwarden checkpoint verify`: whether one checkpoint file is complete and, with the `torch`
//! feature, whether libtorch loads it.

use std::path::Path;

use super::error;

/// `gpuwarden checkpoint verify FILE`: 0 when the file verified, 1 when it did not.
#[cfg(feature = "torch")]
pub fn verify(file: &Path, json: bool) -> i32 {
    match gpuwarden::torch::verify_checkpoint(file) {
        Ok(summary) => {
            if json {
                match serde_json::to_string_pretty(&summary) {
                    Ok(text) => println!("{text}"),
                    Err(e) => {
                        error(format_args!("cannot write the summary as JSON: {e}"));
                        return 1;
                    }
                }
            } else {
                println!("{summary}");
            }
            0
        }
        Err(e) => {
            error(e);
            1
        }
    }
}

/// Without libtorch, `verify` still checks completeness, the way `run` does before resuming.
#[cfg(not(feature = "torch"))]
pub fn verify(file: &Path, json: bool) -> i32 {
    let result = gpuwarden::checkpoints::validate(file);
    if json {
        let (key, value) = match &result {
            Ok(format) => ("format", format.to_string()),
            Err(e) => ("problem", e.to_string()),
        };
        println!(
            "{}",
            serde_json::json!({
                "file": file.display().to_string(),
                "complete": result.is_ok(),
                key: value,
                "loaded_with_libtorch": false,
            })
        );
    }
    match result {
        Ok(format) => {
            if !json {
                println!(
                    "{}: complete ({format}); not loaded: this gpuwarden was built without the \
                     `torch` feature (see docs/torch.md)",
                    file.display()
                );
            }
            0
        }
        Err(e) => {
            error(format_args!(
                "{} is not a complete checkpoint: {e}",
                file.display()
            ));
            1
        }
    }
}

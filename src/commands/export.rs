//! `pipe export STAGE.OUTPUT PATH`: copy an output out of the store (writable).

use std::path::Path;

use crate::cli::ExportArgs;

use super::UsageError;

pub fn run(args: &ExportArgs, cache: &Path) -> anyhow::Result<u8> {
    let store = super::open_existing(cache)?;
    let (stage, output) = args.output.rsplit_once('.').ok_or_else(|| {
        UsageError(format!(
            "`{}`: expected STAGE.OUTPUT, e.g. `split.train`",
            args.output
        ))
    })?;
    let rec = super::find_stage(&store, stage, args.pipeline.as_deref())?;
    let art = rec.outputs.get(output).ok_or_else(|| {
        let names: Vec<&str> = rec.outputs.keys().map(String::as_str).collect();
        let help = pipe_stages::suggest(output, names.iter().copied())
            .map(|s| format!("; did you mean `{stage}.{s}`?"))
            .unwrap_or_default();
        UsageError(format!(
            "stage `{stage}` has outputs {}{help}",
            names.join(", ")
        ))
    })?;
    store.export(art, &args.path)?;
    println!(
        "exported {stage}.{output} ({}, {} bytes) to {}",
        super::short(&art.digest),
        art.bytes,
        args.path.display()
    );
    Ok(crate::exit::OK)
}

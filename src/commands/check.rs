//! `pipe check FILE`: load, validate every stage and the graph, run nothing.

use pipe_stages::Registry;

use crate::cli::PipelineArgs;
use crate::plan::Plan;

pub fn run(args: &PipelineArgs, registry: &Registry) -> anyhow::Result<u8> {
    let pipeline = super::load(args, registry)?;
    let plan = Plan::new(&pipeline)?;
    let kinds: std::collections::BTreeSet<&str> =
        pipeline.stages.iter().map(|s| s.kind.as_str()).collect();
    println!(
        "ok: `{}` has {} stages ({} kinds: {}), {} edges",
        pipeline.name,
        pipeline.stages.len(),
        kinds.len(),
        kinds.into_iter().collect::<Vec<_>>().join(", "),
        plan.edges().len()
    );
    Ok(crate::exit::OK)
}

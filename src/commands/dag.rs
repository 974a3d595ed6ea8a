//! `pipe dag FILE`: the stage graph as text, Graphviz dot or Mermaid.

use pipe_stages::Registry;

use crate::cli::{DagArgs, DagFormat};
use crate::plan::Plan;

pub fn run(args: &DagArgs, registry: &Registry) -> anyhow::Result<u8> {
    let pipeline = super::load(&args.pipeline, registry)?;
    let plan = Plan::new(&pipeline)?;
    let name = |i: usize| pipeline.stages[i].name.as_str();
    match args.format {
        DagFormat::Text => {
            // Each stage on its level (longest path from a root), with what feeds it.
            let mut level = vec![0usize; pipeline.stages.len()];
            for &i in plan.order() {
                level[i] = plan
                    .parents(i)
                    .iter()
                    .map(|p| level[*p] + 1)
                    .max()
                    .unwrap_or(0);
            }
            for &i in plan.order() {
                let spec = &pipeline.stages[i];
                let mut parents: Vec<&str> = plan.parents(i).into_iter().map(name).collect();
                parents.sort();
                let from = if parents.is_empty() {
                    String::new()
                } else {
                    format!("  ← {}", parents.join(", "))
                };
                println!(
                    "{}{} [{}]{from}",
                    "  ".repeat(level[i]),
                    spec.name,
                    spec.kind
                );
            }
        }
        DagFormat::Dot => {
            println!("digraph \"{}\" {{", pipeline.name);
            println!("  rankdir=LR;");
            for s in &pipeline.stages {
                println!("  \"{}\" [label=\"{}\\n({})\"];", s.name, s.name, s.kind);
            }
            for (a, b) in plan.edges() {
                println!("  \"{}\" -> \"{}\";", name(a), name(b));
            }
            println!("}}");
        }
        DagFormat::Mermaid => {
            println!("flowchart LR");
            for (i, s) in pipeline.stages.iter().enumerate() {
                println!("  n{i}[\"{} ({})\"]", s.name, s.kind);
            }
            for (a, b) in plan.edges() {
                println!("  n{a} --> n{b}");
            }
        }
    }
    Ok(crate::exit::OK)
}

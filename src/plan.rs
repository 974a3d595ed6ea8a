//! The DAG of a pipeline (petgraph): cycle detection, a stable topological order, and
//! `--only` / `--from` / `--until` selection.

use std::cmp::Reverse;
use std::collections::{BTreeSet, BinaryHeap};

use petgraph::algo::{tarjan_scc, toposort};
use petgraph::graph::{DiGraph, NodeIndex};
use petgraph::visit::{Bfs, Reversed};
use petgraph::Direction;

use crate::pipeline::{Pipeline, SpecError};

/// Which part of the pipeline to run.
#[derive(Debug, Clone, Default)]
pub struct Selection {
    /// Exactly these stages (names or foreach base names).
    pub only: Vec<String>,
    /// These stages and everything downstream of them.
    pub from: Vec<String>,
    /// These stages and everything upstream of them.
    pub until: Vec<String>,
}

impl Selection {
    /// True when nothing narrows the run.
    pub fn is_all(&self) -> bool {
        self.only.is_empty() && self.from.is_empty() && self.until.is_empty()
    }
}

/// A pipeline's stages as a graph; node `i` is `pipeline.stages[i]`.
#[derive(Debug)]
pub struct Plan {
    graph: DiGraph<usize, ()>,
    order: Vec<usize>,
    selected: Vec<bool>,
}

impl Plan {
    /// Builds the graph; a cycle is an error that lists it.
    pub fn new(pipeline: &Pipeline) -> Result<Plan, SpecError> {
        let mut graph = DiGraph::new();
        let nodes: Vec<NodeIndex> = (0..pipeline.stages.len())
            .map(|i| graph.add_node(i))
            .collect();
        for (i, spec) in pipeline.stages.iter().enumerate() {
            for up in spec.upstream() {
                if let Some(j) = pipeline.stages.iter().position(|s| s.name == up) {
                    graph.update_edge(nodes[j], nodes[i], ());
                }
            }
        }
        if let Err(cycle) = toposort(&graph, None) {
            let mut path = find_cycle(&graph, cycle.node_id());
            // Start the cycle at the stage written first, so the message is stable.
            path.pop();
            let first_at = (0..path.len()).min_by_key(|i| graph[path[*i]]).unwrap_or(0);
            path.rotate_left(first_at);
            path.push(path[0]);
            let names = path
                .iter()
                .map(|n| pipeline.stages[graph[*n]].name.clone())
                .collect::<Vec<_>>();
            let first = &pipeline.stages[graph[path[0]]];
            return Err(SpecError {
                span: first.span.clone(),
                message: format!("stages form a cycle: {}", names.join(" → ")),
                help: Some(
                    "a stage cannot depend, directly or through others, on its own outputs".into(),
                ),
            });
        }
        let order = stable_order(&graph);
        let selected = vec![true; pipeline.stages.len()];
        Ok(Plan {
            graph,
            order,
            selected,
        })
    }

    /// Narrows the plan to a selection; names that match no stage are errors.
    pub fn select(&mut self, pipeline: &Pipeline, selection: &Selection) -> Result<(), SpecError> {
        if selection.is_all() {
            return Ok(());
        }
        let resolve = |flag: &str, names: &[String]| -> Result<Vec<usize>, SpecError> {
            let mut out = Vec::new();
            for name in names {
                let matched = pipeline.select(name);
                if matched.is_empty() {
                    return Err(SpecError {
                        span: crate::pipeline::Span::arg(format!("{flag} {name}")),
                        message: format!("no stage named `{name}` in `{}`", pipeline.name),
                        help: pipe_stages::suggest(name, pipeline.names())
                            .map(|s| format!("did you mean `{s}`?")),
                    });
                }
                out.extend(
                    matched
                        .iter()
                        .filter_map(|m| pipeline.stages.iter().position(|s| s.name == *m)),
                );
            }
            Ok(out)
        };
        let n = pipeline.stages.len();
        let mut keep = vec![true; n];
        if !selection.only.is_empty() {
            let only: BTreeSet<usize> = resolve("--only", &selection.only)?.into_iter().collect();
            for (i, k) in keep.iter_mut().enumerate() {
                *k &= only.contains(&i);
            }
        }
        if !selection.from.is_empty() {
            let mut down = BTreeSet::new();
            for i in resolve("--from", &selection.from)? {
                down.extend(self.reachable(i, Direction::Outgoing));
            }
            for (i, k) in keep.iter_mut().enumerate() {
                *k &= down.contains(&i);
            }
        }
        if !selection.until.is_empty() {
            let mut up = BTreeSet::new();
            for i in resolve("--until", &selection.until)? {
                up.extend(self.reachable(i, Direction::Incoming));
            }
            for (i, k) in keep.iter_mut().enumerate() {
                *k &= up.contains(&i);
            }
        }
        self.selected = keep;
        Ok(())
    }

    /// Stage indices in a topological order that follows file order where it can.
    pub fn order(&self) -> &[usize] {
        &self.order
    }

    /// Whether stage `i` is part of this run.
    pub fn is_selected(&self, i: usize) -> bool {
        self.selected[i]
    }

    /// Direct upstream stages of `i`.
    pub fn parents(&self, i: usize) -> Vec<usize> {
        self.graph
            .neighbors_directed(NodeIndex::new(i), Direction::Incoming)
            .map(|n| self.graph[n])
            .collect()
    }

    /// Direct downstream stages of `i`.
    pub fn children(&self, i: usize) -> Vec<usize> {
        self.graph
            .neighbors_directed(NodeIndex::new(i), Direction::Outgoing)
            .map(|n| self.graph[n])
            .collect()
    }

    /// `i` and everything reachable from it in `direction`.
    pub fn reachable(&self, i: usize, direction: Direction) -> BTreeSet<usize> {
        let mut out = BTreeSet::new();
        match direction {
            Direction::Outgoing => {
                let mut bfs = Bfs::new(&self.graph, NodeIndex::new(i));
                while let Some(n) = bfs.next(&self.graph) {
                    out.insert(self.graph[n]);
                }
            }
            Direction::Incoming => {
                let rev = Reversed(&self.graph);
                let mut bfs = Bfs::new(rev, NodeIndex::new(i));
                while let Some(n) = bfs.next(rev) {
                    out.insert(self.graph[n]);
                }
            }
        }
        out
    }

    /// Stages that must be available for the selected ones: the selection and, outside it,
    /// everything upstream of it (those are taken from the cache, never run).
    pub fn needed(&self) -> Vec<bool> {
        let mut need = self.selected.clone();
        for (i, s) in self.selected.iter().enumerate() {
            if *s {
                for up in self.reachable(i, Direction::Incoming) {
                    need[up] = true;
                }
            }
        }
        need
    }

    /// The edges as (upstream, downstream) stage indices.
    pub fn edges(&self) -> Vec<(usize, usize)> {
        self.graph
            .raw_edges()
            .iter()
            .map(|e| (self.graph[e.source()], self.graph[e.target()]))
            .collect()
    }
}

/// Kahn's algorithm, always taking the ready stage written first.
fn stable_order(graph: &DiGraph<usize, ()>) -> Vec<usize> {
    let mut indegree: Vec<usize> = graph
        .node_indices()
        .map(|n| graph.neighbors_directed(n, Direction::Incoming).count())
        .collect();
    let mut ready: BinaryHeap<Reverse<usize>> = indegree
        .iter()
        .enumerate()
        .filter(|(_, d)| **d == 0)
        .map(|(i, _)| Reverse(i))
        .collect();
    let mut order = Vec::with_capacity(indegree.len());
    while let Some(Reverse(i)) = ready.pop() {
        order.push(graph[NodeIndex::new(i)]);
        for child in graph.neighbors_directed(NodeIndex::new(i), Direction::Outgoing) {
            indegree[child.index()] -= 1;
            if indegree[child.index()] == 0 {
                ready.push(Reverse(child.index()));
            }
        }
    }
    order
}

/// One cycle through `start`, as a closed path (first node repeated at the end).
fn find_cycle(graph: &DiGraph<usize, ()>, start: NodeIndex) -> Vec<NodeIndex> {
    let scc: BTreeSet<NodeIndex> = tarjan_scc(graph)
        .into_iter()
        .find(|c| c.contains(&start))
        .unwrap_or_default()
        .into_iter()
        .collect();
    // Depth-first search inside the component for a path back to `start`.
    let mut stack = vec![(start, vec![start])];
    let mut seen = BTreeSet::new();
    while let Some((node, path)) = stack.pop() {
        for next in graph.neighbors_directed(node, Direction::Outgoing) {
            if next == start {
                let mut cycle = path.clone();
                cycle.push(start);
                return cycle;
            }
            if scc.contains(&next) && seen.insert(next) {
                let mut p = path.clone();
                p.push(next);
                stack.push((next, p));
            }
        }
    }
    vec![start, start]
}

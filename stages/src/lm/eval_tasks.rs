//! Task evaluation inside `sft`: every `eval_every` steps (and before the first),
//! the model as it is generates replies to the validation prompts with stated
//! decoding and seed, each named task parses and scores them, and the scores go
//! into `metrics.jsonl`, the stage metrics and `keep_best`.
//!
//! Decoding is the same at every evaluation: item `k` samples with
//! `Rng::new(seed).fork(k)`, so two evaluations differ only by the model, and a
//! resumed run's evaluations equal the uninterrupted run's.

use std::collections::BTreeMap;

use pipe_train::data::Record;
use pipe_train::generate::{generate, Sampling};
use pipe_train::model::Decoder;
use pipe_train::tokenizer::{Message, TextTokenizer};
use pipe_train::trainer::TaskScores;
use pipe_train::Rng;
use serde::Deserialize;
use serde_json::json;

use crate::task::dot;

/// A task evaluator by name.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TaskKind {
    /// Graphviz DOT replies: `validity` (share of replies holding a graph Graphviz
    /// accepts), `node_f1`, `edge_f1` (means over items whose reference parses; an
    /// invalid reply scores 0).
    Dot,
}

impl TaskKind {
    /// The metrics this task reports.
    pub fn metrics(self) -> &'static [&'static str] {
        match self {
            TaskKind::Dot => &["validity", "node_f1", "edge_f1"],
        }
    }
}

/// How the evaluation decodes.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EvalDecoding {
    /// Tokens per reply at most.
    #[serde(default = "default_max_new")]
    pub max_new_tokens: usize,
    /// 0: greedy.
    #[serde(default)]
    pub temperature: f64,
    /// Nucleus mass when sampling.
    #[serde(default = "one")]
    pub top_p: f64,
    /// A reply ends at one of these.
    #[serde(default)]
    pub stop: Vec<String>,
    /// Seed of item `k`'s sampling: `fork(k)` of it.
    #[serde(default)]
    pub seed: u64,
    /// Evaluate on the first N validation records only (0: all).
    #[serde(default)]
    pub limit: usize,
    /// Prompts per generation batch.
    #[serde(default = "default_batch")]
    pub batch_size: usize,
}

fn default_max_new() -> usize {
    256
}
fn one() -> f64 {
    1.0
}
fn default_batch() -> usize {
    8
}

impl Default for EvalDecoding {
    fn default() -> Self {
        serde_json::from_value(json!({})).expect("every field has a default")
    }
}

impl EvalDecoding {
    fn sampling(&self) -> Sampling {
        Sampling {
            max_new_tokens: self.max_new_tokens,
            temperature: self.temperature,
            top_p: self.top_p,
            stop: self.stop.clone(),
            logprobs: None,
        }
    }
}

/// One validation item: the prompt's ids and the reference reply.
struct Item {
    prompt: String,
    ids: Vec<u32>,
    reference: String,
}

/// Runs the named tasks on the validation records.
pub struct TaskEvaluator<'a> {
    tokenizer: &'a TextTokenizer,
    tasks: Vec<TaskKind>,
    decoding: EvalDecoding,
    samples: usize,
    eos: Vec<u32>,
    items: Vec<Item>,
}

impl<'a> TaskEvaluator<'a> {
    /// Prompts rendered as training renders them (the chat template with the
    /// generation prompt when `chat`), references from the records' responses.
    pub fn new(
        tokenizer: &'a TextTokenizer,
        chat: bool,
        records: &[Record],
        tasks: Vec<TaskKind>,
        decoding: EvalDecoding,
        samples: usize,
        eos: Vec<u32>,
    ) -> pipe_train::Result<Self> {
        let take = if decoding.limit == 0 {
            records.len()
        } else {
            decoding.limit.min(records.len())
        };
        let mut items = Vec::with_capacity(take);
        for r in &records[..take] {
            let (msgs, reference) = match r {
                Record::Pair { prompt, response } => (
                    vec![Message {
                        role: "user".into(),
                        content: prompt.clone(),
                    }],
                    response.clone(),
                ),
                Record::Chat { messages } => {
                    let last = messages.len().saturating_sub(1);
                    (
                        messages[..last].to_vec(),
                        messages
                            .get(last)
                            .map(|m| m.content.clone())
                            .unwrap_or_default(),
                    )
                }
            };
            let prompt = if chat {
                tokenizer.apply_chat_template(&msgs, true)?
            } else {
                msgs.iter()
                    .map(|m| m.content.as_str())
                    .collect::<Vec<_>>()
                    .join("\n")
            };
            let ids = tokenizer.encode(&prompt)?;
            items.push(Item {
                prompt,
                ids,
                reference,
            });
        }
        Ok(TaskEvaluator {
            tokenizer,
            tasks,
            decoding,
            samples,
            eos,
            items,
        })
    }

    /// Generates and scores.
    pub fn run(&self, model: &Decoder) -> pipe_train::Result<TaskScores> {
        let mut replies = Vec::with_capacity(self.items.len());
        for (c, chunk) in self
            .items
            .chunks(self.decoding.batch_size.max(1))
            .enumerate()
        {
            let prompts: Vec<Vec<u32>> = chunk.iter().map(|i| i.ids.clone()).collect();
            let first = c * self.decoding.batch_size.max(1);
            let mut rngs: Vec<Rng> = (0..chunk.len())
                .map(|k| Rng::new(self.decoding.seed).fork((first + k) as u64))
                .collect();
            let gens = generate(
                model,
                self.tokenizer,
                &prompts,
                &self.decoding.sampling(),
                &self.eos,
                &mut rngs,
            )?;
            replies.extend(gens.into_iter().map(|g| g.text));
        }
        let mut scores = TaskScores::default();
        let mut verdicts: Vec<BTreeMap<String, serde_json::Value>> =
            vec![BTreeMap::new(); replies.len()];
        for task in &self.tasks {
            match task {
                TaskKind::Dot => self.dot(&replies, &mut scores, &mut verdicts),
            }
        }
        for (k, (item, reply)) in self
            .items
            .iter()
            .zip(&replies)
            .take(self.samples)
            .enumerate()
        {
            scores.samples.push(json!({
                "item": k, "prompt": item.prompt, "reference": item.reference,
                "generation": reply, "verdict": verdicts[k],
            }));
        }
        Ok(scores)
    }

    fn dot(
        &self,
        replies: &[String],
        scores: &mut TaskScores,
        verdicts: &mut [BTreeMap<String, serde_json::Value>],
    ) {
        let (mut valid, mut scored) = (0usize, 0usize);
        let (mut node_f1, mut edge_f1) = (0.0, 0.0);
        for ((item, reply), v) in self.items.iter().zip(replies).zip(verdicts.iter_mut()) {
            let got = dot::extract(reply).map(|src| dot::parse(&src));
            let reference = dot::extract(&item.reference).and_then(|s| dot::parse(&s).ok());
            match &got {
                Some(Ok(_)) => {
                    valid += 1;
                    v.insert("dot_valid".into(), json!(true));
                }
                Some(Err(e)) => {
                    v.insert("dot_valid".into(), json!(false));
                    v.insert("dot_error".into(), json!(e.to_string()));
                }
                None => {
                    v.insert("dot_valid".into(), json!(false));
                    v.insert("dot_error".into(), json!("no DOT graph in the reply"));
                }
            }
            if let Some(r) = reference {
                scored += 1;
                if let Some(Ok(g)) = &got {
                    let (_, _, nf) = dot::prf(&g.nodes, &r.nodes);
                    let (_, _, ef) = dot::prf(&g.edges, &r.edges);
                    node_f1 += nf;
                    edge_f1 += ef;
                    v.insert("node_f1".into(), json!(nf));
                    v.insert("edge_f1".into(), json!(ef));
                }
            }
        }
        let n = replies.len().max(1) as f64;
        scores.metrics.insert("validity".into(), valid as f64 / n);
        let s = scored.max(1) as f64;
        scores.metrics.insert("node_f1".into(), node_f1 / s);
        scores.metrics.insert("edge_f1".into(), edge_f1 / s);
    }
}

//! `build_data`: reads raw QA/claim datasets in their native formats (see
//! [`crate::data::readers`]) into one JSONL of unified records, attaches evidence
//! retrieved by BM25 from a passage corpus where a source has none (NQ-Open,
//! PopQA) or as extra context (FEVER), and mines hard negatives: high-BM25
//! passages that contain no gold answer.
//!
//! Source files are deps of the stage, so their digests are in its key; an `hf:` source
//! (a Hugging Face dataset in the hub cache, [`crate::data::hub`]) puts its snapshot's
//! commit there instead. A file source may pin its sha256: a file that changed since is an error unless
//! `accept_changed_sources` is set. Malformed records go to `rejects.jsonl` with
//! `file:line` and the reason; the stage fails only above `max_reject_rate`.

use std::collections::{BTreeMap, HashMap};
use std::io::Read as _;
use std::path::{Path, PathBuf};

use serde::Deserialize;
use serde_json::{json, Value};
use sha2::{Digest, Sha256};

use crate::contract::{InputDecl, Outcome, OutputDecl, Signature, Stage, StageContext, StageError};
use crate::data::bm25::{contains_answer, Bm25, Passage};
use crate::data::hub::HubDataset;
use crate::data::readers::{self, Chunk, QaRecord, Read, Reject};
use crate::data::split::normalize;
use crate::params::{parse_params, ParamError};

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Source {
    /// `hotpotqa`, `fever`, `nq_open`, `popqa` or `jsonl`.
    format: String,
    /// A file (JSON, JSONL, TSV or Parquet), relative to the workdir.
    #[serde(default)]
    path: Option<String>,
    /// Or a Hugging Face dataset (`org/name`), read from the hub cache ([`hub`]).
    #[serde(default)]
    hf: Option<String>,
    /// `hf:`: the dataset's config (subset).
    #[serde(default)]
    config: Option<String>,
    /// `hf:`: the split.
    #[serde(default)]
    split: Option<String>,
    /// `hf:`: branch, tag or commit (default `main`).
    #[serde(default)]
    revision: Option<String>,
    /// Expected sha256 of the file.
    #[serde(default)]
    sha256: Option<String>,
    /// FEVER: the wiki-pages JSONL with sentence texts.
    #[serde(default)]
    wiki: Option<String>,
    /// `jsonl`: source name and field mapping (`id`, `question`, `answers`).
    #[serde(default)]
    name: Option<String>,
    #[serde(default)]
    fields: HashMap<String, String>,
}

impl Source {
    fn hub(&self) -> Option<HubDataset> {
        Some(HubDataset {
            id: self.hf.clone()?,
            config: self.config.clone(),
            split: self.split.clone().unwrap_or_default(),
            revision: self.revision.clone().unwrap_or_else(|| "main".into()),
        })
    }

    /// How messages name the source.
    fn shown(&self) -> String {
        match (&self.path, &self.hf) {
            (Some(p), _) => p.clone(),
            (None, Some(id)) => format!("hf:{id}"),
            (None, None) => "?".into(),
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct BuildParams {
    sources: Vec<Source>,
    /// Passage corpus JSONL (`id`, `title`, `text`) for retrieval and negatives.
    #[serde(default)]
    corpus: Option<String>,
    #[serde(default = "default_k")]
    evidence_k: usize,
    #[serde(default = "default_k")]
    hard_negatives: usize,
    #[serde(default = "default_rate")]
    max_reject_rate: f64,
    #[serde(default)]
    accept_changed_sources: bool,
}

fn default_k() -> usize {
    3
}
fn default_rate() -> f64 {
    0.1
}

const FORMATS: [&str; 5] = ["hotpotqa", "fever", "nq_open", "popqa", "jsonl"];

impl BuildParams {
    fn validate(&self) -> Result<(), ParamError> {
        if self.sources.is_empty() {
            return Err(ParamError::new(
                &["with", "sources"],
                "expected at least one source",
            ));
        }
        for (i, s) in self.sources.iter().enumerate() {
            let at = i.to_string();
            if !FORMATS.contains(&s.format.as_str()) {
                let hint = crate::params::suggest(&s.format, FORMATS)
                    .map(|h| format!(" (did you mean `{h}`?)"))
                    .unwrap_or_default();
                return Err(ParamError::new(
                    &["with", "sources", &at, "format"],
                    format!(
                        "unknown format `{}`; expected one of {}{hint}",
                        s.format,
                        FORMATS.join(", ")
                    ),
                ));
            }
            match (&s.path, &s.hf) {
                (Some(_), Some(_)) | (None, None) => {
                    return Err(ParamError::new(
                        &["with", "sources", &at],
                        "expected one of `path:` (a file) or `hf:` (a Hugging Face dataset, with `split:`)",
                    ))
                }
                (None, Some(id)) => {
                    if id.split('/').count() != 2 || id.split('/').any(str::is_empty) {
                        return Err(ParamError::new(
                            &["with", "sources", &at, "hf"],
                            format!("`{id}`: expected a dataset id `org/name`"),
                        ));
                    }
                    if s.split.is_none() {
                        return Err(ParamError::new(
                            &["with", "sources", &at, "split"],
                            "an `hf:` source needs `split:` (train, validation, test...)",
                        ));
                    }
                    if s.sha256.is_some() {
                        return Err(ParamError::new(
                            &["with", "sources", &at, "sha256"],
                            "an `hf:` source is pinned by `revision:` (a commit), not `sha256:`",
                        ));
                    }
                }
                (Some(_), None) => {
                    for (k, v) in [("config", &s.config), ("split", &s.split), ("revision", &s.revision)] {
                        if v.is_some() {
                            return Err(ParamError::new(
                                &["with", "sources", &at, k],
                                format!("`{k}:` belongs to `hf:` sources; this one reads `path:`"),
                            ));
                        }
                    }
                }
            }
            if s.format == "fever" && s.wiki.is_none() {
                return Err(ParamError::new(
                    &["with", "sources", &at, "wiki"],
                    "FEVER needs `wiki`: the wiki-pages JSONL with sentence texts",
                ));
            }
            if let Some(h) = &s.sha256 {
                if h.len() != 64 || !h.chars().all(|c| c.is_ascii_hexdigit()) {
                    return Err(ParamError::new(
                        &["with", "sources", &at, "sha256"],
                        "expected 64 hex digits",
                    ));
                }
            }
        }
        if !(0.0..=1.0).contains(&self.max_reject_rate) {
            return Err(ParamError::new(
                &["with", "max_reject_rate"],
                "expected a fraction between 0 and 1",
            ));
        }
        Ok(())
    }

    fn files(&self) -> Vec<String> {
        let mut out: Vec<String> = Vec::new();
        for s in &self.sources {
            out.extend(s.path.clone());
            out.extend(s.wiki.clone());
        }
        out.extend(self.corpus.clone());
        out
    }
}

fn read_text(path: &Path) -> Result<(String, String), StageError> {
    let mut bytes = Vec::new();
    std::fs::File::open(path)
        .and_then(|mut f| f.read_to_end(&mut bytes))
        .map_err(StageError::io(format!("reading {}", path.display())))?;
    let digest = format!("{:x}", Sha256::digest(&bytes));
    if crate::records::is_parquet(&bytes) {
        // Parquet rows become JSON lines; the JSONL readers take them as they are.
        return Ok((crate::records::parquet_as_jsonl(path)?, digest));
    }
    let text = String::from_utf8(bytes)
        .map_err(|e| StageError::Failed(format!("{}: not UTF-8: {e}", path.display())))?;
    Ok((text, digest))
}

/// Builds the unified dataset.
pub struct BuildDataStage;

impl Stage for BuildDataStage {
    fn kind(&self) -> &'static str {
        "build_data"
    }

    fn version(&self) -> u32 {
        1
    }

    fn summary(&self) -> &'static str {
        "read HotpotQA/FEVER/NQ-Open/PopQA/JSONL (files, Parquet or `hf:` datasets) into one record format, BM25 evidence and hard negatives"
    }

    fn declare(&self, params: &Value) -> Result<Signature, ParamError> {
        let p: BuildParams = parse_params(params)?;
        p.validate()?;
        Ok(Signature {
            inputs: vec![InputDecl::optional("corpus")],
            deps: p.files(),
            outputs: vec![
                OutputDecl::staged("records", "records.jsonl"),
                OutputDecl::staged("rejects", "rejects.jsonl"),
            ],
            ..Signature::default()
        })
    }

    fn key_params(&self, params: &Value) -> Value {
        // An `hf:` source is not a workspace file: the snapshot it resolves to (its commit
        // and files) joins the key, so a new revision in the cache reruns the stage.
        let mut out = params.clone();
        let Ok(p) = parse_params::<BuildParams>(params) else {
            return out;
        };
        let resolved: Vec<Value> = p
            .sources
            .iter()
            .filter_map(Source::hub)
            .map(|ds| match ds.resolve() {
                Ok(r) => json!({"hf": ds.id, "commit": r.commit,
                    "files": r.files.iter().map(|f| f.0.clone()).collect::<Vec<_>>()}),
                Err(_) => json!({"hf": ds.id, "unresolved": true}),
            })
            .collect();
        if !resolved.is_empty() {
            if let Some(obj) = out.as_object_mut() {
                obj.insert("hf_snapshots".into(), Value::Array(resolved));
            }
        }
        out
    }

    fn run(&self, ctx: &StageContext) -> Result<Outcome, StageError> {
        let p: BuildParams = parse_params(&ctx.params)?;
        p.validate()?;
        let at = |rel: &str| -> PathBuf { ctx.workdir.join(rel) };
        let mut metrics = BTreeMap::new();
        let mut records: Vec<QaRecord> = Vec::new();
        let mut rejects: Vec<Reject> = Vec::new();
        for (i, s) in p.sources.iter().enumerate() {
            let (text, digest) = match s.hub() {
                Some(ds) => {
                    let found = ds.resolve().map_err(|e| {
                        StageError::Failed(format!("sources[{i}] hf:{}: {e}", ds.id))
                    })?;
                    let mut all = String::new();
                    for (rel, path) in &found.files {
                        let (t, _) = read_text(path)?;
                        all.push_str(&t);
                        if !all.ends_with('\n') {
                            all.push('\n');
                        }
                        ctx.log(&format!("hf:{} {rel} (commit {})", ds.id, found.commit));
                    }
                    (all, format!("commit:{}", found.commit))
                }
                None => {
                    let rel = s.path.as_deref().expect("validated");
                    let (text, digest) = read_text(&at(rel))?;
                    if let Some(pin) = &s.sha256 {
                        if !pin.eq_ignore_ascii_case(&digest) && !p.accept_changed_sources {
                            return Err(StageError::Failed(format!(
                                "sources[{i}] {rel}: sha256 is {digest}, the pipeline pins {pin}; the file changed. Update `sha256`, or run with `--set {}.with.accept_changed_sources=true`",
                                ctx.stage
                            )));
                        }
                    }
                    (text, digest)
                }
            };
            let shown = s.shown();
            let file = Path::new(&shown);
            let read: Read = match s.format.as_str() {
                "hotpotqa" => readers::hotpotqa(file, &text).map_err(StageError::Failed)?,
                "fever" => {
                    let wiki_rel = s.wiki.as_deref().expect("validated");
                    let (wtext, _) = read_text(&at(wiki_rel))?;
                    let (wiki, bad) = readers::fever_wiki(Path::new(wiki_rel), &wtext);
                    rejects.extend(bad);
                    readers::fever(file, &text, &wiki)
                }
                "nq_open" => readers::nq_open(file, &text),
                "popqa" => readers::popqa(file, &text).map_err(StageError::Failed)?,
                _ => readers::generic(file, &text, s.name.as_deref().unwrap_or("jsonl"), &s.fields),
            };
            // A file in another format than `format:` says: one error, not a reject per line.
            // That is: nothing read, and every row rejected for the same kind of reason.
            let kind = |r: &Reject| -> String {
                if r.reason.starts_with("invalid JSON") {
                    "invalid JSON".to_string()
                } else {
                    r.reason.clone()
                }
            };
            if read.records.is_empty()
                && !read.rejects.is_empty()
                && read
                    .rejects
                    .iter()
                    .all(|r| kind(r) == kind(&read.rejects[0]))
            {
                let first = &read.rejects[0];
                let what = if kind(first) == "invalid JSON" {
                    "is JSON".to_string()
                } else {
                    format!("is a `{}` record", s.format)
                };
                return Err(StageError::Failed(format!(
                    "sources[{i}] {shown}: not a `{}` file: none of its {} rows {what} (line {}: {}); check `format:`",
                    s.format,
                    read.rejects.len(),
                    first.at.rsplit(':').next().unwrap_or("1"),
                    first.reason
                )));
            }
            let name = s.name.clone().unwrap_or_else(|| s.format.clone());
            metrics.insert(format!("source.{name}.records"), json!(read.records.len()));
            metrics.insert(format!("source.{name}.rejects"), json!(read.rejects.len()));
            metrics.insert(format!("source.{name}.sha256"), json!(digest));
            ctx.log(&format!(
                "{}: {} records, {} rejects, sha256 {digest}",
                shown,
                read.records.len(),
                read.rejects.len()
            ));
            records.extend(read.records);
            rejects.extend(read.rejects);
        }

        let corpus_path = ctx
            .inputs
            .get("corpus")
            .cloned()
            .or_else(|| p.corpus.as_deref().map(at));
        let mut retrieved = 0usize;
        let mut negatives = 0usize;
        if let Some(path) = corpus_path {
            let passages: Vec<Passage> = crate::records::read_jsonl(&path)?
                .iter()
                .map(|v| {
                    let get = |k: &str| {
                        v.get(k)
                            .and_then(Value::as_str)
                            .unwrap_or_default()
                            .to_string()
                    };
                    Passage {
                        id: get("id"),
                        title: get("title"),
                        text: get("text"),
                    }
                })
                .collect();
            let index = Bm25::new(passages);
            for r in records.iter_mut() {
                let is_claim = r.source == "fever";
                let gold: Vec<String> = if is_claim {
                    vec![]
                } else {
                    r.answers.iter().map(|a| normalize(a)).collect()
                };
                if r.evidence.is_empty() || is_claim {
                    for (i, _) in index.search(&r.question, p.evidence_k) {
                        let psg = &index.passages()[i];
                        if r.evidence.iter().any(|c| c.id == psg.id) {
                            continue;
                        }
                        if !is_claim && contains_answer(psg, &gold) {
                            r.support.push(psg.id.clone());
                        }
                        r.evidence.push(Chunk {
                            id: psg.id.clone(),
                            title: psg.title.clone(),
                            text: psg.text.clone(),
                        });
                        retrieved += 1;
                    }
                }
                let exclude: Vec<String> = r.evidence.iter().map(|c| c.id.clone()).collect();
                let answers = if is_claim { vec![] } else { r.answers.clone() };
                for i in index.hard_negatives(&r.question, &answers, &exclude, p.hard_negatives) {
                    let psg = &index.passages()[i];
                    r.negatives.push(psg.id.clone());
                    r.evidence.push(Chunk {
                        id: psg.id.clone(),
                        title: psg.title.clone(),
                        text: psg.text.clone(),
                    });
                    negatives += 1;
                }
            }
        }

        let total = records.len() + rejects.len();
        let rate = if total == 0 {
            0.0
        } else {
            rejects.len() as f64 / total as f64
        };
        let mut out = String::new();
        for r in &records {
            out.push_str(&serde_json::to_string(r).expect("records serialise"));
            out.push('\n');
        }
        std::fs::write(ctx.out_dir.join("records.jsonl"), out)
            .map_err(StageError::io("writing records.jsonl"))?;
        let rej: String = rejects
            .iter()
            .map(|r| serde_json::to_string(r).expect("serialise") + "\n")
            .collect();
        std::fs::write(ctx.out_dir.join("rejects.jsonl"), rej)
            .map_err(StageError::io("writing rejects.jsonl"))?;
        for r in rejects.iter().take(20) {
            ctx.log(&format!("rejected {}: {}", r.at, r.reason));
        }
        if rate > p.max_reject_rate {
            let first = rejects
                .first()
                .map(|r| format!("; first: {}: {}", r.at, r.reason))
                .unwrap_or_default();
            return Err(StageError::Failed(format!(
                "{} of {total} records rejected ({:.1}%), above max_reject_rate {:.1}%{first}",
                rejects.len(),
                rate * 100.0,
                p.max_reject_rate * 100.0
            )));
        }
        metrics.insert("records".into(), json!(records.len()));
        metrics.insert("rejects".into(), json!(rejects.len()));
        metrics.insert("reject_rate".into(), json!(rate));
        metrics.insert("retrieved_evidence".into(), json!(retrieved));
        metrics.insert("hard_negatives".into(), json!(negatives));
        Ok(Outcome {
            metrics,
            ..Outcome::default()
        })
    }
}

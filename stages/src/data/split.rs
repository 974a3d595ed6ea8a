//! `split`: a deterministic, seeded train/val/test split of a JSONL file.
//!
//! Records that share an id or a normalized text are grouped (union-find) and a group always
//! lands in one split, so nothing leaks between splits. Each group's place comes from a
//! hash of the seed and the group's smallest id, never from its position in the file:
//! without `stratify`, a group's split is fixed by its hash alone, so adding records never
//! moves existing ones; with `stratify`, groups of each stratum are ranked by hash and cut
//! by exact per-stratum quotas, so added records move at most the few groups at a cut.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{BufRead, BufReader, BufWriter, Write};

use serde::Deserialize;
use serde_json::{json, Value};
use sha2::{Digest, Sha256};

use crate::contract::{InputDecl, Outcome, OutputDecl, Signature, Stage, StageContext, StageError};
use crate::params::{parse_params, ParamError};

/// Fields tried, in order, for the text that identifies duplicates when `text_field` is unset.
const TEXT_FIELDS: [&str; 4] = ["question", "prompt", "text", "claim"];

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct SplitParams {
    /// Split name → fraction; fractions sum to 1.
    ratios: BTreeMap<String, f64>,
    /// Field whose value defines strata.
    #[serde(default)]
    stratify: Option<String>,
    #[serde(default)]
    seed: u64,
    #[serde(default = "default_id_field")]
    id_field: String,
    #[serde(default)]
    text_field: Option<String>,
}

fn default_id_field() -> String {
    "id".to_owned()
}

impl SplitParams {
    fn validate(&self) -> Result<(), ParamError> {
        if self.ratios.is_empty() {
            return Err(ParamError::new(
                &["ratios"],
                "expected at least one split, e.g. {train: 0.8, val: 0.1, test: 0.1}",
            ));
        }
        for (name, ratio) in &self.ratios {
            if name.is_empty()
                || !name
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
            {
                return Err(ParamError::new(
                    &["ratios", name],
                    "split names may use letters, digits, `_` and `-` only",
                ));
            }
            if !(ratio.is_finite() && *ratio > 0.0) {
                return Err(ParamError::new(
                    &["ratios", name],
                    format!("expected a fraction > 0, found {ratio}"),
                ));
            }
        }
        let sum: f64 = self.ratios.values().sum();
        if (sum - 1.0).abs() > 1e-6 {
            return Err(ParamError::new(
                &["ratios"],
                format!("fractions must sum to 1, they sum to {sum}"),
            ));
        }
        Ok(())
    }
}

/// Splits JSONL records into named parts.
pub struct SplitStage;

impl Stage for SplitStage {
    fn kind(&self) -> &'static str {
        "split"
    }

    fn version(&self) -> u32 {
        1
    }

    fn summary(&self) -> &'static str {
        "seeded, leak-free, hash-stable train/val/test split of JSONL"
    }

    fn declare(&self, params: &Value) -> Result<Signature, ParamError> {
        let p: SplitParams = parse_params(params)?;
        p.validate()?;
        Ok(Signature {
            inputs: vec![InputDecl::required("records")],
            outputs: p
                .ratios
                .keys()
                .map(|n| OutputDecl::staged(n, &format!("{n}.jsonl")))
                .collect(),
            ..Signature::default()
        })
    }

    fn run(&self, ctx: &StageContext) -> Result<Outcome, StageError> {
        let p: SplitParams = parse_params(&ctx.params)?;
        p.validate()?;
        let path = ctx.input("records")?;
        let mut records = Vec::new();
        let parquet = crate::records::is_parquet_file(path)?;
        if parquet {
            // Parquet rows are written out as JSON lines.
            for value in crate::records::read_parquet(path)? {
                let line = value.to_string();
                records.push(Record::new(&p, value, line));
            }
        }
        let file =
            File::open(path).map_err(StageError::io(format!("opening {}", path.display())))?;
        let lines = if !parquet {
            BufReader::new(file).lines().collect::<Vec<_>>()
        } else {
            Vec::new()
        };
        for (i, line) in lines.into_iter().enumerate() {
            let line = line.map_err(StageError::io(format!("reading {}", path.display())))?;
            if line.trim().is_empty() {
                continue;
            }
            let value: Value = serde_json::from_str(&line).map_err(|e| {
                StageError::Failed(format!(
                    "{}:{}: invalid JSON record: {e}",
                    path.display(),
                    i + 1
                ))
            })?;
            records.push(Record::new(&p, value, line));
        }
        ctx.progress(records.len() as u64, Some(records.len() as u64), "grouping");
        let assignment = assign(&p, &records);

        let names: Vec<&String> = p.ratios.keys().collect();
        let mut writers = Vec::new();
        for name in &names {
            let out = ctx.out_dir.join(format!("{name}.jsonl"));
            let f = File::create(&out)
                .map_err(StageError::io(format!("creating {}", out.display())))?;
            writers.push(BufWriter::new(f));
        }
        let mut counts = vec![0u64; names.len()];
        let mut strata: BTreeMap<String, Vec<u64>> = BTreeMap::new();
        for (record, &split) in records.iter().zip(&assignment.per_record) {
            writeln!(writers[split], "{}", record.line).map_err(StageError::io("writing split"))?;
            counts[split] += 1;
            strata
                .entry(record.stratum.clone())
                .or_insert_with(|| vec![0; names.len()])[split] += 1;
        }
        for mut w in writers {
            w.flush().map_err(StageError::io("writing split"))?;
        }
        let mut metrics = BTreeMap::new();
        metrics.insert("records".to_owned(), json!(records.len()));
        metrics.insert("groups".to_owned(), json!(assignment.groups));
        metrics.insert(
            "merged_duplicates".to_owned(),
            json!(records.len() - assignment.groups),
        );
        for (i, name) in names.iter().enumerate() {
            metrics.insert(format!("count.{name}"), json!(counts[i]));
        }
        if p.stratify.is_some() {
            for (stratum, row) in strata {
                for (i, name) in names.iter().enumerate() {
                    metrics.insert(format!("strata.{stratum}.{name}"), json!(row[i]));
                }
            }
        }
        ctx.log(&format!(
            "split {} records in {} groups: {:?}",
            records.len(),
            assignment.groups,
            counts
        ));
        Ok(Outcome {
            metrics,
            ..Outcome::default()
        })
    }
}

struct Record {
    id: String,
    text: Option<String>,
    stratum: String,
    line: String,
}

impl Record {
    fn new(p: &SplitParams, value: Value, line: String) -> Self {
        let id = match value.get(&p.id_field) {
            Some(Value::String(s)) => s.clone(),
            Some(v @ Value::Number(_)) => v.to_string(),
            // No id: the record's own content identifies it.
            _ => format!("sha256:{}", hex(&Sha256::digest(line.as_bytes()))),
        };
        let text = match &p.text_field {
            Some(f) => value.get(f).and_then(Value::as_str).map(normalize),
            None => TEXT_FIELDS
                .iter()
                .find_map(|f| value.get(*f).and_then(Value::as_str))
                .map(normalize),
        }
        .filter(|t| !t.is_empty());
        let stratum = match p.stratify.as_deref().and_then(|f| value.get(f)) {
            Some(Value::String(s)) => s.clone(),
            Some(Value::Null) | None => "<none>".to_owned(),
            Some(v) => v.to_string(),
        };
        Record {
            id,
            text,
            stratum,
            line,
        }
    }
}

/// Lowercase, punctuation to spaces, articles dropped, whitespace collapsed (SQuAD-style),
/// so trivially different copies of a question count as the same text.
pub fn normalize(text: &str) -> String {
    let lowered: String = text
        .to_lowercase()
        .chars()
        .map(|c| if c.is_alphanumeric() { c } else { ' ' })
        .collect();
    lowered
        .split_whitespace()
        .filter(|w| !matches!(*w, "a" | "an" | "the"))
        .collect::<Vec<_>>()
        .join(" ")
}

struct Assignment {
    per_record: Vec<usize>,
    groups: usize,
}

fn assign(p: &SplitParams, records: &[Record]) -> Assignment {
    // Union-find over records: an id or a normalized text seen twice joins two records.
    let mut parent: Vec<usize> = (0..records.len()).collect();
    fn find(parent: &mut [usize], mut i: usize) -> usize {
        while parent[i] != i {
            parent[i] = parent[parent[i]];
            i = parent[i];
        }
        i
    }
    let mut first_by_key: BTreeMap<String, usize> = BTreeMap::new();
    for (i, r) in records.iter().enumerate() {
        let keys = std::iter::once(format!("id\u{0}{}", r.id))
            .chain(r.text.iter().map(|t| format!("text\u{0}{t}")));
        for key in keys {
            match first_by_key.get(&key) {
                Some(&j) => {
                    let (a, b) = (find(&mut parent, i), find(&mut parent, j));
                    if a != b {
                        parent[a.max(b)] = a.min(b);
                    }
                }
                None => {
                    first_by_key.insert(key, i);
                }
            }
        }
    }
    // Group identity: the smallest member id, so it does not depend on file order.
    let mut groups: BTreeMap<usize, Group> = BTreeMap::new();
    for (i, record) in records.iter().enumerate() {
        let root = find(&mut parent, i);
        let g = groups.entry(root).or_insert_with(|| Group {
            identity: record.id.clone(),
            members: Vec::new(),
            strata: BTreeMap::new(),
        });
        if record.id < g.identity {
            g.identity = record.id.clone();
        }
        g.members.push(i);
        *g.strata.entry(record.stratum.clone()).or_insert(0) += 1;
    }
    let names: Vec<&String> = p.ratios.keys().collect();
    let ratios: Vec<f64> = p.ratios.values().copied().collect();
    let mut per_group: Vec<(f64, &Group)> = groups
        .values()
        .map(|g| (unit_hash(p.seed, &g.identity), g))
        .collect();
    let mut per_record = vec![0usize; records.len()];
    if p.stratify.is_none() {
        for (u, g) in &per_group {
            let split = by_threshold(*u, &ratios);
            for &m in &g.members {
                per_record[m] = split;
            }
        }
    } else {
        let mut by_stratum: BTreeMap<String, Vec<(f64, &Group)>> = BTreeMap::new();
        for (u, g) in per_group.drain(..) {
            // A group spanning strata goes with its most common one (ties: smallest name).
            let stratum = g
                .strata
                .iter()
                .max_by(|a, b| a.1.cmp(b.1).then(b.0.cmp(a.0)))
                .map(|(s, _)| s.clone())
                .unwrap_or_default();
            by_stratum.entry(stratum).or_default().push((u, g));
        }
        for (_, mut groups) in by_stratum {
            groups.sort_by(|a, b| {
                a.0.total_cmp(&b.0)
                    .then_with(|| a.1.identity.cmp(&b.1.identity))
            });
            let quotas = quotas(groups.len(), &ratios);
            let mut split = 0;
            let mut used = 0;
            for (_, g) in groups {
                while used >= quotas[split] && split + 1 < names.len() {
                    split += 1;
                    used = 0;
                }
                used += 1;
                for &m in &g.members {
                    per_record[m] = split;
                }
            }
        }
    }
    Assignment {
        per_record,
        groups: groups.len(),
    }
}

struct Group {
    identity: String,
    members: Vec<usize>,
    strata: BTreeMap<String, usize>,
}

/// Uniform value in [0, 1) from the seed and a group identity.
fn unit_hash(seed: u64, identity: &str) -> f64 {
    let mut h = Sha256::new();
    h.update(seed.to_le_bytes());
    h.update(identity.as_bytes());
    let d = h.finalize();
    let n = u64::from_be_bytes(d[..8].try_into().expect("8 bytes"));
    (n >> 11) as f64 / (1u64 << 53) as f64
}

fn by_threshold(u: f64, ratios: &[f64]) -> usize {
    let mut acc = 0.0;
    for (i, r) in ratios.iter().enumerate() {
        acc += r;
        if u < acc {
            return i;
        }
    }
    ratios.len() - 1
}

/// Largest-remainder quotas: exact counts per split that sum to `n`.
fn quotas(n: usize, ratios: &[f64]) -> Vec<usize> {
    let exact: Vec<f64> = ratios.iter().map(|r| r * n as f64).collect();
    let mut q: Vec<usize> = exact.iter().map(|e| e.floor() as usize).collect();
    let mut rest = n - q.iter().sum::<usize>();
    let mut order: Vec<usize> = (0..ratios.len()).collect();
    order.sort_by(|&a, &b| {
        (exact[b] - exact[b].floor())
            .total_cmp(&(exact[a] - exact[a].floor()))
            .then(a.cmp(&b))
    });
    for i in order {
        if rest == 0 {
            break;
        }
        q[i] += 1;
        rest -= 1;
    }
    q
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params(v: Value) -> SplitParams {
        parse_params(&v).unwrap()
    }

    fn recs(p: &SplitParams, lines: &[Value]) -> Vec<Record> {
        lines
            .iter()
            .map(|v| Record::new(p, v.clone(), v.to_string()))
            .collect()
    }

    #[test]
    fn duplicates_by_id_or_text_share_a_split() {
        let p = params(json!({"ratios": {"a": 0.5, "b": 0.5}, "seed": 3}));
        let mut lines = Vec::new();
        for i in 0..200 {
            lines.push(json!({"id": format!("q{i}"), "question": format!("What is item {i}?")}));
        }
        // Same text as q5 with another id, and same id as q7 with another text.
        lines.push(json!({"id": "dup1", "question": "what is ITEM 5"}));
        lines.push(json!({"id": "q7", "question": "something else"}));
        let r = recs(&p, &lines);
        let a = assign(&p, &r);
        assert_eq!(a.per_record[200], a.per_record[5]);
        assert_eq!(a.per_record[201], a.per_record[7]);
        assert_eq!(a.groups, 200);
    }

    #[test]
    fn adding_records_moves_nothing_without_stratify() {
        let p = params(json!({"ratios": {"train": 0.8, "val": 0.1, "test": 0.1}, "seed": 42}));
        let lines: Vec<Value> = (0..500)
            .map(|i| json!({"id": i, "question": format!("q {i}")}))
            .collect();
        let before = assign(&p, &recs(&p, &lines)).per_record;
        let mut more = lines.clone();
        more.extend((500..700).map(|i| json!({"id": i, "question": format!("q {i}")})));
        let after = assign(&p, &recs(&p, &more)).per_record;
        assert_eq!(before[..], after[..500]);
    }

    #[test]
    fn stratified_quotas_are_exact_per_stratum() {
        let p = params(
            json!({"ratios": {"train": 0.8, "val": 0.1, "test": 0.1}, "stratify": "source", "seed": 1}),
        );
        let lines: Vec<Value> = (0..60)
            .map(|i| json!({"id": i, "question": format!("q{i}"), "source": if i < 30 { "x" } else { "y" }}))
            .collect();
        let r = recs(&p, &lines);
        let a = assign(&p, &r);
        for s in ["x", "y"] {
            let mut c = [0; 3];
            for (rec, &sp) in r.iter().zip(&a.per_record) {
                if rec.stratum == s {
                    c[sp] += 1;
                }
            }
            // BTreeMap order: test, train, val.
            assert_eq!(c, [3, 24, 3], "stratum {s}");
        }
    }

    #[test]
    fn quotas_sum_to_n() {
        assert_eq!(quotas(3, &[0.1, 0.8, 0.1]), vec![0, 3, 0]);
        assert_eq!(quotas(10, &[0.1, 0.8, 0.1]), vec![1, 8, 1]);
        assert_eq!(quotas(7, &[0.5, 0.5]).iter().sum::<usize>(), 7);
    }

    #[test]
    fn normalize_squad_style() {
        assert_eq!(normalize("The  Capital, of France?"), "capital of france");
    }

    #[test]
    fn bad_ratios_are_rejected() {
        let err = SplitStage
            .declare(&json!({"ratios": {"train": 0.8, "val": 0.3}}))
            .unwrap_err();
        assert!(err.message.contains("sum to 1"));
    }
}

//! `pipe report [RUN ...] -o DIR`: one static HTML page for one run or several, the first
//! the baseline: the runs, each run's DAG with every stage's status, time and key, the
//! params and which differ, every stage's metrics side by side with deltas against the
//! baseline, the training curves of all runs overlaid (from each stage's `metrics` JSONL),
//! gate decisions with their reports, failures with their log tails, and every output with
//! a link (small ones are copied next to the page; large ones link into the store).
//!
//! The page is one file with inline CSS and inline SVG (the DAG is drawn here; curves come
//! from `pipe_stages::figure`), no script and nothing fetched, so it opens from `file://`
//! on a machine without network. Elements carry `data-run`, `data-stage`, `data-metric` and
//! `data-curve` attributes so tests (and users' scripts) can find them.
//!
//! The HTML is written by hand: it is one page of tables, and a template engine would add a
//! dependency without removing any of the escaping and layout work done here.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use pipe_stages::figure::Figure;
use serde_json::Value;

use crate::cli::ReportArgs;
use crate::digest::{self, ArtifactInfo, ArtifactKind};
use crate::redact;
use crate::store::{RunRecord, RunStage, StageRecord, StageStatus, Store};

use super::{secs, short, UsageError};

/// Outputs up to this size are copied next to the page; larger ones are linked in the store.
const COPY_LIMIT: u64 = 8 << 20;
/// Log lines shown under a failure.
const LOG_TAIL: usize = 40;

/// The series colours of `pipe_stages::figure` (tab10), so a run has one colour everywhere.
const COLORS: [&str; 6] = [
    "#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b",
];

struct RunView {
    /// The run, with the DAG edges of records written before runs kept them filled in.
    run: RunRecord,
    /// Stages whose edges are unknown (an older run record, and no stage record).
    unknown: BTreeSet<String>,
    /// Short label used in column heads and legends.
    label: String,
    color: &'static str,
    /// Stage → its record, where the store still has it.
    records: BTreeMap<String, StageRecord>,
}

pub fn run(args: &ReportArgs, cache: &Path) -> anyhow::Result<u8> {
    let store = super::open_existing(cache)?;
    let runs = store.runs()?;
    let chosen: Vec<&RunRecord> = if args.runs.is_empty() {
        runs.last().into_iter().collect()
    } else {
        args.runs
            .iter()
            .map(|r| super::find_run(&runs, r))
            .collect::<anyhow::Result<_>>()?
    };
    if chosen.is_empty() {
        return Err(UsageError("the store has no runs yet; `pipe run` one first".into()).into());
    }
    let views = views(&store, &chosen);
    let out = &args.output;
    std::fs::create_dir_all(out)?;
    let mut page = Page {
        store: &store,
        out: out.clone(),
        copied: HashMap::new(),
        html: String::new(),
    };
    page.render(&views)?;
    let index = out.join("index.html");
    pipe_stages::fsio::write_atomic(&index, page.html.as_bytes())?;
    println!(
        "wrote {} ({} run{}, {} stages)",
        index.display(),
        views.len(),
        if views.len() == 1 { "" } else { "s" },
        stage_names(&views).len()
    );
    Ok(crate::exit::OK)
}

fn views(store: &Store, runs: &[&RunRecord]) -> Vec<RunView> {
    let mut names: HashMap<&str, usize> = HashMap::new();
    for r in runs {
        if let Some(n) = &r.name {
            *names.entry(n).or_default() += 1;
        }
    }
    runs.iter()
        .enumerate()
        .map(|(i, r)| {
            let label = match &r.name {
                Some(n) if names[n.as_str()] == 1 => n.clone(),
                _ => r.id.clone(),
            };
            let records: BTreeMap<String, StageRecord> = r
                .stages
                .iter()
                .filter_map(|(name, st)| {
                    let rec = store.record(st.key.as_deref()?).ok().flatten()?;
                    Some((name.clone(), rec))
                })
                .collect();
            let mut run = (*r).clone();
            let mut unknown = BTreeSet::new();
            if run.stages.values().all(|s| s.after.is_empty()) {
                // An older run record: edges from the stage records' inputs where there
                // are records (ordering-only `needs:` were not recorded).
                for (name, st) in run.stages.iter_mut() {
                    if !records.contains_key(name) {
                        unknown.insert(name.clone());
                    }
                    if let Some(rec) = records.get(name) {
                        let mut after: Vec<String> = rec
                            .upstream
                            .values()
                            .filter_map(|r| r.rsplit_once('.').map(|(s, _)| s.to_string()))
                            .collect();
                        after.sort();
                        after.dedup();
                        st.after = after;
                    }
                    if st.kind.is_empty() {
                        st.kind = records
                            .get(name)
                            .map(|r| r.kind.clone())
                            .unwrap_or_default();
                    }
                }
            }
            if run.status == "running" && !alive(&run) {
                run.status = "died".into();
            }
            RunView {
                run,
                unknown,
                label,
                color: COLORS[i % COLORS.len()],
                records,
            }
        })
        .collect()
}

/// Whether the process of a run recorded as running still exists (unknowable for another
/// host: taken as alive).
fn alive(run: &RunRecord) -> bool {
    run.host != crate::store::hostname() || Path::new(&format!("/proc/{}", run.pid)).exists()
}

/// Every stage of every run, in the first run's order, then stages only later runs have.
fn stage_names(views: &[RunView]) -> Vec<String> {
    let mut seen = BTreeSet::new();
    let mut names = Vec::new();
    for v in views {
        for name in v.run.stages.keys() {
            if seen.insert(name.clone()) {
                names.push(name.clone());
            }
        }
    }
    names
}

/// HTML-escapes text.
fn esc(s: &str) -> String {
    let mut o = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => o.push_str("&amp;"),
            '<' => o.push_str("&lt;"),
            '>' => o.push_str("&gt;"),
            '"' => o.push_str("&quot;"),
            '\'' => o.push_str("&#39;"),
            c => o.push(c),
        }
    }
    o
}

/// A metric or param value as a table shows it.
fn show_value(v: &Value) -> String {
    match v {
        Value::Number(n) => match n.as_f64() {
            Some(f) if n.is_f64() => number(f),
            _ => n.to_string(),
        },
        Value::String(s) => s.clone(),
        Value::Null => "null".into(),
        other => other.to_string(),
    }
}

fn number(f: f64) -> String {
    if f == 0.0 {
        return "0".into();
    }
    let a = f.abs();
    if !(1e-4..1e6).contains(&a) {
        return format!("{f:.4e}");
    }
    let s = format!("{f:.5}");
    s.trim_end_matches('0').trim_end_matches('.').to_string()
}

fn signed(f: f64) -> String {
    let s = number(f);
    if f > 0.0 {
        format!("+{s}")
    } else {
        s
    }
}

/// One training curve file: numeric columns against `step`.
fn curves_of(path: &Path) -> BTreeMap<String, Vec<(f64, f64)>> {
    let mut cols: BTreeMap<String, Vec<(f64, f64)>> = BTreeMap::new();
    let text = std::fs::read_to_string(path).unwrap_or_default();
    for s in pipe_stages::scalars::from_jsonl(&text) {
        if s.tag != "tokens_seen" {
            cols.entry(s.tag)
                .or_default()
                .push((s.step as f64, s.value));
        }
    }
    cols.retain(|_, pts| pts.len() >= 2);
    cols
}

/// Curve names in reading order: losses first.
fn curve_rank(name: &str) -> (u8, String) {
    let rank = match name {
        "loss" => 0,
        n if n.contains("eval") && n.contains("loss") => 1,
        n if n.contains("loss") => 2,
        n if n.starts_with("eval") => 3,
        "lr" | "grad_norm" | "tokens_per_s" => 5,
        _ => 4,
    };
    (rank, name.to_string())
}

/// `(run index, points)` of one curve.
type RunCurves = Vec<(usize, Vec<(f64, f64)>)>;

struct Page<'s> {
    store: &'s Store,
    out: PathBuf,
    /// Digest → path relative to the page, of outputs already copied.
    copied: HashMap<String, Option<String>>,
    html: String,
}

impl Page<'_> {
    fn render(&mut self, views: &[RunView]) -> anyhow::Result<()> {
        let pipelines: BTreeSet<&str> = views.iter().map(|v| v.run.pipeline.as_str()).collect();
        let title = format!(
            "pipe report: {} ({})",
            pipelines.into_iter().collect::<Vec<_>>().join(", "),
            views
                .iter()
                .map(|v| v.label.as_str())
                .collect::<Vec<_>>()
                .join(" vs ")
        );
        let h = &mut self.html;
        let _ = write!(
            h,
            "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">\
             <meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\
             <title>{}</title><style>{CSS}</style></head><body>\n<h1>{}</h1>\n",
            esc(&title),
            esc(&title)
        );
        self.runs_table(views);
        self.failures(views);
        self.dags(views);
        self.params(views);
        self.metrics(views);
        self.curves(views)?;
        self.gates(views)?;
        self.outputs(views)?;
        let _ = write!(
            self.html,
            "<footer>written by <code>pipe report</code> at {}</footer>\n</body></html>\n",
            esc(&crate::executor::now_rfc3339())
        );
        Ok(())
    }

    fn runs_table(&mut self, views: &[RunView]) {
        let h = &mut self.html;
        h.push_str("<section id=\"runs\"><h2>Runs</h2><table><thead><tr><th></th><th>run</th><th>id</th><th>pipeline</th><th>profile</th><th>status</th><th>started</th><th>finished</th><th>stages</th><th>commit</th><th>overrides</th></tr></thead><tbody>\n");
        for (i, v) in views.iter().enumerate() {
            let r = &v.run;
            let count = |s: StageStatus| r.stages.values().filter(|x| x.status == s).count();
            let role = if i == 0 && views.len() > 1 {
                " (baseline)"
            } else {
                ""
            };
            let _ = writeln!(
                h,
                "<tr data-run=\"{id}\" class=\"run-{st}\"><td><span class=\"swatch\" style=\"background:{c}\"></span></td>\
                 <td><b>{label}</b>{role}</td><td><code>{id}</code></td><td>{p}</td><td>{prof}</td>\
                 <td class=\"status {st}\">{st}</td><td>{s}</td><td>{f}</td>\
                 <td>{ran} ran · {cached} cached · {failed} failed · {skipped} skipped</td><td><code>{git}</code></td><td>{ov}</td></tr>",
                id = esc(&r.id),
                st = esc(&r.status),
                c = v.color,
                label = esc(&v.label),
                p = esc(&r.pipeline),
                prof = esc(r.profile.as_deref().unwrap_or("-")),
                s = esc(&r.started),
                f = esc(r.finished.as_deref().unwrap_or("-")),
                ran = count(StageStatus::Ran),
                cached = count(StageStatus::Cached),
                failed = count(StageStatus::Failed),
                skipped = count(StageStatus::Skipped),
                git = esc(r.git_commit.as_deref().map(short).unwrap_or("-")),
                ov = esc(&r.overrides.join(" ")),
            );
        }
        h.push_str("</tbody></table></section>\n");
    }

    fn failures(&mut self, views: &[RunView]) {
        let failed: Vec<(&RunView, &String, &RunStage)> = views
            .iter()
            .flat_map(|v| {
                v.run
                    .stages
                    .iter()
                    .filter(|(_, s)| {
                        matches!(s.status, StageStatus::Failed | StageStatus::Cancelled)
                    })
                    .map(move |(n, s)| (v, n, s))
            })
            .collect();
        if failed.is_empty() {
            return;
        }
        let h = &mut self.html;
        h.push_str("<section id=\"failures\"><h2>Failures</h2>\n");
        for (v, name, st) in failed {
            let log = st
                .key
                .as_deref()
                .map(|k| self.store.root().join("logs").join(format!("{k}.log")))
                .and_then(|p| std::fs::read_to_string(p).ok())
                .map(|text| {
                    let lines: Vec<&str> = text.lines().collect();
                    lines[lines.len().saturating_sub(LOG_TAIL)..].join("\n")
                });
            let _ = write!(
                h,
                "<div class=\"failure\" data-run=\"{}\" data-stage=\"{}\"><h3><span class=\"swatch\" style=\"background:{}\"></span>{} · stage <code>{}</code> {}</h3><p class=\"message\">{}</p>",
                esc(&v.run.id),
                esc(name),
                v.color,
                esc(&v.label),
                esc(name),
                st.status.as_str(),
                esc(st.message.as_deref().unwrap_or("(no message recorded)"))
            );
            if let Some(log) = log {
                let _ = write!(
                    h,
                    "<details open><summary>last lines of its log</summary><pre>{}</pre></details>",
                    esc(&log)
                );
            }
            h.push_str("</div>\n");
        }
        h.push_str("</section>\n");
    }

    fn dags(&mut self, views: &[RunView]) {
        let names = stage_names(views);
        let h = &mut self.html;
        h.push_str("<section id=\"dag\"><h2>Stages</h2><div class=\"dags\">\n");
        for v in views {
            let _ = writeln!(
                h,
                "<figure class=\"dag\" data-run=\"{}\"><figcaption><span class=\"swatch\" style=\"background:{}\"></span>{}{}</figcaption>{}</figure>",
                esc(&v.run.id),
                v.color,
                esc(&v.label),
                if v.unknown.is_empty() {
                    String::new()
                } else {
                    " <span class=\"note\">(an older run record: the edges of stages that never ran are not in it)</span>".to_string()
                },
                dag_svg(&v.run, &v.unknown)
            );
        }
        h.push_str("</div>\n<table class=\"stages\"><thead><tr><th>stage</th><th>kind</th>");
        for v in views {
            let _ = write!(h, "<th colspan=\"3\">{}</th>", esc(&v.label));
        }
        h.push_str("</tr><tr><th></th><th></th>");
        for _ in views {
            h.push_str("<th>status</th><th>time</th><th>key</th>");
        }
        h.push_str("</tr></thead><tbody>\n");
        for name in &names {
            let kind = views
                .iter()
                .find_map(|v| {
                    v.run
                        .stages
                        .get(name)
                        .map(|s| s.kind.clone())
                        .filter(|k| !k.is_empty())
                        .or_else(|| v.records.get(name).map(|r| r.kind.clone()))
                })
                .unwrap_or_default();
            let _ = write!(
                h,
                "<tr data-stage=\"{}\"><td><code>{}</code></td><td>{}</td>",
                esc(name),
                esc(name),
                esc(&kind)
            );
            let first_key = views[0].run.stages.get(name).and_then(|s| s.key.clone());
            for (i, v) in views.iter().enumerate() {
                match v.run.stages.get(name) {
                    Some(s) => {
                        let key = s.key.as_deref().unwrap_or("-");
                        let same = i > 0 && s.key.is_some() && s.key == first_key;
                        let _ = write!(
                            h,
                            "<td class=\"status {st}\" data-run=\"{id}\">{st}</td><td class=\"num\">{t}</td><td><code title=\"{key}\">{k}</code>{same}</td>",
                            st = s.status.as_str(),
                            id = esc(&v.run.id),
                            t = secs(s.seconds),
                            key = esc(key),
                            k = esc(short(key)),
                            same = if same { " <span class=\"note\">same</span>" } else { "" },
                        );
                    }
                    None => h.push_str("<td colspan=\"3\" class=\"absent\">not in this run</td>"),
                }
            }
            h.push_str("</tr>\n");
        }
        h.push_str("</tbody></table></section>\n");
    }

    fn params(&mut self, views: &[RunView]) {
        let flat: Vec<BTreeMap<String, Value>> = views
            .iter()
            .map(|v| {
                let mut m = BTreeMap::new();
                pipe_stages::scalars::flatten("", &redact::redacted(&v.run.params), &mut m);
                m
            })
            .collect();
        let keys: BTreeSet<&String> = flat.iter().flat_map(|m| m.keys()).collect();
        let differs = |k: &String| {
            let first = flat[0].get(k);
            flat.iter().any(|m| m.get(k) != first)
        };
        let n_diff = keys.iter().filter(|k| differs(k)).count();
        let h = &mut self.html;
        let _ = write!(
            h,
            "<section id=\"params\"><h2>Params</h2><p>{} param{}{}</p><table><thead><tr><th>param</th>",
            keys.len(),
            if keys.len() == 1 { "" } else { "s" },
            if views.len() > 1 {
                format!(", <b data-differ=\"{n_diff}\">{n_diff} differ</b> (highlighted, listed first)")
            } else {
                String::new()
            }
        );
        for v in views {
            let _ = write!(h, "<th>{}</th>", esc(&v.label));
        }
        h.push_str("</tr></thead><tbody>\n");
        let mut ordered: Vec<&String> = keys.iter().copied().filter(|k| differs(k)).collect();
        ordered.extend(keys.iter().copied().filter(|k| !differs(k)));
        for k in ordered {
            let d = differs(k);
            let _ = write!(
                h,
                "<tr data-param=\"{}\"{}><td><code>{}</code></td>",
                esc(k),
                if d { " class=\"differs\"" } else { "" },
                esc(k)
            );
            for m in &flat {
                let cell = m.get(k).map(show_value).unwrap_or_else(|| "—".into());
                let _ = write!(h, "<td>{}</td>", esc(&cell));
            }
            h.push_str("</tr>\n");
        }
        h.push_str("</tbody></table></section>\n");
    }

    fn metrics(&mut self, views: &[RunView]) {
        let names = stage_names(views);
        let h = &mut self.html;
        h.push_str("<section id=\"metrics\"><h2>Metrics</h2>");
        let mut any = false;
        for stage in &names {
            let metric_names: BTreeSet<&String> = views
                .iter()
                .filter_map(|v| v.records.get(stage))
                .flat_map(|r| r.metrics.keys())
                .collect();
            if metric_names.is_empty() {
                continue;
            }
            any = true;
            let _ = write!(
                h,
                "<h3 id=\"metrics-{0}\"><code>{0}</code></h3><table class=\"metrics\" data-stage=\"{0}\"><thead><tr><th>metric</th>",
                esc(stage)
            );
            for v in views {
                let _ = write!(h, "<th>{}</th>", esc(&v.label));
            }
            for v in &views[1..] {
                let _ = write!(h, "<th>Δ {} − {}</th>", esc(&v.label), esc(&views[0].label));
            }
            h.push_str("</tr></thead><tbody>\n");
            for m in metric_names {
                let _ = write!(
                    h,
                    "<tr data-metric=\"{}\"><td><code>{}</code></td>",
                    esc(m),
                    esc(m)
                );
                let vals: Vec<Option<&Value>> = views
                    .iter()
                    .map(|v| v.records.get(stage).and_then(|r| r.metrics.get(m)))
                    .collect();
                for (v, x) in views.iter().zip(&vals) {
                    let full = x.map(show_value).unwrap_or_else(|| "—".into());
                    // Digests and other long strings: the start, the whole on hover.
                    let shown = if full.chars().count() > 24 {
                        full.chars().take(12).collect::<String>() + "…"
                    } else {
                        full.clone()
                    };
                    let _ = write!(
                        h,
                        "<td class=\"num\" data-run=\"{}\" title=\"{}\">{}</td>",
                        esc(&v.run.id),
                        esc(&full),
                        esc(&shown)
                    );
                }
                let base = vals[0].and_then(Value::as_f64);
                for (v, x) in views[1..].iter().zip(&vals[1..]) {
                    match (base, x.and_then(Value::as_f64)) {
                        (Some(a), Some(b)) => {
                            let d = b - a;
                            let cls = if d > 0.0 {
                                "up"
                            } else if d < 0.0 {
                                "down"
                            } else {
                                "flat"
                            };
                            let _ = write!(
                                h,
                                "<td class=\"num delta {cls}\" data-run=\"{}\" data-delta=\"{d}\">{}</td>",
                                esc(&v.run.id),
                                signed(d)
                            );
                        }
                        _ => h.push_str("<td class=\"num delta\">—</td>"),
                    }
                }
                h.push_str("</tr>\n");
            }
            h.push_str("</tbody></table>\n");
        }
        if !any {
            h.push_str("<p>No stage of these runs reported metrics.</p>");
        }
        h.push_str("</section>\n");
    }

    fn curves(&mut self, views: &[RunView]) -> anyhow::Result<()> {
        // stage → curve → run index → points
        let mut all: BTreeMap<String, BTreeMap<String, RunCurves>> = BTreeMap::new();
        for (i, v) in views.iter().enumerate() {
            for (stage, rec) in &v.records {
                let Some(art) = rec.outputs.get("metrics") else {
                    continue;
                };
                if art.kind != ArtifactKind::File {
                    continue;
                }
                for (name, pts) in curves_of(&self.store.object_path(&art.digest)) {
                    all.entry(stage.clone())
                        .or_default()
                        .entry(name)
                        .or_default()
                        .push((i, pts));
                }
            }
        }
        let order = stage_names(views);
        let h = &mut self.html;
        h.push_str("<section id=\"curves\"><h2>Training curves</h2>\n");
        if all.is_empty() {
            h.push_str(
                "<p>No stage of these runs wrote a step-wise <code>metrics</code> file.</p>",
            );
        }
        for stage in order.iter().filter(|s| all.contains_key(*s)) {
            let curves = &all[stage];
            let _ = write!(
                h,
                "<h3><code>{}</code></h3><div class=\"curves\">",
                esc(stage)
            );
            let mut names: Vec<&String> = curves.keys().collect();
            names.sort_by_key(|n| curve_rank(n));
            for name in names {
                let runs = &curves[name];
                // Figure colours follow the series index; keep each run's own colour by
                // giving runs without this curve an empty series.
                let last = runs.iter().map(|(i, _)| *i).max().unwrap_or(0);
                let series: Vec<(String, Vec<(f64, f64)>)> = (0..=last)
                    .map(|i| {
                        let pts = runs
                            .iter()
                            .find(|(j, _)| *j == i)
                            .map(|(_, p)| p.clone())
                            .unwrap_or_default();
                        (views[i].label.clone(), pts)
                    })
                    .collect();
                let svg = Figure::Lines {
                    title: format!("{stage}: {name}"),
                    x: "optimizer step".into(),
                    y: name.clone(),
                    series,
                }
                .svg()?;
                let ids: Vec<&str> = runs
                    .iter()
                    .map(|(i, _)| views[*i].run.id.as_str())
                    .collect();
                let _ = write!(
                    h,
                    "<figure class=\"curve\" data-curve=\"{}/{}\" data-runs=\"{}\">{}</figure>",
                    esc(stage),
                    esc(name),
                    esc(&ids.join(" ")),
                    strip_xml_prolog(&svg)
                );
            }
            h.push_str("</div>\n");
        }
        h.push_str("</section>\n");
        Ok(())
    }

    fn gates(&mut self, views: &[RunView]) -> anyhow::Result<()> {
        let gated: Vec<(&RunView, &String, &StageRecord)> = views
            .iter()
            .flat_map(|v| {
                v.records
                    .iter()
                    .filter(|(_, r)| r.gate.is_some())
                    .map(move |(n, r)| (v, n, r))
            })
            .collect();
        if gated.is_empty() {
            return Ok(());
        }
        self.html.push_str("<section id=\"gates\"><h2>Gates</h2><table><thead><tr><th>run</th><th>stage</th><th>decision</th><th>why</th><th>report</th></tr></thead><tbody>\n");
        for (v, stage, rec) in gated {
            let gate = rec.gate.as_ref().expect("filtered");
            let decision = format!("{:?}", gate.decision).to_uppercase();
            let (output, inner) = match gate.report.split_once('/') {
                Some((o, rest)) => (o, Some(rest)),
                None => (gate.report.as_str(), None),
            };
            let link = match rec.outputs.get(output) {
                Some(art) => {
                    let href = self.link(art, output)?;
                    let href = match inner {
                        Some(p) if art.kind == ArtifactKind::Dir => format!("{href}/{p}"),
                        _ => href,
                    };
                    format!("<a href=\"{}\">{}</a>", esc(&href), esc(&gate.report))
                }
                None => esc(&gate.report),
            };
            let _ = writeln!(
                self.html,
                "<tr data-run=\"{}\" data-stage=\"{}\"><td>{}</td><td><code>{}</code></td><td class=\"gate {}\">{}</td><td>{}</td><td>{}</td></tr>",
                esc(&v.run.id),
                esc(stage),
                esc(&v.label),
                esc(stage),
                decision.to_lowercase(),
                esc(&decision),
                if gate.reasons.is_empty() {
                    "all thresholds met".to_string()
                } else {
                    gate.reasons.iter().map(|r| esc(r)).collect::<Vec<_>>().join("<br>")
                },
                link
            );
        }
        self.html.push_str("</tbody></table></section>\n");
        Ok(())
    }

    fn outputs(&mut self, views: &[RunView]) -> anyhow::Result<()> {
        self.html
            .push_str("<section id=\"outputs\"><h2>Outputs</h2>\n");
        for v in views {
            let _ = writeln!(
                self.html,
                "<h3><span class=\"swatch\" style=\"background:{}\"></span>{}</h3><table data-run=\"{}\"><thead><tr><th>output</th><th>size</th><th>digest</th></tr></thead><tbody>",
                v.color,
                esc(&v.label),
                esc(&v.run.id)
            );
            let mut images = Vec::new();
            for name in v.run.stages.keys() {
                let Some(rec) = v.records.get(name) else {
                    continue;
                };
                for (out, art) in &rec.outputs {
                    let href = self.link(art, out)?;
                    let size = if art.kind == ArtifactKind::Dir {
                        format!("{} files, {}", art.files, bytes(art.bytes))
                    } else {
                        bytes(art.bytes)
                    };
                    let _ = writeln!(
                        self.html,
                        "<tr><td><a href=\"{}\"><code>{}.{}</code></a></td><td class=\"num\">{}</td><td><code>{}</code></td></tr>",
                        esc(&href),
                        esc(name),
                        esc(out),
                        size,
                        short(&art.digest)
                    );
                    if !href.starts_with("file:") {
                        images.extend(
                            self.pngs(art, &href)
                                .into_iter()
                                .map(|p| (format!("{name}.{out}"), p)),
                        );
                    }
                }
            }
            self.html.push_str("</tbody></table>\n");
            if !images.is_empty() {
                self.html.push_str("<div class=\"gallery\">");
                for (what, src) in images {
                    let _ = write!(
                        self.html,
                        "<figure><a href=\"{0}\"><img src=\"{0}\" alt=\"{1}\" loading=\"lazy\"></a><figcaption>{1}</figcaption></figure>",
                        esc(&src),
                        esc(&what)
                    );
                }
                self.html.push_str("</div>\n");
            }
        }
        self.html.push_str("</section>\n");
        Ok(())
    }

    /// A link to an output: a copy next to the page when small, else its store path.
    fn link(&mut self, art: &ArtifactInfo, name: &str) -> anyhow::Result<String> {
        if let Some(done) = self.copied.get(&art.digest) {
            return Ok(done
                .clone()
                .unwrap_or_else(|| store_url(&self.store.object_path(&art.digest))));
        }
        let rel = if art.bytes <= COPY_LIMIT {
            let file_name = match art.kind {
                ArtifactKind::Dir => name.to_string(),
                ArtifactKind::File => {
                    // Give the copy the extension of its type, so browsers show it.
                    let ext = digest::sniff_extension(&self.store.object_path(&art.digest));
                    format!("{name}.{}", ext.unwrap_or("txt"))
                }
            };
            let rel = format!("artifacts/{}/{}", short(&art.digest), file_name);
            self.store.export(art, &self.out.join(&rel))?;
            Some(rel)
        } else {
            None
        };
        self.copied.insert(art.digest.clone(), rel.clone());
        Ok(rel.unwrap_or_else(|| store_url(&self.store.object_path(&art.digest))))
    }

    /// PNG files of a copied output (the file itself, or those in a directory).
    fn pngs(&self, art: &ArtifactInfo, href: &str) -> Vec<String> {
        let path = self.out.join(href);
        match art.kind {
            ArtifactKind::File => {
                if href.ends_with(".png") {
                    vec![href.to_string()]
                } else {
                    Vec::new()
                }
            }
            ArtifactKind::Dir => digest::files_under(&path)
                .unwrap_or_default()
                .into_iter()
                .filter(|(rel, _)| rel.ends_with(".png"))
                .map(|(rel, _)| format!("{href}/{rel}"))
                .collect(),
        }
    }
}

fn store_url(path: &Path) -> String {
    let abs = std::path::absolute(path).unwrap_or_else(|_| path.to_path_buf());
    format!("file://{}", abs.display())
}

fn bytes(n: u64) -> String {
    match n {
        n if n < 1 << 10 => format!("{n} B"),
        n if n < 1 << 20 => format!("{:.1} KiB", n as f64 / 1024.0),
        n if n < 1 << 30 => format!("{:.1} MiB", n as f64 / (1u64 << 20) as f64),
        n => format!("{:.2} GiB", n as f64 / (1u64 << 30) as f64),
    }
}

fn strip_xml_prolog(svg: &str) -> &str {
    match svg.find("<svg") {
        Some(i) => &svg[i..],
        None => svg,
    }
}

/// The DAG of one run, top to bottom, each node coloured by its status.
fn dag_svg(run: &RunRecord, unknown: &BTreeSet<String>) -> String {
    const W: f64 = 172.0;
    const H: f64 = 44.0;
    const GAP_X: f64 = 20.0;
    const GAP_Y: f64 = 38.0;
    let names: Vec<&String> = run.stages.keys().collect();
    let index: HashMap<&str, usize> = names
        .iter()
        .enumerate()
        .map(|(i, n)| (n.as_str(), i))
        .collect();
    // Depth = longest path from a stage without upstream in this run.
    let mut depth: Vec<Option<usize>> = vec![None; names.len()];
    fn depth_of(
        i: usize,
        run: &RunRecord,
        names: &[&String],
        index: &HashMap<&str, usize>,
        depth: &mut Vec<Option<usize>>,
        guard: usize,
    ) -> usize {
        if let Some(d) = depth[i] {
            return d;
        }
        let mut d = 0;
        if guard < names.len() {
            for up in &run.stages[names[i].as_str()].after {
                if let Some(&j) = index.get(up.as_str()) {
                    d = d.max(1 + depth_of(j, run, names, index, depth, guard + 1));
                }
            }
        }
        depth[i] = Some(d);
        d
    }
    for i in 0..names.len() {
        depth_of(i, run, &names, &index, &mut depth, 0);
    }
    let mut depth: Vec<usize> = depth.into_iter().map(|d| d.unwrap_or(0)).collect();
    // Stages without known edges go below the others, in run order.
    let known_max = (0..names.len())
        .filter(|i| !unknown.contains(names[*i].as_str()))
        .map(|i| depth[i])
        .max();
    for (i, n) in names.iter().enumerate() {
        if unknown.contains(n.as_str()) {
            depth[i] = known_max.map_or(0, |d| d + 1);
        }
    }
    // Rows by depth; a depth with more than MAX_ROW stages wraps onto further rows.
    const MAX_ROW: usize = 5;
    let depths = depth.iter().max().map_or(0, |d| d + 1);
    let mut pos = vec![(0usize, 0usize); names.len()];
    let mut row_len: Vec<usize> = Vec::new();
    for d in 0..depths {
        let members: Vec<usize> = (0..names.len()).filter(|i| depth[*i] == d).collect();
        for chunk in members.chunks(MAX_ROW) {
            let r = row_len.len();
            for (k, &i) in chunk.iter().enumerate() {
                pos[i] = (k, r);
            }
            row_len.push(chunk.len());
        }
    }
    let rows = row_len.len();
    let widest = row_len.iter().copied().max().unwrap_or(1).max(1);
    let width = widest as f64 * (W + GAP_X) + GAP_X;
    let height = rows as f64 * (H + GAP_Y) + GAP_Y - 10.0;
    let xy = |i: usize| -> (f64, f64) {
        let (k, r) = pos[i];
        let offset = (width - row_len[r] as f64 * (W + GAP_X) - GAP_X) / 2.0;
        (
            offset + GAP_X + k as f64 * (W + GAP_X),
            20.0 + r as f64 * (H + GAP_Y),
        )
    };
    let mut s = String::new();
    let _ = write!(
        s,
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{w:.0}\" height=\"{height:.0}\" viewBox=\"0 0 {w:.0} {height:.0}\" role=\"img\" aria-label=\"DAG of {}\">\
         <defs><marker id=\"arrow\" viewBox=\"0 0 10 10\" refX=\"9\" refY=\"5\" markerWidth=\"7\" markerHeight=\"7\" orient=\"auto\"><path d=\"M0,0 L10,5 L0,10 z\" fill=\"#777\"/></marker></defs>",
        esc(&run.id),
        // Room on the right for edges that bend around rows.
        w = width + 30.0,
    );
    for (i, name) in names.iter().enumerate() {
        for up in &run.stages[name.as_str()].after {
            if let Some(&j) = index.get(up.as_str()) {
                let (x0, y0) = xy(j);
                let (x1, y1) = xy(i);
                let (ax, ay) = (x0 + W / 2.0, y0 + H);
                let (bx, by) = (x1 + W / 2.0, y1 - 2.0);
                let span = pos[i].1.saturating_sub(pos[j].1);
                let path = if span <= 1 {
                    let my = (ay + by) / 2.0;
                    format!("M{ax:.1},{ay:.1} C{ax:.1},{my:.1} {bx:.1},{my:.1} {bx:.1},{by:.1}")
                } else {
                    // Past the rows between: down beside them, on the target's side.
                    let between: Vec<f64> = (0..names.len())
                        .filter(|&k| pos[k].1 > pos[j].1 && pos[k].1 < pos[i].1)
                        .map(|k| xy(k).0)
                        .collect();
                    let lo = between.iter().copied().fold(f64::INFINITY, f64::min);
                    let hi = between.iter().copied().fold(f64::NEG_INFINITY, f64::max) + W;
                    let lane = if bx <= ax {
                        (lo - 10.0).min(bx)
                    } else {
                        (hi + 10.0).max(bx)
                    };
                    format!(
                        "M{ax:.1},{ay:.1} C{ax:.1},{c0:.1} {lane:.1},{c0:.1} {lane:.1},{m0:.1} L{lane:.1},{m1:.1} C{lane:.1},{c1:.1} {bx:.1},{c1:.1} {bx:.1},{by:.1}",
                        c0 = ay + GAP_Y * 0.5,
                        m0 = ay + GAP_Y,
                        m1 = by - GAP_Y,
                        c1 = by - GAP_Y * 0.5,
                    )
                };
                let _ = write!(
                    s,
                    "<path class=\"edge\" data-from=\"{}\" data-to=\"{}\" d=\"{path}\" fill=\"none\" stroke=\"#777\" stroke-width=\"1.3\" marker-end=\"url(#arrow)\"/>",
                    esc(up),
                    esc(name)
                );
            }
        }
    }
    for (i, name) in names.iter().enumerate() {
        let st = &run.stages[name.as_str()];
        let (x, y) = xy(i);
        let label: String = if name.chars().count() > 22 {
            name.chars().take(21).collect::<String>() + "…"
        } else {
            name.to_string()
        };
        let _ = write!(
            s,
            "<g class=\"node {st}\" data-stage=\"{n}\"><title>{n} ({kind}): {st}, {t}{key}</title>\
             <rect x=\"{x:.1}\" y=\"{y:.1}\" width=\"{W}\" height=\"{H}\" rx=\"6\"/>\
             <text x=\"{tx:.1}\" y=\"{ty1:.1}\" class=\"name\">{l}</text>\
             <text x=\"{tx:.1}\" y=\"{ty2:.1}\" class=\"sub\">{st} · {t}</text></g>",
            st = st.status.as_str(),
            n = esc(name),
            kind = esc(&st.kind),
            t = secs(st.seconds),
            key = st
                .key
                .as_deref()
                .map(|k| format!(", key {}", short(k)))
                .unwrap_or_default(),
            tx = x + W / 2.0,
            ty1 = y + 18.0,
            ty2 = y + 35.0,
            l = esc(&label),
        );
    }
    s.push_str("</svg>");
    s
}

const CSS: &str = r#"
body{font-family:system-ui,-apple-system,"Segoe UI",Roboto,"DejaVu Sans",sans-serif;margin:24px auto;max-width:1500px;padding:0 20px;color:#1b1b1b;background:#fff}
h1{font-size:22px;margin-bottom:6px}h2{font-size:18px;border-bottom:1px solid #ddd;padding-bottom:4px;margin-top:28px}h3{font-size:15px;margin:16px 0 6px}
table{border-collapse:collapse;font-size:13px;margin:6px 0 12px}th,td{border:1px solid #ddd;padding:3px 8px;text-align:left;vertical-align:top}
th{background:#f4f4f4}td.num{text-align:right;font-variant-numeric:tabular-nums}code{font-family:"DejaVu Sans Mono",monospace;font-size:12px}
.swatch{display:inline-block;width:11px;height:11px;border-radius:2px;margin-right:6px;vertical-align:-1px}
.status.ran{background:#e3f4e3}.status.cached{background:#e6eef9}.status.failed,.status.interrupted{background:#fbe1e1;font-weight:600}
.status.skipped,.status.pending{background:#f1f1f1;color:#777}.status.died{background:#fbe1e1}.status.cancelled{background:#fdf0d8}.status.ok{background:#e3f4e3}.status.running{background:#fdf0d8}
tr.differs td{background:#fff7d6}.delta.up{color:#1a6d1a}.delta.down{color:#a31515}.note{color:#777;font-size:11px}.absent{color:#999}
.dags{display:flex;flex-wrap:wrap;gap:18px}figure{margin:0}figcaption{font-size:13px;font-weight:600;margin-bottom:4px}
svg .node rect{stroke:#555;stroke-width:1;fill:#fff}svg .node.ran rect{fill:#e3f4e3}svg .node.cached rect{fill:#e6eef9}
svg .node.failed rect{fill:#fbe1e1;stroke:#a31515;stroke-width:2}svg .node.skipped rect,svg .node.pending rect{fill:#f3f3f3;stroke-dasharray:4 3}
svg .node.cancelled rect{fill:#fdf0d8}.dag svg text{font-family:"DejaVu Sans",sans-serif;text-anchor:middle}.dag svg .name{font-size:13px;font-weight:600}.dag svg .sub{font-size:11px;fill:#555}
.curves{display:grid;grid-template-columns:repeat(auto-fill,minmax(480px,1fr));gap:12px}.curves svg{width:100%;height:auto;border:1px solid #eee}
.failure{border:1px solid #e3a3a3;background:#fff6f6;padding:8px 12px;margin:8px 0;border-radius:4px}.failure .message{font-family:monospace;white-space:pre-wrap}
pre{background:#f7f7f7;padding:8px;overflow:auto;max-height:420px;font-size:12px}
.gallery{display:grid;grid-template-columns:repeat(auto-fill,minmax(360px,1fr));gap:12px}.gallery img{width:100%;border:1px solid #eee}
.gate.pass{background:#e3f4e3}.gate.review{background:#fdf0d8}.gate.fail{background:#fbe1e1}
footer{margin-top:30px;color:#888;font-size:12px}
"#;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numbers_and_deltas_read_plainly() {
        assert_eq!(number(0.123456789), "0.12346");
        assert_eq!(number(2.0), "2");
        assert_eq!(number(1.5e-7), "1.5000e-7");
        assert_eq!(signed(0.25), "+0.25");
        assert_eq!(signed(-0.25), "-0.25");
        assert_eq!(
            esc("<a href=\"x\">&'"),
            "&lt;a href=&quot;x&quot;&gt;&amp;&#39;"
        );
    }

    #[test]
    fn curves_come_from_step_lines_with_nested_fields_flattened() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("m.jsonl");
        std::fs::write(
            &p,
            "{\"step\":1,\"loss\":2.0,\"tokens_seen\":10}\n{\"step\":2,\"loss\":1.5,\"eval\":{\"acc\":0.5}}\n\
             {\"step\":3,\"loss\":1.0,\"eval\":{\"acc\":0.7}}\nnot json\n{\"final\":true}\n",
        )
        .unwrap();
        let c = curves_of(&p);
        assert_eq!(c["loss"], vec![(1.0, 2.0), (2.0, 1.5), (3.0, 1.0)]);
        assert_eq!(c["eval.acc"], vec![(2.0, 0.5), (3.0, 0.7)]);
        assert!(!c.contains_key("tokens_seen"));
    }

    #[test]
    fn the_dag_puts_each_stage_below_what_it_waits_for() {
        let mut stages = indexmap::IndexMap::new();
        for (name, after) in [("c", vec!["a", "b"]), ("a", vec![]), ("b", vec!["a"])] {
            stages.insert(
                name.to_string(),
                RunStage {
                    key: None,
                    status: StageStatus::Ran,
                    seconds: 1.0,
                    message: None,
                    kind: "run".into(),
                    after: after.into_iter().map(String::from).collect(),
                },
            );
        }
        let run = RunRecord {
            id: "r".into(),
            name: None,
            pipeline: "p".into(),
            file: "p.yaml".into(),
            file_digest: String::new(),
            profile: None,
            params: Value::Null,
            overrides: vec![],
            stages,
            started: String::new(),
            finished: None,
            status: "ok".into(),
            git_commit: None,
            host: String::new(),
            pid: 0,
        };
        let svg = dag_svg(&run, &BTreeSet::new());
        let y_of = |stage: &str| -> f64 {
            let at = svg.find(&format!("data-stage=\"{stage}\"")).unwrap();
            let rect = &svg[at..];
            let y = rect.split("y=\"").nth(1).unwrap();
            y[..y.find('"').unwrap()].parse().unwrap()
        };
        assert!(y_of("a") < y_of("b") && y_of("b") < y_of("c"), "{svg}");
        assert_eq!(svg.matches("class=\"edge\"").count(), 3);
    }
}

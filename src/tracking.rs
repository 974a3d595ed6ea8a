//! Run tracking in MLflow, over its REST API (`/api/2.0/mlflow/...`), the way MLflow's own
//! clients lay a pipeline out: one parent run per `pipe run` (params = the pipeline's
//! resolved params, tags = run id, profile, commit) and one nested run per stage
//! (`mlflow.parentRunId`), whose params are the stage's resolved params, whose step metrics
//! arrive while it trains (batched), and which ends with the stage's final metrics, its
//! figures and reports as artifacts, and FINISHED, FAILED or KILLED. A cached stage gets a
//! run too (tag `pipe.status = cached`) with the step metrics of its stored `metrics` file,
//! so every pipeline run shows every stage.
//!
//! Turned on by `tracking: {mlflow: URI, experiment: NAME}` in the pipeline or
//! `--track mlflow=URI`. The server must answer when the run starts (else the run does not
//! start); after that a tracking failure is a warning and the run goes on: five hours of
//! training are not lost to a tracking server's restart. `MLFLOW_TRACKING_TOKEN` (bearer) or
//! `MLFLOW_TRACKING_USERNAME`/`MLFLOW_TRACKING_PASSWORD` (basic) authenticate; neither, nor
//! credentials in the URI, ever reaches a message, and params named like credentials are
//! masked ([`crate::redact`]).
//!
//! A hand-written client: MLflow has no Rust client, and the half-dozen JSON calls used
//! here are simpler than a generated one.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use base64::Engine as _;
use serde_json::{json, Value};

use crate::digest::{self, ArtifactKind};
use crate::redact;
use crate::store::{RunRecord, StageRecord, StageStatus, Store};

/// Step metrics are sent once this many are waiting, or this long after the last send.
const BATCH: usize = 200;
const BATCH_EVERY: Duration = Duration::from_secs(3);
/// MLflow's limits per `log-batch` call.
const MAX_METRICS: usize = 1000;
const MAX_PARAMS: usize = 100;
const MAX_PARAM_VALUE: usize = 6000;
/// Files uploaded as artifacts: figures and reports, up to this size each.
const ARTIFACT_EXTENSIONS: &[&str] = &["png", "svg", "md", "html"];
const MAX_ARTIFACT: u64 = 16 << 20;

/// Where to track, from the pipeline's `tracking:` or `--track`.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct TrackingConfig {
    /// MLflow tracking server (`http://127.0.0.1:5000`).
    pub mlflow: Option<String>,
    /// MLflow experiment; the pipeline's name when absent.
    pub experiment: Option<String>,
}

struct Client {
    base: String,
    agent: ureq::Agent,
    auth: Option<String>,
    /// Set after the first warning, so a dead server is reported once.
    warned: AtomicBool,
}

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

/// The server as messages show it: without credentials, query or path.
pub fn shown_uri(uri: &str) -> String {
    let (scheme, rest) = uri.split_once("://").unwrap_or(("", uri));
    let host = rest.split(['/', '?']).next().unwrap_or("");
    let host = host.rsplit_once('@').map_or(host, |(_, h)| h);
    if scheme.is_empty() {
        host.to_string()
    } else {
        format!("{scheme}://{host}")
    }
}

impl Client {
    fn new(uri: &str) -> anyhow::Result<Client> {
        if !(uri.starts_with("http://") || uri.starts_with("https://")) {
            anyhow::bail!(
                "MLflow tracking URI `{}`: expected http://HOST:PORT or https://HOST",
                shown_uri(uri)
            );
        }
        let (scheme, rest) = uri.split_once("://").expect("checked");
        let (userinfo, hostpath) = match rest.split_once('@') {
            Some((u, h)) if !u.contains('/') => (Some(u), h),
            _ => (None, rest),
        };
        let base = format!("{scheme}://{}", hostpath.trim_end_matches('/'));
        let env = |k: &str| std::env::var(k).ok().filter(|v| !v.is_empty());
        let basic = |user: &str, pass: &str| {
            format!(
                "Basic {}",
                base64::engine::general_purpose::STANDARD.encode(format!("{user}:{pass}"))
            )
        };
        let auth = if let Some(t) = env("MLFLOW_TRACKING_TOKEN") {
            Some(format!("Bearer {t}"))
        } else if let (Some(u), Some(p)) = (
            env("MLFLOW_TRACKING_USERNAME"),
            env("MLFLOW_TRACKING_PASSWORD"),
        ) {
            Some(basic(&u, &p))
        } else {
            userinfo.and_then(|ui| ui.split_once(':').map(|(u, p)| basic(u, p)))
        };
        let agent = ureq::AgentBuilder::new()
            .timeout_connect(Duration::from_secs(10))
            .timeout(Duration::from_secs(120))
            .build();
        Ok(Client {
            base,
            agent,
            auth,
            warned: AtomicBool::new(false),
        })
    }

    fn request(&self, method: &str, path: &str) -> ureq::Request {
        let r = self.agent.request(method, &format!("{}{path}", self.base));
        match &self.auth {
            Some(a) => r.set("Authorization", a),
            None => r,
        }
    }

    /// A JSON call; an HTTP error becomes MLflow's own message.
    fn call(&self, method: &str, path: &str, body: Option<&Value>) -> anyhow::Result<Value> {
        let req = self.request(method, path);
        let resp = match body {
            Some(b) => req
                .set("Content-Type", "application/json")
                .send_string(&b.to_string()),
            None => req.call(),
        };
        match resp {
            Ok(r) => {
                let text = r.into_string()?;
                Ok(if text.trim().is_empty() {
                    json!({})
                } else {
                    serde_json::from_str(&text)?
                })
            }
            Err(ureq::Error::Status(code, r)) => {
                let text = r.into_string().unwrap_or_default();
                let msg = serde_json::from_str::<Value>(&text)
                    .ok()
                    .and_then(|v| v["message"].as_str().map(str::to_owned))
                    .unwrap_or(text);
                anyhow::bail!("{} {path}: HTTP {code}: {msg}", shown_uri(&self.base))
            }
            Err(e) => anyhow::bail!("{} {path}: {e}", shown_uri(&self.base)),
        }
    }

    fn post(&self, path: &str, body: Value) -> anyhow::Result<Value> {
        self.call("POST", &format!("/api/2.0/mlflow/{path}"), Some(&body))
    }

    fn warn(&self, what: &str, e: &anyhow::Error) {
        if !self.warned.swap(true, Ordering::Relaxed) {
            eprintln!("warning: MLflow: {what}: {e:#} (the run goes on; later tracking errors are logged at -v)");
        } else {
            tracing::warn!("MLflow: {what}: {e:#}");
        }
    }

    fn create_run(
        &self,
        experiment: &str,
        name: &str,
        tags: &[(&str, String)],
    ) -> anyhow::Result<String> {
        let tags: Vec<Value> = tags
            .iter()
            .map(|(k, v)| json!({"key": k, "value": v}))
            .collect();
        let r = self.post(
            "runs/create",
            json!({"experiment_id": experiment, "run_name": name, "start_time": now_ms(), "tags": tags}),
        )?;
        r["run"]["info"]["run_id"]
            .as_str()
            .map(str::to_owned)
            .ok_or_else(|| anyhow::anyhow!("runs/create answered without a run id: {r}"))
    }

    fn log_params(&self, run: &str, params: &Value) -> anyhow::Result<()> {
        let mut flat = BTreeMap::new();
        pipe_stages::scalars::flatten("", &redact::redacted(params), &mut flat);
        let items: Vec<Value> = flat
            .into_iter()
            .filter(|(k, _)| !k.is_empty())
            .map(|(k, v)| {
                let mut s = match v {
                    Value::String(s) => s,
                    other => other.to_string(),
                };
                if s.len() > MAX_PARAM_VALUE {
                    let mut cut = MAX_PARAM_VALUE - 3;
                    while !s.is_char_boundary(cut) {
                        cut -= 1;
                    }
                    s.truncate(cut);
                    s.push_str("...");
                }
                json!({"key": k, "value": s})
            })
            .collect();
        for chunk in items.chunks(MAX_PARAMS) {
            self.post("runs/log-batch", json!({"run_id": run, "params": chunk}))?;
        }
        Ok(())
    }

    fn log_metrics(&self, run: &str, metrics: &[Value]) -> anyhow::Result<()> {
        for chunk in metrics.chunks(MAX_METRICS) {
            self.post("runs/log-batch", json!({"run_id": run, "metrics": chunk}))?;
        }
        Ok(())
    }

    fn set_tags(&self, run: &str, tags: &[(&str, String)]) -> anyhow::Result<()> {
        let tags: Vec<Value> = tags
            .iter()
            .map(|(k, v)| json!({"key": k, "value": v}))
            .collect();
        self.post("runs/log-batch", json!({"run_id": run, "tags": tags}))?;
        Ok(())
    }

    fn end(&self, run: &str, status: &str) -> anyhow::Result<()> {
        self.post(
            "runs/update",
            json!({"run_id": run, "status": status, "end_time": now_ms()}),
        )?;
        Ok(())
    }

    /// Uploads one file through the server's artifact proxy (`mlflow server`'s default).
    fn upload(&self, artifact_uri: &str, rel: &str, path: &Path) -> anyhow::Result<()> {
        let Some(root) = artifact_uri.strip_prefix("mlflow-artifacts:") else {
            anyhow::bail!(
                "artifact store `{artifact_uri}` is not served by the tracking server (start it with --serve-artifacts)"
            );
        };
        let root = root.trim_start_matches('/');
        let url = format!("/api/2.0/mlflow-artifacts/artifacts/{root}/{rel}");
        let bytes = std::fs::read(path)?;
        match self.request("PUT", &url).send_bytes(&bytes) {
            Ok(_) => Ok(()),
            Err(ureq::Error::Status(code, r)) => anyhow::bail!(
                "uploading {rel}: HTTP {code}: {}",
                r.into_string().unwrap_or_default()
            ),
            Err(e) => anyhow::bail!("uploading {rel}: {e}"),
        }
    }

    fn artifact_uri(&self, run: &str) -> anyhow::Result<String> {
        let r = self.call(
            "GET",
            &format!("/api/2.0/mlflow/runs/get?run_id={run}"),
            None,
        )?;
        r["run"]["info"]["artifact_uri"]
            .as_str()
            .map(str::to_owned)
            .ok_or_else(|| anyhow::anyhow!("runs/get answered without an artifact_uri"))
    }
}

/// The tracking of one `pipe run`: its parent run in MLflow.
pub struct Tracker {
    client: Arc<Client>,
    experiment: String,
    parent: String,
    run_id: String,
}

impl Tracker {
    /// Connects, finds or creates the experiment, and opens the parent run.
    pub fn start(config: &TrackingConfig, run: &RunRecord) -> anyhow::Result<Option<Arc<Tracker>>> {
        let Some(uri) = &config.mlflow else {
            return Ok(None);
        };
        let client = Client::new(uri)?;
        let name = config
            .experiment
            .clone()
            .unwrap_or_else(|| run.pipeline.clone());
        let found = client.call(
            "GET",
            &format!(
                "/api/2.0/mlflow/experiments/get-by-name?experiment_name={}",
                urlencode(&name)
            ),
            None,
        );
        let experiment = match found {
            Ok(v) => v["experiment"]["experiment_id"].as_str().map(str::to_owned),
            Err(e) if e.to_string().contains("HTTP 404") => None,
            Err(e) => {
                return Err(e.context(format!(
                    "cannot reach the MLflow server at {} (tracking is on: `tracking:` or --track)",
                    shown_uri(uri)
                )))
            }
        };
        let experiment = match experiment {
            Some(id) => id,
            None => client.post("experiments/create", json!({"name": name}))?["experiment_id"]
                .as_str()
                .map(str::to_owned)
                .ok_or_else(|| anyhow::anyhow!("experiments/create answered without an id"))?,
        };
        let mut tags = vec![
            ("pipe.run_id", run.id.clone()),
            ("pipe.pipeline", run.pipeline.clone()),
            ("mlflow.source.name", run.file.clone()),
            ("mlflow.source.type", "LOCAL".to_string()),
        ];
        if let Some(p) = &run.profile {
            tags.push(("pipe.profile", p.clone()));
        }
        if let Some(c) = &run.git_commit {
            tags.push(("mlflow.source.git.commit", c.clone()));
        }
        if !run.overrides.is_empty() {
            tags.push(("pipe.overrides", run.overrides.join(" ")));
        }
        let label = run.name.clone().unwrap_or_else(|| run.id.clone());
        let parent = client.create_run(&experiment, &label, &tags)?;
        client.log_params(&parent, &run.params)?;
        Ok(Some(Arc::new(Tracker {
            client: Arc::new(client),
            experiment,
            parent,
            run_id: run.id.clone(),
        })))
    }

    /// The MLflow id of the parent run.
    pub fn parent_id(&self) -> &str {
        &self.parent
    }

    /// Opens the nested run of a stage about to run.
    pub fn stage(
        &self,
        stage: &str,
        kind: &str,
        key: &str,
        params: &Value,
    ) -> Option<Arc<StageTrack>> {
        let open = || -> anyhow::Result<String> {
            let id = self.client.create_run(
                &self.experiment,
                stage,
                &[
                    ("mlflow.parentRunId", self.parent.clone()),
                    ("pipe.run_id", self.run_id.clone()),
                    ("pipe.stage", stage.to_string()),
                    ("pipe.kind", kind.to_string()),
                    ("pipe.key", key.to_string()),
                ],
            )?;
            self.client.log_params(&id, params)?;
            Ok(id)
        };
        match open() {
            Ok(run) => Some(Arc::new(StageTrack {
                client: self.client.clone(),
                run,
                pending: Mutex::new((Vec::new(), Instant::now())),
                steps: Mutex::new(BTreeMap::new()),
            })),
            Err(e) => {
                self.client
                    .warn(&format!("opening the run of `{stage}`"), &e);
                None
            }
        }
    }

    /// A stage found in the store: a run with its params, stored step metrics and results.
    pub fn cached(&self, stage: &str, params: &Value, rec: &StageRecord, store: &Store) {
        let Some(track) = self.stage(stage, &rec.kind, &rec.key, params) else {
            return;
        };
        if let Some(art) = rec
            .outputs
            .get("metrics")
            .filter(|a| a.kind == ArtifactKind::File)
        {
            let text = std::fs::read_to_string(store.object_path(&art.digest)).unwrap_or_default();
            for s in pipe_stages::scalars::from_jsonl(&text) {
                track.scalars(s.step, &[(&s.tag, s.value)]);
            }
        }
        track.finish(StageStatus::Cached, Some(rec), store);
    }

    /// Ends the parent run with the pipeline run's status.
    pub fn finish(&self, status: &str) {
        let st = match status {
            "ok" => "FINISHED",
            "interrupted" => "KILLED",
            _ => "FAILED",
        };
        let r = self
            .client
            .set_tags(&self.parent, &[("pipe.status", status.to_string())])
            .and_then(|_| self.client.end(&self.parent, st));
        if let Err(e) = r {
            self.client.warn("closing the pipeline's run", &e);
        }
    }
}

/// The MLflow run of one stage attempt.
pub struct StageTrack {
    client: Arc<Client>,
    run: String,
    /// Metrics waiting to be sent, and when the last batch went.
    pending: Mutex<(Vec<Value>, Instant)>,
    /// Tag → last step logged, to name final metrics that collide with a curve.
    steps: Mutex<BTreeMap<String, u64>>,
}

impl StageTrack {
    /// The MLflow run id.
    pub fn run_id(&self) -> &str {
        &self.run
    }

    /// One step's scalars; sent in batches.
    pub fn scalars(&self, step: u64, values: &[(&str, f64)]) {
        let ts = now_ms();
        let send = {
            let Ok(mut p) = self.pending.lock() else {
                return;
            };
            if let Ok(mut seen) = self.steps.lock() {
                for (k, _) in values {
                    seen.insert(k.to_string(), step);
                }
            }
            for (k, v) in values {
                if v.is_finite() {
                    p.0.push(json!({"key": k, "value": v, "timestamp": ts, "step": step}));
                }
            }
            if p.0.len() >= BATCH || p.1.elapsed() >= BATCH_EVERY {
                p.1 = Instant::now();
                std::mem::take(&mut p.0)
            } else {
                Vec::new()
            }
        };
        if !send.is_empty() {
            if let Err(e) = self.client.log_metrics(&self.run, &send) {
                self.client.warn("logging step metrics", &e);
            }
        }
    }

    fn flush(&self) -> anyhow::Result<()> {
        let send = match self.pending.lock() {
            Ok(mut p) => std::mem::take(&mut p.0),
            Err(_) => Vec::new(),
        };
        self.client.log_metrics(&self.run, &send)
    }

    /// Sends what is pending, the final metrics and figures (when there is a record), and
    /// ends the run.
    pub fn finish(&self, status: StageStatus, rec: Option<&StageRecord>, store: &Store) {
        let result = (|| -> anyhow::Result<()> {
            self.flush()?;
            if let Some(rec) = rec {
                let seen = self.steps.lock().map(|s| s.clone()).unwrap_or_default();
                let last = seen.values().copied().max().unwrap_or(0);
                let ts = now_ms();
                let finals: Vec<Value> = rec
                    .metrics
                    .iter()
                    .filter_map(|(k, v)| {
                        let x = v.as_f64().filter(|x| x.is_finite())?;
                        // A final value named like a curve would join the curve.
                        let name = if seen.contains_key(k) {
                            format!("{k}_final")
                        } else {
                            k.clone()
                        };
                        Some(json!({"key": name, "value": x, "timestamp": ts, "step": last}))
                    })
                    .collect();
                self.client.log_metrics(&self.run, &finals)?;
                self.upload_outputs(rec, store)?;
            }
            self.client
                .set_tags(&self.run, &[("pipe.status", status.as_str().to_string())])?;
            let st = match status {
                StageStatus::Ran | StageStatus::Cached => "FINISHED",
                StageStatus::Cancelled => "KILLED",
                _ => "FAILED",
            };
            self.client.end(&self.run, st)
        })();
        if let Err(e) = result {
            self.client.warn("finishing a stage's run", &e);
        }
    }

    fn upload_outputs(&self, rec: &StageRecord, store: &Store) -> anyhow::Result<()> {
        let mut files = Vec::new();
        for (name, art) in &rec.outputs {
            let root = store.object_path(&art.digest);
            match art.kind {
                ArtifactKind::File => {
                    // A file output's object has no extension: sniff the figures.
                    if let Some(ext) =
                        digest::sniff_extension(&root).filter(|e| ["png", "svg"].contains(e))
                    {
                        files.push((format!("{name}.{ext}"), root));
                    }
                }
                ArtifactKind::Dir => {
                    for (rel, p) in digest::files_under(&root)? {
                        let ext = rel.rsplit_once('.').map_or("", |(_, e)| e);
                        if ARTIFACT_EXTENSIONS.contains(&ext) {
                            files.push((format!("{name}/{rel}"), p));
                        }
                    }
                }
            }
        }
        files.retain(|(_, p)| std::fs::metadata(p).is_ok_and(|m| m.len() <= MAX_ARTIFACT));
        if files.is_empty() {
            return Ok(());
        }
        let uri = self.client.artifact_uri(&self.run)?;
        for (rel, path) in files {
            self.client.upload(&uri, &rel, &path)?;
        }
        Ok(())
    }
}

fn urlencode(s: &str) -> String {
    let mut o = String::new();
    for b in s.bytes() {
        match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                o.push(b as char)
            }
            _ => o.push_str(&format!("%{b:02X}")),
        }
    }
    o
}

/// `--track BACKEND=URI` flags over the pipeline's `tracking:`.
pub fn with_flags(mut config: TrackingConfig, flags: &[String]) -> Result<TrackingConfig, String> {
    for f in flags {
        match f.split_once('=') {
            Some(("mlflow", uri)) if !uri.is_empty() => config.mlflow = Some(uri.to_string()),
            Some(("experiment", name)) if !name.is_empty() => {
                config.experiment = Some(name.to_string())
            }
            _ => {
                return Err(format!(
                    "`--track {}`: expected `mlflow=URI` (or `experiment=NAME`)",
                    shown_uri(f)
                ))
            }
        }
    }
    Ok(config)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shown_uris_carry_no_credentials() {
        assert_eq!(
            shown_uri("https://alice:s3cret@mlflow.example:8443/path?token=x"),
            "https://mlflow.example:8443"
        );
        assert_eq!(shown_uri("http://127.0.0.1:5000/"), "http://127.0.0.1:5000");
        let e =
            with_flags(TrackingConfig::default(), &["wandb=https://u:pw@h".into()]).unwrap_err();
        assert!(!e.contains("pw"), "{e}");
        let c = with_flags(
            TrackingConfig {
                mlflow: Some("http://a".into()),
                experiment: None,
            },
            &["mlflow=http://b".into(), "experiment=x".into()],
        )
        .unwrap();
        assert_eq!(c.mlflow.as_deref(), Some("http://b"));
        assert_eq!(c.experiment.as_deref(), Some("x"));
    }

    #[test]
    fn a_uri_without_a_scheme_is_refused_plainly() {
        let e = Client::new("localhost:5000").err().unwrap().to_string();
        assert!(e.contains("expected http://HOST:PORT"), "{e}");
        assert!(urlencode("a b/c") == "a%20b%2Fc");
    }
}

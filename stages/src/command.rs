//! The `run:` form: a shell command with declared workspace `deps:` and `outs:`, DVC-style.
//!
//! The command runs with `sh -c` in the pipeline's workdir. It sees its inputs as
//! `PIPE_INPUT_<NAME>` variables, a durable `PIPE_CHECKPOINT_DIR` for resumable work, and
//! `PIPE_STAGE`. Declared outs are deleted before it runs (so a stale file can never pass
//! for a fresh one) and must exist when it exits 0.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Read};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use serde::Deserialize;
use serde_json::Value;

use crate::contract::{
    Outcome, OutputDecl, OutputLocation, Signature, Stage, StageContext, StageError,
};
use crate::params::{parse_params, ParamError};

/// The kind name that the `run:` form of a stage maps to.
pub const KIND: &str = "command";

/// Parameters of a `run:` stage, as written at the stage's top level.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct CommandParams {
    run: String,
    #[serde(default)]
    deps: Vec<String>,
    #[serde(default)]
    outs: Outs,
    #[serde(default)]
    env: BTreeMap<String, String>,
}

/// `outs:` as a list of paths (named after the file stem) or a map name → path.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum Outs {
    List(Vec<String>),
    Map(BTreeMap<String, String>),
}

impl Default for Outs {
    fn default() -> Self {
        Outs::List(Vec::new())
    }
}

impl Outs {
    fn named(&self) -> Result<Vec<(String, String)>, ParamError> {
        match self {
            Outs::Map(map) => Ok(map.iter().map(|(k, v)| (k.clone(), v.clone())).collect()),
            Outs::List(paths) => {
                let mut seen: BTreeMap<String, &str> = BTreeMap::new();
                let mut named = Vec::new();
                for (i, path) in paths.iter().enumerate() {
                    let trimmed = path.trim_end_matches('/');
                    let file = Path::new(trimmed)
                        .file_name()
                        .and_then(|s| s.to_str())
                        .unwrap_or(trimmed);
                    let name = file.split('.').next().unwrap_or(file).to_owned();
                    if let Some(other) = seen.insert(name.clone(), path) {
                        let idx = i.to_string();
                        return Err(ParamError::new(
                            &["outs", &idx],
                            format!(
                                "outs `{other}` and `{path}` would both be named `{name}`; \
                                 write `outs:` as a map of name: path"
                            ),
                        ));
                    }
                    named.push((name, path.clone()));
                }
                Ok(named)
            }
        }
    }
}

/// Runs a shell command.
pub struct CommandStage;

impl Stage for CommandStage {
    fn kind(&self) -> &'static str {
        KIND
    }

    fn version(&self) -> u32 {
        1
    }

    fn summary(&self) -> &'static str {
        "a shell command with declared deps and outs (the `run:` form)"
    }

    fn declare(&self, params: &Value) -> Result<Signature, ParamError> {
        let p: CommandParams = parse_params(params)?;
        if p.run.trim().is_empty() {
            return Err(ParamError::new(&["run"], "the command is empty"));
        }
        for (i, dep) in p.deps.iter().enumerate() {
            check_relative(dep, &["deps", &i.to_string()])?;
        }
        let outputs = p
            .outs
            .named()?
            .into_iter()
            .map(|(name, path)| {
                check_relative(&path, &["outs", &name])?;
                Ok(OutputDecl {
                    name,
                    location: OutputLocation::Workspace(path),
                })
            })
            .collect::<Result<Vec<_>, ParamError>>()?;
        Ok(Signature {
            inputs: Vec::new(),
            any_inputs: true,
            deps: p.deps,
            outputs,
        })
    }

    fn run(&self, ctx: &StageContext) -> Result<Outcome, StageError> {
        let p: CommandParams = parse_params(&ctx.params)?;
        for (_, path) in p.outs.named()? {
            let full = ctx.workdir.join(&path);
            if full.is_dir() {
                std::fs::remove_dir_all(&full)
                    .map_err(StageError::io(format!("removing stale out `{path}`")))?;
            } else if full.exists() {
                std::fs::remove_file(&full)
                    .map_err(StageError::io(format!("removing stale out `{path}`")))?;
            }
            if let Some(parent) = full.parent() {
                std::fs::create_dir_all(parent)
                    .map_err(StageError::io(format!("creating parent of `{path}`")))?;
            }
        }
        let mut cmd = Command::new("sh");
        cmd.arg("-c")
            .arg(&p.run)
            .current_dir(&ctx.workdir)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .env("PIPE_STAGE", &ctx.stage)
            .env("PIPE_CHECKPOINT_DIR", &ctx.checkpoint_dir)
            .env("PIPE_OUT_DIR", &ctx.out_dir);
        if let Some(v) = ctx.cuda_visible_devices() {
            // The GPUs the engine gave this stage, and only those.
            cmd.env("CUDA_VISIBLE_DEVICES", v);
        }
        for (name, path) in &ctx.inputs {
            cmd.env(format!("PIPE_INPUT_{}", env_name(name)), path);
        }
        cmd.envs(&p.env);
        die_with_parent(&mut cmd);
        let mut child = cmd.spawn().map_err(StageError::io("starting `sh -c`"))?;
        let readers = [
            child.stdout.take().map(|s| forward_lines(s, ctx, "")),
            child.stderr.take().map(|s| forward_lines(s, ctx, "")),
        ];
        let status = wait_or_cancel(&mut child, ctx)?;
        for r in readers.into_iter().flatten() {
            let _ = r.join();
        }
        if !status.success() {
            return Err(StageError::Failed(format!(
                "command exited with {status}: {}",
                p.run
            )));
        }
        for (name, path) in p.outs.named()? {
            if !ctx.workdir.join(&path).exists() {
                return Err(StageError::Failed(format!(
                    "command succeeded but did not write out `{name}` at `{path}`"
                )));
            }
        }
        Ok(Outcome::default())
    }
}

fn check_relative(path: &str, at: &[&str]) -> Result<(), ParamError> {
    let p = Path::new(path);
    if path.is_empty()
        || p.is_absolute()
        || p.components().any(|c| c == std::path::Component::ParentDir)
    {
        return Err(ParamError::new(
            at,
            format!("`{path}` must be a relative path inside the workdir (no `..`, not absolute)"),
        ));
    }
    Ok(())
}

/// `split.train` → `SPLIT_TRAIN`.
fn env_name(name: &str) -> String {
    name.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() {
                c.to_ascii_uppercase()
            } else {
                '_'
            }
        })
        .collect()
}

fn forward_lines(
    stream: impl Read + Send + 'static,
    ctx: &StageContext,
    prefix: &'static str,
) -> thread::JoinHandle<()> {
    let reporter = ctx.reporter.clone();
    thread::spawn(move || {
        for line in BufReader::new(stream).lines() {
            match line {
                Ok(line) => reporter.log(&format!("{prefix}{line}")),
                Err(_) => break,
            }
        }
    })
}

fn wait_or_cancel(
    child: &mut Child,
    ctx: &StageContext,
) -> Result<std::process::ExitStatus, StageError> {
    let mut cancelled_at: Option<Instant> = None;
    loop {
        if let Some(status) = child
            .try_wait()
            .map_err(StageError::io("waiting for the command"))?
        {
            return if cancelled_at.is_some() {
                Err(StageError::Cancelled)
            } else {
                Ok(status)
            };
        }
        if ctx.cancel.is_cancelled() {
            match cancelled_at {
                None => {
                    signal_group(child.id(), libc::SIGTERM);
                    cancelled_at = Some(Instant::now());
                }
                Some(t) if t.elapsed() > Duration::from_secs(5) => {
                    signal_group(child.id(), libc::SIGKILL);
                }
                Some(_) => {}
            }
        }
        thread::sleep(Duration::from_millis(20));
    }
}

/// Puts the command in its own process group (so a cancel reaches everything it started)
/// and asks the kernel to kill it if pipe itself dies, so a `kill -9` of pipe never leaves
/// a command writing into outs behind the next run's back.
#[allow(unsafe_code)]
fn die_with_parent(cmd: &mut Command) {
    use std::os::unix::process::CommandExt;
    cmd.process_group(0);
    #[cfg(target_os = "linux")]
    // SAFETY: prctl is async-signal-safe and touches only the child's own state.
    unsafe {
        cmd.pre_exec(|| {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
}

#[allow(unsafe_code)]
fn signal_group(pid: u32, signal: i32) {
    // SAFETY: kill(2) with a negative pid signals the process group we created for the child.
    unsafe {
        libc::kill(-(pid as i32), signal);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn list_outs_are_named_by_stem() {
        let sig = CommandStage
            .declare(&json!({"run": "x", "outs": ["data/train.jsonl", "model/"]}))
            .unwrap();
        let names: Vec<_> = sig.outputs.iter().map(|o| o.name.as_str()).collect();
        assert_eq!(names, ["train", "model"]);
    }

    #[test]
    fn clashing_out_names_are_rejected() {
        let err = CommandStage
            .declare(&json!({"run": "x", "outs": ["a/x.txt", "b/x.json"]}))
            .unwrap_err();
        assert!(err.message.contains("both be named `x`"), "{}", err.message);
    }

    #[test]
    fn escaping_paths_are_rejected() {
        let err = CommandStage
            .declare(&json!({"run": "x", "deps": ["../secret"]}))
            .unwrap_err();
        assert_eq!(err.path, ["deps", "0"]);
    }
}

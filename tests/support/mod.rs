//! The `Project` builder: a temp directory with files, and the real `pipe` binary run in it.
#![allow(dead_code)]

pub mod fake_openai;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

pub struct Project {
    dir: tempfile::TempDir,
}

pub struct Output {
    pub code: i32,
    pub stdout: String,
    pub stderr: String,
}

impl Output {
    /// Status column of the end-of-run table for `stage`.
    pub fn status_of(&self, stage: &str) -> Option<String> {
        self.stdout
            .lines()
            .find(|l| l.split_whitespace().next() == Some(stage))
            .and_then(|l| l.split_whitespace().nth(1).map(str::to_owned))
    }
}

impl Project {
    pub fn new() -> Self {
        Project {
            dir: tempfile::tempdir().expect("tempdir"),
        }
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    pub fn file(&self, rel: &str, content: &str) -> &Self {
        let p = self.dir.path().join(rel);
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(p, content).unwrap();
        self
    }

    pub fn read(&self, rel: &str) -> String {
        std::fs::read_to_string(self.dir.path().join(rel))
            .unwrap_or_else(|e| panic!("reading {rel}: {e}"))
    }

    pub fn command(&self, args: &[&str]) -> Command {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_pipe"));
        cmd.args(args)
            .current_dir(self.dir.path())
            .env_remove("PIPE_CACHE")
            .env_remove("PIPE_LOG")
            .env_remove("CUDA_VISIBLE_DEVICES");
        cmd
    }

    pub fn pipe(&self, args: &[&str]) -> Output {
        let out = self.command(args).output().expect("run pipe");
        Output {
            code: out.status.code().unwrap_or(-1),
            stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        }
    }

    /// Runs and asserts success.
    pub fn ok(&self, args: &[&str]) -> Output {
        let out = self.pipe(args);
        assert_eq!(
            out.code, 0,
            "pipe {args:?} failed\nstdout:\n{}\nstderr:\n{}",
            out.stdout, out.stderr
        );
        out
    }

    pub fn spawn(&self, args: &[&str]) -> Child {
        self.command(args)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn pipe")
    }

    pub fn join(&self, rel: &str) -> PathBuf {
        self.dir.path().join(rel)
    }
}

/// Deterministic pseudo-random numbers for the kill loops.
pub struct Lcg(pub u64);

impl Lcg {
    pub fn next_f64(&mut self) -> f64 {
        self.0 = self
            .0
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (self.0 >> 11) as f64 / (1u64 << 53) as f64
    }
}

/// `n` SFT examples `{"prompt": "i+1=", "response": "i+1"}`, one per line.
pub fn qa_lines(n: usize) -> String {
    (0..n)
        .map(|i| format!("{{\"prompt\": \"{i}+1=\", \"response\": \"{}\"}}\n", i + 1))
        .collect()
}

/// Starts `cmd` (a `pipe serve ... --port 0`) with stdout piped and returns it with the
/// base URL it printed (`http://127.0.0.1:PORT/v1`).
pub fn start_serve(mut cmd: Command) -> (Child, String) {
    use std::io::BufRead;
    let mut child = cmd
        .stdout(Stdio::piped())
        .spawn()
        .expect("start pipe serve");
    let mut line = String::new();
    std::io::BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let url = line
        .trim()
        .strip_prefix("listening on ")
        .unwrap_or_else(|| panic!("pipe serve said {line:?}"))
        .to_string();
    (child, url)
}

impl Project {
    /// `pipe serve --port 0 ARGS` in this project, stderr discarded.
    pub fn serve(&self, args: &[&str]) -> (Child, String) {
        let mut all = vec!["serve", "--port", "0"];
        all.extend(args);
        let mut cmd = self.command(&all);
        cmd.stderr(Stdio::null());
        start_serve(cmd)
    }
}

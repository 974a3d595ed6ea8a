//! The command line (clap derive); doc comments are the help text.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand, ValueEnum};

/// Content-hashed, cached, resumable pipelines for LLM fine-tuning.
#[derive(Debug, Parser)]
#[command(name = "pipe", version, about, long_about = None)]
pub struct Cli {
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
    /// Store directory.
    #[arg(long, global = true, env = "PIPE_CACHE", default_value = "cache")]
    pub cache: PathBuf,
    /// More output: -v shows stage logs and info, -vv debug and fingerprint documents.
    #[arg(short, long, global = true, action = clap::ArgAction::Count)]
    pub verbose: u8,
}

/// Subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run a pipeline: what is cached is reused, the rest runs (resuming from checkpoints).
    Run(RunArgs),
    /// Validate a pipeline without running anything.
    Check(PipelineArgs),
    /// Per stage: cached, or will run and why.
    Status(StatusArgs),
    /// Print the stage graph.
    Dag(DagArgs),
    /// Show a stage's last record: params, inputs, outputs, metrics, log.
    Show(ShowArgs),
    /// List past runs.
    Runs(RunsArgs),
    /// Compare two runs: keys, params, metrics and records of JSONL outputs.
    Diff(DiffArgs),
    /// Write a static HTML page comparing runs: DAG, params, metrics with deltas, curves.
    Report(ReportArgs),
    /// Copy a stage output out of the store.
    Export(ExportArgs),
    /// Rehash every object in the store and quarantine corrupt ones.
    Verify(VerifyArgs),
    /// Delete what recent and named runs do not reference.
    Gc(GcArgs),
    /// Serve a model (plus an optional LoRA adapter) behind an OpenAI-compatible API
    /// (`/v1/chat/completions`, `/v1/models`); concurrent requests are batched.
    Serve(ServeArgs),
}

/// `pipe serve`.
#[derive(Debug, Args)]
pub struct ServeArgs {
    /// The model: `gguf:PATH`, `hf:ORG/NAME`, a folder, or `tiny:ARCH[:SEED]`.
    pub model: String,
    /// A PEFT adapter folder (e.g. an `sft` stage's `adapter` output).
    #[arg(long)]
    pub adapter: Option<PathBuf>,
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1")]
    pub host: String,
    /// Port (0 picks a free one; the address is printed).
    #[arg(long, default_value_t = 8000)]
    pub port: u16,
    /// Sequences decoded together at most (continuous batching: new requests join the
    /// running batch between decoding steps).
    #[arg(long, default_value_t = 16)]
    pub max_batch: usize,
    /// MiB of recent prompts' keys and values kept, so that a prompt starting like one of
    /// them (a shared system prompt, an oracle's rubric) runs only the rest (0: none).
    #[arg(long, default_value_t = 256)]
    pub prefix_cache_mb: usize,
    /// Name reported by `/v1/models` (default: the model argument).
    #[arg(long)]
    pub name: Option<String>,
    /// `auto`, `cpu`, `cuda`, `cuda:N`.
    #[arg(long, default_value = "auto")]
    pub device: String,
    /// `auto`, `f32`, `bf16`, `f16`.
    #[arg(long, default_value = "auto")]
    pub dtype: String,
    /// Decode with the float weights instead of Q8_0 copies.
    #[arg(long)]
    pub no_quantize: bool,
    /// Require `Authorization: Bearer KEY` on every request (read from the environment
    /// variable `PIPE_SERVE_API_KEY` rather than the command line, which others can see).
    #[arg(long, env = "PIPE_SERVE_API_KEY", hide_env_values = true)]
    pub api_key: Option<String>,
}

/// A pipeline file and how to load it.
#[derive(Debug, Args)]
pub struct PipelineArgs {
    /// The pipeline YAML file.
    pub file: PathBuf,
    /// Apply a profile defined in the file (`profiles:`).
    #[arg(long)]
    pub profile: Option<String>,
    /// Merge a YAML file of params over `params:` (repeatable).
    #[arg(short = 'p', long = "params", value_name = "FILE")]
    pub param_files: Vec<PathBuf>,
    /// Override a param (`seed=7`) or a stage field (`sft.with.lr=3e-5`); repeatable.
    #[arg(long = "set", value_name = "PATH=VALUE")]
    pub sets: Vec<String>,
}

/// Which stages.
#[derive(Debug, Args, Default)]
pub struct SelectArgs {
    /// Only these stages (comma-separated; a foreach base name selects all its expansions).
    #[arg(long, value_delimiter = ',')]
    pub only: Vec<String>,
    /// These stages and everything downstream.
    #[arg(long, value_delimiter = ',')]
    pub from: Vec<String>,
    /// These stages and everything upstream.
    #[arg(long, value_delimiter = ',')]
    pub until: Vec<String>,
}

/// `pipe run`.
#[derive(Debug, Args)]
pub struct RunArgs {
    /// The pipeline.
    #[command(flatten)]
    pub pipeline: PipelineArgs,
    /// The stages.
    #[command(flatten)]
    pub select: SelectArgs,
    /// Stages running at once (default: the number of CPUs).
    #[arg(short, long)]
    pub jobs: Option<usize>,
    /// Units of a resource this machine offers (`gpu=2`); repeatable. GPUs are detected.
    #[arg(long = "resource", value_name = "NAME=N")]
    pub resources: Vec<String>,
    /// A name for this run, usable with `pipe diff` and kept by `pipe gc`.
    #[arg(long)]
    pub name: Option<String>,
    /// No progress bars.
    #[arg(long)]
    pub no_progress: bool,
    /// Let stages downstream of these gates run although the gate decided REVIEW
    /// (comma-separated stage names; a FAIL is never accepted).
    #[arg(long, value_delimiter = ',', value_name = "GATE")]
    pub accept: Vec<String>,
    /// Track the run in MLflow: `--track mlflow=http://HOST:PORT` (and optionally
    /// `--track experiment=NAME`); over the pipeline's `tracking:`.
    #[arg(long = "track", value_name = "BACKEND=URI")]
    pub track: Vec<String>,
}

/// `pipe status`.
#[derive(Debug, Args)]
pub struct StatusArgs {
    /// The pipeline.
    #[command(flatten)]
    pub pipeline: PipelineArgs,
    /// Machine-readable output.
    #[arg(long)]
    pub json: bool,
}

/// Graph formats.
#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum DagFormat {
    /// Indented text.
    Text,
    /// Graphviz.
    Dot,
    /// Mermaid flowchart.
    Mermaid,
}

/// `pipe dag`.
#[derive(Debug, Args)]
pub struct DagArgs {
    /// The pipeline.
    #[command(flatten)]
    pub pipeline: PipelineArgs,
    /// Output format.
    #[arg(long, value_enum, default_value = "text")]
    pub format: DagFormat,
}

/// `pipe show`.
#[derive(Debug, Args)]
pub struct ShowArgs {
    /// Stage name.
    pub stage: String,
    /// Pipeline name, when several pipelines have a stage of that name.
    #[arg(long)]
    pub pipeline: Option<String>,
    /// Machine-readable output.
    #[arg(long)]
    pub json: bool,
}

/// `pipe runs`.
#[derive(Debug, Args)]
pub struct RunsArgs {
    /// Show at most this many (newest).
    #[arg(short = 'n', long, default_value_t = 20)]
    pub limit: usize,
    /// Machine-readable output.
    #[arg(long)]
    pub json: bool,
}

/// `pipe diff`.
#[derive(Debug, Args)]
pub struct DiffArgs {
    /// Older run (id, id prefix or name); with one argument, the run to compare with the one before it.
    pub a: Option<String>,
    /// Newer run.
    pub b: Option<String>,
    /// Field that identifies a record in JSONL outputs.
    #[arg(long, default_value = "id")]
    pub id_field: String,
    /// Examples shown per kind of record change.
    #[arg(long, default_value_t = 3)]
    pub examples: usize,
    /// Machine-readable output.
    #[arg(long)]
    pub json: bool,
}

/// `pipe report`.
#[derive(Debug, Args)]
pub struct ReportArgs {
    /// Runs (ids, id prefixes or names); the first is the baseline of the deltas. None: the
    /// latest run.
    pub runs: Vec<String>,
    /// Folder to write `index.html` (and copies of small outputs) into.
    #[arg(short = 'o', long = "output", default_value = "report")]
    pub output: PathBuf,
}

/// `pipe export`.
#[derive(Debug, Args)]
pub struct ExportArgs {
    /// `STAGE.OUTPUT`.
    pub output: String,
    /// Destination path.
    pub path: PathBuf,
    /// Pipeline name, when several pipelines have a stage of that name.
    #[arg(long)]
    pub pipeline: Option<String>,
}

/// `pipe verify`.
#[derive(Debug, Args)]
pub struct VerifyArgs {
    /// Machine-readable output.
    #[arg(long)]
    pub json: bool,
}

/// `pipe gc`.
#[derive(Debug, Args)]
pub struct GcArgs {
    /// Keep what the newest N runs reference (named runs are always kept).
    #[arg(long, default_value_t = 10)]
    pub keep_last: usize,
    /// Also delete checkpoints of unfinished stages.
    #[arg(long)]
    pub checkpoints: bool,
    /// Also delete the memo directories (oracle replies and generations cached per item,
    /// shared across fingerprints); the next run asks the oracle again.
    #[arg(long)]
    pub memo: bool,
    /// Say what would be deleted, delete nothing.
    #[arg(long)]
    pub dry_run: bool,
}

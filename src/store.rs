//! The content-addressed store (default `./cache`).
//!
//! ```text
//! objects/ab/cdef…      artifacts by digest: files, or directory trees (read-only files)
//! records/ab/cdef….json one stage record per fingerprint key
//! runs/ID.json          one record per `pipe run`
//! refs/PIPELINE/STAGE   the key a stage last completed with (for "why" and `pipe show`)
//! checkpoints/KEY/      durable scratch space of a stage that has not finished yet
//! locks/KEY.lock        flock per key: one computation of a key at a time, across processes
//! tmp/KEY-PID-N/        outputs being written; swept once their process is gone
//! logs/KEY.log          log of the last failed attempt at a key
//! quarantine/           objects that failed `pipe verify`
//! statcache             digests of workspace files by stat
//! ```
//!
//! Crash safety: objects appear only by rename of complete, fsynced data, and a record is
//! written (atomically) only after every object it names; so no crash can leave a record
//! pointing at missing or partial data. A lost race to create an object simply deletes
//! the loser's copy, since both are the same bytes.

use std::collections::BTreeMap;
use std::fs::{self, File};
use std::io::{self, Write};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use pipe_stages::fsio::{self, RemoveOnDrop};
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::digest::{self, ArtifactInfo, ArtifactKind};

static TMP_COUNTER: AtomicU64 = AtomicU64::new(0);

/// A stage's result, stored under its fingerprint key.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct StageRecord {
    /// The fingerprint key.
    pub key: String,
    /// The stage's name when it was computed.
    pub stage: String,
    /// The pipeline's name.
    pub pipeline: String,
    /// Stage kind.
    pub kind: String,
    /// Input name → `stage.output` it was bound to (not part of the key; for `pipe diff`).
    #[serde(default)]
    pub upstream: BTreeMap<String, String>,
    /// The fingerprint document (explains the key).
    pub fingerprint: Value,
    /// Output name → artifact.
    pub outputs: BTreeMap<String, ArtifactInfo>,
    /// Metrics reported by the stage.
    #[serde(default)]
    pub metrics: BTreeMap<String, Value>,
    /// A gate stage's decision (re-applied on every cache hit).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gate: Option<pipe_stages::Gate>,
    /// Digest of the log object.
    #[serde(default)]
    pub log: Option<String>,
    /// RFC 3339 start time.
    pub started: String,
    /// Wall seconds the stage ran.
    pub seconds: f64,
    /// Host that computed it.
    #[serde(default)]
    pub host: String,
}

/// How a stage ended within one run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum StageStatus {
    /// Computed in this run.
    Ran,
    /// Found in the store.
    Cached,
    /// Failed.
    Failed,
    /// Not run because something upstream failed or was missing.
    Skipped,
    /// Interrupted; checkpoints kept.
    Cancelled,
    /// Not reached yet (the run is in progress or was killed).
    Pending,
}

impl StageStatus {
    /// Lowercase name.
    pub fn as_str(self) -> &'static str {
        match self {
            StageStatus::Ran => "ran",
            StageStatus::Cached => "cached",
            StageStatus::Failed => "failed",
            StageStatus::Skipped => "skipped",
            StageStatus::Cancelled => "cancelled",
            StageStatus::Pending => "pending",
        }
    }
}

/// One stage's line in a run record.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RunStage {
    /// Its fingerprint key, when it got that far.
    pub key: Option<String>,
    /// How it ended.
    pub status: StageStatus,
    /// Wall seconds in this run (including cache checks).
    pub seconds: f64,
    /// Error message for failed or skipped stages.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
    /// The stage kind (`sft`, `run`…), for pages drawn without the pipeline file.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub kind: String,
    /// The stages it waits for (data and `needs:`), so the DAG can be drawn from the record.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub after: Vec<String>,
}

/// A record of one `pipe run`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RunRecord {
    /// Unique id (`20261122-143005-1a2b`).
    pub id: String,
    /// `--name`.
    pub name: Option<String>,
    /// The pipeline's name.
    pub pipeline: String,
    /// The pipeline file as given.
    pub file: String,
    /// sha256 of the pipeline file.
    pub file_digest: String,
    /// `--profile`.
    pub profile: Option<String>,
    /// Resolved pipeline params.
    pub params: Value,
    /// `-p` files and `--set` overrides, in order.
    pub overrides: Vec<String>,
    /// Stage name → result, in pipeline order.
    pub stages: indexmap::IndexMap<String, RunStage>,
    /// RFC 3339 start.
    pub started: String,
    /// RFC 3339 end, once finished.
    pub finished: Option<String>,
    /// `running`, `ok`, `failed` or `interrupted`.
    pub status: String,
    /// `git rev-parse HEAD` of the workdir's repository, when there is one.
    pub git_commit: Option<String>,
    /// Host and process that ran it.
    pub host: String,
    /// Process id.
    pub pid: u32,
}

/// Errors from the store, with the path involved.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// An I/O error.
    #[error("store: {what} `{}`: {source}", path.display())]
    Io {
        /// What was being done.
        what: &'static str,
        /// The path.
        path: PathBuf,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// A record that does not parse.
    #[error("store: corrupt record `{}`: {message}; run `pipe verify`", path.display())]
    Corrupt {
        /// The record.
        path: PathBuf,
        /// Why.
        message: String,
    },
}

fn io_err<'a>(what: &'static str, path: &'a Path) -> impl FnOnce(io::Error) -> StoreError + 'a {
    move |source| StoreError::Io {
        what,
        path: path.to_path_buf(),
        source,
    }
}

/// The store at a root directory.
#[derive(Debug, Clone)]
pub struct Store {
    root: PathBuf,
}

impl Store {
    /// Opens (and creates) the store at `root`.
    pub fn open(root: &Path) -> Result<Store, StoreError> {
        for sub in [
            "objects",
            "records",
            "runs",
            "refs",
            "checkpoints",
            "locks",
            "tmp",
            "logs",
        ] {
            let p = root.join(sub);
            fs::create_dir_all(&p).map_err(io_err("creating", &p))?;
        }
        Ok(Store {
            root: root.to_path_buf(),
        })
    }

    /// Opens the store only if it exists (for read-only commands).
    pub fn open_existing(root: &Path) -> Option<Store> {
        root.join("records").is_dir().then(|| Store {
            root: root.to_path_buf(),
        })
    }

    /// The root directory.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Where an object with this digest lives.
    pub fn object_path(&self, digest: &str) -> PathBuf {
        self.root
            .join("objects")
            .join(&digest[..2])
            .join(&digest[2..])
    }

    fn record_path(&self, key: &str) -> PathBuf {
        self.root
            .join("records")
            .join(&key[..2])
            .join(format!("{}.json", &key[2..]))
    }

    /// The stage record for `key`, if one exists.
    pub fn record(&self, key: &str) -> Result<Option<StageRecord>, StoreError> {
        let path = self.record_path(key);
        match fs::read(&path) {
            Ok(bytes) => {
                serde_json::from_slice(&bytes)
                    .map(Some)
                    .map_err(|e| StoreError::Corrupt {
                        path,
                        message: e.to_string(),
                    })
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(StoreError::Io {
                what: "reading",
                path,
                source: e,
            }),
        }
    }

    /// The record for `key` if it exists and every object it names is present: the
    /// definition of a cache hit.
    pub fn complete_record(&self, key: &str) -> Result<Option<StageRecord>, StoreError> {
        let Some(rec) = self.record(key)? else {
            return Ok(None);
        };
        let present = rec
            .outputs
            .values()
            .all(|a| self.object_path(&a.digest).exists())
            && rec
                .log
                .as_ref()
                .is_none_or(|d| self.object_path(d).exists());
        Ok(present.then_some(rec))
    }

    /// Writes a stage record atomically (after its objects).
    pub fn write_record(&self, rec: &StageRecord) -> Result<(), StoreError> {
        let path = self.record_path(&rec.key);
        fsio::write_json_atomic(&path, rec).map_err(io_err("writing", &path))
    }

    /// Every stage record key in the store.
    pub fn record_keys(&self) -> Result<Vec<String>, StoreError> {
        let mut keys = Vec::new();
        let dir = self.root.join("records");
        for prefix in read_dir_names(&dir)? {
            for name in read_dir_names(&dir.join(&prefix))? {
                if let Some(rest) = name.strip_suffix(".json") {
                    keys.push(format!("{prefix}{rest}"));
                }
            }
        }
        Ok(keys)
    }

    /// Removes a stage record.
    pub fn remove_record(&self, key: &str) -> Result<(), StoreError> {
        let path = self.record_path(key);
        match fs::remove_file(&path) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => Err(StoreError::Io {
                what: "removing",
                path,
                source: e,
            }),
            _ => Ok(()),
        }
    }

    /// A fresh temporary directory for a stage attempt; removed when the guard drops.
    pub fn tmp_dir(&self, key: &str) -> Result<TmpDir, StoreError> {
        let n = TMP_COUNTER.fetch_add(1, Ordering::Relaxed);
        let path = self
            .root
            .join("tmp")
            .join(format!("{}-{}-{n}", &key[..12], std::process::id()));
        fs::create_dir_all(path.join("out")).map_err(io_err("creating", &path))?;
        Ok(TmpDir {
            guard: Some(RemoveOnDrop::new(path.clone())),
            path,
        })
    }

    /// Removes temporary directories left by processes that no longer exist.
    pub fn sweep_tmp(&self) -> Result<usize, StoreError> {
        let dir = self.root.join("tmp");
        let mut removed = 0;
        for name in read_dir_names(&dir)? {
            let pid = name.split('-').nth(1).and_then(|p| p.parse::<u32>().ok());
            if let Some(pid) = pid {
                if pid != std::process::id() && !process_alive(pid) {
                    let p = dir.join(&name);
                    make_writable(&p);
                    let _ = fs::remove_dir_all(&p);
                    removed += 1;
                }
            }
        }
        Ok(removed)
    }

    /// The durable checkpoint directory of `key` (created).
    pub fn checkpoint_dir(&self, key: &str) -> Result<PathBuf, StoreError> {
        let p = self.root.join("checkpoints").join(key);
        fs::create_dir_all(&p).map_err(io_err("creating", &p))?;
        Ok(p)
    }

    /// Root of the memo directories stages share across fingerprints.
    pub fn memo_root(&self) -> PathBuf {
        self.root.join("memo")
    }

    /// Whether `key` has a checkpoint with something in it.
    pub fn has_checkpoint(&self, key: &str) -> bool {
        fs::read_dir(self.root.join("checkpoints").join(key))
            .map(|mut d| d.next().is_some())
            .unwrap_or(false)
    }

    /// Drops the checkpoint of a finished key.
    pub fn remove_checkpoint(&self, key: &str) {
        let p = self.root.join("checkpoints").join(key);
        make_writable(&p);
        let _ = fs::remove_dir_all(p);
    }

    /// Moves a finished file or directory into the objects, returning its identity. Files
    /// become read-only so that a stage reading an input cannot change the store.
    pub fn put_move(&self, src: &Path) -> Result<ArtifactInfo, StoreError> {
        let info = digest::hash_path(src, None).map_err(io_err("hashing", src))?;
        let dest = self.object_path(&info.digest);
        if dest.exists() {
            make_writable(src);
            let _ = if info.kind == ArtifactKind::Dir {
                fs::remove_dir_all(src)
            } else {
                fs::remove_file(src)
            };
            return Ok(info);
        }
        make_read_only(src);
        sync_tree(src, info.kind).map_err(io_err("syncing", src))?;
        let parent = dest.parent().expect("object paths have a parent");
        fs::create_dir_all(parent).map_err(io_err("creating", parent))?;
        match fs::rename(src, &dest) {
            Ok(()) => {}
            // Another process stored the same bytes first.
            Err(_) if dest.exists() => {
                make_writable(src);
                let _ = if info.kind == ArtifactKind::Dir {
                    fs::remove_dir_all(src)
                } else {
                    fs::remove_file(src)
                };
            }
            Err(e) => {
                return Err(StoreError::Io {
                    what: "storing",
                    path: dest,
                    source: e,
                })
            }
        }
        fsio::sync_dir(parent).map_err(io_err("syncing", parent))?;
        Ok(info)
    }

    /// Copies a workspace file or directory into the objects.
    pub fn put_copy(&self, src: &Path, scratch: &Path) -> Result<ArtifactInfo, StoreError> {
        let n = TMP_COUNTER.fetch_add(1, Ordering::Relaxed);
        let staged = scratch.join(format!("copy-{n}"));
        copy_tree(src, &staged).map_err(io_err("copying", src))?;
        self.put_move(&staged)
    }

    /// Stores bytes (a log) as an object.
    pub fn put_bytes(&self, bytes: &[u8], scratch: &Path) -> Result<ArtifactInfo, StoreError> {
        let n = TMP_COUNTER.fetch_add(1, Ordering::Relaxed);
        let staged = scratch.join(format!("bytes-{n}"));
        fs::write(&staged, bytes).map_err(io_err("writing", &staged))?;
        self.put_move(&staged)
    }

    /// Copies an object out to `dest` (writable), replacing what is there atomically.
    pub fn export(&self, artifact: &ArtifactInfo, dest: &Path) -> Result<(), StoreError> {
        let src = self.object_path(&artifact.digest);
        if let Some(parent) = dest.parent().filter(|p| !p.as_os_str().is_empty()) {
            fs::create_dir_all(parent).map_err(io_err("creating", parent))?;
        }
        let tmp = fsio::temp_path_for(dest);
        let guard = RemoveOnDrop::new(tmp.clone());
        copy_tree(&src, &tmp).map_err(io_err("copying", &src))?;
        make_writable(&tmp);
        if dest.is_dir() {
            fs::remove_dir_all(dest).map_err(io_err("replacing", dest))?;
        } else if dest.exists() {
            fs::remove_file(dest).map_err(io_err("replacing", dest))?;
        }
        fs::rename(&tmp, dest).map_err(io_err("writing", dest))?;
        guard.disarm();
        Ok(())
    }

    /// Runs a record.
    pub fn write_run(&self, run: &RunRecord) -> Result<(), StoreError> {
        let path = self.root.join("runs").join(format!("{}.json", run.id));
        fsio::write_json_atomic(&path, run).map_err(io_err("writing", &path))
    }

    /// All run records, oldest first.
    pub fn runs(&self) -> Result<Vec<RunRecord>, StoreError> {
        let dir = self.root.join("runs");
        let mut runs = Vec::new();
        for name in read_dir_names(&dir)? {
            if !name.ends_with(".json") {
                continue;
            }
            let path = dir.join(&name);
            let bytes = fs::read(&path).map_err(io_err("reading", &path))?;
            let run: RunRecord =
                serde_json::from_slice(&bytes).map_err(|e| StoreError::Corrupt {
                    path: path.clone(),
                    message: e.to_string(),
                })?;
            runs.push(run);
        }
        runs.sort_by(|a, b| a.started.cmp(&b.started).then(a.id.cmp(&b.id)));
        Ok(runs)
    }

    /// Deletes a run record.
    pub fn remove_run(&self, id: &str) -> Result<(), StoreError> {
        let path = self.root.join("runs").join(format!("{id}.json"));
        fs::remove_file(&path).map_err(io_err("removing", &path))
    }

    fn ref_path(&self, pipeline: &str, stage: &str) -> PathBuf {
        self.root
            .join("refs")
            .join(pipeline)
            .join(stage.replace('/', "_"))
    }

    /// The key `stage` of `pipeline` last completed with.
    pub fn ref_key(&self, pipeline: &str, stage: &str) -> Option<String> {
        fs::read_to_string(self.ref_path(pipeline, stage))
            .ok()
            .map(|s| s.trim().to_owned())
            .filter(|s| s.len() == 64)
    }

    /// Points `stage`'s ref at `key`.
    pub fn set_ref(&self, pipeline: &str, stage: &str, key: &str) -> Result<(), StoreError> {
        if self.ref_key(pipeline, stage).as_deref() == Some(key) {
            return Ok(());
        }
        let path = self.ref_path(pipeline, stage);
        fsio::write_atomic(&path, format!("{key}\n").as_bytes()).map_err(io_err("writing", &path))
    }

    /// Every ref: (pipeline, stage, key).
    pub fn refs(&self) -> Result<Vec<(String, String, String)>, StoreError> {
        let dir = self.root.join("refs");
        let mut out = Vec::new();
        for pipeline in read_dir_names(&dir)? {
            for stage in read_dir_names(&dir.join(&pipeline))? {
                if let Some(key) = self.ref_key(&pipeline, &stage) {
                    out.push((pipeline.clone(), stage, key));
                }
            }
        }
        Ok(out)
    }

    /// Saves the log of a failed attempt where the user can read it.
    pub fn save_failed_log(&self, key: &str, log: &[u8]) -> PathBuf {
        let path = self.root.join("logs").join(format!("{key}.log"));
        let _ = fsio::write_atomic(&path, log);
        path
    }

    /// Path of the per-key lock file.
    pub fn lock_path(&self, key: &str) -> PathBuf {
        self.root.join("locks").join(format!("{key}.lock"))
    }

    /// Every object digest in the store.
    pub fn object_digests(&self) -> Result<Vec<String>, StoreError> {
        let dir = self.root.join("objects");
        let mut out = Vec::new();
        for prefix in read_dir_names(&dir)? {
            for rest in read_dir_names(&dir.join(&prefix))? {
                if rest.len() == 62 && !rest.starts_with('.') {
                    out.push(format!("{prefix}{rest}"));
                }
            }
        }
        Ok(out)
    }

    /// Moves a corrupt object aside so the next run recomputes what needs it.
    pub fn quarantine(&self, digest: &str) -> Result<PathBuf, StoreError> {
        let dir = self.root.join("quarantine");
        fs::create_dir_all(&dir).map_err(io_err("creating", &dir))?;
        let dest = dir.join(digest);
        let src = self.object_path(digest);
        fs::rename(&src, &dest).map_err(io_err("quarantining", &src))?;
        Ok(dest)
    }

    /// Deletes an object.
    pub fn remove_object(&self, digest: &str) -> Result<u64, StoreError> {
        let p = self.object_path(digest);
        let bytes = digest::hash_path(&p, None).map(|i| i.bytes).unwrap_or(0);
        make_writable(&p);
        let r = if p.is_dir() {
            fs::remove_dir_all(&p)
        } else {
            fs::remove_file(&p)
        };
        r.map_err(io_err("removing", &p))?;
        Ok(bytes)
    }

    /// Holds the store's shared lock for the duration of a run; `pipe gc` takes it
    /// exclusively, so it never deletes objects a live run is about to reference.
    pub fn run_lock(&self, exclusive: bool) -> io::Result<Option<File>> {
        let path = self.root.join("locks").join("store.lock");
        let file = open_lock_file(&path)?;
        let got = if exclusive {
            file.try_lock()
        } else {
            file.try_lock_shared()
        };
        match got {
            Ok(()) => Ok(Some(file)),
            Err(fs::TryLockError::WouldBlock) => {
                if exclusive {
                    Ok(None)
                } else {
                    file.lock_shared()?;
                    Ok(Some(file))
                }
            }
            Err(fs::TryLockError::Error(e)) => Err(e),
        }
    }

    /// Checkpoint directories present, by key.
    pub fn checkpoint_keys(&self) -> Vec<String> {
        read_dir_names(&self.root.join("checkpoints")).unwrap_or_default()
    }
}

/// A stage attempt's scratch directory: `out/` for outputs, plus room for the log.
pub struct TmpDir {
    path: PathBuf,
    guard: Option<RemoveOnDrop>,
}

impl TmpDir {
    /// The directory.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Where outputs go.
    pub fn out(&self) -> PathBuf {
        self.path.join("out")
    }
}

impl Drop for TmpDir {
    fn drop(&mut self) {
        make_writable(&self.path);
        drop(self.guard.take());
    }
}

fn read_dir_names(dir: &Path) -> Result<Vec<String>, StoreError> {
    match fs::read_dir(dir) {
        Ok(entries) => {
            let mut names: Vec<String> = entries
                .filter_map(|e| e.ok())
                .filter_map(|e| e.file_name().into_string().ok())
                .collect();
            names.sort();
            Ok(names)
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(Vec::new()),
        Err(e) => Err(StoreError::Io {
            what: "listing",
            path: dir.to_path_buf(),
            source: e,
        }),
    }
}

fn process_alive(pid: u32) -> bool {
    Path::new("/proc").join(pid.to_string()).exists()
}

fn walk(path: &Path, f: &mut dyn FnMut(&Path, &fs::Metadata)) {
    let Ok(meta) = fs::symlink_metadata(path) else {
        return;
    };
    f(path, &meta);
    if meta.is_dir() {
        if let Ok(entries) = fs::read_dir(path) {
            for e in entries.flatten() {
                walk(&e.path(), f);
            }
        }
    }
}

fn make_read_only(path: &Path) {
    walk(path, &mut |p, m| {
        if m.is_file() {
            let mode = m.permissions().mode() & !0o222;
            let _ = fs::set_permissions(p, fs::Permissions::from_mode(mode));
        }
    });
}

fn make_writable(path: &Path) {
    walk(path, &mut |p, m| {
        if !m.file_type().is_symlink() {
            let mode = m.permissions().mode() | 0o200;
            let _ = fs::set_permissions(p, fs::Permissions::from_mode(mode));
        }
    });
}

/// Makes a tree durable before it is renamed into the store: one fsync for a file, one
/// `syncfs` for a directory of any size.
fn sync_tree(path: &Path, kind: ArtifactKind) -> io::Result<()> {
    match kind {
        ArtifactKind::File => File::open(path)?.sync_all(),
        ArtifactKind::Dir => syncfs(path),
    }
}

#[allow(unsafe_code)]
fn syncfs(path: &Path) -> io::Result<()> {
    use std::os::fd::AsRawFd;
    let f = File::open(path)?;
    // SAFETY: syncfs only reads the descriptor, which lives until the end of this function.
    let r = unsafe { libc::syncfs(f.as_raw_fd()) };
    if r == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Copies a file or a directory tree.
pub fn copy_tree(src: &Path, dest: &Path) -> io::Result<()> {
    let meta = fs::metadata(src)?;
    if meta.is_dir() {
        fs::create_dir_all(dest)?;
        for entry in fs::read_dir(src)? {
            let entry = entry?;
            copy_tree(&entry.path(), &dest.join(entry.file_name()))?;
        }
        Ok(())
    } else {
        fs::copy(src, dest)?;
        Ok(())
    }
}

/// Holds the lock of one key; released on drop (and by the kernel if the process dies, so
/// a lock can never outlive its holder).
pub struct KeyLock {
    _file: File,
}

/// Who holds a lock, as written into the lock file.
pub fn lock_holder(path: &Path) -> String {
    fs::read_to_string(path)
        .map(|s| s.trim().to_owned())
        .unwrap_or_default()
}

impl KeyLock {
    /// Takes the lock, calling `waiting` once (with the holder's description) if another
    /// process has it, then blocking until it is released.
    pub fn acquire(path: &Path, waiting: &mut dyn FnMut(&str)) -> io::Result<KeyLock> {
        let file = open_lock_file(path)?;
        match file.try_lock() {
            Ok(()) => {}
            Err(fs::TryLockError::WouldBlock) => {
                waiting(&lock_holder(path));
                file.lock()?;
            }
            Err(fs::TryLockError::Error(e)) => return Err(e),
        }
        let mut f = &file;
        let holder = format!("pid {} on {}", std::process::id(), hostname());
        f.set_len(0)?;
        f.write_all(holder.as_bytes())?;
        Ok(KeyLock { _file: file })
    }
}

/// Opens (creating) a lock file without truncating what its holder wrote.
fn open_lock_file(path: &Path) -> io::Result<File> {
    fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(path)
}

/// This machine's host name.
pub fn hostname() -> String {
    fs::read_to_string("/proc/sys/kernel/hostname")
        .or_else(|_| fs::read_to_string("/etc/hostname"))
        .map(|s| s.trim().to_owned())
        .unwrap_or_else(|_| "localhost".into())
}

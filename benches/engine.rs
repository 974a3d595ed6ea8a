//! Engine benchmarks, side by side in one run (`cargo bench --bench engine`):
//!
//! 1. no-op rerun of a fully cached 20-stage chain, against `dvc repro` of the same chain
//!    when `dvc` is on PATH (`pip install dvc`);
//! 2. hashing a 1 GiB file, against `openssl dgst -sha256` on the same file;
//! 3. `pipe status` on a stage whose out directory holds 100,000 small files, first and
//!    second call (the second is served by the stat cache).
//!
//! Prints medians and ratios; asserts nothing (targets belong here, not in tests).

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

fn pipe(dir: &Path, args: &[&str]) -> Duration {
    let t = Instant::now();
    let out = Command::new(env!("CARGO_BIN_EXE_pipe"))
        .args(args)
        .current_dir(dir)
        .env_remove("PIPE_CACHE")
        .output()
        .expect("pipe");
    let d = t.elapsed();
    assert!(
        out.status.success(),
        "pipe {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    d
}

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

fn chain(dir: &Path, n: usize) {
    let mut yaml = String::from("name: chain20\nstages:\n");
    let mut dvc = String::from("stages:\n");
    for i in 0..n {
        if i == 0 {
            yaml.push_str("  s0:\n    run: echo 0 > out0.txt\n    outs: [out0.txt]\n");
            dvc.push_str("  s0:\n    cmd: echo 0 > out0.txt\n    outs: [out0.txt]\n");
        } else {
            let p = i - 1;
            yaml.push_str(&format!(
                "  s{i}:\n    run: cat out{p}.txt > out{i}.txt && echo {i} >> out{i}.txt\n    deps: [out{p}.txt]\n    outs: [out{i}.txt]\n"
            ));
            dvc.push_str(&format!(
                "  s{i}:\n    cmd: cat out{p}.txt > out{i}.txt && echo {i} >> out{i}.txt\n    deps: [out{p}.txt]\n    outs: [out{i}.txt]\n"
            ));
        }
    }
    std::fs::write(dir.join("pipeline.yaml"), yaml).unwrap();
    std::fs::write(dir.join("dvc.yaml"), dvc).unwrap();
}

fn noop_rerun() {
    let dir = tempfile::tempdir().unwrap();
    chain(dir.path(), 20);
    pipe(dir.path(), &["run", "pipeline.yaml", "--no-progress"]);
    pipe(dir.path(), &["run", "pipeline.yaml", "--no-progress"]);
    let pipe_ms = median(
        (0..21)
            .map(|_| pipe(dir.path(), &["run", "pipeline.yaml", "--no-progress"]))
            .collect(),
    );
    println!(
        "no-op rerun, 20 cached stages: pipe median {:.1} ms (target < 30 ms)",
        ms(pipe_ms)
    );

    let has_dvc = Command::new("dvc")
        .arg("--version")
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false);
    if !has_dvc {
        println!("  dvc not on PATH (`pip install dvc`); skipping the side-by-side");
        return;
    }
    let d = dir.path();
    let sh = |cmd: &str| {
        let ok = Command::new("sh")
            .arg("-c")
            .arg(cmd)
            .current_dir(d)
            .output()
            .unwrap();
        assert!(
            ok.status.success(),
            "{cmd}: {}",
            String::from_utf8_lossy(&ok.stderr)
        );
    };
    sh("git init -q . && dvc init -q && dvc config core.analytics false && dvc repro -q >/dev/null");
    sh("dvc repro -q >/dev/null");
    let dvc_ms = median(
        (0..5)
            .map(|_| {
                let t = Instant::now();
                sh("dvc repro -q >/dev/null");
                t.elapsed()
            })
            .collect(),
    );
    println!(
        "  dvc repro median {:.1} ms → pipe takes {:.3}× dvc's time ({:.0}× faster)",
        ms(dvc_ms),
        ms(pipe_ms) / ms(dvc_ms),
        ms(dvc_ms) / ms(pipe_ms)
    );
}

fn hashing() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("big.bin");
    {
        use std::io::Write;
        let mut f = std::io::BufWriter::new(std::fs::File::create(&path).unwrap());
        let mut x: u64 = 0x9e3779b97f4a7c15;
        let mut block = vec![0u8; 1 << 20];
        for _ in 0..1024 {
            for chunk in block.chunks_mut(8) {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                chunk.copy_from_slice(&x.to_le_bytes());
            }
            f.write_all(&block).unwrap();
        }
    }
    let size = std::fs::metadata(&path).unwrap().len() as f64;
    // Warm the page cache for both.
    let _ = pipe::digest::hash_file(&path).unwrap();
    let ours = (0..3)
        .map(|_| {
            let t = Instant::now();
            pipe::digest::hash_file(&path).unwrap();
            t.elapsed()
        })
        .min()
        .unwrap();
    let openssl = (0..3)
        .map(|_| {
            let t = Instant::now();
            let o = Command::new("openssl")
                .args(["dgst", "-sha256"])
                .arg(&path)
                .output()
                .expect("openssl");
            assert!(o.status.success());
            t.elapsed()
        })
        .min()
        .unwrap();
    let gbps = |d: Duration| size / d.as_secs_f64() / 1e9;
    println!(
        "hash 1 GiB: pipe {:.2} GB/s, openssl dgst -sha256 {:.2} GB/s → pipe at {:.0}% of openssl (target ≥ 80%)",
        gbps(ours),
        gbps(openssl),
        100.0 * openssl.as_secs_f64() / ours.as_secs_f64()
    );
}

fn status_many_files() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("pipeline.yaml"),
        "stages:\n  many:\n    run: >-\n      mkdir -p many && awk 'BEGIN { for (i = 0; i < 100000; i++) { f = \"many/f\" i \".txt\"; print i > f; close(f) } }'\n    outs: [many]\n",
    )
    .unwrap();
    pipe(dir.path(), &["run", "pipeline.yaml", "--no-progress"]);
    // Let the files age past the stat cache's one-second safety window.
    std::thread::sleep(Duration::from_millis(1200));
    let first = pipe(dir.path(), &["status", "pipeline.yaml"]);
    let second = median(
        (0..5)
            .map(|_| pipe(dir.path(), &["status", "pipeline.yaml"]))
            .collect(),
    );
    println!(
        "status, out dir of 100,000 files: first call {:.0} ms, second call median {:.0} ms (target < 1000 ms)",
        ms(first),
        ms(second)
    );
}

fn main() {
    // `cargo bench` passes `--bench`; any other argument filters by name.
    let filter: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| !a.starts_with("--"))
        .collect();
    let want = |name: &str| filter.is_empty() || filter.iter().any(|f| name.contains(f.as_str()));
    if want("noop") {
        noop_rerun();
    }
    if want("hash") {
        hashing();
    }
    if want("status") {
        status_many_files();
    }
}

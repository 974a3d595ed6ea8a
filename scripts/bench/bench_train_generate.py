"""Side-by-side benchmark on one machine, in one run:

* LoRA training tokens/s, SmolLM2-135M-Instruct (f32 weights dequantised from the
  Q4_1 GGUF), r=16 on q,k,v,o, seq 256, batch 4: pipe vs PyTorch + PEFT;
* greedy generation tokens/s, 128 new tokens, batch 1 and 8: pipe vs
  `transformers.generate` (float) vs llama.cpp (llama-cpp-python, Q4_1);
* peak resident memory of each (one process per measurement).

Run from the repository root after scripts/fetch_smollm2.sh:
    python scripts/bench/bench_train_generate.py [--steps 6] [--out bench.json]
Needs: torch, transformers, peft, gguf, llama-cpp-python.
"""
import argparse
import json
import os
import platform
import subprocess
import sys

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
GGUF = os.path.join(ROOT, "models/SmolLM2-135M-Instruct.Q4_1.gguf")
BENCH = os.path.join(ROOT, "target/release/examples/bench")
REF = [sys.executable, os.path.join(ROOT, "scripts/bench/torch_ref.py")]


def run(cmd, env=None):
    out = subprocess.run(cmd, check=True, text=True, capture_output=True, env=env).stdout
    line = [l for l in out.splitlines() if l.startswith("{")][-1]
    r = json.loads(line)
    print(json.dumps(r), flush=True)
    return r


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--new", type=int, default=128)
    ap.add_argument("--out")
    a = ap.parse_args()
    subprocess.run(["cargo", "build", "--release", "--quiet", "-p", "pipe-train", "--example", "bench"], check=True, cwd=ROOT)
    results = {"cpu": platform.processor() or platform.machine(), "threads": os.cpu_count()}
    train = ["train", GGUF, "--steps", str(a.steps), "--batch", "4", "--seq", "256", "--r", "16"]
    results["train_pipe"] = run([BENCH] + train)
    results["train_torch"] = run(REF + train)
    for b in (1, 8):
        gen = ["generate", GGUF, "--batch", str(b), "--new", str(a.new)]
        results[f"gen{b}_pipe"] = run([BENCH] + gen)
        results[f"gen{b}_transformers"] = run(REF + gen)
        results[f"gen{b}_llamacpp"] = run(REF + ["llamacpp", GGUF, "--batch", str(b), "--new", str(a.new)])

    def ratio(x, y):
        return results[x]["tokens_per_s"] / results[y]["tokens_per_s"]

    summary = {
        "train pipe/pytorch": ratio("train_pipe", "train_torch"),
        "gen b1 pipe/transformers": ratio("gen1_pipe", "gen1_transformers"),
        "gen b8 pipe/transformers": ratio("gen8_pipe", "gen8_transformers"),
        "gen b1 pipe/llama.cpp": ratio("gen1_pipe", "gen1_llamacpp"),
        "gen b8 pipe/llama.cpp": ratio("gen8_pipe", "gen8_llamacpp"),
    }
    results["ratios"] = summary
    print("\n| measurement | pipe | reference | ratio | peak MB pipe / ref |")
    print("|---|---|---|---|---|")
    for name, (x, y) in {
        "LoRA train tok/s vs PyTorch+PEFT": ("train_pipe", "train_torch"),
        "generate b1 tok/s vs transformers": ("gen1_pipe", "gen1_transformers"),
        "generate b8 tok/s vs transformers": ("gen8_pipe", "gen8_transformers"),
        "generate b1 tok/s vs llama.cpp": ("gen1_pipe", "gen1_llamacpp"),
        "generate b8 tok/s vs llama.cpp": ("gen8_pipe", "gen8_llamacpp"),
    }.items():
        px, py = results[x], results[y]
        print(f"| {name} | {px['tokens_per_s']:.1f} | {py['tokens_per_s']:.1f} | {px['tokens_per_s'] / py['tokens_per_s']:.2f}x | {px['peak_rss_mb']:.0f} / {py['peak_rss_mb']:.0f} |")
    if a.out:
        with open(a.out, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()

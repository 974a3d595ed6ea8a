"""An adapter trained by `pipe` loads in Python `peft`, and the logits agree.

1. `reference_io export` writes a tiny random model as an HF folder;
2. `pipe run` trains a LoRA adapter on it with the `sft` stage (all-linear, rsLoRA;
   two scenarios also add two new special tokens: on a tied-embedding Qwen2 and on an
   untied Llama, whose output rows train as their own token layer);
3. Python loads the folder with `transformers`, the adapter with
   `peft.PeftModel.from_pretrained`, and compares its logits with pipe-train's
   logits for the same adapter; then compares pipe's merged export with
   `merge_and_unload()`.

Run from the repository root:  python scripts/reference/check_peft_interop.py
Needs: torch, transformers, peft, safetensors. Prints max |Δlogits|.
"""
import json
import os
import subprocess
import sys
import tempfile

import torch
from peft import PeftModel
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
REF = os.path.join(ROOT, "target/release/examples/reference_io")
PIPE = os.path.join(ROOT, "target/release/pipe")


def sh(*args, **kw):
    return subprocess.run(args, check=True, text=True, capture_output=True, **kw).stdout


def scenario(name, preset, extra, new_vocab=None):
    """Trains with `pipe` and compares with `peft`; returns the measured differences."""
    work = tempfile.mkdtemp(prefix=f"pipe-peft-{name}-")
    base = os.path.join(work, "base")
    sh(REF, "export", preset, base)
    with open(os.path.join(work, "qa.jsonl"), "w") as f:
        for i in range(24):
            f.write(json.dumps({"prompt": f"What is {i} plus 2?", "response": f"<cite>{i + 2}</cite>."}) + "\n")
    with open(os.path.join(work, "p.yaml"), "w") as f:
        f.write(f"""
name: interop
stages:
  data:
    run: cp qa.jsonl out/train.jsonl
    deps: [qa.jsonl]
    outs: [out/train.jsonl]
  sft:
    uses: sft
    inputs: {{train: data.train}}
    with:
      model: {base}
      lora: {{r: 8, alpha: 16, dropout: 0.05, target_modules: all-linear, use_rslora: true}}
      optimizer: {{lr: 0.01}}
      steps: 20
      batch_size: 4
{extra}
""")
    sh(PIPE, "run", "p.yaml", "--no-progress", cwd=work)
    show = json.loads(sh(PIPE, "show", "sft", "--json", cwd=work))
    adapter = os.path.join(work, show["outputs"]["adapter"]["path"])

    ids = [257, 117, 115, 101, 114, 10, 87, 104, 97, 116, 32, 105, 115, 32, 55, 63, 258, 10, 257]
    if new_vocab:
        ids += list(range(259, new_vocab))
    with open(os.path.join(work, "ids.json"), "w") as f:
        json.dump(ids, f)
    out = os.path.join(work, "pipe_logits.safetensors")
    sh(REF, "logits", base, os.path.join(work, "ids.json"), out, adapter)
    pipe_logits = load_file(out)["logits"]

    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    if new_vocab:
        # The usual workflow: resize the base, then load the adapter (which
        # carries the resized matrices and the trained rows).
        model.resize_token_embeddings(new_vocab)
    peft_model = PeftModel.from_pretrained(model, adapter).eval()
    with torch.no_grad():
        ref = peft_model(torch.tensor([ids])).logits[0]
    d_adapter = (ref - pipe_logits).abs().max().item()
    with peft_model.disable_adapter(), torch.no_grad():
        plain = peft_model(torch.tensor([ids])).logits[0]
    effect = (ref - plain).abs().max().item()

    merged_dir = os.path.join(work, "merged")
    sh(REF, "export", base, merged_dir, adapter)
    merged = AutoModelForCausalLM.from_pretrained(merged_dir, dtype=torch.float32).eval()
    unloaded = peft_model.merge_and_unload().eval()
    with torch.no_grad():
        m1 = merged(torch.tensor([ids])).logits[0]
        m2 = unloaded(torch.tensor([ids])).logits[0]
    d_merge = (m1 - m2).abs().max().item()
    return {
        "scenario": name,
        "adapter_keys": len(load_file(os.path.join(adapter, "adapter_model.safetensors"))),
        "adapter_effect_max_abs_logit_change": effect,
        "peft_vs_pipe_max_abs_diff": d_adapter,
        "pipe_merged_vs_peft_merge_and_unload_max_abs_diff": d_merge,
        "final_train_loss": show["metrics"]["final_train_loss"],
    }


def main():
    sh("cargo", "build", "--release", "--quiet", "--bin", "pipe", cwd=ROOT)
    sh("cargo", "build", "--release", "--quiet", "-p", "pipe-train", "--example", "reference_io", cwd=ROOT)
    reports = [
        scenario("llama-lora", "tiny:llama:3", ""),
        scenario("qwen2-tied-new-tokens", "tiny:qwen2:3", "      new_special_tokens: [\"<cite>\", \"</cite>\"]", new_vocab=261),
        scenario("llama-untied-new-tokens", "tiny:llama:3", "      new_special_tokens: [\"<cite>\", \"</cite>\"]", new_vocab=261),
        scenario("qwen3-lora", "tiny:qwen3:3", ""),
        scenario("gemma-lora", "tiny:gemma:3", ""),
        scenario("gemma2-lora", "tiny:gemma2:3", ""),
        scenario("phi3-fused-lora", "tiny:phi3:3", ""),
    ]
    print(json.dumps(reports, indent=1))
    ok = all(r["peft_vs_pipe_max_abs_diff"] <= 1e-4 and r["pipe_merged_vs_peft_merge_and_unload_max_abs_diff"] <= 1e-4
             and r["adapter_effect_max_abs_logit_change"] > 1e-2 for r in reports)
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()

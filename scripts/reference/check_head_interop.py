"""A sequence head trained by pipe-train loads in Python as
`AutoModelForSequenceClassification` + `PeftModel`, and its outputs agree.

For each (tiny model, objective): `reference_io export` writes the random base as an
HF folder; `reference_io head` trains LoRA (all-linear) + a linear `score` head on
it for 12 steps (mse with 3 outputs, listwise and pairwise with 1) and saves it in
PEFT's SEQ_CLS layout, with pipe's scores of five probe sequences in a right-padded
and a left-padded batch. Python loads the base with `num_labels=D`, the adapter with
`PeftModel.from_pretrained`, runs the same two batches (attention mask, pad id set)
and compares with pipe's scores. Prints the max |Δ| per case; exits 1 above 1e-4.

Run from the repository root:  python scripts/reference/check_head_interop.py
Needs: torch, transformers, peft.
"""
import json
import os
import subprocess
import sys
import tempfile

import torch
from peft import PeftModel
from transformers import AutoModelForSequenceClassification

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
REF = os.path.join(ROOT, "target/release/examples/reference_io")


def sh(*args, **kw):
    return subprocess.run(args, check=True, text=True, capture_output=True, **kw).stdout


def batch(ids, pad, side):
    longest = max(len(s) for s in ids)
    rows, mask = [], []
    for s in ids:
        p = longest - len(s)
        if side == "left":
            rows.append([pad] * p + s)
            mask.append([0] * p + [1] * len(s))
        else:
            rows.append(s + [pad] * p)
            mask.append([1] * len(s) + [0] * p)
    return torch.tensor(rows), torch.tensor(mask)


def case(preset, objective):
    work = tempfile.mkdtemp(prefix=f"pipe-head-{objective}-")
    base = os.path.join(work, "base")
    sh(REF, "export", preset, base)
    sh(REF, "head", preset, objective, work)
    got = json.load(open(os.path.join(work, "scores.json")))
    adapter = os.path.join(work, "model")
    cfg = json.load(open(os.path.join(adapter, "adapter_config.json")))
    labels = json.load(open(os.path.join(adapter, "head_config.json")))["head"]["outputs"]
    model = AutoModelForSequenceClassification.from_pretrained(base, num_labels=labels, dtype=torch.float32)
    model.config.pad_token_id = got["pad_id"]
    peft_model = PeftModel.from_pretrained(model, adapter).eval()
    out = {"model": preset, "objective": objective, "task_type": cfg["task_type"],
           "modules_to_save": cfg["modules_to_save"], "train_losses": [round(x, 4) for x in got["train_losses"][::4]]}
    for side in ("right", "left"):
        ids, mask = batch(got["ids"], got["pad_id"], side)
        with torch.no_grad():
            ref = peft_model(input_ids=ids, attention_mask=mask).logits
        pipe = torch.tensor(got["scores"][side])
        out[f"max_abs_diff_{side}"] = (ref - pipe).abs().max().item()
    with peft_model.disable_adapter(), torch.no_grad():
        ids, mask = batch(got["ids"], got["pad_id"], "right")
        plain = peft_model(input_ids=ids, attention_mask=mask).logits
    out["adapter_effect"] = (plain - torch.tensor(got["scores"]["right"])).abs().max().item()
    return out


def main():
    sh("cargo", "build", "--release", "--quiet", "-p", "pipe-train", "--example", "reference_io", cwd=ROOT)
    reports = [case(p, o) for p in ("tiny:llama:2", "tiny:qwen2:2") for o in ("mse", "listwise", "pairwise")]
    print(json.dumps(reports, indent=1))
    ok = all(r["max_abs_diff_right"] <= 1e-4 and r["max_abs_diff_left"] <= 1e-4 and r["adapter_effect"] > 1e-3
             for r in reports)
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()

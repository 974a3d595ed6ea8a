"""Reference values for pipe-train's sequence-head losses (train/src/heads.rs), from PyTorch.

Writes train/tests/fixtures/heads/losses.json:
- mse: scores [n, D] and targets, torch.nn.MSELoss() (mean over n·D, what
  transformers' sequence-classification models use for regression with D labels)
  and its gradient with respect to the scores;
- listwise: groups of candidate scores with target distributions (one best, tied bests
  sharing the mass, a softmax of rewards), the mean over groups of
  -(t · log_softmax(s)).sum() and its gradient.
Run with the reference venv (torch from PyPI):  python scripts/reference/make_head_fixtures.py
"""
import json
import pathlib

import torch
import torch.nn.functional as F

torch.manual_seed(0)
out = {}

n, d = 5, 3
scores = (torch.randn(n, d, dtype=torch.float64) * 2).requires_grad_(True)
targets = torch.randint(0, 11, (n, d)).to(torch.float64)  # integer labels, as an oracle gives
loss = torch.nn.MSELoss()(scores, targets)
loss.backward()
out["mse"] = {
    "scores": scores.detach().tolist(),
    "targets": targets.tolist(),
    "loss": loss.item(),
    "grad": scores.grad.tolist(),
}

groups = []
for k, kind in [(4, "one_best"), (3, "tied"), (5, "soft"), (2, "all_tied")]:
    s = torch.randn(k, dtype=torch.float64) * 3
    if kind == "one_best":
        t = torch.zeros(k, dtype=torch.float64)
        t[2] = 1.0
    elif kind == "tied":
        t = torch.tensor([0.5, 0.0, 0.5], dtype=torch.float64)
    elif kind == "soft":
        rewards = torch.randn(k, dtype=torch.float64)
        t = torch.softmax(rewards / 0.5, dim=0)
    else:
        t = torch.full((k,), 1.0 / k, dtype=torch.float64)
    groups.append((s.requires_grad_(True), t))
total = sum(-(t * F.log_softmax(s, dim=0)).sum() for s, t in groups) / len(groups)
total.backward()
out["listwise"] = {
    "groups": [{"scores": s.detach().tolist(), "targets": t.tolist()} for s, t in groups],
    "loss": total.item(),
    "grads": [s.grad.tolist() for s, _ in groups],
}

path = pathlib.Path(__file__).resolve().parents[2] / "train/tests/fixtures/heads/losses.json"
path.write_text(json.dumps(out, indent=1) + "\n")
print("wrote", path)

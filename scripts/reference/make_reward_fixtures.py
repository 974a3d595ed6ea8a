"""Reference values for pipe-train's Bradley-Terry loss (train/src/reward.rs), from PyTorch.

Writes train/tests/fixtures/reward/bradley_terry.json: rewards of chosen and rejected
answers, margins, and for several settings the loss and its gradient with respect to both
reward vectors, as TRL's RewardTrainer computes them:
    loss = -logsigmoid(r_c - r_r - margin).mean() + center * ((r_c + r_r) ** 2).mean()
Run with the reference venv (torch from PyPI):  python scripts/reference/make_reward_fixtures.py
"""
import json
import pathlib

import torch
import torch.nn.functional as F

torch.manual_seed(0)
n = 9
chosen = torch.randn(n, dtype=torch.float64) * 3
rejected = torch.randn(n, dtype=torch.float64) * 3
chosen[0], rejected[0] = 40.0, -40.0   # saturated: the loss must stay finite
chosen[1], rejected[1] = -35.0, 35.0
chosen[2] = rejected[2]                 # a tie
margin = torch.rand(n, dtype=torch.float64)

cases = []
for use_margin in (False, True):
    for center in (0.0, 0.01):
        c = chosen.clone().requires_grad_(True)
        r = rejected.clone().requires_grad_(True)
        d = c - r - (margin if use_margin else 0.0)
        loss = -F.logsigmoid(d).mean() + center * ((c + r) ** 2).mean()
        loss.backward()
        cases.append({
            "margin": use_margin,
            "center": center,
            "loss": loss.item(),
            "grad_chosen": c.grad.tolist(),
            "grad_rejected": r.grad.tolist(),
        })

out = pathlib.Path(__file__).resolve().parents[2] / "train/tests/fixtures/reward/bradley_terry.json"
out.parent.mkdir(parents=True, exist_ok=True)
out.write_text(json.dumps({
    "torch": torch.__version__,
    "chosen": chosen.tolist(),
    "rejected": rejected.tolist(),
    "margins": margin.tolist(),
    "cases": cases,
}, indent=1) + "\n")
print("wrote", out)

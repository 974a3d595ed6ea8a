"""Writes tiny Llama checkpoints that bitsandbytes saved in 4-bit, with the logits
transformers computes from them, for pipe-train's loader test.

A tiny random Llama is loaded with `BitsAndBytesConfig(load_in_4bit=True,
bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=...)` on CPU and saved with
`save_pretrained` (packed `.weight` u8 plus `.absmax`, `.quant_map`,
`.nested_absmax`, `.nested_quant_map`, `.quant_state.bitsandbytes__nf4`); then the
saved folder is loaded again by transformers, and two sets of logits for fixed ids
(one row left-padded) are stored in io.safetensors:
- `logits`: the 4-bit model's own forward. On CPU bitsandbytes' 4-bit matmul
  computes in bf16 whatever `bnb_4bit_compute_dtype` says (measured: a 64x64
  projection differs from `x @ dequantize_4bit(W).T` by 9e-3 on outputs of ~2.7),
  so this is a loose reference;
- `logits_dequantized`: the same checkpoint after transformers' `model.dequantize()`
  (every Linear4bit replaced by an f32 Linear holding `dequantize_4bit(W)`), i.e.
  what the checkpoint means in f32: the tight reference.

Run:  python scripts/reference/make_bnb4bit_fixtures.py train/tests/fixtures/bnb4bit
Needs: torch, transformers, bitsandbytes (CPU), safetensors. Not needed by the tests.
"""
import json
import os
import shutil
import sys
import tempfile

import bitsandbytes as bnb
import torch
import transformers
from safetensors.torch import save_file
from transformers import AutoConfig, AutoModelForCausalLM, BitsAndBytesConfig


def build(out, double_quant):
    torch.manual_seed(11)
    cfg = AutoConfig.for_model(
        "llama", vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
        tie_word_embeddings=False, rms_norm_eps=1e-6, initializer_range=0.1)
    model = AutoModelForCausalLM.from_config(cfg).float()
    dense = tempfile.mkdtemp()
    model.save_pretrained(dense)
    qcfg = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                              bnb_4bit_use_double_quant=double_quant,
                              bnb_4bit_compute_dtype=torch.float32)
    q = AutoModelForCausalLM.from_pretrained(dense, quantization_config=qcfg, device_map="cpu")
    if os.path.isdir(out):
        shutil.rmtree(out)
    q.save_pretrained(out)
    for extra in ("generation_config.json",):
        p = os.path.join(out, extra)
        if os.path.exists(p):
            os.remove(p)
    reloaded = AutoModelForCausalLM.from_pretrained(out, device_map="cpu").eval()
    ids = torch.randint(3, 96, (2, 7))
    mask = torch.ones(2, 7, dtype=torch.long)
    mask[1, :2] = 0
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        logits = reloaded(input_ids=ids, attention_mask=mask, position_ids=pos).logits
    deq = AutoModelForCausalLM.from_pretrained(out, device_map="cpu").eval()
    deq.dequantize()
    with torch.no_grad():
        logits_deq = deq(input_ids=ids, attention_mask=mask, position_ids=pos).logits
    save_file({"input_ids": ids, "attention_mask": mask, "logits": logits.contiguous(),
               "logits_dequantized": logits_deq.float().contiguous()},
              os.path.join(out, "io.safetensors"))
    shutil.rmtree(dense)


if __name__ == "__main__":
    root = sys.argv[1] if len(sys.argv) > 1 else "train/tests/fixtures/bnb4bit"
    build(os.path.join(root, "double_quant"), True)
    build(os.path.join(root, "plain"), False)
    with open(os.path.join(root, "VERSIONS.json"), "w") as f:
        json.dump({"torch": torch.__version__, "transformers": transformers.__version__,
                   "bitsandbytes": bnb.__version__}, f, indent=1)

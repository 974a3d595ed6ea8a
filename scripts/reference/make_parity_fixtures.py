"""Writes the parity fixtures that pipe-train's tests check against.

For tiny random Llama, Qwen2, Mistral, Qwen3, Gemma, Gemma 2 and Phi-3 models
(each with the features that set its family apart switched on: explicit head_dim,
one KV head, soft-capping small enough to bend the scores, a window shorter than
the sequence on alternating layers, fused projections) this builds the model with
`transformers` (CPU, float32), attaches a PEFT LoRA adapter with non-zero B,
and stores: the model (config.json + model.safetensors), the adapter (PEFT's
own save_pretrained), and in io.safetensors the inputs, the base logits, the
LoRA logits, the LoRA loss and the gradient of every LoRA tensor.

Run:  python scripts/reference/make_parity_fixtures.py train/tests/fixtures/parity
Needs: torch, transformers, peft, safetensors (not needed by the tests).
"""
import json
import os
import sys

import torch
from peft import LoraConfig, get_peft_model
from safetensors.torch import save_file
from transformers import AutoConfig, AutoModelForCausalLM

VOCAB = 96
COMMON = dict(
    vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
    num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-6, rope_theta=10000.0,
    max_position_embeddings=128, initializer_range=0.1,
)
ARCHS = {
    "llama": dict(model_type="llama", tie_word_embeddings=False),
    "qwen2": dict(model_type="qwen2", tie_word_embeddings=True),
    "mistral": dict(model_type="mistral", tie_word_embeddings=False, sliding_window=4),
    "qwen3": dict(model_type="qwen3", tie_word_embeddings=False, head_dim=24),
    "gemma": dict(model_type="gemma", tie_word_embeddings=True, head_dim=24, num_key_value_heads=1,
                  hidden_activation="gelu_pytorch_tanh", pad_token_id=0, bos_token_id=2, eos_token_id=1),
    "gemma2": dict(model_type="gemma2", tie_word_embeddings=True, head_dim=24, query_pre_attn_scalar=32,
                   attn_logit_softcapping=2.0, final_logit_softcapping=3.0, sliding_window=4,
                   hidden_activation="gelu_pytorch_tanh", pad_token_id=0, bos_token_id=2, eos_token_id=1),
    "phi3": dict(model_type="phi3", tie_word_embeddings=False, sliding_window=5,
                 pad_token_id=0, bos_token_id=1, eos_token_id=2),
}


def random_model(spec):
    """A float32 eager model of `spec` (with `model_type`), norms and biases perturbed."""
    spec = dict(spec)
    model_type = spec.pop("model_type")
    cfg = AutoConfig.for_model(model_type, **spec)
    cfg._attn_implementation = "eager"
    model = AutoModelForCausalLM.from_config(cfg, attn_implementation="eager").float().eval()
    # Norm weights and biases are 1 and 0 at init: perturb them so a bug in
    # either shows up.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name or name.endswith(".bias"):
                p.add_(torch.randn_like(p) * 0.1)
    return model


def build(arch, out):
    torch.manual_seed(1234)
    model = random_model(dict(COMMON, **ARCHS[arch]))
    os.makedirs(out, exist_ok=True)
    model.save_pretrained(out, safe_serialization=True)

    # Row 0: 7 tokens; row 1: left padding (2 pads) then 5 tokens.
    ids = torch.randint(3, VOCAB, (2, 7))
    mask = torch.ones(2, 7, dtype=torch.long)
    mask[1, :2] = 0
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    labels = ids.clone()
    labels[0, :3] = -100  # prompt tokens
    labels[1, :4] = -100
    with torch.no_grad():
        base = model(input_ids=ids, attention_mask=mask, position_ids=pos).logits

    lcfg = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules="all-linear", task_type="CAUSAL_LM")
    peft_model = get_peft_model(model, lcfg)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn_like(p) * 0.1)
    peft_model.train()
    outp = peft_model(input_ids=ids, attention_mask=mask, position_ids=pos, labels=labels)
    outp.loss.backward()
    tensors = {
        "input_ids": ids.to(torch.int64),
        "attention_mask": mask.to(torch.int64),
        "labels": labels.to(torch.int64),
        "base_logits": base.contiguous(),
        "lora_logits": outp.logits.detach().contiguous(),
        "lora_loss": outp.loss.detach().reshape(1),
    }
    for name, p in peft_model.named_parameters():
        if p.requires_grad:
            key = name.replace(".default.weight", ".weight")
            tensors["grad." + key] = p.grad.contiguous()
    peft_model.save_pretrained(os.path.join(out, "adapter"))
    save_file(tensors, os.path.join(out, "io.safetensors"))
    print(arch, "loss", float(outp.loss), "grads", sum(k.startswith("grad.") for k in tensors))


if __name__ == "__main__":
    root = sys.argv[1] if len(sys.argv) > 1 else "train/tests/fixtures/parity"
    only = sys.argv[2:] or list(ARCHS)
    for arch in only:
        build(arch, os.path.join(root, arch))
    import transformers, peft
    with open(os.path.join(root, "VERSIONS.json"), "w") as f:
        json.dump({"torch": torch.__version__, "transformers": transformers.__version__, "peft": peft.__version__}, f, indent=1)

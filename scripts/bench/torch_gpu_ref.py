"""PyTorch + transformers + PEFT (+ bitsandbytes for NF4) side of the GPU benchmark
(scripts/bench/gpu.sh): trains the same LoRA, from the same start, on the same data as
pipe's `bench train ... --save-init DIR` wrote, and prints one JSON object like pipe's.

  torch_gpu_ref.py DIR [--nf4] [--device cuda] [--checkpointing]

DIR holds model.safetensors + config.json (the base), adapter/ (the initial LoRA in
PEFT's format), data.json (token ids, in the order the steps take them) and train.json
(AdamW settings, batch size, steps). Loss: mean next-token cross-entropy over every
position, as pipe computes it with labels = ids. Throughput counts the steps after the
first one (which loads kernels), timed with the device synchronised.
"""
import argparse
import json
import os
import time


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("dir")
    ap.add_argument("--nf4", action="store_true")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--checkpointing", action="store_true")
    a = ap.parse_args()

    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    cuda = a.device.startswith("cuda")
    dtype = getattr(torch, a.dtype)
    train = json.load(open(os.path.join(a.dir, "train.json")))
    data = json.load(open(os.path.join(a.dir, "data.json")))
    kw = {"dtype": dtype}
    if a.nf4:
        from transformers import BitsAndBytesConfig

        kw["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=dtype,
        )
        kw["device_map"] = {"": a.device}
    model = AutoModelForCausalLM.from_pretrained(a.dir, **kw)
    if not a.nf4:
        model = model.to(a.device)
    if a.checkpointing:
        model.gradient_checkpointing_enable()
        model.enable_input_require_grads()
    model = PeftModel.from_pretrained(model, os.path.join(a.dir, "adapter"), is_trainable=True)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(
        params,
        lr=train["lr"],
        betas=(train["beta1"], train["beta2"]),
        eps=train["eps"],
        weight_decay=train["weight_decay"],
    )
    bs, steps = train["batch_size"], train["steps"]
    if cuda:
        torch.cuda.reset_peak_memory_stats()
        torch.cuda.synchronize()
    losses, times, tokens = [], [], 0
    t0 = time.perf_counter()
    for k in range(steps):
        rows = data[k * bs:(k + 1) * bs]
        ids = torch.tensor(rows, device=a.device)
        out = model(input_ids=ids, labels=ids)
        out.loss.backward()
        if train.get("max_grad_norm"):
            torch.nn.utils.clip_grad_norm_(params, train["max_grad_norm"])
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(out.loss.item())  # synchronises
        times.append(time.perf_counter())
        tokens += ids.numel()
    secs = times[-1] - t0
    per_step = tokens / steps
    steady = per_step * (steps - 1) / (times[-1] - times[0]) if steps > 1 else tokens / secs
    res = {
        "impl": "torch+peft" + ("+bnb" if a.nf4 else ""),
        "what": "train",
        "tokens_per_s": tokens / secs,
        "steady_tokens_per_s": steady,
        "losses": losses,
        "steps": steps,
        "batch": bs,
        "seq": len(data[0]),
        "base": "nf4" if a.nf4 else "none",
        "dtype": a.dtype,
        "torch": torch.__version__,
        "gradient_checkpointing": a.checkpointing,
    }
    if cuda:
        res["max_memory_allocated_mb"] = torch.cuda.max_memory_allocated() / 2**20
        res["max_memory_reserved_mb"] = torch.cuda.max_memory_reserved() / 2**20
    print(json.dumps(res))


if __name__ == "__main__":
    main()

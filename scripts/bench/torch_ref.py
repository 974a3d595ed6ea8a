"""PyTorch / transformers / PEFT / llama.cpp side of the benchmark; one
measurement per process (peak RSS belongs to it). Called by
bench_train_generate.py; prints one JSON object.

  torch_ref.py train GGUF --steps N --batch 4 --seq 256 --r 16
  torch_ref.py generate GGUF --batch B --new 128
  torch_ref.py llamacpp GGUF --batch B --new 128
"""
import argparse
import json
import os
import resource
import time


def peak_mb():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def load(gguf):
    import torch
    from transformers import AutoModelForCausalLM
    return AutoModelForCausalLM.from_pretrained(os.path.dirname(gguf), gguf_file=os.path.basename(gguf), dtype=torch.float32)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("mode")
    ap.add_argument("gguf")
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--r", type=int, default=16)
    ap.add_argument("--new", type=int, default=128)
    ap.add_argument("--prompt-len", type=int, default=32)
    a = ap.parse_args()
    threads = int(os.environ.get("BENCH_THREADS", os.cpu_count()))
    if a.mode == "llamacpp":
        from llama_cpp import Llama
        llm = Llama(model_path=a.gguf, n_ctx=512, n_threads=threads, n_batch=512, verbose=False)
        g = __import__("random").Random(0)
        prompts = [[100 + g.randrange(49152 - 200) for _ in range(a.prompt_len)] for _ in range(a.batch)]
        t = time.time()
        n = 0
        # llama-cpp-python decodes one sequence at a time; batch B = B sequences in turn.
        for p in prompts:
            llm.reset()
            for i, tok in enumerate(llm.generate(p, temp=0.0, top_k=1, reset=True)):
                n += 1
                if i + 1 >= a.new:
                    break
        secs = time.time() - t
        print(json.dumps({"impl": "llama.cpp", "what": "generate", "batch": a.batch, "new_tokens": n,
                          "tokens_per_s": n / secs, "seconds": secs, "peak_rss_mb": peak_mb(), "quant": "Q4_1"}))
        return
    import torch
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    model = load(a.gguf)
    vocab = model.config.vocab_size
    if a.mode == "train":
        from peft import LoraConfig, get_peft_model
        model = get_peft_model(model, LoraConfig(r=a.r, lora_alpha=2 * a.r, lora_dropout=0.0,
                                                 target_modules=["q_proj", "k_proj", "v_proj", "o_proj"], task_type="CAUSAL_LM"))
        model.train()
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4, weight_decay=0.0)
        batches = [torch.randint(0, vocab, (a.batch, a.seq)) for _ in range(a.steps + 1)]

        def step(ids):
            out = model(input_ids=ids, labels=ids)
            out.loss.backward()
            torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)
            return out.loss.item()

        step(batches[0])
        t = time.time()
        for b in batches[1:]:
            loss = step(b)
        secs = time.time() - t
        print(json.dumps({"impl": "pytorch+peft", "what": "train", "tokens_per_s": a.steps * a.batch * a.seq / secs,
                          "steps": a.steps, "batch": a.batch, "seq": a.seq, "r": a.r, "last_loss": loss,
                          "peak_rss_mb": peak_mb(), "torch": torch.__version__}))
    else:
        model.eval()
        g = torch.Generator().manual_seed(0)
        ids = torch.randint(100, vocab - 100, (a.batch, a.prompt_len), generator=g)
        with torch.no_grad():
            model.generate(ids[:1], max_new_tokens=2, do_sample=False)
            t = time.time()
            out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=a.new, min_new_tokens=a.new,
                                 do_sample=False, pad_token_id=0)
            secs = time.time() - t
        n = (out.shape[1] - a.prompt_len) * a.batch
        print(json.dumps({"impl": "transformers", "what": "generate", "batch": a.batch, "new_tokens": n,
                          "tokens_per_s": n / secs, "seconds": secs, "peak_rss_mb": peak_mb()}))


if __name__ == "__main__":
    main()

"""pipe-train on the real SmolLM2-135M-Instruct GGUF against the references.

1. Tokenisation: pipe's tokenizer rebuilt from GGUF metadata against llama.cpp
   (llama-cpp-python, `vocab_only`) on the strings below (unicode, digits,
   emoji, code, whitespace, chat special tokens).
2. Float forward: pipe's dequantised f32 model against `transformers` loading
   the same GGUF (it dequantises to float too), on a chat prompt.

Run from the repository root after scripts/fetch_smollm2.sh:
    python scripts/reference/check_smollm2.py [models/SmolLM2-135M-Instruct.Q4_1.gguf]
Needs: torch, transformers, gguf, llama-cpp-python, safetensors.
"""
import json
import os
import subprocess
import sys
import tempfile

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
REF = os.path.join(ROOT, "target/release/examples/reference_io")

STRINGS = [
    "Hello world", "hello  world", " leading space", "trailing space ", "\ttab\tseparated",
    "new\nlines\n\nand\r\nCRLF", "1", "12", "123", "1234567890", "   1.", "3.14159", "1,000,000",
    "-42", "v2.0.1", "2025-11-22T03:16:17Z", "x^2 + y^2 = z^2", "café", "naïve résumé",
    "Straße", "Ελληνικά", "Русский текст", "中文字符测试", "日本語のテキスト", "한국어 문장",
    "עברית", "العربية", "हिन्दी", "emoji 😀", "👍🏽 family 👨‍👩‍👧‍👦", "🇫🇷 flags 🇯🇵",
    "def f(x):\n    return x * 2\n", "fn main() { println!(\"hi\"); }", "<div class=\"a\">b</div>",
    "SELECT * FROM t WHERE id = 1;", "{\"key\": [1, 2, 3]}", "http://example.org/path?q=1&r=2",
    "snake_case_name", "CamelCaseName", "ALL CAPS TEXT", "don't won't it's", "...!!!???",
    "a" * 40, "<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n",
    "<|endoftext|>", "text<|im_end|>more", "<|im_start|>system\nBe brief.<|im_end|>",
    "  multiple   spaces   ", "mixed 中文 and English 123", "$100.50 €20 £5 ¥1000",
    "tab\t\tdouble", "ünïcödé ñ", "\u00a0non-breaking", "math: ∑∫∂√∞≠≤≥", "",
]


def run(*args, stdin=None):
    return subprocess.run(args, check=True, text=True, capture_output=True, input=stdin).stdout


def main():
    gguf = sys.argv[1] if len(sys.argv) > 1 else os.path.join(ROOT, "models/SmolLM2-135M-Instruct.Q4_1.gguf")
    run("cargo", "build", "--release", "--quiet", "-p", "pipe-train", "--example", "reference_io")
    from llama_cpp import Llama

    pipe_ids = json.loads(run(REF, "tokenize", gguf, stdin=json.dumps(STRINGS)))
    llm = Llama(model_path=gguf, vocab_only=True, verbose=False)
    same = 0
    for s, ids in zip(STRINGS, pipe_ids):
        ref = llm.tokenize(s.encode("utf-8"), add_bos=False, special=True)
        if ref == ids:
            same += 1
        else:
            print("MISMATCH", repr(s), ids, ref)
    print(f"tokenisation: {same}/{len(STRINGS)} strings identical to llama.cpp")

    import torch
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    prompt = "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\nWhat is the capital of France? Answer in one word.<|im_end|>\n<|im_start|>assistant\nParis"
    ids = json.loads(run(REF, "tokenize", gguf, stdin=json.dumps([prompt])))[0]
    work = tempfile.mkdtemp(prefix="pipe-smollm2-")
    with open(os.path.join(work, "ids.json"), "w") as f:
        json.dump(ids, f)
    out = os.path.join(work, "logits.safetensors")
    run(REF, "logits", gguf, os.path.join(work, "ids.json"), out)
    pipe_logits = load_file(out)["logits"]
    model = AutoModelForCausalLM.from_pretrained(os.path.dirname(gguf), gguf_file=os.path.basename(gguf), dtype=torch.float32).eval()
    with torch.no_grad():
        ref = model(torch.tensor([ids])).logits[0]
    diff = (ref - pipe_logits).abs().max().item()
    scale = ref.abs().max().item()
    same_argmax = (ref.argmax(-1) == pipe_logits.argmax(-1)).float().mean().item()
    print(json.dumps({
        "tokens": len(ids),
        "max_abs_logit_diff": diff,
        "max_abs_logit": scale,
        "relative": diff / scale,
        "argmax_agreement": same_argmax,
        "tokenizer_identical": f"{same}/{len(STRINGS)}",
    }, indent=1))
    sys.exit(0 if same == len(STRINGS) else 1)


if __name__ == "__main__":
    main()

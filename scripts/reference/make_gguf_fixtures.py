"""Writes the GGUF fixtures that pipe-train's GGUF reader is checked against.

For tiny random Gemma, Gemma 2, Qwen3 and Phi-3 models (the parity fixtures'
configurations, see make_parity_fixtures.py), each with a small tokenizer of its
family's kind, this:

1. trains the tokenizer: SentencePiece BPE with byte fallback for Gemma, Gemma 2
   (no dummy prefix, `<start_of_turn>`/`<end_of_turn>` user-defined) and Phi-3
   (dummy prefix, as Llama 2's); byte-level BPE with Qwen2's pre-tokenizer for Qwen3;
2. saves the model with `transformers` and converts it with llama.cpp's own
   `convert_hf_to_gguf.py --outtype f16` (projections and embeddings f16, norms f32,
   Gemma's norms stored as 1+w, tokens/scores/types/merges in the metadata);
3. stores the references in io.json: token ids of each test string from the
   tokenizer itself (SentencePiece's encoder; HF `tokenizers` for Qwen3), and
   `transformers`' logits on a sequence longer than Gemma 2's window, with every
   2-d weight rounded to f16 as the GGUF file stores it.

Gemma 2's `query_pre_attn_scalar` is set to the head size: llama.cpp does not store
it and uses the head size for every model but the 27B (whose config says the same).
For Qwen3, llama.cpp recognises pre-tokenizers by hashing known tokenizers' output; the
tiny tokenizer is declared `qwen2`, which is the regex it is built with.

Run:  scripts/reference/fetch_llama_cpp.sh /tmp/llama.cpp
      python scripts/reference/make_gguf_fixtures.py /tmp/llama.cpp train/tests/fixtures/gguf
Needs: torch, transformers, sentencepiece, tokenizers, numpy, safetensors (not needed by
the tests).
"""
import json
import os
import shutil
import sys
import tempfile

import sentencepiece as spm
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from make_parity_fixtures import ARCHS, COMMON, random_model  # noqa: E402

CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "Evidence-grounded answers cite the passage they come from.",
    "What is the capital of France? The capital of France is Paris.",
    "def add(x, y):\n    return x + y\n",
    "Numbers: 1, 22, 333, 4444 and 3.14159; dates like 2025-11-22.",
    "She said: \"it's done\", and they're sure we'll see.",
    "Training runs resume from the last checkpoint after a crash.",
    "lowercase words, UPPERCASE WORDS, and CamelCase names",
]
STRINGS = [
    "Hello world", "hello  world", " leading space", "trailing space ", "new\nlines\n\nand tabs\t!",
    "1234567890", "3.14159", "café naïve", "Ελληνικά", "中文字符", "emoji 😀", "x" * 30,
    "The capital of France is Paris.", "def f(x):\n    return x * 2\n", "",
]
SPECIAL_STRINGS = ["<start_of_turn>user\nWhat is 2+2?<end_of_turn>\n<start_of_turn>model\n"]


def sentencepiece_model(out_dir, dummy_prefix, user_defined):
    prefix = os.path.join(out_dir, "sp")
    corpus = os.path.join(out_dir, "corpus.txt")
    with open(corpus, "w", encoding="utf-8") as f:
        for _ in range(20):
            f.write("\n".join(CORPUS) + "\n")
    spm.SentencePieceTrainer.train(
        input=corpus, model_prefix=prefix, vocab_size=400, model_type="bpe",
        byte_fallback=True, normalization_rule_name="identity", add_dummy_prefix=dummy_prefix,
        remove_extra_whitespaces=False, split_digits=False, user_defined_symbols=user_defined,
        unk_id=3, bos_id=2, eos_id=1, pad_id=0, character_coverage=1.0,
        allow_whitespace_only_pieces=True, minloglevel=2,
    )
    return prefix + ".model"


def byte_level_bpe(out_dir):
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
    tok = Tokenizer(models.BPE())
    pattern = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
               r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(pattern), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(CORPUS * 20, trainer)
    tok.save(os.path.join(out_dir, "tokenizer.json"))
    with open(os.path.join(out_dir, "tokenizer_config.json"), "w") as f:
        json.dump({"tokenizer_class": "Qwen2Tokenizer", "eos_token": "<|im_end|>",
                   "pad_token": "<|endoftext|>", "bos_token": None,
                   "chat_template": "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"}, f)
    return tok


def convert(llama_cpp, model_dir, outfile, arch):
    sys.path.insert(0, llama_cpp)
    sys.path.insert(1, os.path.join(llama_cpp, "gguf-py"))
    import convert_hf_to_gguf
    from conversion import base
    if arch == "qwen3":
        # The tiny tokenizer's hash is not one llama.cpp knows; it is built as qwen2's.
        base.TextModel.get_vocab_base_pre = lambda self, tokenizer: "qwen2"
    argv = sys.argv
    sys.argv = ["convert_hf_to_gguf.py", model_dir, "--outtype", "f16", "--outfile", outfile]
    try:
        convert_hf_to_gguf.main()
    finally:
        sys.argv = argv


def build(llama_cpp, arch, out):
    work = tempfile.mkdtemp()
    model_dir = os.path.join(work, "hf")
    os.makedirs(model_dir)
    if arch == "qwen3":
        tok = byte_level_bpe(model_dir)
        vocab = tok.get_vocab_size()
        encode = lambda s: tok.encode(s, add_special_tokens=False).ids
        strings = STRINGS + ["<|im_start|>user\nhi<|im_end|>"]
    else:
        gemma = arch.startswith("gemma")
        user_defined = ["<start_of_turn>", "<end_of_turn>"] if gemma else []
        sp_path = sentencepiece_model(work, dummy_prefix=not gemma, user_defined=user_defined)
        shutil.copy(sp_path, os.path.join(model_dir, "tokenizer.model"))
        sp = spm.SentencePieceProcessor(model_file=sp_path)
        vocab = sp.get_piece_size()
        encode = lambda s: sp.encode(s)
        strings = STRINGS + (SPECIAL_STRINGS if gemma else [])
        # As in the real models' tokenizer_config.json: the turn markers are special.
        added = {str(sp.piece_to_id(t)): {"content": t, "special": True, "normalized": False,
                                          "lstrip": False, "rstrip": False, "single_word": False}
                 for t in ["<pad>", "</s>", "<s>", "<unk>"] + user_defined}
        with open(os.path.join(model_dir, "tokenizer_config.json"), "w") as f:
            json.dump({"tokenizer_class": "GemmaTokenizer" if gemma else "LlamaTokenizer",
                       "add_bos_token": False, "add_eos_token": False,
                       "added_tokens_decoder": added}, f)

    torch.manual_seed(4321)
    spec = dict(COMMON, **ARCHS[arch])
    spec["vocab_size"] = vocab
    if arch == "gemma2":
        spec["query_pre_attn_scalar"] = spec["head_dim"]
    if arch == "qwen3":
        spec.update(bos_token_id=None, eos_token_id=vocab - 1, pad_token_id=vocab - 3)
    model = random_model(spec)
    model.save_pretrained(model_dir, safe_serialization=True)

    os.makedirs(out, exist_ok=True)
    gguf_path = os.path.join(out, "model.gguf")
    convert(llama_cpp, model_dir, gguf_path, arch)

    # The file stores 2-d weights in f16: the reference model uses the same values.
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.copy_(p.half().float())
    ids = torch.randint(4, vocab, (1, 9))
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0]
    io = {
        "ids": ids[0].tolist(),
        "logits": logits.tolist(),
        "strings": [{"text": s, "ids": encode(s)} for s in strings],
    }
    with open(os.path.join(out, "io.json"), "w", encoding="utf-8") as f:
        json.dump(io, f, ensure_ascii=False)
    shutil.rmtree(work)
    print(arch, "vocab", vocab, "gguf", os.path.getsize(gguf_path), "bytes")


if __name__ == "__main__":
    llama_cpp = sys.argv[1]
    root = sys.argv[2] if len(sys.argv) > 2 else "train/tests/fixtures/gguf"
    only = sys.argv[3:] or ["gemma", "gemma2", "qwen3", "phi3"]
    for arch in only:
        build(llama_cpp, arch, os.path.join(root, arch))
    import transformers
    with open(os.path.join(root, "VERSIONS.json"), "w") as f:
        json.dump({"torch": torch.__version__, "transformers": transformers.__version__,
                   "sentencepiece": spm.__version__, "llama.cpp": os.path.basename(os.path.realpath(llama_cpp)),
                   }, f, indent=1)

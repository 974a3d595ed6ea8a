"""Writes the NF4 fixtures that pipe-train's `nf4` tests check against.

For three weight shapes (one whose size is not a multiple of 64, one with more
than 256 blocks so the nested statistics have a partial block) this quantizes a
seeded random float32 weight with `bitsandbytes.functional.quantize_4bit`
(nf4, blocksize 64), without and with double quantization, and stores the
packed codes, the absmaxes (plain; or nested codes, offset, nested absmaxes and
the nested code book) and bitsandbytes' own `dequantize_4bit` of each.

Run:  python scripts/reference/make_nf4_fixtures.py train/tests/fixtures/nf4
Needs: torch, bitsandbytes (runs on CPU), safetensors. Not needed by the tests.
"""
import json
import os
import sys

import bitsandbytes as bnb
import bitsandbytes.functional as F
import torch
from safetensors.torch import save_file

SHAPES = [(8, 64), (5, 70), (64, 300)]
SUM_LENGTHS = [1, 9, 33, 100, 257, 511, 1000, 5000, 12345]


def main(out):
    os.makedirs(out, exist_ok=True)
    tensors = {}
    torch.manual_seed(7)
    for i, shape in enumerate(SHAPES):
        w = torch.randn(*shape) * (0.02 + 0.05 * i)
        w[0, 0] = 0.0  # an exact zero, and a block edge value
        tensors[f"w.{i}"] = w
        q, st = F.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=False)
        tensors[f"packed.{i}"] = q.flatten().contiguous()
        tensors[f"absmax.{i}"] = st.absmax.contiguous()
        tensors[f"dequant.{i}"] = F.dequantize_4bit(q, st).contiguous()
        q2, st2 = F.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=True)
        tensors[f"dq.packed.{i}"] = q2.flatten().contiguous()
        tensors[f"dq.absmax.{i}"] = st2.absmax.contiguous()
        tensors[f"dq.offset.{i}"] = st2.offset.reshape(1).float().contiguous()
        tensors[f"dq.nested_absmax.{i}"] = st2.state2.absmax.contiguous()
        tensors[f"dq.nested_code.{i}"] = st2.state2.code.contiguous()
        tensors[f"dq.dequant.{i}"] = F.dequantize_4bit(q2, st2).contiguous()
    tensors["nf4_code"] = F.get_4bit_type("nf4", device="cpu").contiguous()
    # torch's f32 mean (the double-quantization offset) for other lengths.
    for n in SUM_LENGTHS:
        v = torch.rand(n) * 0.3
        tensors[f"mean_in.{n}"] = v
        tensors[f"mean_out.{n}"] = v.mean().reshape(1)
    save_file(tensors, os.path.join(out, "nf4.safetensors"))
    with open(os.path.join(out, "VERSIONS.json"), "w") as f:
        json.dump({"torch": torch.__version__, "bitsandbytes": bnb.__version__,
                   "shapes": SHAPES, "blocksize": 64, "nested_blocksize": 256}, f, indent=1)
    print("wrote", len(tensors), "tensors")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "train/tests/fixtures/nf4")

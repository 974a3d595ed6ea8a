"""Writes the Parquet fixtures of tests/cli.rs (`tests/fixtures/parquet/`) with pyarrow,
as the Hugging Face hub serves datasets:

- nq_open.parquet: examples/data/raw/NQ-open.dev.jsonl as Parquet (snappy, HF's default),
  `answer` a list<string> column; build_data must read it exactly like the JSONL;
- generic.parquet + generic.jsonl: the same records with a list column and a struct column
  (zstd pages, two row groups), for the generic `jsonl` format and for split.

  pip install pyarrow && python scripts/reference/make_parquet_fixtures.py
"""
import json
import os

import pyarrow as pa
import pyarrow.parquet as pq

root = os.path.join(os.path.dirname(__file__), "..", "..")
out = os.path.join(root, "tests", "fixtures", "parquet")
os.makedirs(out, exist_ok=True)

rows = [json.loads(l) for l in open(os.path.join(root, "examples/data/raw/NQ-open.dev.jsonl")) if l.strip()]
table = pa.table({
    "question": pa.array([r["question"] for r in rows], pa.string()),
    "answer": pa.array([r.get("answer") for r in rows], pa.list_(pa.string())),
})
pq.write_table(table, os.path.join(out, "nq_open.parquet"), compression="snappy")

generic = [
    {"qid": f"g{i}", "q": r["question"], "golds": r.get("answer", []),
     "meta": {"source": "nq", "n_answers": len(r.get("answer", []))}}
    for i, r in enumerate(rows)
]
gtable = pa.Table.from_pylist(generic)
pq.write_table(gtable, os.path.join(out, "generic.parquet"), compression="zstd",
               row_group_size=max(1, len(generic) // 2))
with open(os.path.join(out, "generic.jsonl"), "w") as f:
    for g in generic:
        f.write(json.dumps(g, ensure_ascii=False) + "\n")
print("wrote", out, len(rows), "rows")

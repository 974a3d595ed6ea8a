"""Writes the Parquet fixtures of tests/cli.rs (`tests/fixtures/parquet/`) with pyarrow,
as the Hugging Face hub serves datasets:

- nq_open.parquet: examples/data/raw/NQ-open.dev.jsonl as Parquet (snappy, HF's default),
  `answer` a list<string> column; build_data must read it exactly like the JSONL;
- generic.parquet + generic.jsonl: the same records with a list column and a struct column
  (zstd pages, two row groups), for the generic `jsonl` format and for split;
- hotpot_hf.parquet: examples/data/raw/hotpot_dev_distractor.json in the Hugging Face
  `hotpotqa/hotpot_qa` schema (`id`; `supporting_facts` and `context` struct columns of
  lists, as `datasets` writes them), for an `hf:` source read from a hub cache;
- popqa_hf.parquet: examples/data/raw/popQA.tsv as the HF `akariasai/PopQA` Parquet
  (`id` an integer, `possible_answers` the TSV's JSON string).

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
hotpot = json.load(open(os.path.join(root, "examples/data/raw/hotpot_dev_distractor.json")))
htable = pa.table({
    "id": pa.array([h["_id"] for h in hotpot], pa.string()),
    "question": pa.array([h["question"] for h in hotpot], pa.string()),
    "answer": pa.array([h["answer"] for h in hotpot], pa.string()),
    "type": pa.array([h["type"] for h in hotpot], pa.string()),
    "level": pa.array([h["level"] for h in hotpot], pa.string()),
    "supporting_facts": pa.array(
        [{"title": [f[0] for f in h["supporting_facts"]], "sent_id": [f[1] for f in h["supporting_facts"]]} for h in hotpot],
        pa.struct([("title", pa.list_(pa.string())), ("sent_id", pa.list_(pa.int32()))])),
    "context": pa.array(
        [{"title": [c[0] for c in h["context"]], "sentences": [c[1] for c in h["context"]]} for h in hotpot],
        pa.struct([("title", pa.list_(pa.string())), ("sentences", pa.list_(pa.list_(pa.string())))])),
})
pq.write_table(htable, os.path.join(out, "hotpot_hf.parquet"), compression="snappy")

import csv
with open(os.path.join(root, "examples/data/raw/popQA.tsv"), newline="") as f:
    prow = list(csv.DictReader(f, delimiter="\t"))
def as_int(x):
    # The fixture's malformed rows have missing or non-numeric cells: nulls in Parquet.
    try:
        return int(x)
    except (TypeError, ValueError):
        return None

cols = {k: [r.get(k) for r in prow] for k in prow[0]}
ptable = pa.table({k: (pa.array([as_int(x) for x in v], pa.int64()) if k in ("id", "s_pop", "o_pop") else pa.array(v, pa.string()))
                   for k, v in cols.items()})
pq.write_table(ptable, os.path.join(out, "popqa_hf.parquet"), compression="snappy")
print("wrote", out, len(rows), "rows")

"""Sends the same oracle requests (a long shared rubric as the system message, one
passage per request, the rubric's JSON schema as response_format) to an
OpenAI-compatible server at a given concurrency, and prints one JSON line: items/s over
the wall time of the batch, p50/p95 request latency, prompt/completion tokens, and how
many replies parsed as JSON with every rubric key.

    python oracle_clients.py URL CONCURRENCY N [--label L] [--schema-form openai|llama]
"""
import argparse
import concurrent.futures as cf
import json
import pathlib
import statistics
import time
import urllib.request

HERE = pathlib.Path(__file__).resolve().parent
ROOT = HERE.parent.parent
DIMS = ["accuracy", "specificity", "sourcing", "clarity", "neutrality",
        "completeness", "relevance", "novelty"]
SCHEMA = {
    "type": "object",
    "properties": {
        **{d: {"type": "integer", "minimum": 0, "maximum": 10} for d in DIMS},
        "content_type": {"enum": ["geography", "history", "science", "culture", "other"]},
        "reasoning": {"type": "string", "maxLength": 120},
    },
    "required": DIMS + ["content_type", "reasoning"],
}


def requests(n, form):
    rubric = (HERE / "oracle_rubric.txt").read_text()
    passages = [json.loads(l) for l in (ROOT / "examples/data/oracle/passages.jsonl").open()]
    out = []
    for i in range(n + 1):  # the first one warms the server up and is not timed
        p = passages[i % len(passages)]
        out.append({
            "model": "m",
            "messages": [
                {"role": "system", "content": rubric},
                {"role": "user", "content": f"Title: {p['title']}\nPassage: {p['text']}"},
            ],
            "max_tokens": 96,
            "temperature": 0,
            "seed": 0,
            # OpenAI's form, or the one llama.cpp's servers take.
            "response_format": {"type": "json_schema",
                                "json_schema": {"name": "rubric", "schema": SCHEMA}}
            if form == "openai" else {"type": "json_object", "schema": SCHEMA},
        })
    return out


def send(url, body):
    data = json.dumps(body).encode()
    req = urllib.request.Request(url + "/chat/completions", data=data,
                                 headers={"Content-Type": "application/json"})
    t = time.perf_counter()
    with urllib.request.urlopen(req, timeout=600) as r:
        reply = json.load(r)
    return time.perf_counter() - t, reply


def valid(text):
    try:
        v = json.loads(text)
    except ValueError:
        return False
    return isinstance(v, dict) and all(k in v for k in SCHEMA["required"])


def main():
    a = argparse.ArgumentParser()
    a.add_argument("url")
    a.add_argument("concurrency", type=int)
    a.add_argument("n", type=int)
    a.add_argument("--label", default="")
    a.add_argument("--schema-form", choices=["openai", "llama"], default="openai")
    args = a.parse_args()
    reqs = requests(args.n, args.schema_form)
    send(args.url, reqs[0])
    t0 = time.perf_counter()
    with cf.ThreadPoolExecutor(args.concurrency) as pool:
        results = list(pool.map(lambda b: send(args.url, b), reqs[1:]))
    wall = time.perf_counter() - t0
    lat = sorted(r[0] for r in results)
    usage = [r[1].get("usage", {}) for r in results]
    texts = [r[1]["choices"][0]["message"]["content"] for r in results]
    print(json.dumps({
        "label": args.label,
        "concurrency": args.concurrency,
        "items": len(results),
        "items_per_s": round(len(results) / wall, 3),
        "p50_s": round(statistics.median(lat), 3),
        "p95_s": round(lat[min(len(lat) - 1, int(0.95 * len(lat)))], 3),
        "prompt_tokens": sum(u.get("prompt_tokens", 0) for u in usage),
        "completion_tokens": sum(u.get("completion_tokens", 0) for u in usage),
        "valid_replies": sum(valid(t) for t in texts),
    }), flush=True)


if __name__ == "__main__":
    main()

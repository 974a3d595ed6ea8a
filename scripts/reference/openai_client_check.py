"""Drives `pipe serve` with the official `openai` Python client, as a user would, and
prints what it saw as one JSON object (tests/serve_openai.rs checks it and compares the
logprobs with pipe's own log-softmax).

    pip install openai && python openai_client_check.py http://127.0.0.1:PORT/v1
"""
import json
import sys

import openai

client = openai.OpenAI(base_url=sys.argv[1], api_key="unused", max_retries=0)
model = client.models.list().data[0].id
out = {"model": model}
messages = [{"role": "user", "content": "Say something."}]

r = client.chat.completions.create(model=model, messages=messages, max_tokens=6, temperature=0)
out["chat"] = {"text": r.choices[0].message.content, "finish": r.choices[0].finish_reason,
               "usage": [r.usage.prompt_tokens, r.usage.completion_tokens, r.usage.total_tokens]}

r = client.chat.completions.create(model=model, messages=messages, max_tokens=6, temperature=1.0, n=2, seed=3)
out["n2"] = [c.message.content for c in r.choices]
out["n2_index"] = [c.index for c in r.choices]

r = client.chat.completions.create(model=model, messages=messages, max_tokens=3, temperature=0,
                                   logprobs=True, top_logprobs=2)
lp = r.choices[0].logprobs.content
out["logprobs"] = [{"token": t.token, "logprob": t.logprob, "bytes": t.bytes,
                    "top": [[a.token, a.logprob, a.bytes] for a in t.top_logprobs]} for t in lp]

schema = {"type": "object", "properties": {"verdict": {"enum": ["yes", "no"]},
                                          "score": {"type": "integer", "minimum": 1, "maximum": 5}},
          "required": ["verdict", "score"], "additionalProperties": False}
r = client.chat.completions.create(model=model, messages=messages, max_tokens=40, temperature=1.0, seed=5,
                                   response_format={"type": "json_schema",
                                                    "json_schema": {"name": "v", "schema": schema, "strict": True}})
out["json_schema"] = r.choices[0].message.content
r = client.chat.completions.create(model=model, messages=messages, max_tokens=60, temperature=0.7, seed=2,
                                   response_format={"type": "json_object"})
out["json_object"] = {"text": r.choices[0].message.content, "finish": r.choices[0].finish_reason}

# Streaming: the deltas add up to the text of the same request unstreamed; the usage
# comes in a last chunk without choices.
plain = client.chat.completions.create(model=model, messages=messages, max_tokens=12, temperature=0)
chunks = list(client.chat.completions.create(model=model, messages=messages, max_tokens=12, temperature=0,
                                             stream=True, stream_options={"include_usage": True}))
out["stream"] = {
    "plain": plain.choices[0].message.content,
    "joined": "".join(c.choices[0].delta.content or "" for c in chunks if c.choices),
    "pieces": sum(1 for c in chunks if c.choices and c.choices[0].delta.content),
    "finish": [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason],
    "usage": [c.usage.completion_tokens for c in chunks if c.usage is not None],
    "last_has_no_choices": chunks[-1].choices == [],
}
# A client that leaves mid-stream ends its sequence: the next request does not wait for a
# long generation nobody reads. (A 400-character string keeps EOS away for all 470 tokens;
# the tiny model's context is 512.)
import time
long = dict(model=model, messages=messages, max_tokens=470, temperature=1.0, response_format={
    "type": "json_schema", "json_schema": {"name": "t", "schema": {
        "type": "object", "properties": {"t": {"type": "string", "minLength": 400}}, "required": ["t"]}}})
t0 = time.time()
client.chat.completions.create(**long)
full = time.time() - t0
s = client.chat.completions.create(stream=True, **long)
for i, _ in enumerate(s):
    if i == 3:
        break
s.close()
t0 = time.time()
after = client.chat.completions.create(model=model, messages=messages, max_tokens=4, temperature=0)
out["after_disconnect"] = {"text": after.choices[0].message.content, "seconds": time.time() - t0,
                           "full_seconds": full}

r = client.completions.create(model=model, prompt="Once upon a time", max_tokens=5, temperature=0)
out["legacy"] = {"text": r.choices[0].text, "object": r.object, "usage": r.usage.completion_tokens}

bad = {
    "empty_messages": dict(messages=[]),
    "unknown_role": dict(messages=[{"role": "wizard", "content": "x"}]),
    "n_too_large": dict(messages=messages, n=100),
    "bad_schema": dict(messages=messages, response_format={"type": "json_schema", "json_schema": {
        "name": "p", "schema": {"type": "string", "pattern": "a+"}}}),
    "bad_type": dict(messages=messages, max_tokens="many"),
}
out["errors"] = {}
for name, kw in bad.items():
    try:
        client.chat.completions.create(model=model, **kw)
        out["errors"][name] = None
    except openai.BadRequestError as e:
        body = e.body if isinstance(e.body, dict) else {}
        out["errors"][name] = {"status": e.status_code, "body": body}
json.dump(out, sys.stdout)

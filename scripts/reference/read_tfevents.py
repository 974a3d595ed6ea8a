"""Reads TensorBoard event files with the `tensorboard` package's own reader and prints
their scalars as JSON: {"tag": [[step, value], ...]}.

    python read_tfevents.py DIR

Used by tests/tracking.rs to check that pipe's event files read back as written
(`pip install tensorboard`).
"""
import json
import sys

from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

acc = EventAccumulator(sys.argv[1], size_guidance={"scalars": 0})
acc.Reload()
out = {}
for tag in acc.Tags()["scalars"]:
    out[tag] = [[e.step, e.value] for e in acc.Scalars(tag)]
json.dump(out, sys.stdout)

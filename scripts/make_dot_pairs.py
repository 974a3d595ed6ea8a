#!/usr/bin/env python3
"""Writes the bundled (text, DOT) pairs of pipelines/anecdot.yaml
(examples/data/anecdot/pairs.jsonl): 160 pairs in five kinds, 32 each, written from
templates and seeded choices so the file is the same on every run:

- state_machine: a small class in Python or Rust whose method moves between states on
  events; the graph has one edge per transition, labelled with its event;
- flow: a described procedure with steps and yes/no decisions (diamonds);
- org_chart: who reports to whom, departments as clusters;
- dependency: packages or build targets and what each depends on;
- network: machines and the links between them (an undirected `graph`).

Each line: {"id", "kind", "text", "dot"}. With Graphviz installed (`nop` on the PATH)
every reference is checked by it and the script fails on one it rejects.

    python3 scripts/make_dot_pairs.py
"""
import json
import pathlib
import random
import shutil
import subprocess

OUT = pathlib.Path(__file__).resolve().parent.parent / "examples/data/anecdot/pairs.jsonl"
PER_KIND = 32


def q(s):
    """A DOT id: bare when it is a plain identifier, else a quoted string."""
    if s.replace("_", "a").isalnum() and s.isascii() and not s[0].isdigit():
        return s
    return '"' + s.replace("\\", "\\\\").replace('"', '\\"') + '"'


# ---------------------------------------------------------------- state machines
MACHINES = [
    ("TrafficLight", ["red", "green", "yellow"], ["timer", "emergency"]),
    ("Door", ["closed", "open", "locked"], ["push", "pull", "lock", "unlock"]),
    ("Order", ["created", "paid", "shipped", "delivered", "cancelled"], ["pay", "ship", "deliver", "cancel"]),
    ("Connection", ["idle", "connecting", "connected", "closed"], ["dial", "ack", "hangup", "timeout"]),
    ("Player", ["stopped", "playing", "paused"], ["play", "pause", "stop"]),
    ("Ticket", ["open", "in_progress", "review", "done"], ["start", "submit", "approve", "reject"]),
    ("Turnstile", ["locked", "unlocked"], ["coin", "push"]),
    ("Job", ["queued", "running", "failed", "succeeded"], ["start", "crash", "finish", "retry"]),
    ("Elevator", ["idle", "moving_up", "moving_down", "doors_open"], ["call_up", "call_down", "arrive", "close"]),
    ("Login", ["logged_out", "awaiting_code", "logged_in", "blocked"], ["submit_password", "submit_code", "fail", "logout"]),
    ("Kettle", ["off", "heating", "boiling"], ["switch_on", "hot", "switch_off"]),
    ("Upload", ["pending", "uploading", "verifying", "stored", "rejected"], ["begin", "sent", "ok", "bad_checksum"]),
]


def state_machine(rng, k):
    name, states, events = MACHINES[k % len(MACHINES)]
    states = list(states)
    # A random walk over the states gives the transitions; every state is entered or left.
    n = rng.randint(len(states), len(states) + 3)
    trans = []
    seen = set()
    for _ in range(n * 3):
        a, b = rng.sample(states, 2)
        e = rng.choice(events)
        if (a, e) in seen:
            continue
        seen.add((a, e))
        trans.append((a, e, b))
        if len(trans) == n:
            break
    start = states[0]
    rust = k % 2 == 1
    if rust:
        lines = [f"enum State {{ {', '.join(s.title().replace('_', '') for s in states)} }}", "",
                 f"impl {name} {{", "    fn on(&mut self, event: &str) {",
                 "        self.state = match (self.state, event) {"]
        for a, e, b in trans:
            lines.append(f"            (State::{a.title().replace('_', '')}, \"{e}\") => State::{b.title().replace('_', '')},")
        lines += ["            (s, _) => s,", "        };", "    }", "}"]
        code = "\n".join(lines)
        lang = "Rust"
        label = lambda s: s.title().replace("_", "")
    else:
        lines = [f"class {name}:", f"    def __init__(self):", f"        self.state = \"{start}\"", "",
                 "    def on(self, event):"]
        for i, (a, e, b) in enumerate(trans):
            kw = "if" if i == 0 else "elif"
            lines.append(f"        {kw} self.state == \"{a}\" and event == \"{e}\":")
            lines.append(f"            self.state = \"{b}\"")
        code = "\n".join(lines)
        lang = "Python"
        label = lambda s: s
    text = (f"Draw the state machine of this {lang} code as a directed graph: one node per state, "
            f"one edge per transition labelled with its event, the initial state "
            f"`{label(start)}` drawn as a double circle.\n\n{code}")
    used = []
    for a, _, b in trans:
        for s in (a, b):
            if s not in used:
                used.append(s)
    if start not in used:
        used.insert(0, start)
    dot = [f"digraph {name} {{", "  rankdir=LR;", "  node [shape=circle];",
           f"  {q(label(start))} [shape=doublecircle];"]
    for a, e, b in trans:
        dot.append(f"  {q(label(a))} -> {q(label(b))} [label=\"{e}\"];")
    dot.append("}")
    return text, "\n".join(dot)


# ---------------------------------------------------------------- flows
PROCESSES = [
    ("deploy", ["run the tests", "build the image", "push the image", "roll out to staging",
                "run the smoke tests", "roll out to production"],
     [("do the tests pass?", "notify the author"), ("are the smoke tests green?", "roll back staging")]),
    ("refund", ["receive the request", "look up the order", "check the receipt", "issue the refund",
                "email the customer"],
     [("is the order under 30 days old?", "decline the request"), ("is the item unused?", "offer store credit")]),
    ("onboarding", ["sign the contract", "create the accounts", "assign a laptop", "meet the team",
                    "start the first task"],
     [("is the background check complete?", "wait for the check"), ("is the laptop in stock?", "order a laptop")]),
    ("bug triage", ["read the report", "reproduce the bug", "assign a severity", "assign an owner",
                    "schedule the fix"],
     [("can it be reproduced?", "ask for more details"), ("is it a security issue?", "page the security team")]),
    ("loan application", ["collect the documents", "verify the identity", "check the credit score",
                          "compute the rate", "sign the agreement"],
     [("is the score above 650?", "reject the application"), ("is the income verified?", "request payslips")]),
    ("code review", ["open a pull request", "run the linters", "request a review", "address the comments",
                     "merge the branch"],
     [("do the linters pass?", "fix the lint errors"), ("is the review approved?", "revise the change")]),
    ("hiring", ["post the job", "screen the resumes", "hold the interviews", "make an offer",
                "prepare the start date"],
     [("is the candidate a fit?", "send a rejection"), ("is the offer accepted?", "reopen the position")]),
    ("incident response", ["receive the alert", "acknowledge the page", "diagnose the cause",
                           "apply the fix", "write the postmortem"],
     [("is the service down?", "monitor the metrics"), ("did the fix work?", "escalate to the lead")]),
]


def flow(rng, k):
    name, steps, decisions = PROCESSES[k % len(PROCESSES)]
    steps = steps[: rng.randint(4, len(steps))]
    d = decisions[: 1 + (k // len(PROCESSES)) % 2]
    # Decision i sits after step i+1 (0-based: after steps[1], steps[3]).
    places = sorted(rng.sample(range(1, len(steps) - 1), min(len(d), len(steps) - 2)))
    sentences = [f"Describe the {name} process as a flowchart."]
    # Node ids are the steps' own words, so a graph that names them as the text does
    # matches the reference node for node.
    ids = {s: q(s) for s in steps}
    dot = [f"digraph {q(name.replace(' ', '_'))} {{", "  node [shape=box];",
           "  start [shape=oval];", "  end [shape=oval];"]
    edges = [f"  start -> {ids[steps[0]]};"]
    text_steps = [f"First, {steps[0]}."]
    di = 0
    for i in range(len(steps) - 1):
        a, b = steps[i], steps[i + 1]
        if di < len(places) and places[di] == i:
            question, otherwise = d[di]
            dot.append(f"  {q(question)} [shape=diamond];")
            edges.append(f"  {ids[a]} -> {q(question)};")
            edges.append(f"  {q(question)} -> {ids[b]} [label=\"yes\"];")
            edges.append(f"  {q(question)} -> {q(otherwise)} [label=\"no\"];")
            edges.append(f"  {q(otherwise)} -> end;")
            text_steps.append(f"Then ask: {question} If yes, {b}; if not, {otherwise} and stop.")
            di += 1
        else:
            edges.append(f"  {ids[a]} -> {ids[b]};")
            text_steps.append(f"Next, {b}.")
    edges.append(f"  {ids[steps[-1]]} -> end;")
    text_steps.append("That ends the process.")
    text = " ".join(sentences + text_steps)
    return text, "\n".join(dot + edges + ["}"])


# ---------------------------------------------------------------- org charts
FIRST = ["Alice", "Bob", "Carol", "Dan", "Erin", "Frank", "Grace", "Heidi", "Ivan", "Judy", "Karl",
         "Lena", "Mona", "Nils", "Olga", "Pedro", "Quinn", "Rosa", "Sami", "Tara", "Uma", "Victor",
         "Wen", "Xavier", "Yara", "Zoë", "José", "Chloé"]
DEPTS = ["Engineering", "Sales", "Finance", "Research", "Support", "Marketing", "Legal", "Operations"]


def org_chart(rng, k):
    people = rng.sample(FIRST, rng.randint(6, 9))
    ceo = people[0]
    depts = rng.sample(DEPTS, 2 if len(people) < 8 else 3)
    heads = people[1 : 1 + len(depts)]
    rest = people[1 + len(depts) :]
    team = {h: [] for h in heads}
    for i, p in enumerate(rest):
        team[heads[i % len(heads)]].append(p)
    text = [f"{ceo} is the CEO."]
    for h, dpt in zip(heads, depts):
        text.append(f"{h} runs {dpt} and reports to {ceo}.")
        if team[h]:
            names = team[h]
            who = names[0] if len(names) == 1 else ", ".join(names[:-1]) + " and " + names[-1]
            verb = "reports" if len(names) == 1 else "report"
            text.append(f"In {dpt}, {who} {verb} to {h}.")
    text.append("Draw the org chart as a directed graph from manager to report, one box per person, each department a cluster.")
    dot = ["digraph org {", "  node [shape=box];", f"  {q(ceo)};"]
    for i, (h, dpt) in enumerate(zip(heads, depts)):
        members = " ".join(q(x) + ";" for x in [h] + team[h])
        dot.append(f"  subgraph cluster_{i} {{ label=\"{dpt}\"; {members} }}")
    for h in heads:
        dot.append(f"  {q(ceo)} -> {q(h)};")
        if team[h]:
            dot.append(f"  {q(h)} -> {{ {' '.join(q(x) for x in team[h])} }};")
    dot.append("}")
    return " ".join(text), "\n".join(dot)


# ---------------------------------------------------------------- dependencies
PKGS = ["app", "cli", "server", "api", "auth", "db", "cache", "http", "json", "log", "config",
        "crypto", "tls", "metrics", "queue", "storage", "utils", "parser", "render", "ui"]


def dependency(rng, k):
    n = rng.randint(5, 8)
    pkgs = rng.sample(PKGS, n)
    # A DAG: each package depends only on packages after it in the list.
    deps = {p: [] for p in pkgs}
    for i, p in enumerate(pkgs[:-1]):
        later = pkgs[i + 1 :]
        deps[p] = sorted(rng.sample(later, rng.randint(1, min(3, len(later)))), key=pkgs.index)
    target = "crate" if k % 2 else "package"
    text = []
    for p in pkgs:
        if deps[p]:
            d = deps[p]
            lst = d[0] if len(d) == 1 else ", ".join(d[:-1]) + " and " + d[-1]
            text.append(f"The {target} {p} depends on {lst}.")
        else:
            text.append(f"{p} depends on nothing.")
    text.append(f"Draw the dependency graph with an edge from each {target} to what it depends on.")
    dot = ["digraph deps {", "  node [shape=box, style=rounded];"]
    for p in pkgs:
        if len(deps[p]) > 1:
            dot.append(f"  {q(p)} -> {{ {' '.join(q(x) for x in deps[p])} }};")
        elif deps[p]:
            dot.append(f"  {q(p)} -> {q(deps[p][0])};")
        else:
            dot.append(f"  {q(p)};")
    dot.append("}")
    return " ".join(text), "\n".join(dot)


# ---------------------------------------------------------------- networks
HOSTS = ["router", "switch1", "switch2", "web1", "web2", "db1", "db2", "backup", "firewall",
         "laptop", "printer", "nas", "vpn", "dns", "mail"]


def network(rng, k):
    hosts = rng.sample(HOSTS, rng.randint(5, 8))
    links = set()
    # A spanning tree, then a few extra links.
    for i in range(1, len(hosts)):
        a, b = hosts[rng.randrange(i)], hosts[i]
        links.add(tuple(sorted((a, b), key=hosts.index)))
    for _ in range(rng.randint(0, 2)):
        a, b = rng.sample(hosts, 2)
        links.add(tuple(sorted((a, b), key=hosts.index)))
    links = sorted(links, key=lambda e: (hosts.index(e[0]), hosts.index(e[1])))
    text = [f"A small network has {len(hosts)} machines: " + ", ".join(hosts) + "."]
    for a, b in links:
        text.append(f"{a} is cabled to {b}.")
    text.append("Draw it as an undirected graph, one edge per cable.")
    dot = ["graph network {", "  node [shape=box];"]
    # Every third graph writes runs of links that continue one another as edge chains
    # (`a -- b -- c`), which a comparison must expand.
    chains = []
    for a, b in links:
        if k % 3 == 0 and chains and chains[-1][-1] == a:
            chains[-1].append(b)
        else:
            chains.append([a, b])
    for c in chains:
        dot.append("  " + " -- ".join(q(x) for x in c) + ";")
    dot.append("}")
    return " ".join(text), "\n".join(dot)


KINDS = [("state_machine", state_machine), ("flow", flow), ("org_chart", org_chart),
         ("dependency", dependency), ("network", network)]


def main():
    rng = random.Random(20261202)
    nop = shutil.which("nop")
    out = []
    for kind, make in KINDS:
        texts = set()
        k = 0
        while sum(1 for r in out if r["kind"] == kind) < PER_KIND:
            text, dot = make(rng, k)
            k += 1
            if text in texts:
                continue
            texts.add(text)
            if nop:
                r = subprocess.run([nop], input=dot.encode(), capture_output=True)
                if r.returncode != 0:
                    raise SystemExit(f"Graphviz rejects the {kind} reference:\n{dot}\n{r.stderr.decode()}")
            out.append({"id": f"{kind}-{k:03d}", "kind": kind, "text": text, "dot": dot})
    OUT.parent.mkdir(parents=True, exist_ok=True)
    with open(OUT, "w", encoding="utf-8") as f:
        for r in out:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
    print(f"wrote {len(out)} pairs to {OUT}" + ("" if nop else " (nop not found: references not checked by Graphviz)"))


if __name__ == "__main__":
    main()

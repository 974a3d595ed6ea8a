#!/usr/bin/env python3
"""Graphviz's own verdict on DOT sources, for pipe's DOT validator
(stages/src/task/dot.rs). Each case is fed to `nop` (a syntax checker from Debian's
`graphviz` package) on stdin; exit status 0 means Graphviz read it without a syntax
error. Writes stages/tests/fixtures/dot_graphviz.json.

    apt-get install -y graphviz && python3 scripts/reference/make_dot_fixtures.py
"""
import json
import pathlib
import subprocess

CASES = [
    # graph types, strict, names
    "digraph {}",
    "graph G {}",
    "strict digraph G { a -> b; a -> b }",
    "strict graph { a -- b }",
    "strict { a }",
    "digraph strict { a }",
    'digraph "my graph" { a }',
    "digraph <G> { a }",
    "digraph 12 { a }",
    "DiGraph { Node [shape=box] }",
    "subgraph { a }",
    "",
    # edge operators against the graph type
    "digraph { a -> b }",
    "digraph { a -- b }",
    "graph { a -> b }",
    "graph { a -- b -- c -- a }",
    "digraph { a--b }",
    "digraph{a->b}",
    "digraph { a - > b }",
    "digraph { a -> }",
    "digraph { a -> b -> ; }",
    "digraph { a -> b } digraph { c -- d }",
    "graph { a -- b } digraph { c -> d }",
    "graph { a -- b -- c } graph { d }",
    # edge chains and attribute lists
    "digraph { a -> b -> c [color=red]; }",
    "digraph { a -> b [x=y] -> c }",
    "digraph { a [x=y][z=w] }",
    "digraph { a [b=c d=e, f=g; h=i] }",
    "digraph { a [ ] }",
    "digraph { a [x=y,] }",
    "digraph { a [,x=y] }",
    "digraph { a [b] }",
    "digraph { a [label=y=z] }",
    "digraph { a -> b [dir=both] ; c }",
    "digraph { a , b -> c }",
    "digraph { a -> b;; }",
    "digraph { ; }",
    # attribute statements and assignments
    "digraph { node [a=b]; edge [c=d]; graph [e=f]; g=h; }",
    "digraph { edge }",
    "digraph { graph [a=b] node edge }",
    "digraph { edge -> b }",
    'digraph { "edge" -> b }',
    "digraph { a = b }",
    "digraph { x = }",
    "digraph { = x }",
    "digraph { rankdir=LR a -> b }",
    # subgraphs, named and anonymous
    'digraph { subgraph cluster_0 { label="x"; a; } }',
    "digraph { subgraph { subgraph { a } } }",
    "digraph { a -> subgraph s { b } }",
    "digraph { {a b} -> {c d} }",
    "digraph { a -> {} }",
    "digraph { { rank=same; a; b } }",
    "graph { subgraph s { a -- b } -- c }",
    # ports
    "strict digraph G { a:n -> b:s:e }",
    "digraph { a:b:c:d }",
    "digraph { a:n }",
    'digraph { a:"n":s }',
    "digraph { a:<n> }",
    "digraph { a: -> b }",
    # HTML labels
    "digraph { a [label=<<b>x</b>>] }",
    "digraph { a [label=<<b>x</b>] }",
    "digraph { a -> b [label=<a<br/>b>] }",
    "digraph { a [label=<<table><tr><td>x</td></tr></table>>] }",
    "digraph { a [label=<x>y>] }",
    "digraph { a [label=< >] }",
    "digraph { a [label=<>] }",
    # comments
    "digraph { a -> b // c\n}",
    "digraph { # comment\na }",
    "digraph { /* c */ a }",
    "digraph { a -> # c\nb }",
    "digraph { a # c\n}",
    "  # x\ndigraph { a }",
    "digraph { a -> b } # trailing",
    "digraph { a -> b /* unterminated }",
    "digraph { a -> b } /* x",
    # IDs: names, numbers, unicode, quoted and escaped strings, concatenation
    'digraph { "é" -> ü }',
    "digraph { _a1 -> Ωmega }",
    "digraph { a -> 🙂 }",
    "digraph { 1.5 -> -.3 }",
    "digraph { a -> .5 }",
    "digraph { a->-1 }",
    "digraph { a -> - }",
    "digraph { a -> 1abc }",
    "digraph { -1 -> -1.5.3 }",
    "digraph { 1e5 }",
    "digraph { ab-c }",
    "digraph { a.b }",
    "digraph { a @ b }",
    "digraph { a [@x] }",
    'digraph { a [label="x\\"y"] }',
    'digraph { a [label="\\\\"] }',
    'digraph { a [label="x\ny"] }',
    'digraph { a [label="x\\\ny"] }',
    'digraph { "unterminated }',
    'digraph { a [label=""] }',
    'digraph { "a" + "b" -> c }',
    'digraph { a + "b" }',
    'digraph { a -> "b" + c }',
    'digraph { "a" + }',
    'digraph { "a" + "b" + "c" }',
    'digraph { a [label="a" + "b"] }',
    # structure of the whole input
    "digraph { a } }",
    "digraph { a",
    "digraph { a -> b; } extra",
    "digraph G { a } extra { }",
    "digraph { a }\r\n",
    "digraph {\n  a -> b\n  b -- c\n}",
    "digraph G {\n  start [shape=Mdiamond];\n  start -> a0 -> a1 -> end;\n  a1 -> b3 [style=dashed];\n}",
]


def main():
    version = subprocess.run(["dot", "-V"], capture_output=True, text=True).stderr.strip()
    out = []
    for text in CASES:
        r = subprocess.run(["nop"], input=text.encode(), capture_output=True)
        out.append(
            {
                "text": text,
                "graphviz_accepts": r.returncode == 0,
                "graphviz_says": r.stderr.decode(errors="replace").strip(),
            }
        )
    path = pathlib.Path(__file__).resolve().parents[2] / "stages/tests/fixtures/dot_graphviz.json"
    path.write_text(
        json.dumps(
            {"graphviz": version, "command": "nop < case", "cases": out},
            ensure_ascii=False,
            indent=1,
        )
        + "\n"
    )
    print(f"{len(out)} cases, {sum(c['graphviz_accepts'] for c in out)} accepted -> {path}")


if __name__ == "__main__":
    main()

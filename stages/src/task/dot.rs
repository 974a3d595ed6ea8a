//! Graphviz DOT: syntax validity as Graphviz itself judges it, extraction of a graph
//! from a model's reply, and structural scores against a reference graph.
//!
//! Hand-written because validity has to mean "Graphviz accepts it", and the DOT
//! crates implement the grammar of Graphviz's language page rather than the one its
//! scanner and yacc grammar enforce. The differences decide verdicts: `#` starts a
//! comment anywhere on a line; keywords are case-insensitive and never IDs unless
//! quoted; `"a" + "b"` concatenates quoted strings only; a statement can be a
//! comma-separated node list (`a, b -> c`); attribute lists come only after the whole
//! edge chain; a number runs into a following letter or dot without a separator
//! (`1abc` is `1` then `abc`); a file can hold several graphs, each with its own edge
//! operator (`--` in a `graph`, `->` in a `digraph`, anything else a syntax error);
//! HTML strings nest `<` and `>`; an unterminated `/*` ends the input. Every verdict
//! here is checked against Graphviz 2.43's `nop` on the cases in
//! `stages/tests/fixtures/dot_graphviz.json` (`scripts/reference/make_dot_fixtures.py`).

use std::collections::BTreeSet;

/// Where a syntax error is, and what was expected there.
#[derive(Debug, Clone, PartialEq)]
pub struct DotError {
    /// 1-based line.
    pub line: usize,
    /// 1-based column, in characters.
    pub col: usize,
    /// What went wrong.
    pub message: String,
}

impl std::fmt::Display for DotError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}:{}: {}", self.line, self.col, self.message)
    }
}

/// A parsed graph's structure: what the scores compare.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Graph {
    /// `digraph` (true) or `graph`.
    pub directed: bool,
    /// `strict`.
    pub strict: bool,
    /// Canonical node names ([`canonical`]).
    pub nodes: BTreeSet<String>,
    /// Edges between canonical names, edge chains and subgraph ends expanded;
    /// undirected edges with their ends in sorted order.
    pub edges: BTreeSet<(String, String)>,
}

#[derive(Debug, Clone, PartialEq)]
enum Tok {
    /// An ID: name, number, quoted string (unescaped) or HTML string (with its `<>`).
    Id {
        text: String,
        quoted: bool,
    },
    Kw(Kw),
    Punct(char),
    /// `->` (true) or `--`.
    EdgeOp(bool),
    /// A character that starts no token.
    Bad(char),
    Eof,
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum Kw {
    Strict,
    Graph,
    Digraph,
    Subgraph,
    Node,
    Edge,
}

#[derive(Debug, Clone)]
struct Token {
    tok: Tok,
    line: usize,
    col: usize,
    /// The source text, for "near '…'" messages.
    raw: String,
}

fn is_name_start(c: char) -> bool {
    c.is_ascii_alphabetic() || c == '_' || !c.is_ascii()
}

fn is_name_char(c: char) -> bool {
    is_name_start(c) || c.is_ascii_digit()
}

/// Splits DOT source into tokens; a lexical error (an unterminated string) is an error.
fn lex(src: &str) -> Result<Vec<Token>, DotError> {
    let chars: Vec<char> = src.chars().collect();
    let (mut i, mut line, mut col) = (0usize, 1usize, 1usize);
    let mut out = Vec::new();
    // Advances over chars[i..j], keeping line and column.
    let advance = |i: &mut usize, j: usize, line: &mut usize, col: &mut usize| {
        for &c in &chars[*i..j] {
            if c == '\n' {
                *line += 1;
                *col = 1;
            } else {
                *col += 1;
            }
        }
        *i = j;
    };
    while i < chars.len() {
        let c = chars[i];
        let next = chars.get(i + 1).copied();
        let (l0, c0) = (line, col);
        if c.is_whitespace() {
            {
                let j = i + 1;
                advance(&mut i, j, &mut line, &mut col)
            };
            continue;
        }
        if c == '#' || (c == '/' && next == Some('/')) {
            let end = chars[i..]
                .iter()
                .position(|&x| x == '\n')
                .map_or(chars.len(), |p| i + p);
            advance(&mut i, end, &mut line, &mut col);
            continue;
        }
        if c == '/' && next == Some('*') {
            let end = (i + 2..chars.len().saturating_sub(1))
                .find(|&j| chars[j] == '*' && chars[j + 1] == '/');
            match end {
                Some(j) => advance(&mut i, j + 2, &mut line, &mut col),
                // Graphviz's scanner ends the input at an unterminated comment.
                None => {
                    out.push(Token {
                        tok: Tok::Eof,
                        line,
                        col,
                        raw: "an unterminated /* comment".into(),
                    });
                    return Ok(out);
                }
            }
            continue;
        }
        let start = i;
        let tok = if c == '-' && (next == Some('>') || next == Some('-')) {
            {
                let j = i + 2;
                advance(&mut i, j, &mut line, &mut col)
            };
            Tok::EdgeOp(next == Some('>'))
        } else if c.is_ascii_digit()
            || (c == '.' && next.is_some_and(|n| n.is_ascii_digit()))
            || (c == '-'
                && (next.is_some_and(|n| n.is_ascii_digit())
                    || (next == Some('.') && chars.get(i + 2).is_some_and(|n| n.is_ascii_digit()))))
        {
            let mut j = i + usize::from(c == '-');
            while j < chars.len() && chars[j].is_ascii_digit() {
                j += 1;
            }
            if j < chars.len() && chars[j] == '.' {
                j += 1;
                while j < chars.len() && chars[j].is_ascii_digit() {
                    j += 1;
                }
            }
            let text: String = chars[i..j].iter().collect();
            advance(&mut i, j, &mut line, &mut col);
            Tok::Id {
                text,
                quoted: false,
            }
        } else if is_name_start(c) {
            let mut j = i;
            while j < chars.len() && is_name_char(chars[j]) {
                j += 1;
            }
            let text: String = chars[i..j].iter().collect();
            advance(&mut i, j, &mut line, &mut col);
            match text.to_ascii_lowercase().as_str() {
                "strict" => Tok::Kw(Kw::Strict),
                "graph" => Tok::Kw(Kw::Graph),
                "digraph" => Tok::Kw(Kw::Digraph),
                "subgraph" => Tok::Kw(Kw::Subgraph),
                "node" => Tok::Kw(Kw::Node),
                "edge" => Tok::Kw(Kw::Edge),
                _ => Tok::Id {
                    text,
                    quoted: false,
                },
            }
        } else if c == '"' {
            let mut j = i + 1;
            let mut text = String::new();
            loop {
                match chars.get(j) {
                    None => {
                        return Err(DotError {
                            line: l0,
                            col: c0,
                            message: "a quoted string is not closed (missing `\"`)".into(),
                        })
                    }
                    Some('"') => break,
                    Some('\\') => match chars.get(j + 1) {
                        Some('"') => {
                            text.push('"');
                            j += 2;
                        }
                        Some('\n') => j += 2,
                        Some(&n) => {
                            text.push('\\');
                            text.push(n);
                            j += 2;
                        }
                        None => j += 1,
                    },
                    Some(&x) => {
                        text.push(x);
                        j += 1;
                    }
                }
            }
            advance(&mut i, j + 1, &mut line, &mut col);
            Tok::Id { text, quoted: true }
        } else if c == '<' {
            let mut depth = 0usize;
            let mut j = i;
            loop {
                match chars.get(j) {
                    None => {
                        return Err(DotError {
                            line: l0,
                            col: c0,
                            message:
                                "an HTML string is not closed (its `<` and `>` do not balance)"
                                    .into(),
                        })
                    }
                    Some('<') => depth += 1,
                    Some('>') => {
                        depth -= 1;
                        if depth == 0 {
                            break;
                        }
                    }
                    Some(_) => {}
                }
                j += 1;
            }
            let text: String = chars[i..=j].iter().collect();
            advance(&mut i, j + 1, &mut line, &mut col);
            Tok::Id {
                text,
                quoted: false,
            }
        } else if "{}[];,:=+".contains(c) {
            {
                let j = i + 1;
                advance(&mut i, j, &mut line, &mut col)
            };
            Tok::Punct(c)
        } else {
            {
                let j = i + 1;
                advance(&mut i, j, &mut line, &mut col)
            };
            Tok::Bad(c)
        };
        out.push(Token {
            tok,
            line: l0,
            col: c0,
            raw: chars[start..i].iter().collect(),
        });
    }
    out.push(Token {
        tok: Tok::Eof,
        line,
        col,
        raw: "the end of the input".into(),
    });
    Ok(out)
}

struct Parser {
    toks: Vec<Token>,
    at: usize,
    directed: bool,
    graph: Graph,
    /// Whether this graph's structure is being recorded (the first graph only).
    record: bool,
}

impl Parser {
    fn peek(&self) -> &Tok {
        &self.toks[self.at].tok
    }

    fn peek2(&self) -> &Tok {
        &self.toks[(self.at + 1).min(self.toks.len() - 1)].tok
    }

    fn bump(&mut self) -> Token {
        let t = self.toks[self.at].clone();
        if self.at + 1 < self.toks.len() {
            self.at += 1;
        }
        t
    }

    fn error(&self, expected: &str) -> DotError {
        let t = &self.toks[self.at];
        let found = match &t.tok {
            Tok::Eof => t.raw.clone(),
            Tok::EdgeOp(true) if !self.directed => {
                return DotError {
                    line: t.line,
                    col: t.col,
                    message: "`->` in an undirected graph (a `graph` takes `--`)".into(),
                }
            }
            Tok::EdgeOp(false) if self.directed => {
                return DotError {
                    line: t.line,
                    col: t.col,
                    message: "`--` in a directed graph (a `digraph` takes `->`)".into(),
                }
            }
            _ => format!("'{}'", t.raw),
        };
        DotError {
            line: t.line,
            col: t.col,
            message: format!("syntax error near {found}: expected {expected}"),
        }
    }

    fn punct(&self, c: char) -> bool {
        *self.peek() == Tok::Punct(c)
    }

    fn expect(&mut self, c: char, expected: &str) -> Result<(), DotError> {
        if self.punct(c) {
            self.bump();
            Ok(())
        } else {
            Err(self.error(expected))
        }
    }

    fn at_atom(&self) -> bool {
        matches!(self.peek(), Tok::Id { .. })
    }

    /// `ID`, or quoted strings joined by `+`.
    fn atom(&mut self, expected: &str) -> Result<String, DotError> {
        let Tok::Id { text, quoted } = self.peek().clone() else {
            return Err(self.error(expected));
        };
        self.bump();
        let mut text = text;
        if quoted {
            while self.punct('+') {
                self.bump();
                match self.peek().clone() {
                    Tok::Id {
                        text: t,
                        quoted: true,
                    } => {
                        self.bump();
                        text.push_str(&t);
                    }
                    _ => return Err(self.error("a quoted string after `+`")),
                }
            }
        }
        Ok(text)
    }

    fn file(&mut self) -> Result<usize, DotError> {
        let mut graphs = 0;
        while *self.peek() != Tok::Eof {
            self.record = graphs == 0;
            self.graph_def()?;
            graphs += 1;
        }
        Ok(graphs)
    }

    fn graph_def(&mut self) -> Result<(), DotError> {
        let strict = *self.peek() == Tok::Kw(Kw::Strict);
        if strict {
            self.bump();
        }
        self.directed = match self.peek() {
            Tok::Kw(Kw::Digraph) => true,
            Tok::Kw(Kw::Graph) => false,
            _ => return Err(self.error("`graph` or `digraph`")),
        };
        self.bump();
        if self.record {
            self.graph.directed = self.directed;
            self.graph.strict = strict;
        }
        if self.at_atom() {
            self.atom("a graph name")?;
        }
        self.body()?;
        Ok(())
    }

    /// `{ stmt* }`; returns the nodes it mentions.
    fn body(&mut self) -> Result<Vec<String>, DotError> {
        self.expect('{', "`{`")?;
        let mut nodes = Vec::new();
        while !self.punct('}') {
            nodes.extend(self.stmt()?);
            if self.punct(';') {
                self.bump();
            }
        }
        self.bump();
        Ok(nodes)
    }

    fn stmt(&mut self) -> Result<Vec<String>, DotError> {
        match self.peek().clone() {
            Tok::Kw(Kw::Graph | Kw::Node | Kw::Edge) => {
                self.bump();
                if !self.punct('[') {
                    return Err(self.error("`[` (an attribute list)"));
                }
                while self.punct('[') {
                    self.attr_list()?;
                }
                Ok(Vec::new())
            }
            Tok::Id { .. } if *self.peek2() == Tok::Punct('=') => {
                self.atom("an attribute name")?;
                self.bump();
                self.atom("an attribute value")?;
                Ok(Vec::new())
            }
            Tok::Id { .. } | Tok::Kw(Kw::Subgraph) | Tok::Punct('{') => self.compound(),
            _ => Err(self.error("a statement")),
        }
    }

    fn compound(&mut self) -> Result<Vec<String>, DotError> {
        let mut left = self.simple()?;
        let mut all = left.clone();
        while let Tok::EdgeOp(arrow) = *self.peek() {
            if arrow != self.directed {
                return Err(self.error(""));
            }
            self.bump();
            let right = self.simple()?;
            if self.record {
                for a in &left {
                    for b in &right {
                        let e = if self.directed || a <= b {
                            (a.clone(), b.clone())
                        } else {
                            (b.clone(), a.clone())
                        };
                        self.graph.edges.insert(e);
                    }
                }
            }
            all.extend(right.iter().cloned());
            left = right;
        }
        while self.punct('[') {
            self.attr_list()?;
        }
        Ok(all)
    }

    /// A node list or a subgraph; returns its nodes.
    fn simple(&mut self) -> Result<Vec<String>, DotError> {
        match self.peek() {
            Tok::Kw(Kw::Subgraph) => {
                self.bump();
                if self.at_atom() {
                    self.atom("a subgraph name")?;
                }
                self.body()
            }
            Tok::Punct('{') => self.body(),
            Tok::Id { .. } => {
                let mut nodes = vec![self.node()?];
                while self.punct(',') {
                    self.bump();
                    nodes.push(self.node()?);
                }
                Ok(nodes)
            }
            _ => Err(self.error("a node ID or a subgraph")),
        }
    }

    fn node(&mut self) -> Result<String, DotError> {
        let name = canonical(&self.atom("a node ID")?);
        for _ in 0..2 {
            if !self.punct(':') {
                break;
            }
            self.bump();
            self.atom("a port after `:`")?;
        }
        if self.record {
            self.graph.nodes.insert(name.clone());
        }
        Ok(name)
    }

    fn attr_list(&mut self) -> Result<(), DotError> {
        self.expect('[', "`[`")?;
        while !self.punct(']') {
            self.atom("an attribute name or `]`")?;
            self.expect('=', "`=` after an attribute name")?;
            self.atom("an attribute value")?;
            if self.punct(';') || self.punct(',') {
                self.bump();
            }
        }
        self.bump();
        Ok(())
    }
}

/// Parses DOT source as Graphviz reads a file: zero or more graphs. Returns the
/// first graph's structure, or the first syntax error. A source with no graph at
/// all is an error here (Graphviz accepts an empty file; a reply must hold a graph).
pub fn parse(src: &str) -> Result<Graph, DotError> {
    let toks = lex(src)?;
    let mut p = Parser {
        toks,
        at: 0,
        directed: true,
        graph: Graph::default(),
        record: true,
    };
    if p.file()? == 0 {
        return Err(DotError {
            line: 1,
            col: 1,
            message: "no graph: expected `graph` or `digraph`".into(),
        });
    }
    Ok(p.graph)
}

/// Whether Graphviz would read `src` without a syntax error (an empty source too).
pub fn graphviz_accepts(src: &str) -> Result<(), DotError> {
    let toks = lex(src)?;
    let mut p = Parser {
        toks,
        at: 0,
        directed: true,
        graph: Graph::default(),
        record: false,
    };
    p.file().map(|_| ())
}

/// A node name for comparison: surrounding whitespace removed, inner whitespace runs
/// made one space, lower case. `"Start State"`, `start state` and `START  state`
/// are one node.
pub fn canonical(name: &str) -> String {
    name.split_whitespace()
        .collect::<Vec<_>>()
        .join(" ")
        .to_lowercase()
}

/// The DOT in a model's reply: the first fenced code block if there is one, else
/// from the first `[strict] graph|digraph` keyword to its balanced closing brace
/// (braces inside strings and comments do not count), else `None`.
pub fn extract(reply: &str) -> Option<String> {
    if let Some(start) = reply.find("```") {
        let after = &reply[start + 3..];
        let body_start = after.find('\n').map_or(after.len(), |p| p + 1);
        let body = &after[body_start..];
        let end = body.find("```").unwrap_or(body.len());
        return Some(body[..end].trim().to_string());
    }
    // The first graph header: `[strict] graph|digraph [ID] {`, its keyword a word of
    // its own ("the graph is digraph G {" starts at `digraph`).
    let lower = reply.to_ascii_lowercase();
    let bytes = lower.as_bytes();
    let mut starts: Vec<usize> = Vec::new();
    for kw in ["strict", "digraph", "graph"] {
        let mut search = 0;
        while let Some(p) = lower[search..].find(kw) {
            let p = search + p;
            let before_ok = p == 0 || !is_name_char(bytes[p - 1] as char);
            let after_ok = bytes
                .get(p + kw.len())
                .is_none_or(|&b| !is_name_char(b as char));
            if before_ok && after_ok {
                starts.push(p);
            }
            search = p + kw.len();
        }
    }
    starts.sort_unstable();
    let is_header = |from: usize| {
        // Only the header is lexed: a broken string later on must not hide it.
        let Some(brace) = reply[from..].find('{') else {
            return false;
        };
        let Ok(toks) = lex(&reply[from..=from + brace]) else {
            return false;
        };
        let mut t = toks.iter().map(|t| &t.tok).peekable();
        if t.peek() == Some(&&Tok::Kw(Kw::Strict)) {
            t.next();
        }
        if !matches!(t.next(), Some(Tok::Kw(Kw::Graph | Kw::Digraph))) {
            return false;
        }
        if matches!(t.peek(), Some(Tok::Id { .. })) {
            t.next();
        }
        t.next() == Some(&Tok::Punct('{'))
    };
    let from = *starts.iter().find(|&&p| is_header(p))?;
    let rest = &reply[from..];
    // Walk tokens to the brace that closes the first one.
    let toks = match lex(rest) {
        Ok(t) => t,
        Err(_) => return Some(rest.trim().to_string()),
    };
    let mut depth = 0i32;
    for t in &toks {
        match t.tok {
            Tok::Punct('{') => depth += 1,
            Tok::Punct('}') => {
                depth -= 1;
                if depth == 0 {
                    // Byte offset of (line, col) + 1 in `rest`.
                    let end = offset_of(rest, t.line, t.col) + 1;
                    return Some(rest[..end].trim().to_string());
                }
            }
            _ => {}
        }
    }
    Some(rest.trim().to_string())
}

fn offset_of(s: &str, line: usize, col: usize) -> usize {
    let (mut l, mut c) = (1, 1);
    for (i, ch) in s.char_indices() {
        if l == line && c == col {
            return i;
        }
        if ch == '\n' {
            l += 1;
            c = 1;
        } else {
            c += 1;
        }
    }
    s.len()
}

/// Node and edge precision, recall and F1 of `pred` against `reference`:
/// `[node P, R, F1, edge P, R, F1]`. Names are canonical and edge chains expanded
/// already ([`Graph`]); when one graph is directed and the other not, edges are
/// compared as connections (each pair's ends in sorted order), so a reply that draws
/// the right links with the wrong graph type keeps its edge credit and loses only
/// its validity where Graphviz would refuse it.
pub fn compare(pred: &Graph, reference: &Graph) -> [f64; 6] {
    let (np, nr, nf) = prf(&pred.nodes, &reference.nodes);
    let (ep, er, ef) = if pred.directed == reference.directed {
        prf(&pred.edges, &reference.edges)
    } else {
        let undirected = |g: &Graph| -> BTreeSet<(String, String)> {
            g.edges
                .iter()
                .map(|(a, b)| {
                    if a <= b {
                        (a.clone(), b.clone())
                    } else {
                        (b.clone(), a.clone())
                    }
                })
                .collect()
        };
        prf(&undirected(pred), &undirected(reference))
    };
    [np, nr, nf, ep, er, ef]
}

/// Precision, recall and F1 of a predicted set against a reference set. Both empty:
/// all 1; a side empty and the other not: all 0.
pub fn prf<T: Ord>(pred: &BTreeSet<T>, reference: &BTreeSet<T>) -> (f64, f64, f64) {
    if pred.is_empty() && reference.is_empty() {
        return (1.0, 1.0, 1.0);
    }
    let hit = pred.intersection(reference).count() as f64;
    let p = if pred.is_empty() {
        0.0
    } else {
        hit / pred.len() as f64
    };
    let r = if reference.is_empty() {
        0.0
    } else {
        hit / reference.len() as f64
    };
    let f = if p + r == 0.0 {
        0.0
    } else {
        2.0 * p * r / (p + r)
    };
    (p, r, f)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn set(items: &[&str]) -> BTreeSet<String> {
        items.iter().map(|s| s.to_string()).collect()
    }

    /// Every verdict equals Graphviz's (`nop`) on the committed cases.
    #[test]
    fn verdicts_match_graphviz() {
        let fixture: serde_json::Value =
            serde_json::from_str(include_str!("../../tests/fixtures/dot_graphviz.json")).unwrap();
        let cases = fixture["cases"].as_array().unwrap();
        assert!(cases.len() >= 50);
        let mut wrong = Vec::new();
        for c in cases {
            let text = c["text"].as_str().unwrap();
            let graphviz = c["graphviz_accepts"].as_bool().unwrap();
            let ours = graphviz_accepts(text);
            if ours.is_ok() != graphviz {
                wrong.push(format!(
                    "{text:?}: graphviz {graphviz} ({}), pipe {ours:?}",
                    c["graphviz_says"]
                ));
            }
        }
        assert!(
            wrong.is_empty(),
            "{} of {} differ:\n{}",
            wrong.len(),
            cases.len(),
            wrong.join("\n")
        );
    }

    #[test]
    fn edge_chains_and_subgraph_ends_expand() {
        let g = parse("digraph { a -> b -> c; {x y} -> \"Z\" [color=red] }").unwrap();
        assert_eq!(g.nodes, set(&["a", "b", "c", "x", "y", "z"]));
        let e: Vec<(&str, &str)> = g
            .edges
            .iter()
            .map(|(a, b)| (a.as_str(), b.as_str()))
            .collect();
        assert_eq!(e, vec![("a", "b"), ("b", "c"), ("x", "z"), ("y", "z")]);
        let u = parse("graph { b -- a -- c }").unwrap();
        assert!(u.edges.contains(&("a".into(), "b".into())));
        assert!(u.edges.contains(&("a".into(), "c".into())));
    }

    #[test]
    fn node_and_edge_f1_by_hand() {
        // Reference: 4 nodes, 3 edges. Prediction: 3 of the nodes plus one extra,
        // 2 of the edges plus one wrong one.
        let r = parse("digraph { start -> load -> parse -> done }").unwrap();
        let p = parse("digraph { Start -> Load -> Parse; load -> fail }").unwrap();
        let (np, nr, nf) = prf(&p.nodes, &r.nodes);
        assert_eq!((np, nr), (3.0 / 4.0, 3.0 / 4.0));
        assert!((nf - 0.75).abs() < 1e-12);
        let (ep, er, ef) = prf(&p.edges, &r.edges);
        assert_eq!((ep, er), (2.0 / 3.0, 2.0 / 3.0));
        assert!((ef - 2.0 / 3.0).abs() < 1e-12);
        assert_eq!(
            prf::<String>(&BTreeSet::new(), &BTreeSet::new()),
            (1.0, 1.0, 1.0)
        );
        assert_eq!(prf(&BTreeSet::new(), &set(&["a"])), (0.0, 0.0, 0.0));
    }

    #[test]
    fn compare_reads_a_graph_type_mismatch_as_connections() {
        let r = parse("graph { b -- a; b -- c }").unwrap();
        // Same type: ends sorted on both sides, so `c -- b` is `b -- c`.
        let same = compare(&parse("graph { a -- b; c -- b; c -- d }").unwrap(), &r);
        // Nodes {a, b, c, d} against {a, b, c}; edges {a–b, b–c, c–d} against {a–b, b–c}.
        assert_eq!(same[..2], [0.75, 1.0]);
        assert!((same[2] - 6.0 / 7.0).abs() < 1e-12);
        assert_eq!(same[3..5], [2.0 / 3.0, 1.0]);
        assert!((same[5] - 0.8).abs() < 1e-12);
        // A digraph drawing `c -> b` and `a -> b`: both links are there.
        let mixed = compare(&parse("digraph { c -> b; a -> b }").unwrap(), &r);
        assert_eq!(mixed, [1.0; 6]);
        // Within digraphs direction counts.
        let d = parse("digraph { a -> b }").unwrap();
        assert_eq!(compare(&parse("digraph { b -> a }").unwrap(), &d)[5], 0.0);
    }

    #[test]
    fn errors_name_the_line_and_column() {
        let e = parse("digraph {\n  a -> b\n  b -- c\n}").unwrap_err();
        assert_eq!((e.line, e.col), (3, 5), "{e}");
        assert!(e.message.contains("`--` in a directed graph"), "{e}");
        let e = parse("digraph { a -> }").unwrap_err();
        assert_eq!((e.line, e.col), (1, 16), "{e}");
    }

    #[test]
    fn extraction_prefers_a_fence_then_balances_braces() {
        let r = "Here:\n```dot\ndigraph { a -> b }\n```\nthanks";
        assert_eq!(extract(r).unwrap(), "digraph { a -> b }");
        let r = "The graph is digraph G { a [label=\"}\"]; a -> b } and that is all.";
        assert_eq!(extract(r).unwrap(), "digraph G { a [label=\"}\"]; a -> b }");
        assert_eq!(extract("no graph here, a paragraph"), None);
        // "subgraph" inside prose is not a graph keyword.
        assert_eq!(extract("see the subgraphs"), None);
        // A broken graph is still found (and then judged invalid).
        let r = "digraph { a [label=\"x] }";
        assert_eq!(extract(r).unwrap(), r);
        assert!(parse(r).is_err());
    }
}

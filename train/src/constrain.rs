//! Schema-constrained decoding: a JSON-schema subset compiled to a byte automaton, walked
//! token by token over the model's vocabulary, so that every sampled token keeps the text
//! a prefix of a valid reply and EOS is allowed only once the reply is complete.
//!
//! The subset: objects with typed properties (in declared order; required ones always
//! written, optional ones may be left out), arrays (`items`, `minItems`, `maxItems`),
//! strings (`minLength`, `maxLength` in characters, `enum`), integers (`minimum`,
//! `maximum`, exclusive bounds; exact, by a digit automaton), numbers, booleans, null,
//! `enum` and `const`. The written form is compact JSON with at most one space after `:`
//! and `,` (a model that writes `{"a": 1}` is fine; one that pads with newlines is not
//! offered the newline), strings escaped as JSON escapes them; integers at most 18 digits,
//! numbers at most 17 digits before the point and 20 after it (what shortest round-trip
//! writers print for an f64) and a two-digit exponent, so no branch runs forever and every number
//! parses as an f64.
//!
//! Construction: the schema becomes a byte NFA (UTF-8 aware: a string character is a whole
//! code point's bytes), determinised lazily (subset construction on first visit). For each
//! DFA state reached, the allowed tokens are found by walking a trie of the vocabulary's
//! token bytes alongside the DFA, so a dead prefix prunes every token that starts with it;
//! the result is cached per state for the life of the [`Grammar`], which the caller keeps
//! per (tokenizer, schema). Hand-written: the Rust crates for this (outlines-core,
//! llguidance) bring their own tokenizer layers and far larger grammars than replies need.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use serde_json::Value;

/// A reply shape the automaton enforces.
#[derive(Debug, Clone, PartialEq)]
pub enum Schema {
    /// Properties in written order.
    Object(Vec<Property>),
    /// A list of `items`.
    Array {
        /// Each item.
        items: Box<Schema>,
        /// At least this many.
        min: usize,
        /// At most this many.
        max: Option<usize>,
    },
    /// A string of `min..=max` characters.
    String {
        /// Fewest characters.
        min: usize,
        /// Most characters.
        max: Option<usize>,
    },
    /// One of these JSON values, written as `serde_json` writes them.
    Enum(Vec<Value>),
    /// An integer in `min..=max`.
    Integer {
        /// Smallest value.
        min: i64,
        /// Largest value.
        max: i64,
    },
    /// Any JSON number.
    Number,
    /// `true` or `false`.
    Boolean,
    /// `null`.
    Null,
    /// Any JSON value nested at most this deep (`response_format: json_object` is
    /// `Object` of these).
    Any(usize),
    /// Any JSON object whose values nest at most this deep.
    AnyObject(usize),
}

/// One property of an object.
#[derive(Debug, Clone, PartialEq)]
pub struct Property {
    /// Its key.
    pub name: String,
    /// Its value.
    pub schema: Schema,
    /// Always written.
    pub required: bool,
}

/// How deep the values of a free-form object (`{"type": "object"}`) may nest.
pub const ANY_DEPTH: usize = 3;

/// Integers beyond ±10^18 are not offered (they would not fit an i64 anyway).
const INT_LIMIT: i64 = 1_000_000_000_000_000_000;

impl Schema {
    /// Reads a JSON schema; anything outside the subset is an error naming where.
    pub fn from_json_schema(v: &Value) -> Result<Schema, String> {
        Self::read(v, "$")
    }

    fn read(v: &Value, at: &str) -> Result<Schema, String> {
        let obj = v
            .as_object()
            .ok_or_else(|| format!("{at}: expected a schema object"))?;
        if let Some(c) = obj.get("const") {
            return Ok(Schema::Enum(vec![c.clone()]));
        }
        if let Some(e) = obj.get("enum") {
            let items = e
                .as_array()
                .filter(|a| !a.is_empty())
                .ok_or_else(|| format!("{at}.enum: expected a non-empty list"))?;
            return Ok(Schema::Enum(items.clone()));
        }
        for unsupported in [
            "pattern",
            "format",
            "oneOf",
            "anyOf",
            "allOf",
            "$ref",
            "not",
            "patternProperties",
        ] {
            if obj.contains_key(unsupported) {
                return Err(format!(
                    "{at}.{unsupported}: not supported by constrained decoding (supported: type, properties, required, items, minItems, maxItems, minLength, maxLength, minimum, maximum, enum, const)"
                ));
            }
        }
        let ty = obj.get("type").and_then(Value::as_str).ok_or_else(|| {
            format!(
                "{at}.type: expected one of object, array, string, integer, number, boolean, null"
            )
        })?;
        let uint = |k: &str| -> Result<Option<usize>, String> {
            match obj.get(k) {
                None => Ok(None),
                Some(x) => x
                    .as_u64()
                    .map(|n| Some(n as usize))
                    .ok_or_else(|| format!("{at}.{k}: expected a non-negative integer")),
            }
        };
        match ty {
            "object" => {
                let props = match obj.get("properties") {
                    // An object of anything (JSON schema's meaning), nested a few deep.
                    None => return Ok(Schema::AnyObject(ANY_DEPTH)),
                    Some(Value::Object(p)) => p.clone(),
                    Some(_) => return Err(format!("{at}.properties: expected an object")),
                };
                let required: Vec<&str> = match obj.get("required") {
                    None => Vec::new(),
                    Some(Value::Array(r)) => r.iter().filter_map(Value::as_str).collect(),
                    Some(_) => return Err(format!("{at}.required: expected a list of names")),
                };
                for r in &required {
                    if !props.contains_key(*r) {
                        return Err(format!("{at}.required: `{r}` is not a property"));
                    }
                }
                let mut out = Vec::new();
                for (name, s) in &props {
                    out.push(Property {
                        name: name.clone(),
                        schema: Self::read(s, &format!("{at}.properties.{name}"))?,
                        required: required.contains(&name.as_str()),
                    });
                }
                Ok(Schema::Object(out))
            }
            "array" => {
                let items = obj
                    .get("items")
                    .ok_or_else(|| format!("{at}.items: an array needs `items`"))?;
                let (min, max) = (uint("minItems")?.unwrap_or(0), uint("maxItems")?);
                if max.is_some_and(|m| m < min) {
                    return Err(format!("{at}: maxItems is below minItems"));
                }
                Ok(Schema::Array {
                    items: Box::new(Self::read(items, &format!("{at}.items"))?),
                    min,
                    max,
                })
            }
            "string" => {
                let (min, max) = (uint("minLength")?.unwrap_or(0), uint("maxLength")?);
                if max.is_some_and(|m| m < min) {
                    return Err(format!("{at}: maxLength is below minLength"));
                }
                Ok(Schema::String { min, max })
            }
            "integer" => {
                let bound = |k: &str, ex: &str, lower: bool| -> Result<i64, String> {
                    let num = |key: &str| -> Result<Option<f64>, String> {
                        match obj.get(key) {
                            None => Ok(None),
                            Some(x) => x
                                .as_f64()
                                .map(Some)
                                .ok_or_else(|| format!("{at}.{key}: expected a number")),
                        }
                    };
                    let mut b = if lower { -INT_LIMIT } else { INT_LIMIT };
                    if let Some(x) = num(k)? {
                        let x = if lower { x.ceil() } else { x.floor() };
                        b = if lower { b.max(x as i64) } else { b.min(x as i64) };
                    }
                    if let Some(x) = num(ex)? {
                        let x = if lower { x.floor() as i64 + 1 } else { x.ceil() as i64 - 1 };
                        b = if lower { b.max(x) } else { b.min(x) };
                    }
                    Ok(b)
                };
                let min = bound("minimum", "exclusiveMinimum", true)?;
                let max = bound("maximum", "exclusiveMaximum", false)?;
                if min > max {
                    return Err(format!("{at}: no integer is between minimum and maximum"));
                }
                Ok(Schema::Integer { min, max })
            }
            "number" => {
                if obj.contains_key("minimum") || obj.contains_key("maximum") {
                    return Err(format!(
                        "{at}: minimum/maximum on a number is not supported by constrained decoding; use an integer range or an enum"
                    ));
                }
                Ok(Schema::Number)
            }
            "boolean" => Ok(Schema::Boolean),
            "null" => Ok(Schema::Null),
            other => Err(format!(
                "{at}.type: `{other}` is not one of object, array, string, integer, number, boolean, null"
            )),
        }
    }
}

/// A byte NFA: `edges[s]` are `(lo, hi, to)` byte ranges, `eps[s]` empty moves.
#[derive(Debug, Default)]
struct Nfa {
    edges: Vec<Vec<(u8, u8, u32)>>,
    eps: Vec<Vec<u32>>,
}

impl Nfa {
    fn state(&mut self) -> u32 {
        self.edges.push(Vec::new());
        self.eps.push(Vec::new());
        (self.edges.len() - 1) as u32
    }

    fn range(&mut self, from: u32, lo: u8, hi: u8) -> u32 {
        let to = self.state();
        self.edges[from as usize].push((lo, hi, to));
        to
    }

    fn bytes(&mut self, mut from: u32, bytes: &[u8]) -> u32 {
        for &b in bytes {
            from = self.range(from, b, b);
        }
        from
    }

    fn eps(&mut self, from: u32, to: u32) {
        self.eps[from as usize].push(to);
    }

    /// Alternatives from `from`, each built by `f(nfa, start) -> end`, joined into one end.
    fn any_of(
        &mut self,
        from: u32,
        n: usize,
        mut f: impl FnMut(&mut Nfa, u32, usize) -> u32,
    ) -> u32 {
        let end = self.state();
        for i in 0..n {
            let e = f(self, from, i);
            self.eps(e, end);
        }
        end
    }

    /// An optional single space.
    fn space(&mut self, from: u32) -> u32 {
        let end = self.range(from, b' ', b' ');
        self.eps(from, end);
        end
    }

    /// One JSON string character: an unescaped code point (not `"`, `\` or a control
    /// character) as its UTF-8 bytes, or an escape.
    fn string_char(&mut self, from: u32) -> u32 {
        let end = self.state();
        let edge =
            |nfa: &mut Nfa, lo: u8, hi: u8, to: u32| nfa.edges[from as usize].push((lo, hi, to));
        // ASCII without `"` and `\`.
        edge(self, 0x20, 0x21, end);
        edge(self, 0x23, 0x5B, end);
        edge(self, 0x5D, 0x7F, end);
        // Two-byte sequences.
        let c1 = self.state();
        edge(self, 0xC2, 0xDF, c1);
        self.edges[c1 as usize].push((0x80, 0xBF, end));
        // Three-byte: E0 A0-BF, E1-EC, ED 80-9F (no surrogates), EE-EF.
        let t_e0 = self.state();
        let t_mid = self.state();
        let t_ed = self.state();
        let t_last = self.state();
        edge(self, 0xE0, 0xE0, t_e0);
        edge(self, 0xE1, 0xEC, t_mid);
        edge(self, 0xED, 0xED, t_ed);
        edge(self, 0xEE, 0xEF, t_mid);
        self.edges[t_e0 as usize].push((0xA0, 0xBF, t_last));
        self.edges[t_mid as usize].push((0x80, 0xBF, t_last));
        self.edges[t_ed as usize].push((0x80, 0x9F, t_last));
        self.edges[t_last as usize].push((0x80, 0xBF, end));
        // Four-byte: F0 90-BF, F1-F3, F4 80-8F.
        let f_f0 = self.state();
        let f_mid = self.state();
        let f_f4 = self.state();
        let f_2 = self.state();
        let f_3 = self.state();
        edge(self, 0xF0, 0xF0, f_f0);
        edge(self, 0xF1, 0xF3, f_mid);
        edge(self, 0xF4, 0xF4, f_f4);
        self.edges[f_f0 as usize].push((0x90, 0xBF, f_2));
        self.edges[f_mid as usize].push((0x80, 0xBF, f_2));
        self.edges[f_f4 as usize].push((0x80, 0x8F, f_2));
        self.edges[f_2 as usize].push((0x80, 0xBF, f_3));
        self.edges[f_3 as usize].push((0x80, 0xBF, end));
        // Escapes.
        let esc = self.state();
        edge(self, b'\\', b'\\', esc);
        for b in [b'"', b'\\', b'/', b'b', b'f', b'n', b'r', b't'] {
            self.edges[esc as usize].push((b, b, end));
        }
        // `\uXXXX` outside the surrogates (D800-DFFF): JSON parsers refuse lone ones, and
        // a model can write any character as UTF-8 instead.
        let u = self.range(esc, b'u', b'u');
        let any = self.state(); // first digit not D
        let d = self.state(); // first digit D: the second must be 0-7
        for (lo, hi) in [
            (b'0', b'9'),
            (b'a', b'c'),
            (b'A', b'C'),
            (b'e', b'f'),
            (b'E', b'F'),
        ] {
            self.edges[u as usize].push((lo, hi, any));
        }
        self.edges[u as usize].push((b'd', b'd', d));
        self.edges[u as usize].push((b'D', b'D', d));
        let mut hex = self.state();
        for (lo, hi) in [(b'0', b'9'), (b'a', b'f'), (b'A', b'F')] {
            self.edges[any as usize].push((lo, hi, hex));
        }
        self.edges[d as usize].push((b'0', b'7', hex));
        for _ in 0..2 {
            let next = self.state();
            for (lo, hi) in [(b'0', b'9'), (b'a', b'f'), (b'A', b'F')] {
                self.edges[hex as usize].push((lo, hi, next));
            }
            hex = next;
        }
        self.eps(hex, end);
        end
    }

    /// `count` repetitions of `f`, at least `min`, at most `max` (unbounded: a loop),
    /// separated by `sep`.
    fn repeat(
        &mut self,
        from: u32,
        min: usize,
        max: Option<usize>,
        sep: &[u8],
        mut f: impl FnMut(&mut Nfa, u32) -> u32,
    ) -> u32 {
        let end = self.state();
        if min == 0 {
            self.eps(from, end);
        }
        let mut at = from;
        let mut n = 0usize;
        // Unroll up to max (or min when unbounded), then loop.
        let unroll = max.unwrap_or(min.max(1));
        while n < unroll {
            if n > 0 {
                at = self.bytes(at, sep);
                if sep == b"," {
                    at = self.space(at);
                }
            }
            at = f(self, at);
            n += 1;
            if n >= min {
                self.eps(at, end);
            }
        }
        if max.is_none() {
            // Loop: after the last unrolled item, any number of `sep item`.
            let loop_start = at;
            let mut s = self.bytes(loop_start, sep);
            if sep == b"," {
                s = self.space(s);
            }
            let item_end = f(self, s);
            self.eps(item_end, loop_start);
        }
        end
    }

    /// Decimal numerals of the integers in `lo..=hi`, canonical (no leading zeros, `-0` not).
    fn int_range(&mut self, from: u32, lo: i64, hi: i64) -> u32 {
        let end = self.state();
        if hi >= 0 {
            let e = self.uint_range(from, lo.max(0) as u64, hi as u64);
            self.eps(e, end);
        }
        if lo < 0 {
            // Negative part: `-` then |x| in [max(1, -hi), -lo].
            let minus = self.range(from, b'-', b'-');
            let a = if hi < 0 { hi.unsigned_abs() } else { 1 };
            let e = self.uint_range(minus, a, lo.unsigned_abs());
            self.eps(e, end);
        }
        end
    }

    fn uint_range(&mut self, from: u32, lo: u64, hi: u64) -> u32 {
        let end = self.state();
        if lo > hi {
            return end; // unreachable end: nothing accepted
        }
        let digits = |x: u64| x.to_string().len();
        for len in digits(lo)..=digits(hi) {
            let floor = if len == 1 {
                0
            } else {
                10u64.pow(len as u32 - 1)
            };
            let ceil = 10u64.saturating_pow(len as u32).saturating_sub(1);
            let (a, b) = (lo.max(floor), hi.min(ceil));
            if a > b {
                continue;
            }
            let e = self.same_len(from, a.to_string().as_bytes(), b.to_string().as_bytes());
            self.eps(e, end);
        }
        end
    }

    /// Digit strings `s` of equal length with `a <= s <= b`.
    fn same_len(&mut self, from: u32, a: &[u8], b: &[u8]) -> u32 {
        if a.is_empty() {
            return from;
        }
        if a[0] == b[0] {
            let s = self.range(from, a[0], a[0]);
            return self.same_len(s, &a[1..], &b[1..]);
        }
        let end = self.state();
        let n = a.len() - 1;
        let nines = vec![b'9'; n];
        let zeros = vec![b'0'; n];
        // a[0] followed by >= a[1..]
        let s = self.range(from, a[0], a[0]);
        let e = self.same_len(s, &a[1..], &nines);
        self.eps(e, end);
        // Digits strictly between, followed by anything.
        if a[0] + 1 < b[0] {
            let s = self.range(from, a[0] + 1, b[0] - 1);
            let e = self.same_len(s, &zeros, &nines);
            self.eps(e, end);
        }
        // b[0] followed by <= b[1..]
        let s = self.range(from, b[0], b[0]);
        let e = self.same_len(s, &zeros, &b[1..]);
        self.eps(e, end);
        end
    }

    fn digits(&mut self, from: u32, min: usize, max: usize) -> u32 {
        self.repeat(from, min, Some(max), b"", |n, s| n.range(s, b'0', b'9'))
    }

    fn number(&mut self, from: u32) -> u32 {
        let after_sign = self.range(from, b'-', b'-');
        self.eps(from, after_sign);
        // Integer part: 0 | [1-9][0-9]{0,16}
        let int_end = self.state();
        let zero = self.range(after_sign, b'0', b'0');
        self.eps(zero, int_end);
        let lead = self.range(after_sign, b'1', b'9');
        let rest = self.digits(lead, 0, 16);
        self.eps(rest, int_end);
        // Fraction.
        let frac_end = self.state();
        self.eps(int_end, frac_end);
        let dot = self.range(int_end, b'.', b'.');
        let f = self.digits(dot, 1, 20);
        self.eps(f, frac_end);
        // Exponent.
        let end = self.state();
        self.eps(frac_end, end);
        let e = self.state();
        self.edges[frac_end as usize].push((b'e', b'e', e));
        self.edges[frac_end as usize].push((b'E', b'E', e));
        let sign = self.state();
        self.eps(e, sign);
        self.edges[e as usize].push((b'+', b'+', sign));
        self.edges[e as usize].push((b'-', b'-', sign));
        let x = self.digits(sign, 1, 2);
        self.eps(x, end);
        end
    }

    fn schema(&mut self, from: u32, s: &Schema) -> u32 {
        match s {
            Schema::Null => self.bytes(from, b"null"),
            Schema::Any(depth) => {
                let kinds = if *depth > 0 { 6 } else { 4 };
                self.any_of(from, kinds, |n, f, i| match i {
                    0 => n.schema(f, &Schema::String { min: 0, max: None }),
                    1 => n.number(f),
                    2 => n.schema(f, &Schema::Boolean),
                    3 => n.bytes(f, b"null"),
                    4 => n.schema(f, &Schema::AnyObject(depth - 1)),
                    _ => n.schema(
                        f,
                        &Schema::Array {
                            items: Box::new(Schema::Any(depth - 1)),
                            min: 0,
                            max: None,
                        },
                    ),
                })
            }
            Schema::AnyObject(depth) => {
                let open = self.bytes(from, b"{");
                let body = self.repeat(open, 0, None, b",", |n, s| {
                    let k = n.schema(s, &Schema::String { min: 0, max: None });
                    let c = n.bytes(k, b":");
                    let c = n.space(c);
                    n.schema(c, &Schema::Any(*depth))
                });
                self.bytes(body, b"}")
            }
            Schema::Boolean => self.any_of(from, 2, |n, f, i| {
                n.bytes(f, if i == 0 { b"true" } else { b"false" })
            }),
            Schema::Enum(values) => {
                let lits: Vec<String> = values.iter().map(|v| v.to_string()).collect();
                self.any_of(from, lits.len(), |n, f, i| n.bytes(f, lits[i].as_bytes()))
            }
            Schema::Integer { min, max } => self.int_range(from, *min, *max),
            Schema::Number => self.number(from),
            Schema::String { min, max } => {
                let open = self.bytes(from, b"\"");
                let body = self.repeat(open, *min, *max, b"", |n, s| n.string_char(s));
                self.bytes(body, b"\"")
            }
            Schema::Array { items, min, max } => {
                let open = self.bytes(from, b"[");
                let body = self.repeat(open, *min, *max, b",", |n, s| n.schema(s, items));
                self.bytes(body, b"]")
            }
            Schema::Object(props) => {
                let open = self.bytes(from, b"{");
                // `none`: no property written yet; `some`: at least one.
                let mut none = Some(open);
                let mut some: Option<u32> = None;
                for p in props {
                    let key = serde_json::to_string(&p.name).expect("a string serialises");
                    let next_some = self.state();
                    for (start, comma) in [(none, false), (some, true)] {
                        let Some(mut at) = start else { continue };
                        if comma {
                            at = self.bytes(at, b",");
                            at = self.space(at);
                        }
                        at = self.bytes(at, key.as_bytes());
                        at = self.bytes(at, b":");
                        at = self.space(at);
                        at = self.schema(at, &p.schema);
                        self.eps(at, next_some);
                    }
                    if !p.required {
                        if let Some(s) = some {
                            self.eps(s, next_some);
                        }
                    } else {
                        none = None;
                    }
                    some = Some(next_some);
                }
                let close = self.state();
                for s in [none, some].into_iter().flatten() {
                    let c = self.bytes(s, b"}");
                    self.eps(c, close);
                }
                close
            }
        }
    }
}

const DEAD: u32 = u32::MAX;
const UNKNOWN: u32 = u32::MAX - 1;

/// A lazily determinised automaton of one schema.
#[derive(Debug)]
pub struct Automaton {
    nfa: Nfa,
    accept: u32,
    sets: Vec<Vec<u32>>,
    index: HashMap<Vec<u32>, u32>,
    next: Vec<[u32; 256]>,
}

impl Automaton {
    /// Compiles `schema`.
    pub fn new(schema: &Schema) -> Automaton {
        let mut nfa = Nfa::default();
        let start = nfa.state();
        let accept = nfa.schema(start, schema);
        let mut a = Automaton {
            nfa,
            accept,
            sets: Vec::new(),
            index: HashMap::new(),
            next: Vec::new(),
        };
        let s0 = a.closure(vec![start]);
        a.intern(s0);
        a
    }

    /// The start state.
    pub fn start(&self) -> u32 {
        0
    }

    fn closure(&self, mut states: Vec<u32>) -> Vec<u32> {
        let mut seen = vec![false; self.nfa.edges.len()];
        let mut stack = states.clone();
        for &s in &states {
            seen[s as usize] = true;
        }
        while let Some(s) = stack.pop() {
            for &t in &self.nfa.eps[s as usize] {
                if !seen[t as usize] {
                    seen[t as usize] = true;
                    states.push(t);
                    stack.push(t);
                }
            }
        }
        states.sort_unstable();
        states.dedup();
        states
    }

    fn intern(&mut self, set: Vec<u32>) -> u32 {
        if set.is_empty() {
            return DEAD;
        }
        if let Some(&id) = self.index.get(&set) {
            return id;
        }
        let id = self.sets.len() as u32;
        self.index.insert(set.clone(), id);
        self.sets.push(set);
        self.next.push([UNKNOWN; 256]);
        id
    }

    /// The state after `byte`, or `None` when no valid reply continues that way.
    pub fn step(&mut self, state: u32, byte: u8) -> Option<u32> {
        if state == DEAD {
            return None;
        }
        let known = self.next[state as usize][byte as usize];
        if known != UNKNOWN {
            return (known != DEAD).then_some(known);
        }
        let mut moved = Vec::new();
        for &s in &self.sets[state as usize] {
            for &(lo, hi, to) in &self.nfa.edges[s as usize] {
                if lo <= byte && byte <= hi {
                    moved.push(to);
                }
            }
        }
        let set = if moved.is_empty() {
            Vec::new()
        } else {
            self.closure(moved)
        };
        let id = self.intern(set);
        self.next[state as usize][byte as usize] = id;
        (id != DEAD).then_some(id)
    }

    /// Whether the text so far is a complete reply.
    pub fn accepting(&self, state: u32) -> bool {
        state != DEAD
            && self.sets[state as usize]
                .binary_search(&self.accept)
                .is_ok()
    }

    /// The state after `bytes` from `state`, or `None` when no valid reply continues so.
    pub fn walk(&mut self, mut state: u32, bytes: &[u8]) -> Option<u32> {
        for &b in bytes {
            state = self.step(state, b)?;
        }
        Some(state)
    }

    /// Whether `bytes` is a complete reply.
    pub fn accepts(&mut self, bytes: &[u8]) -> bool {
        self.walk(self.start(), bytes)
            .is_some_and(|s| self.accepting(s))
    }

    /// Whether `bytes` can still be completed into a reply.
    pub fn viable_prefix(&mut self, bytes: &[u8]) -> bool {
        self.walk(self.start(), bytes).is_some()
    }
}

/// A trie of the vocabulary's token bytes.
#[derive(Debug)]
pub struct Vocab {
    /// Children: `(byte, node)` sorted by byte, per node; node 0 is the root.
    children: Vec<Vec<(u8, u32)>>,
    /// Tokens ending at each node.
    ends: Vec<Vec<u32>>,
    /// The bytes of each token, `None` for special tokens.
    bytes: Vec<Option<Vec<u8>>>,
}

impl Vocab {
    /// Builds the trie from each token id's bytes (see `TextTokenizer::token_bytes`).
    pub fn new(bytes: Vec<Option<Vec<u8>>>) -> Vocab {
        let mut v = Vocab {
            children: vec![Vec::new()],
            ends: vec![Vec::new()],
            bytes,
        };
        for id in 0..v.bytes.len() {
            let Some(b) = v.bytes[id].clone().filter(|b| !b.is_empty()) else {
                continue;
            };
            let mut node = 0u32;
            for byte in b {
                let kids = &v.children[node as usize];
                node = match kids.binary_search_by_key(&byte, |c| c.0) {
                    Ok(i) => kids[i].1,
                    Err(i) => {
                        let new = v.children.len() as u32;
                        v.children.push(Vec::new());
                        v.ends.push(Vec::new());
                        v.children[node as usize].insert(i, (byte, new));
                        new
                    }
                };
            }
            v.ends[node as usize].push(id as u32);
        }
        v
    }

    /// Number of token ids.
    pub fn len(&self) -> usize {
        self.bytes.len()
    }

    /// Whether there are no tokens.
    pub fn is_empty(&self) -> bool {
        self.bytes.is_empty()
    }

    /// The bytes of token `id`.
    pub fn token(&self, id: u32) -> Option<&[u8]> {
        self.bytes.get(id as usize)?.as_deref()
    }
}

/// A schema's automaton over one vocabulary, with the allowed tokens of each visited
/// state cached. Share one per (tokenizer, schema) across generations.
pub struct Grammar {
    vocab: Arc<Vocab>,
    inner: Mutex<GrammarState>,
}

struct GrammarState {
    auto: Automaton,
    allowed: HashMap<u32, Arc<Vec<u32>>>,
    /// The complement of `allowed`, for states that allow most of the vocabulary
    /// (inside a string): masking then touches only these.
    refused: HashMap<u32, Arc<Vec<u32>>>,
}

impl Grammar {
    /// Compiles `schema` for `vocab`.
    pub fn new(schema: &Schema, vocab: Arc<Vocab>) -> Grammar {
        Grammar {
            vocab,
            inner: Mutex::new(GrammarState {
                auto: Automaton::new(schema),
                allowed: HashMap::new(),
                refused: HashMap::new(),
            }),
        }
    }

    /// The state before any token.
    pub fn start(&self) -> u32 {
        0
    }

    /// Token ids the vocabulary has.
    pub fn vocab_len(&self) -> usize {
        self.vocab.len()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, GrammarState> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Tokens that keep the text a viable prefix from `state`, sorted.
    pub fn allowed(&self, state: u32) -> Arc<Vec<u32>> {
        let mut g = self.lock();
        if let Some(a) = g.allowed.get(&state) {
            return a.clone();
        }
        let mut out = Vec::new();
        // Depth-first over the trie, carrying the DFA state.
        let mut stack: Vec<(u32, u32)> = vec![(0, state)];
        while let Some((node, st)) = stack.pop() {
            for &(byte, child) in &self.vocab.children[node as usize] {
                if let Some(next) = g.auto.step(st, byte) {
                    out.extend_from_slice(&self.vocab.ends[child as usize]);
                    stack.push((child, next));
                }
            }
        }
        out.sort_unstable();
        let out = Arc::new(out);
        g.allowed.insert(state, out.clone());
        out
    }

    /// Token ids (of the whole vocabulary, specials included) that `allowed` leaves out,
    /// sorted.
    pub fn refused(&self, state: u32) -> Arc<Vec<u32>> {
        if let Some(r) = self.lock().refused.get(&state) {
            return r.clone();
        }
        let allowed = self.allowed(state);
        let mut out = Vec::with_capacity(self.vocab.len().saturating_sub(allowed.len()));
        let mut a = allowed.iter().peekable();
        for id in 0..self.vocab.len() as u32 {
            if a.peek() == Some(&&id) {
                a.next();
            } else {
                out.push(id);
            }
        }
        let out = Arc::new(out);
        self.lock().refused.insert(state, out.clone());
        out
    }

    /// The state after `token` (which must be allowed).
    pub fn advance(&self, state: u32, token: u32) -> Option<u32> {
        let bytes = self.vocab.token(token)?;
        self.lock().auto.walk(state, bytes)
    }

    /// The state after the bytes `prefix` (a prefilled start of the reply), or `None`
    /// when no valid reply starts that way.
    pub fn start_after(&self, prefix: &[u8]) -> Option<u32> {
        let mut g = self.lock();
        let start = g.auto.start();
        g.auto.walk(start, prefix)
    }

    /// Whether the reply is complete in `state` (EOS may follow).
    pub fn accepting(&self, state: u32) -> bool {
        self.lock().auto.accepting(state)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rng::Rng;
    use serde_json::json;

    fn auto(schema: Value) -> Automaton {
        Automaton::new(&Schema::from_json_schema(&schema).unwrap())
    }

    #[test]
    fn integer_ranges_are_exact() {
        for (lo, hi) in [
            (1, 10),
            (0, 0),
            (-5, 5),
            (7, 123),
            (-120, -3),
            (0, 1000),
            (99, 101),
        ] {
            let mut a = auto(json!({"type": "integer", "minimum": lo, "maximum": hi}));
            for x in -200i64..=1200 {
                assert_eq!(
                    a.accepts(x.to_string().as_bytes()),
                    (lo..=hi).contains(&x),
                    "{x} in [{lo}, {hi}]"
                );
            }
            for bad in ["01", "-0", "+1", "", "1.0", " 1"] {
                assert!(!a.accepts(bad.as_bytes()), "{bad} in [{lo}, {hi}]");
            }
        }
        let mut ex = auto(json!({"type": "integer", "exclusiveMinimum": 0, "exclusiveMaximum": 3}));
        assert!(ex.accepts(b"1") && ex.accepts(b"2") && !ex.accepts(b"0") && !ex.accepts(b"3"));
    }

    /// A random JSON value, often of the schema's shape, sometimes not.
    fn sample(s: &Schema, rng: &mut Rng, valid: bool) -> Value {
        let coin = |rng: &mut Rng, p: f64| rng.uniform() < p;
        let text = |rng: &mut Rng, n: usize| -> String {
            let pool = ["a", "é", "\"", "\\", "\n", "日本", "🦀", " ", "x", "\u{1}"];
            (0..n)
                .map(|_| pool[(rng.uniform() * pool.len() as f64) as usize])
                .collect()
        };
        match s {
            Schema::Null | Schema::Any(_) | Schema::AnyObject(_) => Value::Null,
            Schema::Boolean => json!(coin(rng, 0.5)),
            Schema::Enum(v) => v[(rng.uniform() * v.len() as f64) as usize].clone(),
            Schema::Integer { min, max } => {
                let lo = (*min).max(-1000);
                let hi = (*max).min(1000);
                let x = lo + (rng.uniform() * (hi - lo + 1) as f64) as i64;
                if valid {
                    json!(x)
                } else {
                    json!(x + if coin(rng, 0.5) { 2000 } else { -2000 })
                }
            }
            Schema::Number => json!((rng.uniform() - 0.5) * 100.0),
            Schema::String { min, max } => {
                let hi = max.unwrap_or(min + 8);
                let n = min + (rng.uniform() * (hi - min + 1) as f64) as usize;
                let over = hi + 1 + (rng.uniform() * 3.0) as usize;
                json!(text(rng, if valid { n } else { over }))
            }
            Schema::Array { items, min, max } => {
                let hi = max.unwrap_or(min + 3);
                let n = min + (rng.uniform() * (hi - min + 1) as f64) as usize;
                let n = if valid { n } else { hi + 1 };
                Value::Array((0..n).map(|_| sample(items, rng, true)).collect())
            }
            Schema::Object(props) => {
                let mut m = serde_json::Map::new();
                for p in props {
                    if p.required || coin(rng, 0.5) {
                        m.insert(p.name.clone(), sample(&p.schema, rng, true));
                    }
                }
                if !valid {
                    if let Some(p) = props.iter().find(|p| p.required) {
                        if coin(rng, 0.5) {
                            m.remove(&p.name);
                        } else {
                            m.insert(p.name.clone(), json!({"wrong": true}));
                        }
                    } else {
                        m.insert("zz_extra".into(), json!(1));
                    }
                }
                Value::Object(m)
            }
        }
    }

    /// Nesting depth of a value (scalars 0).
    fn depth(v: &Value) -> usize {
        match v {
            Value::Object(m) => 1 + m.values().map(depth).max().unwrap_or(0),
            Value::Array(a) => 1 + a.iter().map(depth).max().unwrap_or(0),
            _ => 0,
        }
    }

    /// Validates `v` against `s` independently of the automaton.
    fn valid(v: &Value, s: &Schema) -> bool {
        match (s, v) {
            (Schema::Null, Value::Null) | (Schema::Boolean, Value::Bool(_)) => true,
            (Schema::Any(d), v) => depth(v) <= *d,
            (Schema::AnyObject(d), Value::Object(m)) => m.values().all(|x| depth(x) <= *d),
            (Schema::Enum(e), v) => e.contains(v),
            (Schema::Integer { min, max }, Value::Number(n)) => {
                n.as_i64().is_some_and(|x| *min <= x && x <= *max)
            }
            (Schema::Number, Value::Number(_)) => true,
            (Schema::String { min, max }, Value::String(t)) => {
                let n = t.chars().count();
                n >= *min && max.is_none_or(|m| n <= m)
            }
            (Schema::Array { items, min, max }, Value::Array(a)) => {
                a.len() >= *min
                    && max.is_none_or(|m| a.len() <= m)
                    && a.iter().all(|x| valid(x, items))
            }
            (Schema::Object(props), Value::Object(m)) => {
                m.keys().all(|k| props.iter().any(|p| &p.name == k))
                    && props.iter().all(|p| match m.get(&p.name) {
                        Some(x) => valid(x, &p.schema),
                        None => !p.required,
                    })
            }
            _ => false,
        }
    }

    /// `v` written as the automaton's language writes it: properties in schema order,
    /// optionally one space after `:` and `,`.
    fn write(v: &Value, s: &Schema, spaced: bool) -> String {
        let sp = if spaced { " " } else { "" };
        match (s, v) {
            (Schema::Object(props), Value::Object(m)) => {
                let mut parts: Vec<String> = Vec::new();
                for p in props {
                    if let Some(x) = m.get(&p.name) {
                        parts.push(format!(
                            "{}:{sp}{}",
                            serde_json::to_string(&p.name).unwrap(),
                            write(x, &p.schema, spaced)
                        ));
                    }
                }
                for (k, x) in m {
                    if !props.iter().any(|p| &p.name == k) {
                        parts.push(format!("{}:{sp}{x}", serde_json::to_string(k).unwrap()));
                    }
                }
                format!("{{{}}}", parts.join(&format!(",{sp}")))
            }
            (Schema::Array { items, .. }, Value::Array(a)) => {
                format!(
                    "[{}]",
                    a.iter()
                        .map(|x| write(x, items, spaced))
                        .collect::<Vec<_>>()
                        .join(&format!(",{sp}"))
                )
            }
            (_, v) => v.to_string(),
        }
    }

    fn rubric() -> Value {
        json!({"type": "object", "properties": {
            "reasoning": {"type": "string", "maxLength": 12},
            "content_type": {"enum": ["fact", "opinion", "mixed"]},
            "accuracy": {"type": "integer", "minimum": 1, "maximum": 10},
            "clarity": {"type": "integer", "minimum": 1, "maximum": 10},
            "confidence": {"type": "number"},
            "citations": {"type": "array", "items": {"type": "string", "maxLength": 4}, "maxItems": 3},
            "flagged": {"type": "boolean"},
            "note": {"type": "string"},
            "tags": {"type": "array", "items": {"type": "integer", "minimum": 0, "maximum": 99}, "minItems": 1}
        }, "required": ["reasoning", "content_type", "accuracy", "clarity", "confidence", "citations", "flagged", "tags"]})
    }

    #[test]
    fn the_automaton_accepts_exactly_the_schemas_language() {
        let schema = Schema::from_json_schema(&rubric()).unwrap();
        let mut a = Automaton::new(&schema);
        let mut rng = Rng::new(7);
        let (mut yes, mut no) = (0, 0);
        for i in 0..3000 {
            let want_valid = i % 2 == 0;
            let v = sample(&schema, &mut rng, want_valid);
            let is_valid = valid(&v, &schema);
            let text = write(&v, &schema, i % 3 == 0);
            assert_eq!(a.accepts(text.as_bytes()), is_valid, "{text}");
            if is_valid {
                yes += 1;
                // Every proper prefix is viable; the text with junk after it is not accepted.
                let b = text.as_bytes();
                let cut = (rng.uniform() * b.len() as f64) as usize;
                assert!(a.viable_prefix(&b[..cut]), "prefix of {text}");
                assert!(!a.accepts(format!("{text} ").as_bytes()));
                assert!(!a.accepts(format!("{text}}}").as_bytes()));
            } else {
                no += 1;
            }
        }
        assert!(yes > 1000 && no > 1000, "{yes} valid, {no} invalid");
        // Other serialisations of valid values are outside the language.
        assert!(!a.accepts(b"{ \"reasoning\": \"x\"}"));
        assert!(!a.accepts(b"{\n\"reasoning\":\"x\"}"));
    }

    #[test]
    fn strings_count_characters_and_take_escapes_and_multibyte_text() {
        let mut a = auto(json!({"type": "string", "minLength": 1, "maxLength": 3}));
        for ok in [
            "\"a\"",
            "\"日本語\"",
            "\"🦀🦀\"",
            "\"\\n\\\"\\u00e9\"",
            "\"a\\\\b\"",
        ] {
            assert!(a.accepts(ok.as_bytes()), "{ok}");
        }
        for bad in [
            "\"\"",
            "\"abcd\"",
            "\"a\nb\"",
            "\"\\x\"",
            "\"a",
            "'a'",
            "\"\\ud8\"",
        ] {
            assert!(!a.accepts(bad.as_bytes()), "{bad}");
        }
        // A lone continuation byte or a surrogate's encoding is not a character.
        assert!(!a.accepts(b"\"\x80\""));
        assert!(!a.accepts(b"\"\xED\xA0\x80\""));
        assert!(!a.viable_prefix(b"\"\xC0"));
    }

    #[test]
    fn any_object_takes_nested_json_up_to_its_depth() {
        let mut a = Automaton::new(&Schema::AnyObject(2));
        for ok in [
            "{}",
            "{\"a\": 1}",
            "{\"a\":[1, \"x\", null],\"b\":{\"c\":true}}",
            "{\"k\": {\"l\": [1]}}",
        ] {
            assert!(a.accepts(ok.as_bytes()), "{ok}");
        }
        for bad in [
            "[]",
            "{\"a\"}",
            "{\"a\": {\"b\": {\"c\": [1]}}}",
            "{\"a\": 1,}",
            "{a: 1}",
        ] {
            assert!(!a.accepts(bad.as_bytes()), "{bad}");
        }
    }

    #[test]
    fn unsupported_keywords_are_named() {
        let e = Schema::from_json_schema(
            &json!({"type": "object", "properties": {"a": {"type": "string", "pattern": "x+"}}}),
        )
        .unwrap_err();
        assert!(e.contains("$.properties.a.pattern: not supported"), "{e}");
        let e = Schema::from_json_schema(
            &json!({"type": "object", "properties": {}, "required": ["b"]}),
        )
        .unwrap_err();
        assert!(e.contains("`b` is not a property"), "{e}");
    }

    /// Token bytes of a toy vocabulary: single bytes plus merged and multi-byte pieces.
    fn toy_vocab() -> Arc<Vocab> {
        let mut bytes: Vec<Option<Vec<u8>>> = (0..=255u8).map(|b| Some(vec![b])).collect();
        for piece in [
            "{\"", "\":", "\": ", "\",", "true", "false", "10", "日", "本", "\"}", "}", ", \"",
            "ans", "wer", "score",
        ] {
            bytes.push(Some(piece.as_bytes().to_vec()));
        }
        // A token holding half of a multi-byte character, as byte-level BPE has.
        bytes.push(Some(vec![0xE6]));
        bytes.push(None); // EOS
        Arc::new(Vocab::new(bytes))
    }

    #[test]
    fn every_constrained_generation_of_a_random_model_is_a_valid_reply() {
        use crate::generate::{generate, generate_constrained, Finish, Sampling};
        let loaded = crate::loader::load(
            "tiny:llama:1",
            candle_core::DType::F32,
            &candle_core::Device::Cpu,
        )
        .unwrap();
        let tok = &loaded.tokenizer;
        let schema = Schema::from_json_schema(&json!({"type": "object", "properties": {
            "answer": {"type": "string", "maxLength": 16},
            "kind": {"enum": ["fact", "opinion"]},
            "score": {"type": "integer", "minimum": 1, "maximum": 10},
            "confidence": {"type": "number"},
            "ok": {"type": "boolean"},
            "citations": {"type": "array", "items": {"type": "string", "maxLength": 3}, "maxItems": 2}
        }, "required": ["answer", "kind", "score", "confidence", "ok"]}))
        .unwrap();
        let grammar = Arc::new(Grammar::new(
            &schema,
            Arc::new(Vocab::new(tok.token_bytes())),
        ));
        let eos = vec![tok.eos_id().unwrap()];
        let prompt = tok.encode("Reply in JSON: ").unwrap();
        let s = Sampling {
            max_new_tokens: 400,
            temperature: 1.0,
            ..Default::default()
        };
        let (mut n, mut complete) = (0, 0);
        for round in 0..40u64 {
            let prompts = vec![prompt.clone(); 50];
            let mut rngs: Vec<Rng> = (0..50).map(|i| Rng::new(round * 1000 + i)).collect();
            for g in generate_constrained(
                &loaded.model,
                tok,
                &prompts,
                &s,
                &eos,
                &mut rngs,
                Some((grammar.clone(), grammar.start())),
            )
            .unwrap()
            {
                n += 1;
                if g.finish == Finish::Length {
                    // Cut by max_new_tokens: still a viable prefix.
                    assert!(
                        Automaton::new(&schema).viable_prefix(g.text.as_bytes()),
                        "{}",
                        g.text
                    );
                    continue;
                }
                complete += 1;
                let v: Value =
                    serde_json::from_str(&g.text).unwrap_or_else(|e| panic!("{e}: {}", g.text));
                assert!(valid(&v, &schema), "{v}");
            }
        }
        assert_eq!(n, 2000);
        assert!(complete >= 1900, "{complete} of {n} complete");
        // Unconstrained, the same model writes no JSON at all.
        let mut rngs: Vec<Rng> = (0..20).map(Rng::new).collect();
        let free = generate(
            &loaded.model,
            tok,
            &vec![prompt.clone(); 20],
            &s,
            &eos,
            &mut rngs,
        )
        .unwrap();
        assert!(free
            .iter()
            .all(|g| serde_json::from_str::<Value>(&g.text).is_err()));
    }

    #[test]
    fn random_walks_over_allowed_tokens_always_end_in_a_valid_reply() {
        let schema = Schema::from_json_schema(&rubric()).unwrap();
        let vocab = toy_vocab();
        let g = Grammar::new(&schema, vocab.clone());
        let mut rng = Rng::new(3);
        for _ in 0..500 {
            let mut state = g.start();
            let mut text = Vec::new();
            loop {
                let allowed = g.allowed(state);
                let accepting = g.accepting(state);
                if allowed.is_empty() || (accepting && rng.uniform() < 0.5) {
                    assert!(accepting, "stuck at {}", String::from_utf8_lossy(&text));
                    break;
                }
                // Prefer closing moves now and then so walks end.
                let t = allowed[(rng.uniform() * allowed.len() as f64) as usize];
                text.extend_from_slice(vocab.token(t).unwrap());
                state = g.advance(state, t).expect("allowed tokens advance");
                assert!(text.len() < 20_000, "runaway");
            }
            let v: Value = serde_json::from_slice(&text)
                .unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(&text)));
            assert!(valid(&v, &schema), "{v}");
        }
    }
}

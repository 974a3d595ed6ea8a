//! Generation: continuous batching ([`Decoding`]: sequences join after a packed prefill,
//! without padding, that reuses cached prompt starts, and leave as they finish), greedy or
//! seeded temperature/top-p sampling, EOS, stop strings, log-probabilities and
//! grammar-constrained replies.

use candle_core::{DType, Tensor, D};
use serde::{Deserialize, Serialize};

use crate::constrain::Grammar;
use crate::error::Result;
use std::sync::Arc;

use crate::model::{Decoder, KeyMask, KvCache, Prefill};
use crate::rng::Rng;
use crate::tokenizer::TextTokenizer;

/// Decoding settings.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Sampling {
    /// Tokens to generate at most.
    #[serde(default = "default_max_new")]
    pub max_new_tokens: usize,
    /// 0 means greedy.
    #[serde(default)]
    pub temperature: f64,
    /// Nucleus mass kept when sampling.
    #[serde(default = "default_top_p")]
    pub top_p: f64,
    /// Generation ends when the text contains one of these (it is cut before it).
    #[serde(default)]
    pub stop: Vec<String>,
    /// Record each generated token's log-probability and this many most likely
    /// alternatives (under the model's full distribution, before any constraint).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub logprobs: Option<usize>,
}

fn default_max_new() -> usize {
    128
}
fn default_top_p() -> f64 {
    1.0
}

impl Default for Sampling {
    fn default() -> Self {
        Sampling {
            max_new_tokens: default_max_new(),
            temperature: 0.0,
            top_p: 1.0,
            stop: vec![],
            logprobs: None,
        }
    }
}

/// Why a sequence ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Finish {
    /// An end-of-sequence token.
    Eos,
    /// A stop string.
    Stop,
    /// `max_new_tokens` reached.
    Length,
}

/// One generated continuation.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Generation {
    /// New token ids (EOS excluded).
    pub ids: Vec<u32>,
    /// Decoded text, cut at a stop string.
    pub text: String,
    /// Why it ended.
    pub finish: Finish,
    /// Per generated token (when [`Sampling::logprobs`] asks), aligned with `ids`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub logprobs: Vec<TokenLogprob>,
}

/// A generated token's log-probability and the most likely alternatives at its step.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TokenLogprob {
    /// The token.
    pub token: u32,
    /// Its natural-log probability under the model.
    pub logprob: f32,
    /// `(token, logprob)` of the most likely tokens, most likely first.
    pub top: Vec<(u32, f32)>,
}

/// `log_softmax(logits)[token]` and the `k` largest entries, in f64 for the sum.
pub fn logprob_of(logits: &[f32], token: u32, k: usize) -> TokenLogprob {
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
    let lse = max
        + logits
            .iter()
            .map(|&x| ((x as f64) - max).exp())
            .sum::<f64>()
            .ln();
    let lp = |t: usize| (logits[t] as f64 - lse) as f32;
    let mut top: Vec<u32> = Vec::new();
    if k > 0 {
        let mut idx: Vec<u32> = (0..logits.len() as u32).collect();
        let k = k.min(idx.len());
        idx.select_nth_unstable_by(k - 1, |a, b| {
            logits[*b as usize]
                .total_cmp(&logits[*a as usize])
                .then(a.cmp(b))
        });
        idx.truncate(k);
        idx.sort_by(|a, b| {
            logits[*b as usize]
                .total_cmp(&logits[*a as usize])
                .then(a.cmp(b))
        });
        top = idx;
    }
    TokenLogprob {
        token,
        logprob: lp(token as usize),
        top: top.into_iter().map(|t| (t, lp(t as usize))).collect(),
    }
}

/// Picks the next token from `logits` (f32, one row).
pub fn pick(logits: &[f32], s: &Sampling, rng: &mut Rng) -> u32 {
    let argmax = || {
        logits
            .iter()
            .enumerate()
            .fold((0usize, f32::NEG_INFINITY), |b, (i, &x)| {
                if x > b.1 {
                    (i, x)
                } else {
                    b
                }
            })
            .0 as u32
    };
    if s.temperature <= 0.0 {
        return argmax();
    }
    let max = logits.iter().cloned().fold(f32::NEG_INFINITY, f32::max) as f64;
    let mut probs: Vec<(usize, f64)> = logits
        .iter()
        .enumerate()
        .map(|(i, &x)| (i, ((x as f64 - max) / s.temperature).exp()))
        .collect();
    let total: f64 = probs.iter().map(|p| p.1).sum();
    probs.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
    let mut kept = 0f64;
    let mut cut = probs.len();
    for (n, p) in probs.iter().enumerate() {
        kept += p.1 / total;
        if kept >= s.top_p {
            cut = n + 1;
            break;
        }
    }
    probs.truncate(cut);
    let mass: f64 = probs.iter().map(|p| p.1).sum();
    let mut u = rng.uniform() * mass;
    for (i, p) in &probs {
        u -= p;
        if u <= 0.0 {
            return *i as u32;
        }
    }
    probs.last().map(|p| p.0 as u32).unwrap_or_else(argmax)
}

/// Generates for a batch of prompts (token ids). `rngs` holds one generator per
/// prompt so results do not depend on how prompts are batched.
pub fn generate(
    model: &Decoder,
    tokenizer: &TextTokenizer,
    prompts: &[Vec<u32>],
    s: &Sampling,
    eos: &[u32],
    rngs: &mut [Rng],
) -> Result<Vec<Generation>> {
    generate_constrained(model, tokenizer, prompts, s, eos, rngs, None)
}

/// `logits` with every token `grammar` does not allow from `state` at −∞; EOS stays
/// allowed only where the reply is complete. `None` when nothing may follow (the reply is
/// complete and closed: the sequence ends here).
fn masked(logits: &[f32], grammar: &Grammar, state: u32, eos: &[u32]) -> Option<Vec<f32>> {
    let allowed = grammar.allowed(state);
    let accepting = grammar.accepting(state);
    if allowed.is_empty() {
        return None;
    }
    let mut out;
    if allowed.len() * 2 > logits.len() {
        // Most tokens allowed (inside a string): blank the few that are not.
        out = logits.to_vec();
        for &t in grammar.refused(state).iter() {
            if let Some(x) = out.get_mut(t as usize) {
                *x = f32::NEG_INFINITY;
            }
        }
        // Ids past the tokenizer's vocabulary (padded embedding rows) are never allowed.
        for x in out.iter_mut().skip(grammar.vocab_len()) {
            *x = f32::NEG_INFINITY;
        }
    } else {
        out = vec![f32::NEG_INFINITY; logits.len()];
        for &t in allowed.iter() {
            if let Some(x) = logits.get(t as usize) {
                out[t as usize] = *x;
            }
        }
    }
    if accepting {
        for &e in eos {
            if let Some(x) = logits.get(e as usize) {
                out[e as usize] = *x;
            }
        }
    }
    Some(out)
}

/// [`generate`], with every sequence kept inside a grammar's language when one is given
/// (with the state the prompts' prefilled reply start left it in): each step samples only
/// tokens that keep the text a prefix of a valid reply, and a sequence ends (as EOS) once
/// its reply is complete and nothing more may follow.
pub fn generate_constrained(
    model: &Decoder,
    tokenizer: &TextTokenizer,
    prompts: &[Vec<u32>],
    s: &Sampling,
    eos: &[u32],
    rngs: &mut [Rng],
    constraint: Option<(Arc<Grammar>, u32)>,
) -> Result<Vec<Generation>> {
    generate_observed(model, tokenizer, prompts, s, eos, rngs, constraint, None)
}

/// Called with (sequence id, token id) after each generated token; `false` ends that
/// sequence there (a client that went away), as if by `max_new_tokens`.
pub type OnToken<'a> = &'a mut dyn FnMut(usize, u32) -> bool;

/// [`generate_constrained`], telling `on_token` of each token as it is generated (for
/// streaming) and letting it end sequences early. Sequence ids are prompt indices.
#[allow(clippy::too_many_arguments)]
pub fn generate_observed(
    model: &Decoder,
    tokenizer: &TextTokenizer,
    prompts: &[Vec<u32>],
    s: &Sampling,
    eos: &[u32],
    rngs: &mut [Rng],
    constraint: Option<(Arc<Grammar>, u32)>,
    mut on_token: Option<OnToken>,
) -> Result<Vec<Generation>> {
    let mut run = Decoding::new(model, tokenizer, eos.to_vec(), PrefixCache::default());
    let seqs = prompts
        .iter()
        .zip(rngs.iter())
        .map(|(p, rng)| Sequence {
            prompt: p.clone(),
            sampling: s.clone(),
            rng: *rng,
            constraint: constraint.clone(),
        })
        .collect();
    let mut noop = |_: usize, _: u32| true;
    let cb: OnToken = match on_token.as_mut() {
        Some(f) => *f,
        None => &mut noop,
    };
    run.add(seqs, cb)?;
    let mut out: Vec<Option<Generation>> = vec![None; prompts.len()];
    loop {
        for (id, g, rng) in run.step(cb)? {
            rngs[id] = rng;
            out[id] = Some(g);
        }
        if run.is_idle() {
            break;
        }
    }
    Ok(out
        .into_iter()
        .map(|g| g.expect("every sequence finishes"))
        .collect())
}

/// One sequence to decode: its prompt, settings, sampler and constraint.
#[derive(Clone)]
pub struct Sequence {
    /// Prompt token ids.
    pub prompt: Vec<u32>,
    /// Decoding settings.
    pub sampling: Sampling,
    /// This sequence's sampler.
    pub rng: Rng,
    /// A grammar the reply stays inside, with the state its prefilled start left it in.
    pub constraint: Option<(Arc<Grammar>, u32)>,
}

/// Keys and values of recent prompts (one-row caches), reused by later prompts that
/// start with the same tokens: an oracle's rubric, a system prompt. Least recently
/// used entries go first once the byte budget is spent.
pub struct PrefixCache {
    entries: Vec<(Vec<u32>, KvCache, u64)>,
    budget: usize,
    clock: u64,
    /// Prompt tokens whose keys and values came from a cached start.
    pub reused: u64,
    /// Prompt tokens run through the model.
    pub computed: u64,
}

/// A shared start shorter than this is not worth a separate prefill.
const MIN_SHARED: usize = 16;

impl Default for PrefixCache {
    /// 256 MiB.
    fn default() -> Self {
        PrefixCache::new(256 << 20)
    }
}

impl PrefixCache {
    /// A cache holding at most `budget` bytes of keys and values (0 keeps nothing).
    pub fn new(budget: usize) -> PrefixCache {
        PrefixCache {
            entries: Vec::new(),
            budget,
            clock: 0,
            reused: 0,
            computed: 0,
        }
    }

    /// The longest cached start of `ids` (leaving at least one token to run), as a
    /// one-row cache of that many tokens.
    fn lookup(&mut self, ids: &[u32]) -> Result<Option<KvCache>> {
        let limit = ids.len().saturating_sub(1);
        let best = self
            .entries
            .iter()
            .enumerate()
            .map(|(i, (e, _, _))| (i, shared_len(e, ids).min(limit)))
            .max_by_key(|&(i, n)| (n, std::cmp::Reverse(i)));
        match best {
            Some((i, n)) if n >= MIN_SHARED => {
                self.clock += 1;
                self.entries[i].2 = self.clock;
                Ok(Some(self.entries[i].1.prefix(n)?))
            }
            _ => Ok(None),
        }
    }

    /// Keeps the keys and values of `ids`; an entry that `ids` extends is replaced.
    fn insert(&mut self, ids: &[u32], kv: &KvCache) {
        if self.budget == 0 || ids.len() < MIN_SHARED {
            return;
        }
        self.entries
            .retain(|(e, _, _)| !(e.len() <= ids.len() && ids.starts_with(e)));
        if self.entries.iter().any(|(e, _, _)| e.starts_with(ids)) {
            return;
        }
        self.clock += 1;
        self.entries.push((ids.to_vec(), kv.clone(), self.clock));
        while self.bytes() > self.budget && !self.entries.is_empty() {
            let oldest = (0..self.entries.len())
                .min_by_key(|&i| self.entries[i].2)
                .expect("not empty");
            self.entries.swap_remove(oldest);
        }
    }

    /// Bytes held.
    pub fn bytes(&self) -> usize {
        self.entries.iter().map(|(_, kv, _)| kv.bytes()).sum()
    }
}

/// Next-token logits of each row of `hidden` (`[rows, hidden]`), a few rows per call so
/// that a row's logits do not depend on how many rows come with it (few rows take the
/// output layer's int8 copy).
fn logits_of(model: &Decoder, hidden: &Tensor) -> Result<Vec<Vec<f32>>> {
    let rows = hidden.dim(0)?;
    let mut out = Vec::with_capacity(rows);
    for start in (0..rows).step_by(crate::linear::QUANTIZED_MAX_ROWS) {
        let n = crate::linear::QUANTIZED_MAX_ROWS.min(rows - start);
        let part = model.logits(&hidden.narrow(0, start, n)?)?;
        out.extend(part.to_dtype(DType::F32)?.to_vec2::<f32>()?);
    }
    Ok(out)
}

fn shared_len(a: &[u32], b: &[u32]) -> usize {
    a.iter().zip(b).take_while(|(x, y)| x == y).count()
}

/// A sequence being decoded.
struct Row {
    id: usize,
    seq: Sequence,
    state: u32,
    out: Vec<u32>,
    lps: Vec<TokenLogprob>,
    /// The token to feed at the next step.
    next: u32,
}

/// Continuous batched decoding: sequences join (after a packed prefill that reuses
/// cached prompt starts) between steps and leave as they finish, each with its own
/// settings, sampler and constraint. Every step runs one token of every live sequence
/// through the model together.
pub struct Decoding<'m> {
    model: &'m Decoder,
    tokenizer: &'m TextTokenizer,
    eos: Vec<u32>,
    /// Cached prompt starts.
    pub prefixes: PrefixCache,
    /// The batch's keys and values, `[rows, kv_heads, keys, head]`, left-padded.
    cache: KvCache,
    keys: usize,
    /// Row-major `[rows, keys]`: false for padding.
    valid: Vec<bool>,
    rows: Vec<Row>,
    done: Vec<(usize, Generation, Rng)>,
    next_id: usize,
}

impl<'m> Decoding<'m> {
    /// An empty batch.
    pub fn new(
        model: &'m Decoder,
        tokenizer: &'m TextTokenizer,
        eos: Vec<u32>,
        prefixes: PrefixCache,
    ) -> Decoding<'m> {
        Decoding {
            model,
            tokenizer,
            eos,
            prefixes,
            cache: KvCache::new(model.config().num_hidden_layers),
            keys: 0,
            valid: Vec::new(),
            rows: Vec::new(),
            done: Vec::new(),
            next_id: 0,
        }
    }

    /// Sequences decoding now.
    pub fn len(&self) -> usize {
        self.rows.len()
    }

    /// Whether no sequence is decoding.
    pub fn is_empty(&self) -> bool {
        self.rows.is_empty()
    }

    /// Whether nothing is decoding and every finished sequence was handed out.
    pub fn is_idle(&self) -> bool {
        self.rows.is_empty() && self.done.is_empty()
    }

    /// Prefills `seqs` and adds them to the batch; returns their ids (consecutive, from
    /// 0 for a new batch). Their first tokens come from the prefill; `on_token` hears of
    /// them. Prompts sharing a start of at least 16 tokens with a cached prompt, or with
    /// each other, run only the rest.
    pub fn add(&mut self, seqs: Vec<Sequence>, on_token: OnToken) -> Result<Vec<usize>> {
        if seqs.is_empty() {
            return Ok(Vec::new());
        }
        if let Some(i) = seqs.iter().position(|s| s.prompt.is_empty()) {
            return Err(crate::Error::Invalid(format!(
                "sequence {i} has an empty prompt"
            )));
        }
        // Starts the new prompts share with each other (and no cached prompt) run once
        // first, so that a batch of oracle prompts repeating one rubric computes it once.
        let mut starts: Vec<Vec<u32>> = Vec::new();
        for (i, a) in seqs.iter().enumerate().filter(|_| self.prefixes.budget > 0) {
            let cached = self
                .prefixes
                .entries
                .iter()
                .map(|(e, _, _)| shared_len(e, &a.prompt))
                .max()
                .unwrap_or(0);
            let n = seqs
                .iter()
                .enumerate()
                .filter(|&(j, _)| j != i)
                .map(|(_, b)| shared_len(&a.prompt, &b.prompt))
                .max()
                .unwrap_or(0)
                .min(a.prompt.len() - 1);
            if n >= MIN_SHARED && n > cached && !starts.iter().any(|s| s[..] == a.prompt[..n]) {
                starts.push(a.prompt[..n].to_vec());
            }
        }
        // A start that another one extends is covered by it.
        let covered: Vec<bool> = starts
            .iter()
            .map(|s| starts.iter().any(|t| t.len() > s.len() && t.starts_with(s)))
            .collect();
        let starts: Vec<Vec<u32>> = starts
            .into_iter()
            .zip(covered)
            .filter(|(_, c)| !c)
            .map(|(s, _)| s)
            .collect();
        if !starts.is_empty() {
            self.prefill(&starts)?;
        }
        let prompts: Vec<Vec<u32>> = seqs.iter().map(|s| s.prompt.clone()).collect();
        let (logits, caches) = self.prefill(&prompts)?;
        let mut ids = Vec::with_capacity(seqs.len());
        let mut joined: Vec<(Row, KvCache)> = Vec::new();
        for ((seq, row_logits), kv) in seqs.into_iter().zip(logits).zip(caches) {
            let id = self.next_id;
            self.next_id += 1;
            ids.push(id);
            let mut row = Row {
                id,
                state: seq.constraint.as_ref().map_or(0, |c| c.1),
                seq,
                out: Vec::new(),
                lps: Vec::new(),
                next: 0,
            };
            match self.accept(&mut row, &row_logits, on_token)? {
                Some(f) => self.finish(row, f)?,
                None => joined.push((row, kv)),
            }
        }
        self.join(joined)?;
        Ok(ids)
    }

    /// Runs `prompts` (packed, reusing cached starts), caches each prompt, and returns
    /// the next-token logits and one-row cache of each.
    fn prefill(&mut self, prompts: &[Vec<u32>]) -> Result<(Vec<Vec<f32>>, Vec<KvCache>)> {
        let mut pasts = Vec::with_capacity(prompts.len());
        for p in prompts {
            pasts.push(self.prefixes.lookup(p)?);
        }
        let parts: Vec<Prefill> = prompts
            .iter()
            .zip(&pasts)
            .map(|(p, past)| Prefill {
                ids: &p[past.as_ref().map_or(0, KvCache::len)..],
                past: past.as_ref(),
            })
            .collect();
        for p in &parts {
            self.prefixes.reused += p.past.map_or(0, KvCache::len) as u64;
            self.prefixes.computed += p.ids.len() as u64;
        }
        let (last, caches) = self.model.prefill_packed(&parts)?;
        for (p, kv) in prompts.iter().zip(&caches) {
            self.prefixes.insert(p, kv);
        }
        Ok((logits_of(self.model, &last)?, caches))
    }

    /// Adds prefilled rows to the batch's cache, left-padding whichever side is shorter.
    fn join(&mut self, joined: Vec<(Row, KvCache)>) -> Result<()> {
        if joined.is_empty() {
            return Ok(());
        }
        let longest = joined.iter().map(|(_, kv)| kv.len()).max().unwrap_or(0);
        let keys = self.keys.max(longest);
        let mut parts: Vec<(KvCache, usize)> = Vec::with_capacity(joined.len() + 1);
        let mut valid = Vec::with_capacity((self.rows.len() + joined.len()) * keys);
        if !self.rows.is_empty() {
            let grow = keys - self.keys;
            for r in 0..self.rows.len() {
                valid.extend(std::iter::repeat_n(false, grow));
                valid.extend_from_slice(&self.valid[r * self.keys..(r + 1) * self.keys]);
            }
            parts.push((std::mem::take(&mut self.cache), grow));
        }
        for (row, kv) in joined {
            let pad = keys - kv.len();
            valid.extend(std::iter::repeat_n(false, pad));
            valid.extend(std::iter::repeat_n(true, kv.len()));
            parts.push((kv, pad));
            self.rows.push(row);
        }
        self.cache = KvCache::stack_left_padded(&parts, self.model.config().num_hidden_layers)?;
        self.keys = keys;
        self.valid = valid;
        Ok(())
    }

    /// One decoding step for every live sequence; returns the sequences that finished
    /// since the last call (with their samplers, as they ended).
    pub fn step(&mut self, on_token: OnToken) -> Result<Vec<(usize, Generation, Rng)>> {
        if !self.rows.is_empty() {
            let n = self.rows.len();
            let mut valid = Vec::with_capacity(n * (self.keys + 1));
            for r in 0..n {
                valid.extend_from_slice(&self.valid[r * self.keys..(r + 1) * self.keys]);
                valid.push(true);
            }
            let keys = KeyMask {
                batch: n,
                keys: self.keys + 1,
                valid,
            };
            let next: Vec<u32> = self.rows.iter().map(|r| r.next).collect();
            let input = Tensor::from_vec(next, (n, 1), self.model.device())?;
            let h = self
                .model
                .hidden(&input, &keys, Some(&mut self.cache), None)?;
            let last = h.squeeze(1)?;
            let logits: Vec<Vec<f32>> =
                self.model.logits(&last)?.to_dtype(DType::F32)?.to_vec2()?;
            self.keys += 1;
            self.valid = keys.valid;
            let rows = std::mem::take(&mut self.rows);
            let mut keep = Vec::with_capacity(n);
            for (i, (mut row, l)) in rows.into_iter().zip(&logits).enumerate() {
                match self.accept(&mut row, l, on_token)? {
                    Some(f) => self.finish(row, f)?,
                    None => {
                        keep.push(i);
                        self.rows.push(row);
                    }
                }
            }
            if keep.len() < n {
                self.keep_rows(&keep)?;
            }
        }
        Ok(std::mem::take(&mut self.done))
    }

    /// Ends the sequence `id` now (its client went away), as if by `max_new_tokens`.
    pub fn cancel(&mut self, id: usize) -> Result<()> {
        if let Some(i) = self.rows.iter().position(|r| r.id == id) {
            let row = self.rows.remove(i);
            let keep: Vec<usize> = (0..=self.rows.len()).filter(|&r| r != i).collect();
            self.keep_rows(&keep)?;
            self.finish(row, Finish::Length)?;
        }
        Ok(())
    }

    /// Keeps these rows of the cache and mask (the rows themselves are already kept),
    /// dropping key columns that no row needs any more.
    fn keep_rows(&mut self, keep: &[usize]) -> Result<()> {
        let k = self.keys;
        let valid: Vec<bool> = keep
            .iter()
            .flat_map(|&r| self.valid[r * k..(r + 1) * k].iter().copied())
            .collect();
        if keep.is_empty() {
            self.cache = KvCache::new(self.model.config().num_hidden_layers);
            self.keys = 0;
            self.valid = Vec::new();
            return Ok(());
        }
        self.cache.keep_rows(keep)?;
        // Leading columns padding every row (a long prompt that left) go.
        let unused = (0..k)
            .take_while(|&j| (0..keep.len()).all(|r| !valid[r * k + j]))
            .count();
        if unused > 0 {
            self.cache.drop_front(unused)?;
            self.valid = (0..keep.len())
                .flat_map(|r| valid[r * k + unused..(r + 1) * k].iter().copied())
                .collect();
            self.keys = k - unused;
        } else {
            self.valid = valid;
        }
        Ok(())
    }

    /// Takes in the next token of `row` from `logits`; `Some` when the row ends here.
    fn accept(&self, row: &mut Row, logits: &[f32], on_token: OnToken) -> Result<Option<Finish>> {
        let s = &row.seq.sampling;
        if row.out.len() >= s.max_new_tokens {
            return Ok(Some(Finish::Length));
        }
        let grammar = row.seq.constraint.as_ref().map(|c| c.0.clone());
        let t = match &grammar {
            None => pick(logits, s, &mut row.seq.rng),
            Some(g) => match masked(logits, g, row.state, &self.eos) {
                Some(m) => pick(&m, s, &mut row.seq.rng),
                None => {
                    return Ok(Some(if g.accepting(row.state) {
                        Finish::Eos
                    } else {
                        Finish::Length
                    }))
                }
            },
        };
        if self.eos.contains(&t) {
            return Ok(Some(Finish::Eos));
        }
        if let Some(g) = &grammar {
            match g.advance(row.state, t) {
                Some(next) => row.state = next,
                // Only reachable if a masked-out token was picked; end it.
                None => return Ok(Some(Finish::Length)),
            }
        }
        row.out.push(t);
        row.next = t;
        if let Some(k) = s.logprobs {
            row.lps.push(logprob_of(logits, t, k));
        }
        if !on_token(row.id, t) {
            return Ok(Some(Finish::Length));
        }
        if grammar.is_some_and(|g| g.allowed(row.state).is_empty()) {
            // The reply is complete and closed: nothing may follow, not even a step.
            return Ok(Some(Finish::Eos));
        }
        if !s.stop.is_empty() {
            let text = self.tokenizer.decode(&row.out, false)?;
            if s.stop.iter().any(|st| text.contains(st.as_str())) {
                return Ok(Some(Finish::Stop));
            }
        }
        if row.out.len() >= s.max_new_tokens {
            return Ok(Some(Finish::Length));
        }
        Ok(None)
    }

    /// Records a finished row's generation.
    fn finish(&mut self, row: Row, f: Finish) -> Result<()> {
        let text = if f == Finish::Stop {
            let text = self.tokenizer.decode(&row.out, false)?;
            let pos = row
                .seq
                .sampling
                .stop
                .iter()
                .filter_map(|st| text.find(st.as_str()))
                .min()
                .unwrap_or(text.len());
            text[..pos].to_string()
        } else {
            self.tokenizer.decode(&row.out, true)?
        };
        self.done.push((
            row.id,
            Generation {
                ids: row.out,
                text,
                finish: f,
                logprobs: row.lps,
            },
            row.seq.rng,
        ));
        Ok(())
    }
}

/// Log-probabilities of the next token at the last position, for scoring.
pub fn next_token_logprobs(model: &Decoder, ids: &[u32]) -> Result<Vec<f32>> {
    let t = Tensor::new(ids, model.device())?.unsqueeze(0)?;
    let h = model.hidden(&t, &KeyMask::full(1, ids.len()), None, None)?;
    let last = h.narrow(1, ids.len() - 1, 1)?.squeeze(1)?;
    let lp = candle_nn::ops::log_softmax(&model.logits(&last)?.to_dtype(DType::F32)?, D::Minus1)?;
    Ok(lp.squeeze(0)?.to_vec1()?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn greedy_takes_argmax_and_top_p_keeps_the_nucleus() {
        let logits = [0.0f32, 5.0, 1.0, 4.9];
        assert_eq!(pick(&logits, &Sampling::default(), &mut Rng::new(0)), 1);
        let s = Sampling {
            temperature: 1.0,
            top_p: 0.5,
            ..Default::default()
        };
        let mut rng = Rng::new(3);
        for _ in 0..50 {
            let t = pick(&logits, &s, &mut rng);
            assert!(t == 1 || t == 3, "{t}");
        }
        let s = Sampling {
            temperature: 1.0,
            top_p: 0.4,
            ..Default::default()
        };
        assert!((0..20).all(|_| pick(&logits, &s, &mut rng) == 1));
    }
}

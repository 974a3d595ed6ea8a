//! Generation with an external KV cache: batched prompts with left padding,
//! greedy or seeded temperature/top-p sampling, EOS and stop strings.

use candle_core::{DType, Tensor, D};
use serde::{Deserialize, Serialize};

use crate::constrain::Grammar;
use crate::error::Result;
use crate::model::{Decoder, KeyMask, KvCache};
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
    constraint: Option<(&Grammar, u32)>,
) -> Result<Vec<Generation>> {
    generate_observed(model, tokenizer, prompts, s, eos, rngs, constraint, None)
}

/// Called with (prompt index, token id) after each generated token; `false` ends that
/// sequence there (a client that went away), as if by `max_new_tokens`.
pub type OnToken<'a> = &'a mut dyn FnMut(usize, u32) -> bool;

/// [`generate_constrained`], telling `on_token` of each token as it is generated (for
/// streaming) and letting it end sequences early.
#[allow(clippy::too_many_arguments)]
pub fn generate_observed(
    model: &Decoder,
    tokenizer: &TextTokenizer,
    prompts: &[Vec<u32>],
    s: &Sampling,
    eos: &[u32],
    rngs: &mut [Rng],
    constraint: Option<(&Grammar, u32)>,
    mut on_token: Option<OnToken>,
) -> Result<Vec<Generation>> {
    let grammar = constraint.map(|c| c.0);
    let b = prompts.len();
    let device = model.device();
    let longest = prompts.iter().map(Vec::len).max().unwrap_or(0).max(1);
    let pad = eos.first().copied().unwrap_or(0);
    let mut ids = Vec::with_capacity(b * longest);
    let mut valid = Vec::with_capacity(b * longest);
    for p in prompts {
        ids.extend(std::iter::repeat_n(pad, longest - p.len()));
        ids.extend(p);
        valid.extend(std::iter::repeat_n(false, longest - p.len()));
        valid.extend(std::iter::repeat_n(true, p.len()));
    }
    let mut keys = KeyMask {
        batch: b,
        keys: longest,
        valid,
    };
    let mut cache = KvCache::new(model.config().num_hidden_layers);
    let mut input = Tensor::from_vec(ids, (b, longest), device)?;
    let mut out: Vec<Vec<u32>> = vec![Vec::new(); b];
    let mut finish: Vec<Option<Finish>> = vec![None; b];
    let mut texts: Vec<String> = vec![String::new(); b];
    // Prompt index of each row still decoding; finished rows leave the batch (and the
    // cache), so one long answer does not make the others pay for its steps.
    let mut alive: Vec<usize> = (0..b).collect();
    let mut states: Vec<u32> = vec![constraint.map_or(0, |c| c.1); b];
    let mut lps: Vec<Vec<TokenLogprob>> = vec![Vec::new(); b];
    for _ in 0..s.max_new_tokens {
        let h = model.hidden(&input, &keys, Some(&mut cache), None)?;
        let last = h.narrow(1, h.dim(1)? - 1, 1)?.squeeze(1)?;
        let logits: Vec<Vec<f32>> = model.logits(&last)?.to_dtype(DType::F32)?.to_vec2()?;
        let mut next = Vec::with_capacity(alive.len());
        let mut keep = Vec::with_capacity(alive.len());
        for (row, &r) in alive.iter().enumerate() {
            let t = match grammar {
                None => pick(&logits[row], s, &mut rngs[r]),
                Some(g) => match masked(&logits[row], g, states[r], eos) {
                    Some(m) => pick(&m, s, &mut rngs[r]),
                    None => {
                        finish[r] = Some(if g.accepting(states[r]) {
                            Finish::Eos
                        } else {
                            Finish::Length
                        });
                        continue;
                    }
                },
            };
            if eos.contains(&t) {
                finish[r] = Some(Finish::Eos);
                continue;
            }
            if let Some(g) = grammar {
                match g.advance(states[r], t) {
                    Some(next) => states[r] = next,
                    None => {
                        // Only reachable if a masked-out token was picked; end it.
                        finish[r] = Some(Finish::Length);
                        continue;
                    }
                }
            }
            out[r].push(t);
            if let Some(k) = s.logprobs {
                lps[r].push(logprob_of(&logits[row], t, k));
            }
            if let Some(f) = on_token.as_mut() {
                if !f(r, t) {
                    finish[r] = Some(Finish::Length);
                    continue;
                }
            }
            if grammar.is_some_and(|g| g.allowed(states[r]).is_empty()) {
                // The reply is complete and closed: nothing may follow, not even a step.
                finish[r] = Some(Finish::Eos);
                continue;
            }
            if !s.stop.is_empty() {
                let text = tokenizer.decode(&out[r], false)?;
                if let Some(pos) = s.stop.iter().filter_map(|st| text.find(st.as_str())).min() {
                    texts[r] = text[..pos].to_string();
                    finish[r] = Some(Finish::Stop);
                    continue;
                }
            }
            keep.push(row);
            next.push(t);
        }
        if keep.is_empty() {
            break;
        }
        let n = keys.keys;
        let mut valid = Vec::with_capacity(keep.len() * (n + 1));
        for &row in &keep {
            valid.extend_from_slice(&keys.valid[row * n..(row + 1) * n]);
            valid.push(true);
        }
        if keep.len() < alive.len() {
            cache.keep_rows(&keep)?;
            alive = keep.iter().map(|&row| alive[row]).collect();
        }
        keys = KeyMask {
            batch: alive.len(),
            keys: n + 1,
            valid,
        };
        input = Tensor::from_vec(next, (alive.len(), 1), device)?;
    }
    let mut result = Vec::with_capacity(b);
    for r in 0..b {
        let f = finish[r].unwrap_or(Finish::Length);
        let text = if f == Finish::Stop {
            std::mem::take(&mut texts[r])
        } else {
            tokenizer.decode(&out[r], true)?
        };
        result.push(Generation {
            ids: std::mem::take(&mut out[r]),
            text,
            finish: f,
            logprobs: std::mem::take(&mut lps[r]),
        });
    }
    Ok(result)
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

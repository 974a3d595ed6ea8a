//! Turning records into token ids and labels: chat template or plain text,
//! loss masks, truncation, and padded batches with their key masks.

use candle_core::{Device, Tensor};
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::loss::IGNORE;
use crate::model::KeyMask;
use crate::tokenizer::{Message, TextTokenizer};

/// A training record: prompt/response or chat messages (the last one is the answer).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum Record {
    /// A single-turn pair.
    Pair {
        /// The question or instruction.
        prompt: String,
        /// The answer to learn.
        response: String,
    },
    /// A conversation; the final `assistant` message is the answer.
    Chat {
        /// Messages in order.
        messages: Vec<Message>,
    },
}

/// Which tokens carry loss.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum LossMask {
    /// Answer tokens only; the prompt is context. An example whose answer does not
    /// fit in `max_len` whole (its end-of-turn token included) is dropped, not cut:
    /// a cut answer teaches the model to stop mid-answer, or never to stop.
    AnswerOnly,
    /// Only the last answer token (classification-style labels).
    LastToken,
    /// Only the answer's last token that is one of [`Formatter::label_tokens`] (a
    /// confidence or class token, found by id wherever the chat template puts it and
    /// whatever end-of-turn tokens follow); an example whose answer has none within
    /// `max_len` is dropped.
    LabelToken,
    /// Every token (plain text: a sequence longer than `max_len` is cut at the end).
    Full,
}

/// A tokenised example.
#[derive(Debug, Clone, PartialEq)]
pub struct Example {
    /// Token ids.
    pub ids: Vec<u32>,
    /// HF-style labels (`-100` = no loss).
    pub labels: Vec<i64>,
}

/// How records become examples.
pub struct Formatter<'a> {
    /// The tokenizer (with its chat template).
    pub tokenizer: &'a TextTokenizer,
    /// Use the chat template (false: plain `prompt + response + eos`).
    pub chat: bool,
    /// Loss mask.
    pub mask: LossMask,
    /// Longest sequence; longer ones are cut at the end.
    pub max_len: usize,
    /// The token ids [`LossMask::LabelToken`] puts the label on.
    pub label_tokens: &'a [u32],
}

impl Formatter<'_> {
    /// Splits a record into prompt text and answer text.
    pub fn texts(&self, record: &Record) -> Result<(String, String)> {
        let messages = match record {
            Record::Pair { prompt, response } => vec![
                Message {
                    role: "user".into(),
                    content: prompt.clone(),
                },
                Message {
                    role: "assistant".into(),
                    content: response.clone(),
                },
            ],
            Record::Chat { messages } => messages.clone(),
        };
        let Some((last, context)) = messages.split_last() else {
            return Err(Error::Invalid("a record has no messages".into()));
        };
        if last.role != "assistant" {
            return Err(Error::Invalid(format!(
                "the last message must be the assistant's answer, found role `{}`",
                last.role
            )));
        }
        if !self.chat {
            let prompt: Vec<&str> = context.iter().map(|m| m.content.as_str()).collect();
            let eos = self
                .tokenizer
                .eos_id()
                .map(|id| self.tokenizer.decode(&[id], false))
                .transpose()?
                .unwrap_or_default();
            return Ok((prompt.join("\n"), format!("{}{eos}", last.content)));
        }
        let prompt = self.tokenizer.apply_chat_template(context, true)?;
        let full = self.tokenizer.apply_chat_template(&messages, false)?;
        let answer = full.strip_prefix(&prompt).ok_or_else(|| {
            Error::Tokenizer("the chat template does not render the prompt as a prefix of the full conversation, so the answer cannot be masked".into())
        })?;
        Ok((prompt, answer.to_string()))
    }

    /// Tokenises a record; `None` when truncation leaves no token with a loss, or
    /// (answer-only loss) would cut the answer.
    pub fn example(&self, record: &Record) -> Result<Option<Example>> {
        let (prompt, answer) = self.texts(record)?;
        let p = self.tokenizer.encode(&prompt)?;
        let a = self.tokenizer.encode(&answer)?;
        let mut ids = p.clone();
        ids.extend(&a);
        let mut labels: Vec<i64> = match self.mask {
            LossMask::Full => ids.iter().map(|&i| i as i64).collect(),
            LossMask::AnswerOnly => p
                .iter()
                .map(|_| IGNORE)
                .chain(a.iter().map(|&i| i as i64))
                .collect(),
            LossMask::LastToken => {
                let mut l = vec![IGNORE; ids.len()];
                if let Some(last) = l.last_mut() {
                    *last = *ids.last().expect("non-empty") as i64;
                }
                l
            }
            LossMask::LabelToken => {
                let mut l = vec![IGNORE; ids.len()];
                if let Some(j) = a.iter().rposition(|t| self.label_tokens.contains(t)) {
                    l[p.len() + j] = a[j] as i64;
                }
                l
            }
        };
        if self.mask == LossMask::AnswerOnly && ids.len() > self.max_len {
            return Ok(None);
        }
        ids.truncate(self.max_len);
        labels.truncate(self.max_len);
        // The first token is never predicted; an example needs a label after it.
        if labels.iter().skip(1).all(|&l| l == IGNORE) {
            return Ok(None);
        }
        Ok(Some(Example { ids, labels }))
    }
}

/// A padded batch ready for the model.
pub struct Batch {
    /// `[b, s]` token ids.
    pub ids: Tensor,
    /// Valid keys.
    pub keys: KeyMask,
    /// Labels per row, padded with `-100`.
    pub labels: Vec<Vec<i64>>,
    /// Real (non-pad) tokens.
    pub tokens: usize,
}

/// Right-pads examples to the longest one.
pub fn collate(examples: &[&Example], pad_id: u32, device: &Device) -> Result<Batch> {
    let s = examples.iter().map(|e| e.ids.len()).max().unwrap_or(0);
    let b = examples.len();
    let mut ids = Vec::with_capacity(b * s);
    let mut valid = Vec::with_capacity(b * s);
    let mut labels = Vec::with_capacity(b);
    for e in examples {
        let n = e.ids.len();
        ids.extend(&e.ids);
        ids.extend(std::iter::repeat_n(pad_id, s - n));
        valid.extend(std::iter::repeat_n(true, n));
        valid.extend(std::iter::repeat_n(false, s - n));
        let mut l = e.labels.clone();
        l.resize(s, IGNORE);
        labels.push(l);
    }
    let tokens = examples.iter().map(|e| e.ids.len()).sum();
    Ok(Batch {
        ids: Tensor::from_vec(ids, (b, s), device)?,
        keys: KeyMask {
            batch: b,
            keys: s,
            valid,
        },
        labels,
        tokens,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn answer_only_masks_the_prompt_and_the_template_prefix() {
        let tok = TextTokenizer::bytes_chatml();
        let f = Formatter {
            tokenizer: &tok,
            chat: true,
            mask: LossMask::AnswerOnly,
            max_len: 512,
            label_tokens: &[],
        };
        let r = Record::Pair {
            prompt: "2+2?".into(),
            response: "4".into(),
        };
        let e = f.example(&r).unwrap().unwrap();
        let labelled: Vec<u32> = e
            .ids
            .iter()
            .zip(&e.labels)
            .filter(|(_, l)| **l != IGNORE)
            .map(|(i, _)| *i)
            .collect();
        assert_eq!(tok.decode(&labelled, false).unwrap(), "4<|im_end|>\n");
        assert_eq!(
            tok.decode(&e.ids, false).unwrap(),
            "<|im_start|>user\n2+2?<|im_end|>\n<|im_start|>assistant\n4<|im_end|>\n"
        );
        let last = Formatter {
            mask: LossMask::LastToken,
            ..f
        };
        let e = last.example(&r).unwrap().unwrap();
        assert_eq!(e.labels.iter().filter(|l| **l != IGNORE).count(), 1);
    }

    #[test]
    fn the_label_token_is_found_by_id_and_a_truncated_one_drops_the_example() {
        let mut tok = TextTokenizer::bytes_chatml();
        let ids = tok
            .add_special_tokens(&["<C>".into(), "<U>".into()])
            .unwrap();
        let f = Formatter {
            tokenizer: &tok,
            chat: true,
            mask: LossMask::LabelToken,
            max_len: 512,
            label_tokens: &ids,
        };
        let r = Record::Pair {
            prompt: "2+2?".into(),
            response: "4 <U>".into(),
        };
        let e = f.example(&r).unwrap().unwrap();
        let labelled: Vec<(usize, i64)> = e
            .labels
            .iter()
            .enumerate()
            .filter(|(_, l)| **l != IGNORE)
            .map(|(i, l)| (i, *l))
            .collect();
        // One label, on the token itself, with `<|im_end|>\n` after it.
        assert_eq!(labelled.len(), 1);
        let (at, id) = labelled[0];
        assert_eq!(id, ids[1] as i64);
        assert_eq!(e.ids[at], ids[1]);
        assert!(at + 1 < e.ids.len(), "the token is not the last position");
        // Cut before the token: dropped.
        let short = Formatter { max_len: at, ..f };
        assert!(short.example(&r).unwrap().is_none());
    }

    #[test]
    fn truncated_answers_are_dropped_and_roles_checked() {
        let tok = TextTokenizer::bytes_chatml();
        let f = Formatter {
            tokenizer: &tok,
            chat: true,
            mask: LossMask::AnswerOnly,
            max_len: 8,
            label_tokens: &[],
        };
        assert!(f
            .example(&Record::Pair {
                prompt: "long prompt here".into(),
                response: "x".into()
            })
            .unwrap()
            .is_none());
        // An answer that fits only in part is dropped too, and kept once it fits.
        let cut = Record::Pair {
            prompt: "p".into(),
            response: "a long answer".into(),
        };
        assert!(f.example(&cut).unwrap().is_none());
        let roomy = Formatter { max_len: 200, ..f };
        assert!(roomy.example(&cut).unwrap().is_some());
        let bad = Record::Chat {
            messages: vec![Message {
                role: "user".into(),
                content: "hi".into(),
            }],
        };
        assert!(f.texts(&bad).unwrap_err().to_string().contains("assistant"));
    }
}

//! The confidence-token task (after Chuang et al., "Learning to Route LLMs with
//! Confidence Tokens", ICML 2025): a model answers a BoolQ or MedQA question, then
//! writes one confidence token (`<C_READ>`/`<U_READ>` for BoolQ, `<C_MED>`/`<U_MED>`
//! for MedQA). This file grades answers and reads the token back.
//!
//! Grading is strict, to design out the original's loose regexes:
//! - **BoolQ**: the answer's first word, punctuation stripped, must be `yes` or `no`
//!   (any case). "not", "know", "nope" and "no-one" are not "no"; a reply that starts
//!   otherwise is ungraded (counted wrong, and reported as unparsed).
//! - **MedQA**: an option letter counts only where it stands as a letter: the whole
//!   answer (`B`, `B.`, `(B)`, `B)`), a leading `B.`/`B)`/`B:`/`(B)` label, or after
//!   "answer is", "answer:", "option" or "choice". "A patient..." is the article,
//!   not option A. Failing that, the answer may name exactly one option by its text
//!   (whole words, case and spacing ignored); naming two options is ungraded.

/// The dataset a question comes from, which picks its tokens and its grader.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Dataset {
    /// Yes/no questions over a passage.
    Boolq,
    /// 4–5 option medical exam questions.
    Medqa,
}

impl Dataset {
    /// `(confident, unconfident)` tokens.
    pub fn tokens(self) -> (&'static str, &'static str) {
        match self {
            Dataset::Boolq => ("<C_READ>", "<U_READ>"),
            Dataset::Medqa => ("<C_MED>", "<U_MED>"),
        }
    }

    /// The dataset's name as records carry it.
    pub fn name(self) -> &'static str {
        match self {
            Dataset::Boolq => "boolq",
            Dataset::Medqa => "medqa",
        }
    }
}

/// All four confidence tokens, in the order they are added to the vocabulary.
pub const TOKENS: [&str; 4] = ["<C_READ>", "<U_READ>", "<C_MED>", "<U_MED>"];

/// A reply split into its answer and its confidence token.
#[derive(Debug, Clone, PartialEq)]
pub struct Reply<'a> {
    /// The text before the token (or the whole reply without one), trimmed.
    pub answer: &'a str,
    /// `Some(true)` for the confident token of the dataset, `Some(false)` for the
    /// unconfident one, `None` when neither appears.
    pub confident: Option<bool>,
}

/// Splits a reply at the first of the dataset's two tokens.
pub fn split_reply(text: &str, dataset: Dataset) -> Reply<'_> {
    let (c, u) = dataset.tokens();
    let hit = [(c, true), (u, false)]
        .into_iter()
        .filter_map(|(t, conf)| text.find(t).map(|p| (p, conf)))
        .min_by_key(|&(p, _)| p);
    match hit {
        Some((p, conf)) => Reply {
            answer: text[..p].trim(),
            confident: Some(conf),
        },
        None => Reply {
            answer: text.trim(),
            confident: None,
        },
    }
}

/// A BoolQ answer's verdict: `Some(true)` for yes, `Some(false)` for no, `None` when
/// the first word is neither.
pub fn boolq_answer(answer: &str) -> Option<bool> {
    let first = answer
        .split_whitespace()
        .next()?
        .trim_matches(|c: char| !c.is_alphanumeric());
    // "no-one" → "no-one" keeps its hyphen inside; only edges are trimmed.
    match first.to_ascii_lowercase().as_str() {
        "yes" => Some(true),
        "no" => Some(false),
        _ => None,
    }
}

/// Whether a BoolQ answer is the gold one (an ungraded answer is wrong).
pub fn boolq_correct(answer: &str, gold: bool) -> bool {
    boolq_answer(answer) == Some(gold)
}

/// Whether a MedQA answer picks the gold letter (an ungraded answer is wrong).
pub fn medqa_correct(answer: &str, options: &[(String, String)], gold: &str) -> bool {
    medqa_answer(answer, options).as_deref() == Some(gold)
}

/// The option letter a MedQA answer picks, given the options `(letter, text)`;
/// `None` when it picks none or several.
pub fn medqa_answer(answer: &str, options: &[(String, String)]) -> Option<String> {
    let letters: Vec<char> = options
        .iter()
        .filter_map(|(l, _)| l.chars().next())
        .collect();
    if let Some(l) = letter_of(answer, &letters) {
        return Some(l.to_string());
    }
    let norm = words(answer);
    let named: Vec<&String> = options
        .iter()
        .filter(|(_, t)| {
            let t = words(t);
            !t.is_empty() && contains_words(&norm, &t)
        })
        .map(|(l, _)| l)
        .collect();
    // An option whose text is inside another's (e.g. "Aspirin" and "Aspirin and
    // heparin") is not also named when the longer one is.
    let named: Vec<&String> = named
        .iter()
        .copied()
        .filter(|l| {
            let mine = words(&options.iter().find(|(x, _)| x == *l).expect("named").1);
            !named.iter().any(|o| {
                let other = words(&options.iter().find(|(x, _)| x == *o).expect("named").1);
                *o != *l && other.len() > mine.len() && contains_words(&other, &mine)
            })
        })
        .collect();
    match named.as_slice() {
        [one] => Some((*one).clone()),
        _ => None,
    }
}

/// An option letter standing as a letter in `answer`.
fn letter_of(answer: &str, letters: &[char]) -> Option<char> {
    let a = answer.trim();
    let is_opt = |c: char| letters.contains(&c.to_ascii_uppercase());
    let bare = a.trim_matches(|c: char| "().:,;*[] ".contains(c));
    if bare.chars().count() == 1 {
        let c = bare.chars().next().expect("one char");
        if is_opt(c) {
            return Some(c.to_ascii_uppercase());
        }
    }
    // A leading label: "B.", "B)", "B:", "(B)", followed by anything. Upper case
    // only: "a. " is too often prose.
    let chars: Vec<char> = a.chars().collect();
    let label = match chars.as_slice() {
        ['(', c, ')', ..] => Some(*c),
        [c, '.' | ')' | ':', rest @ ..] if rest.first().is_none_or(|r| r.is_whitespace()) => {
            Some(*c)
        }
        _ => None,
    };
    if let Some(c) = label.filter(|c| c.is_ascii_uppercase() && is_opt(*c)) {
        return Some(c);
    }
    // After a cue phrase.
    let lower = a.to_lowercase();
    for cue in ["answer is", "answer:", "option", "choice"] {
        let mut from = 0;
        while let Some(p) = lower[from..].find(cue) {
            let after = &a[from + p + cue.len()..];
            let token = after
                .trim_start_matches(|c: char| c.is_whitespace() || c == ':' || c == '(')
                .chars()
                .take_while(|c| c.is_alphanumeric())
                .collect::<String>();
            if token.chars().count() == 1 {
                let c = token.chars().next().expect("one char");
                if is_opt(c) {
                    return Some(c.to_ascii_uppercase());
                }
            }
            from += p + cue.len();
        }
    }
    None
}

fn words(s: &str) -> Vec<String> {
    s.split(|c: char| !c.is_alphanumeric())
        .filter(|w| !w.is_empty())
        .map(str::to_lowercase)
        .collect()
}

fn contains_words(hay: &[String], needle: &[String]) -> bool {
    needle.len() <= hay.len() && hay.windows(needle.len()).any(|w| w == needle)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn opts() -> Vec<(String, String)> {
        [
            ("A", "Aspirin"),
            ("B", "Aspirin and heparin"),
            ("C", "Warfarin"),
            ("D", "No treatment"),
            ("E", "Surgery"),
        ]
        .iter()
        .map(|(l, t)| (l.to_string(), t.to_string()))
        .collect()
    }

    #[test]
    fn boolq_is_strict_about_yes_and_no() {
        assert_eq!(boolq_answer("Yes."), Some(true));
        assert_eq!(boolq_answer("no, the passage says otherwise"), Some(false));
        assert_eq!(boolq_answer("NO"), Some(false));
        assert_eq!(boolq_answer("not really"), None);
        assert_eq!(boolq_answer("I know the answer"), None);
        assert_eq!(boolq_answer("nope"), None);
        assert_eq!(boolq_answer("no-one knows"), None);
        assert_eq!(boolq_answer("The answer is yes"), None);
        assert_eq!(boolq_answer(""), None);
    }

    #[test]
    fn medqa_reads_letters_only_where_they_stand_as_letters() {
        let o = opts();
        assert_eq!(medqa_answer("C", &o).as_deref(), Some("C"));
        assert_eq!(medqa_answer("(C)", &o).as_deref(), Some("C"));
        assert_eq!(medqa_answer("C. Warfarin", &o).as_deref(), Some("C"));
        assert_eq!(medqa_answer("The answer is E.", &o).as_deref(), Some("E"));
        assert_eq!(medqa_answer("Answer: (d)", &o).as_deref(), Some("D"));
        // The article "A" is not option A; the text names Warfarin.
        assert_eq!(
            medqa_answer("A patient like this needs warfarin", &o).as_deref(),
            Some("C")
        );
        assert_eq!(medqa_answer("A patient like this needs rest", &o), None);
        // Option text instead of a letter; the longer option wins over its prefix.
        assert_eq!(medqa_answer("surgery", &o).as_deref(), Some("E"));
        assert_eq!(
            medqa_answer("Give aspirin and heparin now", &o).as_deref(),
            Some("B")
        );
        assert_eq!(medqa_answer("aspirin", &o).as_deref(), Some("A"));
        // Two options named: ungraded.
        assert_eq!(medqa_answer("warfarin or surgery", &o), None);
        // A letter that is not an option.
        assert_eq!(medqa_answer("F", &o), None);
    }

    #[test]
    fn the_token_is_found_not_assumed() {
        let r = split_reply("Yes <C_READ>", Dataset::Boolq);
        assert_eq!((r.answer, r.confident), ("Yes", Some(true)));
        let r = split_reply("B. Aspirin and heparin<U_MED></s>", Dataset::Medqa);
        assert_eq!(
            (r.answer, r.confident),
            ("B. Aspirin and heparin", Some(false))
        );
        // The other dataset's token does not count.
        assert_eq!(split_reply("Yes <C_MED>", Dataset::Boolq).confident, None);
        assert_eq!(split_reply("Yes", Dataset::Boolq).confident, None);
    }
}

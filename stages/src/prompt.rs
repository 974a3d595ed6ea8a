//! Prompt templates: minijinja files rendered once per record, the record's fields
//! being the template's variables (an undefined variable is an error), and the first
//! JSON object in a model's reply. Every stage with a prompt file renders through
//! here: oracles, evaluation, preference sampling and judging, sft's templates and the
//! reward model.

use serde_json::Value;

use crate::contract::{StageContext, StageError};

/// The first `n` whitespace-separated words of `text` (the `words(n)` filter: an
/// article cut to a word limit), joined by single spaces; the text as it is when it
/// has no more than `n`.
pub fn first_words(text: &str, n: usize) -> String {
    let words: Vec<&str> = text.split_whitespace().collect();
    if words.len() <= n {
        text.to_string()
    } else {
        words[..n].join(" ")
    }
}

/// Renders a minijinja template with `record`'s fields as its variables; an undefined
/// variable is an error, not an empty string. Shared by every stage with a prompt file.
/// Besides minijinja's filters, `words(n)` keeps the first `n` words.
pub fn render_template(template: &str, record: &Value) -> Result<String, String> {
    let mut env = minijinja::Environment::new();
    env.add_filter("words", |s: String, n: usize| first_words(&s, n));
    env.set_undefined_behavior(minijinja::UndefinedBehavior::Strict);
    env.add_template("prompt", template)
        .map_err(|e| format!("the template does not parse: {e}"))?;
    env.get_template("prompt")
        .expect("added")
        .render(minijinja::Value::from_serialize(record))
        .map_err(|e| format!("rendering: {e}"))
}

/// The first balanced `{…}` in `text`, braces inside JSON strings ignored.
pub fn first_object(text: &str) -> Option<&str> {
    let start = text.find('{')?;
    let (mut depth, mut in_str, mut esc) = (0usize, false, false);
    for (i, c) in text[start..].char_indices() {
        if in_str {
            match (esc, c) {
                (true, _) => esc = false,
                (false, '\\') => esc = true,
                (false, '"') => in_str = false,
                _ => {}
            }
            continue;
        }
        match c {
            '"' => in_str = true,
            '{' => depth += 1,
            '}' => {
                depth -= 1;
                if depth == 0 {
                    return Some(&text[start..start + i + 1]);
                }
            }
            _ => {}
        }
    }
    None
}

/// Reads the prompt template a stage's params name (relative to the workdir).
pub fn read_template(ctx: &StageContext, name: &str) -> Result<String, StageError> {
    let path = ctx.workdir.join(name);
    std::fs::read_to_string(&path).map_err(StageError::io(format!(
        "reading the prompt template {}",
        path.display()
    )))
}

/// Renders `template` (the file `name`) for every record; an error names the
/// template and the record (`what` record N, counted from 1).
pub fn render_each(
    template: &str,
    name: &str,
    records: &[Value],
    what: &str,
) -> Result<Vec<String>, StageError> {
    records
        .iter()
        .enumerate()
        .map(|(i, r)| {
            render_template(template, r)
                .map_err(|e| StageError::Failed(format!("{name}: {what} record {}: {e}", i + 1)))
        })
        .collect()
}

#[cfg(test)]
mod words_tests {
    #[test]
    fn the_words_filter_cuts_to_a_word_limit() {
        let r = serde_json::json!({"text": "one two  three\nfour"});
        assert_eq!(
            super::render_template("{{ text | words(2) }}", &r).unwrap(),
            "one two"
        );
        assert_eq!(
            super::render_template("{{ text | words(9) }}", &r).unwrap(),
            "one two  three\nfour"
        );
    }
}

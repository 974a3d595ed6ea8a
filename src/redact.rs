//! What never leaves the machine in a page or a tracker: values of params whose name says
//! they are a credential. Pipelines name secrets by the environment variable that holds
//! them (`api_key_env: OPENAI_API_KEY`), so this catches only a literal key written into a
//! params file by mistake; those are shown as `***`.

use serde_json::Value;

/// Shown instead of a secret.
pub const MASK: &str = "***";

/// Whether a param called `name` holds a credential (`api_key`, `hf_token`, `password`),
/// as opposed to naming where one is (`api_key_env`, `token_file`) or counting tokens
/// (`max_tokens`, `max_new_tokens`).
pub fn is_secret_name(name: &str) -> bool {
    let n = name.to_ascii_lowercase();
    if n.ends_with("_env") || n.ends_with("_file") || n.ends_with("_path") {
        return false;
    }
    if n.ends_with("tokens") || n.contains("token_") || n.starts_with("max_") {
        return false;
    }
    [
        "api_key",
        "apikey",
        "secret",
        "password",
        "passwd",
        "token",
        "credential",
    ]
    .iter()
    .any(|w| n.contains(w))
}

/// `value` with every secret-named field (at any depth) replaced by [`MASK`].
pub fn redacted(value: &Value) -> Value {
    match value {
        Value::Object(map) => Value::Object(
            map.iter()
                .map(|(k, v)| {
                    let v = if is_secret_name(k) && !v.is_null() {
                        Value::String(MASK.into())
                    } else {
                        redacted(v)
                    };
                    (k.clone(), v)
                })
                .collect(),
        ),
        Value::Array(items) => Value::Array(items.iter().map(redacted).collect()),
        other => other.clone(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn credentials_are_masked_and_their_pointers_and_token_counts_are_not() {
        let v = json!({
            "oracle": {"api_key": "sk-live-123", "api_key_env": "OPENAI_API_KEY", "max_new_tokens": 64},
            "hf_token": "hf_abc", "lr": 0.1, "stages": [{"password": "x", "token_file": "t"}]
        });
        let r = redacted(&v);
        assert_eq!(r["oracle"]["api_key"], MASK);
        assert_eq!(r["oracle"]["api_key_env"], "OPENAI_API_KEY");
        assert_eq!(r["oracle"]["max_new_tokens"], 64);
        assert_eq!(r["hf_token"], MASK);
        assert_eq!(r["lr"], 0.1);
        assert_eq!(r["stages"][0]["password"], MASK);
        assert_eq!(r["stages"][0]["token_file"], "t");
        assert!(!r.to_string().contains("sk-live"));
    }
}

//! Names of templates and sandboxes: they become file names and clone ids, so only a safe,
//! short alphabet is accepted.

/// Longest name (bytes); a clone id must fit the identity page's 63 bytes.
pub const MAX_NAME: usize = 63;

/// A name that is not `[a-z0-9][a-z0-9._-]{0,62}`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid {what} {name:?}: use 1 to 63 characters of a-z, 0-9, '.', '_' or '-', starting with a letter or digit")]
pub struct InvalidName {
    /// What was named (`template`, `sandbox id`).
    pub what: &'static str,
    /// The refused name (truncated to 80 characters).
    pub name: String,
}

/// Checks `name` against `[a-z0-9][a-z0-9._-]{0,62}`.
pub fn validate(what: &'static str, name: &str) -> Result<(), InvalidName> {
    let b = name.as_bytes();
    let ok = !b.is_empty()
        && b.len() <= MAX_NAME
        && (b[0].is_ascii_lowercase() || b[0].is_ascii_digit())
        && b.iter()
            .all(|&c| c.is_ascii_lowercase() || c.is_ascii_digit() || b"._-".contains(&c));
    if ok {
        Ok(())
    } else {
        Err(InvalidName {
            what,
            name: name.chars().take(80).collect(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::validate;

    #[test]
    fn names() {
        for ok in ["a", "0", "py3.12_x-y", &"a".repeat(63)] {
            assert!(validate("template", ok).is_ok(), "{ok}");
        }
        for bad in [
            "",
            ".a",
            "-a",
            "A",
            "a/b",
            "..",
            "a b",
            "é",
            &"a".repeat(64),
            "a\0",
        ] {
            let e = validate("template", bad).unwrap_err().to_string();
            assert!(e.contains("invalid template"), "{e}");
        }
    }
}

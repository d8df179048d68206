//! Container id rules: `[A-Za-z0-9][A-Za-z0-9_.-]{0,127}` (so never a path component such as
//! `..` or one with a `/`).

/// A container id that is not acceptable.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("invalid container id {0:?}: use 1 to 128 characters of [A-Za-z0-9_.-], starting with a letter or digit")]
pub struct InvalidId(pub String);

/// Checks `id`.
pub fn validate(id: &str) -> Result<(), InvalidId> {
    let b = id.as_bytes();
    let ok = !b.is_empty()
        && b.len() <= 128
        && b[0].is_ascii_alphanumeric()
        && b.iter()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, b'_' | b'.' | b'-'));
    if ok {
        Ok(())
    } else {
        Err(InvalidId(id.to_string()))
    }
}

#[cfg(test)]
mod tests {
    use super::validate;

    #[test]
    fn accepts_runc_ids_and_refuses_paths() {
        for ok in ["a", "abc-1.2_3", "0", &"x".repeat(128)] {
            assert_eq!(validate(ok), Ok(()), "{ok}");
        }
        for bad in [
            "",
            "..",
            ".a",
            "-a",
            "a/b",
            "../x",
            "a b",
            "é",
            &"x".repeat(129),
        ] {
            assert!(validate(bad).is_err(), "{bad}");
        }
    }
}

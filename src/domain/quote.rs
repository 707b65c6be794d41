//! Quoting what callers send: a value echoed into a status message, an error detail or a log
//! line is cut to a short prefix, so a hostile value costs the same as a sensible one.

/// The most characters of a caller's value that are echoed back.
pub(crate) const MAX_QUOTED_CHARS: usize = 64;

/// `value`, cut to [`MAX_QUOTED_CHARS`] characters with `…` and the full length when longer.
pub(crate) fn quoted(value: &str) -> String {
    match value.char_indices().nth(MAX_QUOTED_CHARS) {
        None => value.to_owned(),
        Some((cut, _)) => format!("{}… ({} bytes)", &value[..cut], value.len()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn long_values_are_cut_on_a_character_boundary() {
        assert_eq!(quoted("farm-x"), "farm-x");
        let long = "é".repeat(10_000);
        let q = quoted(&long);
        assert!(q.starts_with(&"é".repeat(MAX_QUOTED_CHARS)));
        assert!(q.ends_with("… (20000 bytes)"), "{q}");
        assert!(q.len() < 200);
    }
}

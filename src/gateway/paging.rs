//! Page tokens: opaque to callers, bound to one aggregation.

use super::error::GatewayError;
use crate::domain::validate::{Field, FieldViolation};
use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;

/// Rows per page when the caller names no size.
pub const DEFAULT_PAGE_SIZE: usize = 100;
/// The largest page; larger requests are served this many rows.
pub const MAX_PAGE_SIZE: usize = 1000;

/// The page size to serve for a requested one.
pub fn page_size(requested: i32) -> Result<usize, GatewayError> {
    match usize::try_from(requested) {
        Ok(0) => Ok(DEFAULT_PAGE_SIZE),
        Ok(n) => Ok(n.min(MAX_PAGE_SIZE)),
        Err(_) => Err(GatewayError::Invalid(vec![FieldViolation::new(Field::MaxResults, "must not be negative")])),
    }
}

/// The token for the page starting at `offset` of aggregation `id`: `base64url("{id}/{offset}")`.
pub fn encode(id: &str, offset: usize) -> String {
    use std::fmt::Write as _;
    let mut plain = String::with_capacity(id.len() + 21);
    plain.push_str(id);
    let _ = write!(plain, "/{offset}");
    URL_SAFE_NO_PAD.encode(plain)
}

/// The refusal of a token that points past the last row.
pub fn past_the_end() -> GatewayError {
    GatewayError::Invalid(vec![FieldViolation::new(Field::NextToken, "points past the last row")])
}

/// The offset a token points at; the token must belong to aggregation `id`.
pub fn decode(token: &str, id: &str) -> Result<usize, GatewayError> {
    let bad = |why: &str| GatewayError::Invalid(vec![FieldViolation::new(Field::NextToken, why)]);
    let text = URL_SAFE_NO_PAD
        .decode(token)
        .ok()
        .and_then(|raw| String::from_utf8(raw).ok())
        .ok_or_else(|| bad("is not a page token of this gateway"))?;
    let (owner, offset) = text.rsplit_once('/').ok_or_else(|| bad("is not a page token of this gateway"))?;
    if owner != id {
        return Err(bad("belongs to another aggregation"));
    }
    offset.parse().map_err(|_| bad("is not a page token of this gateway"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_round_trip_and_are_bound_to_their_aggregation() {
        for offset in [0, 7, 300, usize::MAX] {
            assert_eq!(encode("agg-1", offset), URL_SAFE_NO_PAD.encode(format!("agg-1/{offset}")));
        }
        let t = encode("agg-1", 300);
        assert_eq!(decode(&t, "agg-1").ok(), Some(300));
        assert!(decode(&t, "agg-2").is_err());
        assert!(decode("%%%", "agg-1").is_err());
        assert!(decode(&URL_SAFE_NO_PAD.encode("agg-1/x"), "agg-1").is_err());
    }

    #[test]
    fn page_sizes_default_and_cap() {
        assert_eq!(page_size(0).ok(), Some(DEFAULT_PAGE_SIZE));
        assert_eq!(page_size(5000).ok(), Some(MAX_PAGE_SIZE));
        assert_eq!(page_size(7).ok(), Some(7));
        assert!(page_size(-1).is_err());
    }
}

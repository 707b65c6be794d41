//! Aggregation ids: `agg-` and 32 hex digits, unguessable, and carrying the tag of the state
//! they live in (the process's, or a shared store's epoch), so an id whose state was lost (a
//! restart, a shared store that restarted empty) can be told from one that never existed.
//! Callers treat ids as opaque; only this module reads the tag.

use super::record::AggregationId;
use std::sync::atomic::{AtomicU32, Ordering};

/// Hex digits of the instance tag at the start of an id's hex part.
const TAG_HEX: usize = 8;
/// Hex digits after `agg-`.
const ID_HEX: usize = 32;
const PREFIX: &str = "agg-";

/// Who minted an id, as far as this process can tell.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Origin {
    /// This process: if it is not found, it never existed or has been forgotten.
    Ours,
    /// Another generation of the state (an earlier run of this gateway, or a shared store's
    /// state before it was lost): its state is gone.
    Elsewhere,
    /// Not an id of this gateway at all.
    Malformed,
}

/// Mints the ids of one gateway instance.
#[derive(Debug)]
pub struct IdMinter {
    tag: AtomicU32,
}

impl Default for IdMinter {
    fn default() -> Self {
        Self::new()
    }
}

impl IdMinter {
    /// A minter with a fresh random instance tag.
    pub fn new() -> Self {
        Self::tagged(rand::random())
    }

    /// A minter tagging ids with `tag` (a shared store's epoch).
    pub fn tagged(tag: u32) -> Self {
        Self { tag: AtomicU32::new(tag) }
    }

    /// Tags ids with `tag` from now on: the shared store's state is of a new generation.
    pub fn retag(&self, tag: u32) {
        self.tag.store(tag, Ordering::Relaxed);
    }

    fn tag(&self) -> u32 {
        self.tag.load(Ordering::Relaxed)
    }

    /// A new id: the instance tag, then 96 random bits.
    pub fn mint(&self) -> AggregationId {
        let random: [u8; 12] = rand::random();
        let mut id = String::with_capacity(PREFIX.len() + ID_HEX);
        id.push_str(PREFIX);
        push_hex(&mut id, &self.tag().to_be_bytes());
        push_hex(&mut id, &random);
        id.into()
    }

    /// Who minted `id`.
    pub fn origin(&self, id: &str) -> Origin {
        let Some(hex) = id.strip_prefix(PREFIX) else { return Origin::Malformed };
        if hex.len() != ID_HEX || !hex.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')) {
            return Origin::Malformed;
        }
        match u32::from_str_radix(&hex[..TAG_HEX], 16) {
            Ok(tag) if tag == self.tag() => Origin::Ours,
            Ok(_) => Origin::Elsewhere,
            Err(_) => Origin::Malformed,
        }
    }
}

/// The tag `id` carries (the epoch it was minted in), if it is an id of this gateway.
pub fn tag_of(id: &str) -> Option<u32> {
    let hex = id.strip_prefix(PREFIX)?;
    u32::from_str_radix(hex.get(..TAG_HEX)?, 16).ok()
}

fn push_hex(out: &mut String, bytes: &[u8]) {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    for b in bytes {
        out.push(char::from(DIGITS[usize::from(b >> 4)]));
        out.push(char::from(DIGITS[usize::from(b & 0xf)]));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_unique_well_formed_and_know_their_origin() {
        let (ours, other) = (IdMinter::new(), IdMinter::tagged(7));
        let a = ours.mint();
        assert!(a.starts_with("agg-") && a.len() == 36, "{a}");
        assert_ne!(a, ours.mint());
        assert_eq!(ours.origin(&a), Origin::Ours);
        assert_eq!(ours.origin(&other.mint()), if ours.tag() == 7 { Origin::Ours } else { Origin::Elsewhere });
        for bad in
            ["", "agg-", "agg-xyz", "agg-0123456789ABCDEF0123456789abcdef", "farm-0123456789abcdef0123456789abcdef"]
        {
            assert_eq!(ours.origin(bad), Origin::Malformed, "{bad}");
        }
    }

    #[test]
    fn a_new_generation_makes_the_old_ids_lost_and_its_own_ours() {
        let minter = IdMinter::tagged(1);
        let old = minter.mint();
        minter.retag(2);
        let new = minter.mint();
        assert_eq!((minter.origin(&old), minter.origin(&new)), (Origin::Elsewhere, Origin::Ours));
        assert_eq!((tag_of(&old), tag_of(&new), tag_of("agg-")), (Some(1), Some(2), None));
    }
}

//! Aggregation ids: `agg-` and 32 hex digits, unguessable, carrying where their record lives
//! and which state they were minted in:
//! - 2 digits: the farm's bucket ([`Bucket`]), which every key of the farm is hash-tagged
//!   with in a shared store, so a Get goes to the right shard of a Redis Cluster without a
//!   lookup;
//! - 8 digits: the tag of the state they live in (the process's, or the bucket's epoch in a
//!   shared store), so an id whose state was lost (a restart, a shard that failed over or
//!   restarted empty) can be told from one that never existed;
//! - 22 digits (88 bits) at random.
//!
//! Ids minted before buckets existed (8 digits of tag, then 24 at random) read as ids of
//! another generation: their state is gone. Callers treat ids as opaque; only this module
//! reads them.

use super::record::AggregationId;
use std::sync::atomic::{AtomicU32, Ordering};

/// Hex digits after `agg-`.
const ID_HEX: usize = 32;
/// Where the epoch's 8 digits sit among them.
const EPOCH_HEX: std::ops::Range<usize> = 2..10;
const PREFIX: &str = "agg-";

/// One of the [`Bucket::COUNT`] groups farms fall in by a hash of their id. A shared store
/// hash-tags every key of a farm with its bucket (`{07}`), so one script's keys share a slot
/// of a Redis Cluster; per-bucket state (the farms with work, the live count, the refresh due
/// set, the epoch) replaces what would otherwise span slots.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Bucket(u8);

impl Bucket {
    /// How many buckets there are. Changing it moves farms between buckets: their state in a
    /// shared store would be orphaned.
    pub const COUNT: u8 = 64;

    /// The bucket of `farm`: FNV-1a of its id.
    pub fn of_farm(farm: &str) -> Self {
        let hash = farm.bytes().fold(0x811c_9dc5_u32, |h, b| (h ^ u32::from(b)).wrapping_mul(0x0100_0193));
        Self(u8::try_from(hash % u32::from(Self::COUNT)).unwrap_or_default())
    }

    /// The bucket an id of this gateway names (`None`: not one, or minted before buckets).
    pub fn of_id(id: &str) -> Option<Self> {
        let hex = well_formed(id)?;
        let n = u8::from_str_radix(&hex[..2], 16).ok()?;
        (n < Self::COUNT).then_some(Self(n))
    }

    /// Every bucket.
    pub fn all() -> impl Iterator<Item = Self> {
        (0..Self::COUNT).map(Self)
    }

    pub fn index(self) -> usize {
        usize::from(self.0)
    }

    /// Its two hex digits, as keys and ids carry them.
    pub fn hex(self) -> String {
        format!("{:02x}", self.0)
    }
}

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

/// Mints the ids of one gateway instance: a tag per bucket.
#[derive(Debug)]
pub struct IdMinter {
    tags: Vec<AtomicU32>,
}

impl Default for IdMinter {
    fn default() -> Self {
        Self::new()
    }
}

impl IdMinter {
    /// A minter with a fresh random instance tag, the same for every bucket.
    pub fn new() -> Self {
        Self::tagged(rand::random())
    }

    /// A minter tagging ids of every bucket with `tag`.
    pub fn tagged(tag: u32) -> Self {
        Self::per_bucket(|_| tag)
    }

    /// A minter tagging each bucket's ids with `tag(bucket)` (a shared store's epochs).
    pub fn per_bucket(tag: impl Fn(Bucket) -> u32) -> Self {
        Self { tags: Bucket::all().map(|b| AtomicU32::new(tag(b))).collect() }
    }

    /// Tags `bucket`'s ids with `tag` from now on: its state in the shared store is of a new
    /// generation.
    pub fn retag(&self, bucket: Bucket, tag: u32) {
        if let Some(t) = self.tags.get(bucket.index()) {
            t.store(tag, Ordering::Relaxed);
        }
    }

    /// The tag of `bucket`'s ids now.
    pub fn tag(&self, bucket: Bucket) -> u32 {
        self.tags.get(bucket.index()).map_or(0, |t| t.load(Ordering::Relaxed))
    }

    /// A new id for an aggregation of `farm`: its bucket, the bucket's tag, 88 random bits.
    pub fn mint(&self, farm: &str) -> AggregationId {
        let bucket = Bucket::of_farm(farm);
        let random: [u8; 11] = rand::random();
        let mut id = String::with_capacity(PREFIX.len() + ID_HEX);
        id.push_str(PREFIX);
        id.push_str(&bucket.hex());
        push_hex(&mut id, &self.tag(bucket).to_be_bytes());
        push_hex(&mut id, &random);
        id.into()
    }

    /// Who minted `id`.
    pub fn origin(&self, id: &str) -> Origin {
        if well_formed(id).is_none() {
            return Origin::Malformed;
        }
        match (Bucket::of_id(id), tag_of(id)) {
            (Some(bucket), Some(tag)) if tag == self.tag(bucket) => Origin::Ours,
            _ => Origin::Elsewhere,
        }
    }
}

/// The hex digits of an id of this gateway's shape.
fn well_formed(id: &str) -> Option<&str> {
    let hex = id.strip_prefix(PREFIX)?;
    (hex.len() == ID_HEX && hex.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))).then_some(hex)
}

/// The tag `id` carries (the epoch it was minted in), if it is an id of this gateway.
pub fn tag_of(id: &str) -> Option<u32> {
    u32::from_str_radix(well_formed(id)?.get(EPOCH_HEX)?, 16).ok()
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

    const FARM: &str = "farm-0123456789abcdef0123456789abcdef";

    #[test]
    fn ids_are_unique_well_formed_and_know_their_origin() {
        let (ours, other) = (IdMinter::new(), IdMinter::tagged(7));
        let a = ours.mint(FARM);
        assert!(a.starts_with("agg-") && a.len() == 36, "{a}");
        assert_ne!(a, ours.mint(FARM));
        assert_eq!(ours.origin(&a), Origin::Ours);
        let bucket = Bucket::of_farm(FARM);
        let expected = if ours.tag(bucket) == 7 { Origin::Ours } else { Origin::Elsewhere };
        assert_eq!(ours.origin(&other.mint(FARM)), expected);
        for bad in
            ["", "agg-", "agg-xyz", "agg-0123456789ABCDEF0123456789abcdef", "farm-0123456789abcdef0123456789abcdef"]
        {
            assert_eq!(ours.origin(bad), Origin::Malformed, "{bad}");
        }
    }

    #[test]
    fn an_id_names_its_farms_bucket_and_the_buckets_tag() {
        let minter = IdMinter::per_bucket(|b| 1000 + u32::try_from(b.index()).unwrap_or_default());
        for farm in [FARM, "farm-ffffffffffffffffffffffffffffffff", "farm-00000000000000000000000000000000"] {
            let id = minter.mint(farm);
            let bucket = Bucket::of_farm(farm);
            assert_eq!(Bucket::of_id(&id), Some(bucket), "{id}");
            assert_eq!(tag_of(&id), Some(minter.tag(bucket)), "{id}");
        }
    }

    #[test]
    fn farms_spread_over_every_bucket() {
        let mut seen = std::collections::HashSet::new();
        for n in 0..2000_u32 {
            seen.insert(Bucket::of_farm(&format!("farm-{n:032x}")));
        }
        assert_eq!(seen.len(), usize::from(Bucket::COUNT));
    }

    #[test]
    fn a_new_generation_of_a_bucket_makes_its_old_ids_lost_and_its_own_ours() {
        let minter = IdMinter::tagged(1);
        let old = minter.mint(FARM);
        minter.retag(Bucket::of_farm(FARM), 2);
        let new = minter.mint(FARM);
        assert_eq!((minter.origin(&old), minter.origin(&new)), (Origin::Elsewhere, Origin::Ours));
        assert_eq!((tag_of(&old), tag_of(&new), tag_of("agg-")), (Some(1), Some(2), None));
    }

    #[test]
    fn ids_minted_before_buckets_read_as_another_generations() {
        let minter = IdMinter::tagged(0x0000_0001);
        // The old shape: 8 digits of tag, then 24 random; its first two digits may name no bucket.
        for old in ["agg-000000019f3c2a7b5d1e4f6a8b0c2d4e", "agg-ff0000019f3c2a7b5d1e4f6a8b0c2d4e"] {
            assert_eq!(minter.origin(old), Origin::Elsewhere, "{old}");
        }
    }
}

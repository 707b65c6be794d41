//! Completed results as the transport will serve them: every row encoded once, when it arrives
//! from the upstream, into one buffer with one end offset per row. Serving a page is then a
//! reference-counted slice of that buffer, handed to the socket without a copy, and holding a
//! row costs its encoded size plus one offset.
//!
//! The gateway does not know the encoding: the transport supplies the [`RowCodec`], whose
//! decoder reads rows back only to derive an answer from a larger result.

use crate::domain::StatisticsRow;
use bytes::Bytes;
use std::ops::Range;

/// Appends the encoding of one row to a buffer.
pub type RowEncoder = fn(&StatisticsRow, &mut Vec<u8>);

/// Reads back one row as the [`RowEncoder`] wrote it; `None` when the bytes are not one.
pub type RowDecoder = fn(&[u8]) -> Option<StatisticsRow>;

/// How the transport encodes rows, and reads them back.
#[derive(Debug, Clone, Copy)]
pub struct RowCodec {
    pub encode: RowEncoder,
    pub decode: RowDecoder,
}

/// Encoded rows, in order.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct RowBlock {
    buf: Bytes,
    /// `ends[i]` is where row `i` ends in `buf`.
    ends: Vec<usize>,
}

impl RowBlock {
    pub fn len(&self) -> usize {
        self.ends.len()
    }

    pub fn is_empty(&self) -> bool {
        self.ends.is_empty()
    }

    /// The encodings of the rows in `range`, back to back: rows are stored contiguously.
    pub fn slice(&self, range: Range<usize>) -> &[u8] {
        &self.buf[self.span(range)]
    }

    /// [`RowBlock::slice`] as a handle sharing this block's buffer: no bytes are copied.
    pub fn shared(&self, range: Range<usize>) -> Bytes {
        self.buf.slice(self.span(range))
    }

    fn span(&self, range: Range<usize>) -> Range<usize> {
        if range.is_empty() {
            return 0..0;
        }
        let start = if range.start == 0 { 0 } else { self.ends[range.start - 1] };
        start..self.ends[range.end - 1]
    }

    /// The bytes the rows of `range` take, encoded.
    pub fn encoded_len(&self, range: Range<usize>) -> usize {
        self.slice(range).len()
    }

    /// Every row, read back with `decode` (`None` for one that is not a row).
    pub fn rows(&self, decode: RowDecoder) -> impl Iterator<Item = Option<StatisticsRow>> + '_ {
        (0..self.len()).map(move |i| decode(self.slice(i..i + 1)))
    }

    /// Heap bytes held, for the cache's memory budget.
    pub fn heap_bytes(&self) -> usize {
        self.buf.len() + self.ends.capacity() * std::mem::size_of::<usize>()
    }
}

impl RowBlock {
    /// The block as one byte string, for a shared store: the row count and each row's end
    /// (little-endian `u32`s), then the encoded rows.
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(4 + 4 * self.ends.len() + self.buf.len());
        out.extend_from_slice(&u32::try_from(self.ends.len()).unwrap_or(u32::MAX).to_le_bytes());
        for end in &self.ends {
            out.extend_from_slice(&u32::try_from(*end).unwrap_or(u32::MAX).to_le_bytes());
        }
        out.extend_from_slice(&self.buf);
        out
    }

    /// A block read back from [`RowBlock::to_bytes`]; `None` when the bytes are not one.
    pub fn from_bytes(bytes: Bytes) -> Option<Self> {
        let word = |at: usize| -> Option<usize> {
            let b = bytes.get(at..at + 4)?;
            Some(u32::from_le_bytes([b[0], b[1], b[2], b[3]]) as usize)
        };
        let count = word(0)?;
        let header = 4usize.checked_add(count.checked_mul(4)?)?;
        let buf = bytes.get(header..).map(|_| bytes.slice(header..))?;
        let ends = (0..count).map(|i| word(4 + 4 * i)).collect::<Option<Vec<usize>>>()?;
        let ordered = ends.windows(2).all(|w| w[0] <= w[1]) && ends.last().is_none_or(|last| *last <= buf.len());
        ordered.then_some(Self { buf, ends })
    }
}

impl RowBlock {
    /// Some rows of a block stored as [`RowBlock::to_bytes`], read without the rest: `ends`
    /// holds their end offsets in the stored block's rows (little-endian `u32`s), `start` is
    /// where the first of them begins, and `buf` their bytes from there. `None` when they do
    /// not fit together.
    pub fn window(ends: &[u8], start: usize, buf: Bytes) -> Option<Self> {
        let ends = ends
            .chunks(4)
            .map(|b| <[u8; 4]>::try_from(b).ok().map(|w| (u32::from_le_bytes(w) as usize).checked_sub(start)))
            .collect::<Option<Option<Vec<usize>>>>()??;
        let ordered = ends.windows(2).all(|w| w[0] <= w[1]) && ends.last().is_none_or(|last| *last == buf.len());
        ordered.then_some(Self { buf, ends })
    }
}

/// Builds a [`RowBlock`] row by row.
pub struct RowBlockBuilder {
    buf: Vec<u8>,
    ends: Vec<usize>,
    encoder: RowEncoder,
}

impl RowBlockBuilder {
    pub fn new(encoder: RowEncoder) -> Self {
        Self { buf: Vec::new(), ends: Vec::new(), encoder }
    }

    pub fn push(&mut self, row: &StatisticsRow) {
        (self.encoder)(row, &mut self.buf);
        self.ends.push(self.buf.len());
    }

    /// Appends every row of `block`, already encoded (the parts of a split aggregation).
    pub fn append(&mut self, block: &RowBlock) {
        let base = self.buf.len();
        self.buf.extend_from_slice(&block.buf);
        self.ends.extend(block.ends.iter().map(|end| base + end));
    }

    pub fn len(&self) -> usize {
        self.ends.len()
    }

    pub fn is_empty(&self) -> bool {
        self.ends.is_empty()
    }

    /// The block, with spare capacity returned.
    pub fn finish(mut self) -> RowBlock {
        self.buf.shrink_to_fit();
        self.ends.shrink_to_fit();
        RowBlock { buf: Bytes::from(self.buf), ends: self.ends }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn count_only(row: &StatisticsRow, buf: &mut Vec<u8>) {
        buf.extend(std::iter::repeat_n(b'x', row.count as usize));
    }

    #[test]
    fn rows_come_back_as_they_were_encoded() {
        let mut b = RowBlockBuilder::new(count_only);
        for count in [3, 0, 5] {
            b.push(&StatisticsRow { count, ..StatisticsRow::default() });
        }
        let block = b.finish();
        assert_eq!(block.len(), 3);
        assert_eq!((0..3).map(|i| block.encoded_len(i..i + 1)).collect::<Vec<_>>(), vec![3, 0, 5]);
        assert_eq!(block.encoded_len(1..3), 5);
        assert_eq!(block.slice(0..2), b"xxx");
        assert_eq!(block.shared(1..3), &b"xxxxx"[..]);
        assert!(block.shared(1..1).is_empty());
        assert_eq!(block.encoded_len(2..2), 0);
        assert!(block.heap_bytes() >= 8);
        let again = RowBlock::from_bytes(Bytes::from(block.to_bytes())).expect("round trip");
        assert_eq!(again, block);
        assert_eq!(RowBlock::from_bytes(Bytes::from_static(b"\x05\0\0\0")), None, "too short");
        assert_eq!(RowBlock::from_bytes(Bytes::from_static(b"\x01\0\0\0\x09\0\0\0xx")), None, "past the end");
    }

    #[test]
    fn a_window_of_a_stored_block_is_the_same_rows() {
        let mut builder =
            RowBlockBuilder::new(|row, buf| buf.extend_from_slice(row.queue_id.as_deref().unwrap_or("").as_bytes()));
        for name in ["a", "bb", "ccc", "dddd", "e"] {
            builder.push(&StatisticsRow { queue_id: Some(name.to_owned()), ..StatisticsRow::default() });
        }
        let whole = builder.finish();
        let stored = whole.to_bytes();
        // Rows 1..4 ("bb", "ccc", "dddd"): their ends, and the bytes from the end of row 0.
        let ends = &stored[4 + 4..4 + 4 * 4];
        let window = RowBlock::window(ends, 1, Bytes::copy_from_slice(&stored[4 + 4 * 5 + 1..4 + 4 * 5 + 10]));
        let window = window.expect("fits");
        assert_eq!(window.len(), 3);
        assert_eq!(window.slice(0..3), whole.slice(1..4));
        assert_eq!(window.slice(1..2), b"ccc");
        assert!(RowBlock::window(ends, 1, Bytes::from_static(b"short")).is_none(), "ends past the bytes");
    }
}

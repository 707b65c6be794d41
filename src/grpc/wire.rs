//! `GetAggregationResponse` written by hand so a page of cached rows goes out as the bytes the
//! gateway already holds: the rows are stored already framed as field 2 (`repeated
//! StatisticsRow statistics`, see `convert::encode_row`), so a page is one contiguous slice,
//! copied once, never decoded or re-encoded.
//!
//! [`GetAggregationResponse::into_parts`] gives the same message in two pieces, the rows
//! sharing the cache's buffer, for `super::page_route` to send without copying them.
//!
//! Decoding is the ordinary one (clients see `statistics`); the build maps the proto message
//! to this type, so the generated server and client both use it.

use super::pb::{Aggregation, StatisticsRow};
use crate::gateway::Rows;
use bytes::{Buf, BufMut, Bytes};
use prost::DecodeError;
use prost::encoding::{self, DecodeContext, WireType};
use std::ops::Range;

/// A page of pre-encoded rows: a range of a completed aggregation's results.
#[derive(Debug, Clone)]
pub struct EncodedRows {
    pub rows: Rows,
    pub range: Range<usize>,
}

impl PartialEq for EncodedRows {
    fn eq(&self, other: &Self) -> bool {
        std::sync::Arc::ptr_eq(&self.rows, &other.rows) && self.range == other.range
    }
}

/// The response of GetAggregation (see the proto for the fields' meaning).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct GetAggregationResponse {
    pub aggregation: Option<Aggregation>,
    /// Fields 1 and 3 (`aggregation`, then `next_page_token`) already encoded, sent in place of
    /// both (server side only; `next_page_token` is then left empty): see [`encode_head`].
    pub encoded_head: Option<Bytes>,
    pub statistics: Vec<StatisticsRow>,
    pub next_page_token: String,
    /// Rows already encoded, sent last, after `statistics` (server side only; never decoded into).
    pub encoded_statistics: Option<EncodedRows>,
}

const AGGREGATION: u32 = 1;
/// The field number of `statistics`.
pub const STATISTICS: u32 = 2;
const NEXT_PAGE_TOKEN: u32 = 3;

/// `aggregation` encoded as the response's field 1.
pub fn encode_aggregation(aggregation: &Aggregation) -> Bytes {
    let mut buf = Vec::with_capacity(encoding::message::encoded_len(AGGREGATION, aggregation));
    encoding::message::encode(AGGREGATION, aggregation, &mut buf);
    buf.into()
}

/// [`GetAggregationResponse::encoded_head`]: the encoded `aggregation` (see
/// [`encode_aggregation`]), then `next_page_token` when there is one.
pub fn encode_head(aggregation: &Bytes, next_page_token: Option<&str>) -> Bytes {
    let Some(token) = next_page_token.filter(|t| !t.is_empty()) else { return aggregation.clone() };
    let len = encoding::key_len(NEXT_PAGE_TOKEN) + encoding::encoded_len_varint(token.len() as u64) + token.len();
    let mut buf = Vec::with_capacity(aggregation.len() + len);
    buf.put_slice(aggregation);
    encoding::encode_key(NEXT_PAGE_TOKEN, WireType::LengthDelimited, &mut buf);
    encoding::encode_varint(token.len() as u64, &mut buf);
    buf.put_slice(token.as_bytes());
    buf.into()
}

impl GetAggregationResponse {
    /// The message in two pieces, back to back: every other field, then the pre-encoded rows
    /// (sharing the cached buffer, not copied).
    pub fn into_parts(self) -> [Bytes; 2] {
        let head = match &self.encoded_head {
            // A cached page: its head is shared as it is.
            Some(head)
                if self.aggregation.is_none() && self.next_page_token.is_empty() && self.statistics.is_empty() =>
            {
                head.clone()
            }
            _ => {
                let mut head = Vec::with_capacity(self.head_len());
                self.encode_head(&mut head);
                head.into()
            }
        };
        let rows = self.encoded_statistics.map(|page| page.rows.shared(page.range)).unwrap_or_default();
        [head, rows]
    }

    /// Every field but the pre-encoded rows. The page token comes before the rows rather than
    /// after: protobuf lets fields come in any order, and this way the rows are the one large
    /// piece at the end, which [`GetAggregationResponse::into_parts`] hands over as it is.
    fn encode_head(&self, buf: &mut impl BufMut) {
        if let Some(a) = &self.encoded_head {
            buf.put_slice(a);
        } else if let Some(a) = &self.aggregation {
            encoding::message::encode(AGGREGATION, a, buf);
        }
        if !self.next_page_token.is_empty() {
            encoding::string::encode(NEXT_PAGE_TOKEN, &self.next_page_token, buf);
        }
        for row in &self.statistics {
            encoding::message::encode(STATISTICS, row, buf);
        }
    }
}

impl GetAggregationResponse {
    /// The length of what [`Self::encode_head`] writes.
    fn head_len(&self) -> usize {
        let aggregation = match (&self.encoded_head, &self.aggregation) {
            (Some(a), _) => a.len(),
            (None, Some(a)) => encoding::message::encoded_len(AGGREGATION, a),
            (None, None) => 0,
        };
        let statistics = encoding::message::encoded_len_repeated(STATISTICS, &self.statistics);
        let token = if self.next_page_token.is_empty() {
            0
        } else {
            encoding::string::encoded_len(NEXT_PAGE_TOKEN, &self.next_page_token)
        };
        aggregation + statistics + token
    }
}

impl prost::Message for GetAggregationResponse {
    fn encode_raw(&self, buf: &mut impl BufMut) {
        self.encode_head(buf);
        if let Some(page) = &self.encoded_statistics {
            buf.put_slice(page.rows.slice(page.range.clone()));
        }
    }

    fn merge_field(
        &mut self,
        tag: u32,
        wire_type: WireType,
        buf: &mut impl Buf,
        ctx: DecodeContext,
    ) -> Result<(), DecodeError> {
        match tag {
            AGGREGATION => {
                encoding::message::merge(wire_type, self.aggregation.get_or_insert_with(Default::default), buf, ctx)
            }
            STATISTICS => encoding::message::merge_repeated(wire_type, &mut self.statistics, buf, ctx),
            NEXT_PAGE_TOKEN => encoding::string::merge(wire_type, &mut self.next_page_token, buf, ctx),
            _ => encoding::skip_field(wire_type, tag, buf, ctx),
        }
    }

    fn encoded_len(&self) -> usize {
        self.head_len() + self.encoded_statistics.as_ref().map_or(0, |page| page.rows.encoded_len(page.range.clone()))
    }

    fn clear(&mut self) {
        *self = Self::default();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gateway::rows::RowBlockBuilder;
    use prost::Message as _;
    use std::sync::Arc;

    fn row(n: i32) -> crate::domain::StatisticsRow {
        crate::domain::StatisticsRow { count: n, job_id: Some(format!("job-{n:032x}")), ..Default::default() }
    }

    #[test]
    fn pre_encoded_rows_decode_as_ordinary_rows() {
        let mut block = RowBlockBuilder::new(super::super::convert::encode_row);
        (0..5).for_each(|n| block.push(&row(n)));
        let rows: Rows = Arc::new(block.finish());
        let sent = GetAggregationResponse {
            aggregation: Some(Aggregation { aggregation_id: "agg-1".into(), ..Default::default() }),
            next_page_token: "next".into(),
            encoded_statistics: Some(EncodedRows { rows, range: 1..4 }),
            ..Default::default()
        };
        let bytes = sent.encode_to_vec();
        assert_eq!(bytes.len(), sent.encoded_len());
        let pre = GetAggregationResponse {
            encoded_head: sent.aggregation.as_ref().map(encode_aggregation),
            aggregation: None,
            ..sent.clone()
        };
        assert_eq!(pre.encode_to_vec(), bytes, "a pre-encoded aggregation is the same bytes");
        assert_eq!(pre.encoded_len(), bytes.len());
        let view = sent.aggregation.as_ref().map(encode_aggregation).unwrap_or_default();
        let head = GetAggregationResponse {
            encoded_head: Some(encode_head(&view, Some("next"))),
            aggregation: None,
            next_page_token: String::new(),
            ..sent.clone()
        };
        assert_eq!(head.encode_to_vec(), bytes, "a pre-encoded head is the same bytes");
        assert_eq!(head.encoded_len(), bytes.len());
        assert_eq!(head.clone().into_parts().concat(), bytes);
        let parts = sent.clone().into_parts().concat();
        assert_eq!(parts.len(), bytes.len());
        assert_eq!(
            GetAggregationResponse::decode(parts.as_slice()).expect("decodes"),
            GetAggregationResponse::decode(bytes.as_slice()).expect("decodes"),
            "the parts are the same message"
        );
        let got = GetAggregationResponse::decode(bytes.as_slice()).expect("decodes");
        assert_eq!(got.statistics, (1..4).map(|n| super::super::convert::row(&row(n))).collect::<Vec<_>>());
        assert_eq!(
            (got.next_page_token.as_str(), got.aggregation.map(|a| a.aggregation_id)),
            ("next", Some("agg-1".into()))
        );
    }
}

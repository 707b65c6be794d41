//! The codec of the generated service and client: prost's wire format, with each message
//! encoded into space reserved for its exact size up front.
//!
//! tonic's prost codec starts every response in an 8 KiB buffer and lets it grow as the
//! message is written. A page of rows is written as one slice of 10–130 kB, so growing meant
//! one to four reallocations, each copying all the buffer held. Here the buffer starts small
//! and the encoded length is reserved before writing: one reallocation at most, copying only
//! the 5-byte frame header.

use prost::Message;
use std::marker::PhantomData;
use tonic::Status;
use tonic::codec::{BufferSettings, Codec, EncodeBuf, Encoder};
use tonic_prost::{ProstCodec, ProstDecoder};

/// Encodes `T` and decodes `U` (requests and responses, from the side using it).
#[derive(Debug, Clone, Copy)]
pub(crate) struct ExactCodec<T, U>(PhantomData<(T, U)>);

impl<T, U> Default for ExactCodec<T, U> {
    fn default() -> Self {
        Self(PhantomData)
    }
}

impl<T, U> Codec for ExactCodec<T, U>
where
    T: Message + Send + 'static,
    U: Message + Default + Send + 'static,
{
    type Encode = T;
    type Decode = U;
    type Encoder = ExactEncoder<T>;
    type Decoder = ProstDecoder<U>;

    fn encoder(&mut self) -> ExactEncoder<T> {
        ExactEncoder(PhantomData)
    }

    fn decoder(&mut self) -> ProstDecoder<U> {
        ProstCodec::<T, U>::raw_decoder(BufferSettings::default())
    }
}

/// Writes a message after reserving its encoded length.
#[derive(Debug, Clone, Copy)]
pub(crate) struct ExactEncoder<T>(PhantomData<T>);

/// The first allocation of a response buffer: enough for the small messages (a
/// StartAggregation response, a status), no more.
const INITIAL_BUFFER: usize = 512;
/// tonic's default: for streams, bytes gathered before they are handed to the transport.
const YIELD_THRESHOLD: usize = 32 * 1024;

impl<T: Message> Encoder for ExactEncoder<T> {
    type Item = T;
    type Error = Status;

    fn buffer_settings(&self) -> BufferSettings {
        BufferSettings::new(INITIAL_BUFFER, YIELD_THRESHOLD)
    }

    fn encode(&mut self, item: T, buf: &mut EncodeBuf<'_>) -> Result<(), Status> {
        buf.reserve(item.encoded_len());
        item.encode_raw(buf);
        Ok(())
    }
}

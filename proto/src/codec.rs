//! The codec of every generated client and server: prost's encoding, with buffers sized so
//! that a tensor-sized message is not copied while it is being assembled.
//!
//! Receiving, tonic's prost codec starts from an 8 KiB buffer; a tensor that arrives in one
//! large frame (opreg's clients send frames of up to 1 MiB) first grows it to the frame, and
//! then, when the message's header is read, tonic reserves the message's length again on top
//! of the bytes already there: a reallocation that copies the whole message once more
//! (profiled on a Relu over a 600 KB image served back to back: 3 % of the daemon's samples,
//! under `decode_chunk`). Starting from [`DECODE_BUFFER_BYTES`], a message of up to half of
//! that is never moved: memcpy fell from ~136 to ~113 us of CPU per request (daemon and
//! client together) and the requests one client completed in 3 s rose 5-7 % (two
//! alternations). The buffer is only touched where written, and the allocator serves it
//! again to the next call.
//!
//! Sending, a message of many tensors (a batch or an ensemble's outputs) grows tonic's 8 KiB
//! buffer by doubling as its fields are written, copying what it holds each time; here the
//! encoder reserves the encoded length first.

use prost::bytes::BufMut;
use prost::Message;
use std::marker::PhantomData;
use tonic::codec::{BufferSettings, Codec, DecodeBuf, Decoder, EncodeBuf, Encoder};
use tonic::Status;

/// Initial capacity of a call's receive buffer: a message of up to 1 MiB is received without
/// a reallocation.
pub const DECODE_BUFFER_BYTES: usize = 2 << 20;

/// Bytes of encoded messages a streaming call collects before it hands them to the
/// transport (tonic's default).
const YIELD_THRESHOLD: usize = 32 << 10;

/// [`Codec`] for `application/grpc+proto` messages (see the module docs).
#[derive(Debug, Clone)]
pub struct TensorCodec<T, U> {
    _pd: PhantomData<(T, U)>,
}

impl<T, U> Default for TensorCodec<T, U> {
    fn default() -> Self {
        TensorCodec { _pd: PhantomData }
    }
}

impl<T, U> Codec for TensorCodec<T, U>
where
    T: Message + Send + 'static,
    U: Message + Default + Send + 'static,
{
    type Encode = T;
    type Decode = U;
    type Encoder = SizedEncoder<T>;
    type Decoder = RoomyDecoder<U>;

    fn encoder(&mut self) -> Self::Encoder {
        SizedEncoder { _pd: PhantomData }
    }

    fn decoder(&mut self) -> Self::Decoder {
        RoomyDecoder { _pd: PhantomData }
    }
}

/// Encodes a message into room reserved for its whole encoded length.
#[derive(Debug, Clone)]
pub struct SizedEncoder<T> {
    _pd: PhantomData<T>,
}

impl<T: Message> Encoder for SizedEncoder<T> {
    type Item = T;
    type Error = Status;

    fn encode(&mut self, item: T, buf: &mut EncodeBuf<'_>) -> Result<(), Status> {
        encode_sized(&item, buf)
    }
}

/// A buffer that can make room ahead of writes.
trait Room: BufMut {
    fn make_room(&mut self, additional: usize);
}

impl Room for EncodeBuf<'_> {
    fn make_room(&mut self, additional: usize) {
        self.reserve(additional);
    }
}

impl Room for prost::bytes::BytesMut {
    fn make_room(&mut self, additional: usize) {
        self.reserve(additional);
    }
}

/// `item` into `buf` after reserving its whole encoded length: one allocation, no growth
/// (and no copy) while its fields are written.
fn encode_sized<M: Message>(item: &M, buf: &mut impl Room) -> Result<(), Status> {
    buf.make_room(item.encoded_len());
    item.encode(buf)
        .map_err(|e| Status::internal(format!("encoding a message: {e}")))
}

/// Decodes prost messages from a receive buffer of [`DECODE_BUFFER_BYTES`].
#[derive(Debug, Clone)]
pub struct RoomyDecoder<U> {
    _pd: PhantomData<U>,
}

impl<U: Message + Default> Decoder for RoomyDecoder<U> {
    type Item = U;
    type Error = Status;

    fn decode(&mut self, buf: &mut DecodeBuf<'_>) -> Result<Option<U>, Status> {
        // As tonic's prost codec: a malformed message is an INTERNAL status.
        U::decode(buf)
            .map(Some)
            .map_err(|e| Status::internal(format!("decoding a message: {e}")))
    }

    fn buffer_settings(&self) -> BufferSettings {
        BufferSettings::new(DECODE_BUFFER_BYTES, YIELD_THRESHOLD)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::inference::ModelInferRequest;

    /// A request of many inputs: 48 tensors of 16 KiB raw contents (768 KiB).
    fn request() -> ModelInferRequest {
        ModelInferRequest {
            model_name: "ensemble".into(),
            raw_input_contents: (0..48)
                .map(|t| {
                    (0..16 << 10)
                        .map(|i| ((i + t) % 251) as u8)
                        .collect::<Vec<u8>>()
                        .into()
                })
                .collect(),
            ..Default::default()
        }
    }

    #[test]
    fn a_large_message_is_written_into_room_made_once() {
        let item = request();
        let len = item.encoded_len();
        // tonic's starting size for an encode buffer.
        let mut buf = prost::bytes::BytesMut::with_capacity(8 << 10);
        encode_sized(&item, &mut buf).expect("encode");
        assert_eq!(buf.len(), len);
        // Grown field by field from 8 KiB, the buffer doubles (copying what it holds each
        // time) and ends with up to half of it spare; reserved up front, almost none.
        assert!(
            buf.capacity() - buf.len() < 8 << 10,
            "{} spare",
            buf.capacity() - buf.len()
        );
        let back = ModelInferRequest::decode(buf.freeze()).expect("decode");
        assert_eq!(back, item);
    }
}

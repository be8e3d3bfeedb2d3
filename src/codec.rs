//! The protobuf codec of the generated services (`build.rs` names it): prost's, except
//! that a request body that does not decode (truncated, a wrong wire type, invalid UTF-8
//! in a string) is the caller's mistake, `INVALID_ARGUMENT` / `MALFORMED_REQUEST`, where
//! prost's codec says `INTERNAL`. No code path answers `INTERNAL` for what a caller sent.

use tonic::Status;
use tonic::codec::{BufferSettings, Codec, DecodeBuf, Decoder, EncodeBuf, Encoder};
use tonic_prost::ProstCodec;

use crate::error::Error;

/// See the module docs.
#[derive(Debug, Clone)]
pub struct UsherCodec<T, U>(ProstCodec<T, U>);

impl<T, U> Default for UsherCodec<T, U> {
    fn default() -> Self {
        Self(ProstCodec::default())
    }
}

impl<T, U> Codec for UsherCodec<T, U>
where
    T: prost::Message + Send + 'static,
    U: prost::Message + Default + Send + 'static,
{
    type Encode = T;
    type Decode = U;
    type Encoder = SmallBuffer<<ProstCodec<T, U> as Codec>::Encoder>;
    type Decoder = MalformedIsInvalid<<ProstCodec<T, U> as Codec>::Decoder>;

    fn encoder(&mut self) -> Self::Encoder {
        SmallBuffer(self.0.encoder())
    }

    fn decoder(&mut self) -> Self::Decoder {
        MalformedIsInvalid(self.0.decoder())
    }
}

/// A decoder whose failures are `MALFORMED_REQUEST`.
#[derive(Debug)]
pub struct MalformedIsInvalid<D>(D);

impl<D: Decoder<Error = Status>> Decoder for MalformedIsInvalid<D> {
    type Item = D::Item;
    type Error = Status;

    fn decode(&mut self, buf: &mut DecodeBuf<'_>) -> Result<Option<Self::Item>, Status> {
        self.0
            .decode(buf)
            .map_err(|status| Error::MalformedRequest(status.message().to_owned()).into())
    }

    fn buffer_settings(&self) -> BufferSettings {
        small_buffers()
    }
}

/// Each call's encode and decode buffers start at 1 KiB, not tonic's 8 KiB: usher's
/// messages are small, and a device stream holds both buffers for as long as it is open
/// (20,000 streams: 300 MB at 8 KiB each, 40 MB at 1 KiB). A larger message grows them.
const CODEC_BUFFER_SIZE: usize = 1024;

fn small_buffers() -> BufferSettings {
    BufferSettings::new(CODEC_BUFFER_SIZE, 32 * 1024)
}

/// An encoder with [`small_buffers`].
#[derive(Debug)]
pub struct SmallBuffer<E>(E);

impl<E: Encoder<Error = Status>> Encoder for SmallBuffer<E> {
    type Item = E::Item;
    type Error = Status;

    fn encode(&mut self, item: Self::Item, buf: &mut EncodeBuf<'_>) -> Result<(), Status> {
        self.0.encode(item, buf)
    }

    fn buffer_settings(&self) -> BufferSettings {
        small_buffers()
    }
}

//! The protobuf codec of the generated services (`build.rs` names it): prost's, except
//! that a request body that does not decode (truncated, a wrong wire type, invalid UTF-8
//! in a string) is the caller's mistake, `INVALID_ARGUMENT` / `MALFORMED_REQUEST`, where
//! prost's codec says `INTERNAL`. No code path answers `INTERNAL` for what a caller sent.

use tonic::Status;
use tonic::codec::{BufferSettings, Codec, DecodeBuf, Decoder};
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
    type Encoder = <ProstCodec<T, U> as Codec>::Encoder;
    type Decoder = MalformedIsInvalid<<ProstCodec<T, U> as Codec>::Decoder>;

    fn encoder(&mut self) -> Self::Encoder {
        self.0.encoder()
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
        self.0.buffer_settings()
    }
}

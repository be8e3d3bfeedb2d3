//! The generated protobuf types, clients and servers for `usher.v1`, the encoded
//! descriptor set that server reflection serves, and the conversions to the well-known
//! time types that every feature shares.

#[expect(clippy::all, reason = "generated code")]
mod generated {
    tonic::include_proto!("usher.v1");
}

pub use generated::*;

/// Every file under `proto/` and its imports, encoded by protox with source info and the
/// `google.api.http` options intact.
pub const FILE_DESCRIPTOR_SET: &[u8] =
    include_bytes!(concat!(env!("OUT_DIR"), "/usher_descriptor.bin"));

/// A protobuf timestamp from epoch milliseconds.
pub fn timestamp_ms(ms: u64) -> prost_types::Timestamp {
    prost_types::Timestamp {
        seconds: (ms / 1000) as i64,
        nanos: ((ms % 1000) * 1_000_000) as i32,
    }
}

/// The last second a protobuf Timestamp can hold (9999-12-31T23:59:59Z).
const MAX_TIMESTAMP_SECONDS: u64 = 253_402_300_799;

/// A protobuf timestamp from epoch seconds (JWT time claims), clamped to the Timestamp
/// range: a claim is any u64, and must not overflow.
pub fn timestamp_seconds(seconds: u64) -> prost_types::Timestamp {
    prost_types::Timestamp {
        seconds: seconds.min(MAX_TIMESTAMP_SECONDS) as i64,
        nanos: 0,
    }
}

/// A protobuf duration from milliseconds.
pub fn duration_ms(ms: u64) -> prost_types::Duration {
    prost_types::Duration {
        seconds: (ms / 1000) as i64,
        nanos: ((ms % 1000) * 1_000_000) as i32,
    }
}

/// A protobuf duration from a std one, at millisecond precision.
pub fn duration(d: std::time::Duration) -> prost_types::Duration {
    duration_ms(d.as_millis() as u64)
}

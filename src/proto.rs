//! The generated protobuf types, clients and servers for `usher.v1`, and the encoded
//! descriptor set that server reflection serves.

#![expect(clippy::all, reason = "generated code")]

tonic::include_proto!("usher.v1");

/// Every file under `proto/` and its imports, encoded by protox with source info and the
/// `google.api.http` options intact.
pub const FILE_DESCRIPTOR_SET: &[u8] =
    include_bytes!(concat!(env!("OUT_DIR"), "/usher_descriptor.bin"));

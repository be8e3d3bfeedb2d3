//! Generates the gRPC server and client code from `proto/` at build time, with no
//! `protoc` installed: protox parses the protos in Rust, tonic-prost-build writes the code.
//!
//! The encoded descriptor set is kept in `OUT_DIR/usher_descriptor.bin` for server
//! reflection. It is encoded by protox itself, not re-encoded from `prost_types`, because
//! `prost_types::MethodOptions` drops extensions and the `google.api.http` rules must
//! survive for grpcurl and the REST shim.

use std::path::PathBuf;

const PROTOS: &[&str] = &[
    "usher/v1/common.proto",
    "usher/v1/session.proto",
    "usher/v1/concurrency.proto",
    "usher/v1/token.proto",
    "usher/v1/streaming.proto",
    "usher/v1/progress.proto",
    "usher/v1/events.proto",
];

fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=proto");
    let out_dir = PathBuf::from(std::env::var("OUT_DIR")?);

    let mut compiler = protox::Compiler::new(["proto"])?;
    compiler.include_source_info(true).include_imports(true);
    compiler.open_files(PROTOS)?;
    std::fs::write(
        out_dir.join("usher_descriptor.bin"),
        compiler.encode_file_descriptor_set(),
    )?;

    tonic_prost_build::configure()
        // prost's codec, but a body that does not decode is INVALID_ARGUMENT (src/codec.rs).
        .codec_path("crate::codec::UsherCodec")
        .build_client(true)
        .build_server(true)
        .compile_fds(compiler.file_descriptor_set())?;
    Ok(())
}

# usher: multi-stage build, non-root runtime, health checked with `usher health`.
FROM rust:1.95-bookworm AS build
WORKDIR /src
# Dependencies first, so source edits do not rebuild them.
COPY Cargo.toml Cargo.lock build.rs ./
COPY proto proto
# Cargo reads every target the manifest declares, so the benches must be there (a release
# build does not compile them).
COPY benches benches
RUN mkdir src && echo 'fn main() {}' > src/main.rs && touch src/lib.rs \
    && cargo build --release --locked \
    && rm -rf src
COPY src src
RUN touch src/main.rs src/lib.rs && cargo build --release --locked

FROM debian:bookworm-slim
RUN apt-get update \
    && apt-get install -y --no-install-recommends ca-certificates \
    && rm -rf /var/lib/apt/lists/* \
    && useradd --system --uid 10001 --no-create-home --shell /usr/sbin/nologin usher
COPY --from=build /src/target/release/usher /usr/local/bin/usher
USER 10001:10001
# Inside a container the listener must be reachable from outside it.
ENV USHER_LISTEN=0.0.0.0:50051 \
    USHER_LOG_FORMAT=json
EXPOSE 50051
HEALTHCHECK --interval=10s --timeout=4s --start-period=5s --retries=3 \
    CMD ["usher", "health", "--addr", "127.0.0.1:50051"]
STOPSIGNAL SIGTERM
ENTRYPOINT ["usher"]
CMD ["serve"]

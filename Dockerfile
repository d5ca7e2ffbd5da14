# threadgate container image.
#
#   docker build -t threadgate .
#   docker run -p 8080:8080 -v threadgate-data:/data threadgate
#   docker run -p 8080:8080 -e THREADGATE_STORE=postgres://user:pw@db:5432/threadgate threadgate
#
# Every flag is also an environment variable THREADGATE_<NAME> (see `threadgate --help`).
# The build needs no database: no compile-time checked queries are used, and
# `sqlx::migrate!` embeds migrations/ into the binary at compile time.

# ---- build ------------------------------------------------------------------------------------
FROM rust:1-bookworm AS builder
WORKDIR /src
ENV CARGO_TERM_COLOR=never \
    SQLX_OFFLINE=true

# Dependencies first, in their own layer: built from the manifests with placeholder sources,
# so a source change does not rebuild them.
# The workspace's client crate only needs its manifest and an empty library to be resolved.
COPY Cargo.toml Cargo.lock ./
COPY clients/rust/Cargo.toml clients/rust/
RUN mkdir -p src tests/it clients/rust/src clients/rust/tests/it \
 && echo 'fn main() {}' > src/main.rs \
 && : > src/lib.rs \
 && : > tests/it/main.rs \
 && : > clients/rust/src/lib.rs \
 && : > clients/rust/tests/it/main.rs \
 && cargo build --release --locked --bin threadgate \
 && rm -rf src tests clients \
       target/release/threadgate target/release/threadgate.d \
       target/release/deps/threadgate-* target/release/deps/libthreadgate-* \
       target/release/.fingerprint/threadgate-*

# The real sources (.dockerignore keeps target/, data/ and .git/ out). Touch them so cargo
# never mistakes them for older than the placeholder build.
COPY . .
RUN find . -path ./target -prune -o -type f -exec touch {} + \
 && cargo build --release --locked --bin threadgate \
 && mkdir -p /out \
 && install -m 0755 target/release/threadgate /out/threadgate

# ---- run --------------------------------------------------------------------------------------
FROM debian:bookworm-slim
# curl serves the health check; versions follow the bookworm point release.
# hadolint ignore=DL3008
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates curl \
 && rm -rf /var/lib/apt/lists/* \
 && groupadd --system --gid 10001 threadgate \
 && useradd --system --uid 10001 --gid threadgate --home-dir /data --no-create-home \
        --shell /usr/sbin/nologin threadgate \
 && mkdir -p /data \
 && chown threadgate:threadgate /data

COPY --from=builder /out/threadgate /usr/local/bin/threadgate

ENV THREADGATE_LISTEN=0.0.0.0:8080 \
    NO_COLOR=1 \
    THREADGATE_STORE=file:/data
WORKDIR /data
# Numeric, so orchestrators can verify runAsNonRoot.
USER 10001:10001
VOLUME ["/data"]
EXPOSE 8080

# The port follows THREADGATE_LISTEN if it is overridden.
HEALTHCHECK --interval=15s --timeout=3s --start-period=10s --retries=3 \
    CMD ["/bin/sh", "-c", "curl -fsS -o /dev/null \"http://127.0.0.1:${THREADGATE_LISTEN##*:}/healthz\" || exit 1"]

STOPSIGNAL SIGTERM
ENTRYPOINT ["threadgate"]

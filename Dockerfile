# One image for `ferry control` and `ferry proxy` (and the CLI).
#
#   docker build -t registry.example.com/ferry:0.1.0 .
#   docker push registry.example.com/ferry:0.1.0
#
# The builder is pinned; the etcd store needs protoc and its includes.
FROM rust:1.95.0-bookworm AS build
RUN apt-get update \
 && apt-get install -y --no-install-recommends protobuf-compiler libprotobuf-dev \
 && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY . .
RUN cargo build --release --locked --features etcd --bin ferry \
 && cp target/release/ferry /ferry

# Distroless: no shell, no package manager; uid 65532 (nonroot).
FROM gcr.io/distroless/cc-debian12:nonroot
COPY --from=build /ferry /usr/local/bin/ferry
USER 65532:65532
ENTRYPOINT ["/usr/local/bin/ferry"]
CMD ["--help"]

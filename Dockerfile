# Build stage: the migrations are embedded in the binary at compile time.
FROM rust:1.95-slim-bookworm AS build
WORKDIR /src
COPY Cargo.toml Cargo.lock rustfmt.toml ./
COPY src ./src
COPY workers ./workers
COPY migrations ./migrations
RUN cargo build --release --locked --bin micro8gents

FROM debian:bookworm-slim
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates curl \
 && rm -rf /var/lib/apt/lists/* \
 && useradd --system --uid 10001 micro8gents
COPY --from=build /src/target/release/micro8gents /usr/local/bin/micro8gents
USER micro8gents
ENV LISTEN_ADDR=0.0.0.0:8080
EXPOSE 8080
ENTRYPOINT ["micro8gents"]
CMD ["run"]

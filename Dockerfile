# The engine image: a release build, then a slim runtime holding only the
# binary and the project's pipelines, rules and migrations.
#   docker build -t engine .
#   docker run --rm engine validate pipelines/*.yaml
# docker-compose.yml runs the whole platform with it.

FROM rust:1-bookworm AS build
WORKDIR /src
COPY Cargo.toml Cargo.lock ./
COPY engine engine
COPY bench bench
RUN cargo build --release --locked -p engine

FROM debian:bookworm-slim
RUN useradd --system --create-home --home-dir /app engine
WORKDIR /app
COPY --from=build /src/target/release/engine /usr/local/bin/engine
COPY --chown=engine pipelines pipelines
COPY --chown=engine rules rules
COPY --chown=engine migrations migrations
USER engine
ENTRYPOINT ["engine"]
CMD ["--help"]

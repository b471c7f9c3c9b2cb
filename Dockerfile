# pgflip's image: the controller (`pgflip controller`) and the endpoint pods
# (`pgflip endpoint`, which runs PgBouncer) use the same one. The controller runs pg_dump
# of the newest major for schema copies, hence the PostgreSQL client tools.
# Not built on the development machine (it reaches no image registry); kept buildable.
FROM rust:1-bookworm AS build
WORKDIR /src
COPY . .
# The controller image carries no benchmark (nor its plotting).
RUN cargo build --release --locked --bin pgflip --no-default-features

FROM debian:bookworm-slim
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates curl gnupg pgbouncer \
 && install -d /usr/share/postgresql-common/pgdg \
 && curl -fsSL https://www.postgresql.org/media/keys/ACCC4CF8.asc \
      -o /usr/share/postgresql-common/pgdg/apt.postgresql.org.asc \
 && echo "deb [signed-by=/usr/share/postgresql-common/pgdg/apt.postgresql.org.asc] https://apt.postgresql.org/pub/repos/apt bookworm-pgdg main" \
      > /etc/apt/sources.list.d/pgdg.list \
 && apt-get update \
 && apt-get install -y --no-install-recommends postgresql-client-18 \
 && apt-get purge -y curl gnupg && apt-get autoremove -y && rm -rf /var/lib/apt/lists/*
COPY --from=build /src/target/release/pgflip /usr/local/bin/pgflip
USER 65532:65532
ENTRYPOINT ["pgflip"]

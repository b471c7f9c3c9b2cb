# pgflip's image: the controller (`pgflip controller`) and the endpoint pods
# (`pgflip endpoint`, which runs PgBouncer) use the same one. The controller runs pg_dump
# of the newest major for schema copies, hence the PostgreSQL client tools.
#
# With network access (the defaults): pgflip is built from this repository in the Rust
# image, and the client tools of PostgreSQL 18 come from apt.postgresql.org:
#   buildah bud -t pgflip .        (or docker build -t pgflip .)
#
# Offline, as the tests build it on a real node (tests/common/real_node.rs): a local Debian
# base, Debian's packages, pgflip built beforehand and the client tools of a PostgreSQL
# install taken from the build context (a directory holding `pgflip` and `postgresql/`):
#   buildah bud --build-arg PGFLIP_FROM=context --build-arg POSTGRES_CLIENT=context \
#     -f Dockerfile -t pgflip <context>
# Only the stages the final one needs are built (BuildKit and buildah skip the others).
ARG RUST_IMAGE=rust:1-bookworm
ARG BASE_IMAGE=debian:bookworm-slim
# build: compile here; context: the `pgflip` binary of the build context.
ARG PGFLIP_FROM=build
# pgdg: postgresql-client-18 from apt.postgresql.org; context: `postgresql/` of the build
# context (bin/ and lib/ of one major, laid out like an installation).
ARG POSTGRES_CLIENT=pgdg

FROM ${RUST_IMAGE} AS build
WORKDIR /src
COPY . .
# The controller image carries no benchmark (nor its plotting).
RUN cargo build --release --locked --bin pgflip --no-default-features \
 && cp target/release/pgflip /pgflip

FROM scratch AS context
COPY pgflip /pgflip

FROM ${PGFLIP_FROM} AS binary

# The client tools from the build context (none for pgdg: they are installed below).
FROM ${BASE_IMAGE} AS client-pgdg
RUN mkdir -p /client

FROM scratch AS client-context
COPY postgresql /client/postgresql

FROM client-${POSTGRES_CLIENT} AS client

FROM ${BASE_IMAGE}
ARG POSTGRES_CLIENT
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates pgbouncer \
 && if [ "$POSTGRES_CLIENT" = pgdg ]; then \
      apt-get install -y --no-install-recommends curl gnupg \
      && install -d /usr/share/postgresql-common/pgdg \
      && curl -fsSL https://www.postgresql.org/media/keys/ACCC4CF8.asc \
           -o /usr/share/postgresql-common/pgdg/apt.postgresql.org.asc \
      && echo "deb [signed-by=/usr/share/postgresql-common/pgdg/apt.postgresql.org.asc] https://apt.postgresql.org/pub/repos/apt bookworm-pgdg main" \
           > /etc/apt/sources.list.d/pgdg.list \
      && apt-get update \
      && apt-get install -y --no-install-recommends postgresql-client-18 \
      && apt-get purge -y curl gnupg && apt-get autoremove -y; \
    fi \
 && rm -rf /var/lib/apt/lists/*
# An installation from the context goes where pgflip looks: /usr/lib/postgresql/<major>.
COPY --from=client /client/ /usr/lib/postgresql/
RUN cd /usr/lib/postgresql \
 && if [ -d postgresql ]; then \
      mv postgresql "$(postgresql/bin/pg_dump --version | sed -E 's/^[^0-9]*([0-9]+).*/\1/')"; \
    fi \
 && ls /usr/lib/postgresql/*/bin/pg_dump
COPY --from=binary /pgflip /usr/local/bin/pgflip
USER 65532:65532
ENTRYPOINT ["pgflip"]

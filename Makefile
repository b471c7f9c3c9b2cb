# pgflip — the two commands a fresh machine needs: `make demo` and `make test`.
# Both install what is missing first (`make setup`, idempotent).

CARGO ?= cargo
DEMO_JSON ?=
export PGFLIP_TOOLCHAIN := $(CURDIR)/.toolchain

.PHONY: setup build demo test test-unit lint bench clean

setup:
	@bash scripts/setup-rust.sh
	@bash scripts/setup-toolchain.sh

build: setup
	$(CARGO) build --release

demo: build
	./target/release/pgflip demo $(if $(DEMO_JSON),--json $(DEMO_JSON),)

# All tests: unit tests of the pure core, and integration tests against real PostgreSQL
# 15/16/17, a real PgBouncer and real Git repositories.
test: setup
	$(CARGO) test -- --test-threads=2

test-unit:
	$(CARGO) test --lib

lint:
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy --all-targets -- -D warnings

clean:
	$(CARGO) clean

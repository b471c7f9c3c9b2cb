# pgflip — the two commands a fresh machine needs: `make demo` and `make test`.
# Both install what is missing first (`make setup`, idempotent).

CARGO ?= cargo
DEMO_JSON ?=
export PGFLIP_TOOLCHAIN := $(CURDIR)/.toolchain

.PHONY: setup setup-kube setup-flux setup-node build demo test test-k8s test-flux test-unit lint bench soak clean

setup:
	@bash scripts/setup-rust.sh
	@bash scripts/setup-toolchain.sh

build: setup
	$(CARGO) build --release

demo: build
	./target/release/pgflip demo $(if $(DEMO_JSON),--json $(DEMO_JSON),)

# Kubernetes for the Kubernetes-mode tests: etcd, kube-apiserver, kube-controller-manager,
# kube-scheduler, kubelet and kube-proxy (one version) built from the Go module proxy into
# ~/.cache/pgflip/kube (idempotent; about 12 minutes the first time on 2 cores).
setup-kube:
	@bash scripts/setup-kube.sh

# A real node for the Kubernetes-mode tests: containerd, runc and the CNI plugins from
# Debian, the kubelet of setup-kube, CoreDNS, and the images it runs (pause, PostgreSQL
# 15-18 on a Debian root) into ~/.cache/pgflip/node (idempotent; needs root).
setup-node: setup
	@bash scripts/setup-node.sh

# Flux's source-controller and kustomize-controller (and all their CRDs), built from their
# Go modules into the same cache, for the GitOps end-to-end (about 4 minutes the first time).
setup-flux:
	@bash scripts/setup-flux.sh

# All tests: unit tests of the pure core, and integration tests against real PostgreSQL
# 15/16/17/18, a real PgBouncer, real Git repositories, a real kube-apiserver and real Flux.
test: setup setup-kube setup-flux setup-node
	$(CARGO) test --workspace --all-targets -- --test-threads=2

# The Kubernetes-mode tests only: every tests/k8s_*.rs (cargo expands the quoted glob, so a
# new file is picked up by itself), one test at a time (each starts its own control plane).
test-k8s: setup setup-kube setup-node
	$(CARGO) test --test 'k8s_*' -- --test-threads=1

# The GitOps loop end to end with real Flux (tests/flux_gitops.rs): push a version bump,
# a revert, a bad commit; Flux applies; pgflip switches; the commit gets its statuses.
test-flux: setup setup-kube setup-flux
	$(CARGO) test --test flux_gitops -- --test-threads=1

# The benchmark: pgflip against dump/restore and pg_upgrade --link, 100 MB and 1 GB at
# 1000 tx/s (BENCH_ARGS="--sizes 100MB,1GB,5GB" for more). Results in bench/results/.
BENCH_ARGS ?=
bench: build
	./target/release/pgflip bench $(BENCH_ARGS)

# The soak (tests/soak.rs): SWITCHES switches and reverts under a writing ledger, each with a
# fault drawn from a seeded generator; figures to SOAK_JSON. SEED=<n> replays a run (the
# seed is printed). `make test` runs the same with 3 switches.
SWITCHES ?= 20
SOAK_JSON ?= soak.json
SEED ?=
soak: setup
	SOAK_SWITCHES=$(SWITCHES) SOAK_JSON=$(abspath $(SOAK_JSON)) $(if $(SEED),SOAK_SEED=$(SEED),) \
		$(CARGO) test --test soak -- --nocapture

test-unit:
	$(CARGO) test --workspace --lib

lint:
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy --workspace --all-targets -- -D warnings

clean:
	$(CARGO) clean

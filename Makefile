# Ferry: build, test and demo entry points. Everything runs as root (network namespaces).
SHELL := /bin/bash
.DEFAULT_GOAL := help
CARGO ?= cargo

.PHONY: help setup build release image demo test lint bench

help:
	@echo "Ferry make targets (run as root):"
	@echo "  make setup    install system packages and rustup components (scripts/setup.sh)"
	@echo "  make build    setup, then build all binaries (debug: what the tests run)"
	@echo "  make release  setup, then build all binaries optimized (what you install)"
	@echo "  make image    release build, then the node image as an archive (target/image/ferry-image.tar)"
	@echo "  make demo     build, then run ferry-demo: a node with pods on Ferry's network"
	@echo "  make test     build, then rustfmt check, clippy, and every test"
	@echo "  make lint     rustfmt check and clippy only"
	@echo "  make bench    release build, then the benchmarks (they print figures)"

setup:
	@scripts/setup.sh

build: setup
	$(CARGO) build --workspace --bins

release: setup
	$(CARGO) build --release --workspace --bins

# The image conf/ferry.yaml runs, as an archive every node runtime loads (no registry):
# kind load image-archive, k3s ctr images import, ctr images import, podman/docker load.
image: release
	scripts/image/build.sh target/release target/image/ferry-image.tar

# The demo runs the plugins as they ship: optimized.
demo: release
	FERRY_BIN_DIR=target/release target/release/ferry-demo

lint:
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy --workspace --all-targets -- -D warnings

# Tests find the plugins next to their own executable, in target/debug.
test: build lint
	$(CARGO) test --workspace

bench: release
	$(CARGO) bench -p ferry-tests
	$(CARGO) bench -p ferry-proxy --bench proxy

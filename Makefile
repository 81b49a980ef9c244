# Ferry: build, test and demo entry points. Everything runs as root (network namespaces).
SHELL := /bin/bash
.DEFAULT_GOAL := help
CARGO ?= cargo

.PHONY: help setup build demo test lint bench

help:
	@echo "Ferry make targets (run as root):"
	@echo "  make setup   install system packages and rustup components (scripts/setup.sh)"
	@echo "  make build   setup, then build all binaries, debug and release"
	@echo "  make demo    build, then run ferry-demo: ferry-ipam on a throwaway node"
	@echo "  make test    build, then rustfmt check, clippy, and every test (debug binaries)"
	@echo "  make lint    rustfmt check and clippy only"
	@echo "  make bench   build, then the benchmarks of ferry-tests (release binaries)"

setup:
	@scripts/setup.sh

build: setup
	$(CARGO) build --workspace --bins
	$(CARGO) build --release --workspace --bins

demo: build
	FERRY_BIN_DIR=target/release target/release/ferry-demo

lint:
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy --workspace --all-targets -- -D warnings

# Tests find the plugins next to their own executable, in target/debug.
test: build lint
	$(CARGO) test --workspace

bench: build
	$(CARGO) bench -p ferry-tests

# One entry point for people and CI. `make test` installs what the tests need (the Go-built
# kube-apiserver/etcd/kubectl, cached in .cache/tools; the fake Proxmox in .venv/fakepve; runc
# and umoci for the image test; QEMU and the real Debian 12 guest image with its apt repository,
# cached in .cache/real-guest), then runs formatting, lints and the whole test suite: the unit
# tests, tests/integration/ (one binary), then tests/real_guest.rs (real guests under QEMU/TCG,
# after the others so they do not share the CPU). `make test-real-guest` runs only the last.

CARGO ?= cargo
# Extra arguments for `cargo test`, e.g. CARGO_TEST_FLAGS='--test integration builder::'.
CARGO_TEST_FLAGS ?=

.PHONY: test test-real-guest tools venv real-guest-image fmt-check clippy cargo-test crds health-samples image demo bench-build bench-controller \
	bench-real-guest

test: tools venv real-guest-image fmt-check clippy cargo-test

tools:
	scripts/test-tools.sh
	scripts/image-tools.sh

venv:
	scripts/fakepve-venv.sh

# QEMU (apt-get) and the Debian 12 image + signed apt repository of tests/real_guest.rs; a few
# minutes once, instant while scripts/real-guest-image.sh and its customize hook are unchanged.
real-guest-image:
	scripts/real-guest-image.sh

# The real-guest end-to-end test alone (tests/real_guest.rs): build, validation and the controller
# on a real Debian 12 guest under QEMU/TCG, printing its figures. `make test` runs it too.
test-real-guest: tools venv real-guest-image
	$(CARGO) test --locked --all-features --test real_guest -- --nocapture

fmt-check:
	$(CARGO) fmt --all -- --check

clippy:
	$(CARGO) clippy --all-targets --all-features --locked -- -D warnings

# --all-features turns on tests/real_guest.rs; the same features as clippy's, so the crate is
# compiled for tests once.
cargo-test:
	$(CARGO) test --locked --no-fail-fast --all-features $(CARGO_TEST_FLAGS)

# Regenerate the checked-in CRDs and the Helm chart's copies (tests fail when either is stale).
crds:
	$(CARGO) run --quiet -- crd --out-dir crds
	$(CARGO) run --quiet -- crd --out-dir charts/sombrero/crds

# tests/health/: GoldenImages and TemplateRetentions in each state, recorded from a real run of
# the controller (tests/integration/health.rs checks that the samples still match one).
health-samples: tools venv
	SOMBRERO_RECORD_HEALTH=1 $(CARGO) test --locked --all-features --test integration health::the_samples_are_what_the_controller_writes

# The release image without a container engine: a release build, then an OCI layout
# (target/image/oci) and the same as one archive, for
# `skopeo copy oci-archive:target/image/sombrero.oci.tar docker://REGISTRY/sombrero:TAG`.
# The tests build the same image from their debug binary (tests/integration/chart.rs).
image:
	$(CARGO) build --release --locked --bin sombrero
	scripts/image.sh --gzip --archive target/image/sombrero.oci.tar

# The fake Proxmox VE on loopback and `sombrero build -f examples/ubuntu-24.04-minimal.yaml`
# against it, end to end (prints the seed's JSON).
demo: venv
	scripts/demo.sh

# Proxmox requests per build, wall time and task waits against the fake (scripts/bench-build.sh):
# cloud image and template source, tasks finishing instantly, then PVE-like task durations.
BENCH_N ?= 5
bench-build: venv
	BENCH_N=$(BENCH_N) scripts/bench-build.sh

# Steady state of the controller with 100 and 1,000 GoldenImages (templates already promoted):
# Proxmox requests per resync, reconcile latency, RSS. See docs/controller.md for the numbers.
bench-controller: tools venv
	scripts/bench-controller.sh

# The real Debian 12 guest under QEMU (tests/real_guest.rs) with its scenarios one after another,
# so the figures are not shared CPU: per stage and step wall time, template disk size, Proxmox
# requests per build and validation. See docs/build.md and docs/validation.md for the numbers.
bench-real-guest: tools venv real-guest-image
	SOMBRERO_REAL_GUEST_SERIAL=1 $(CARGO) test --locked --all-features --test real_guest -- --nocapture

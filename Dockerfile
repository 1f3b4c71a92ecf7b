# syntax=docker/dockerfile:1
# The sombrero controller image: a release build on Debian, run from distroless (no shell, no
# package manager) as the non-root user 65532. Build from the repository root:
#   docker build -t registry.example.com/platform/sombrero:0.1.0 .
# The chart runs it read-only, without capabilities, with `controller` and its flags as args.
# Without a Docker engine, `make image` builds the same image (scripts/image.sh: an OCI layout of
# the binary, its glibc/libgcc, CA certificates and the nonroot user); keep USER, ENTRYPOINT, CMD
# and EXPOSE in step with it (tests/integration/chart.rs compares them).

# Keep in step with rust-version in Cargo.toml.
FROM docker.io/library/rust:1.95-bookworm AS build
WORKDIR /src
COPY Cargo.toml Cargo.lock ./
COPY src ./src
# --locked: exactly the dependency versions of Cargo.lock.
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked --bin sombrero \
 && install -D -m 0755 target/release/sombrero /out/sombrero

# glibc and libgcc (the binary links them), CA certificates, and the `nonroot` user (65532).
FROM gcr.io/distroless/cc-debian12:nonroot
COPY --from=build /out/sombrero /usr/local/bin/sombrero
USER 65532:65532
EXPOSE 8080
ENTRYPOINT ["/usr/local/bin/sombrero"]
CMD ["controller"]

//! The integration tests: one binary, so the crate and the test support are linked once (twelve
//! binaries before; `cargo test --test integration <module>::` runs one file's tests). The real
//! kube-apiserver and etcd of `support::kube` start once for the whole binary.
//!
//! `tests/real_guest.rs` stays a binary of its own: it runs after this one, so its QEMU guests do
//! not share the CPU with these tests.

#[path = "../support/mod.rs"]
mod support;

mod builder;
mod chart;
mod controller;
mod controller_crash;
mod controller_resume;
mod controller_states;
mod fakepve_harness;
mod gitops;
mod health;
mod kube_api;
mod proxmox_client;
mod retention;
mod validate;

//! Test support shared by the integration test binaries.
#![allow(dead_code)]

pub mod controller;
pub mod crash;
pub mod fakepve;
pub mod kube;
pub mod rbac;

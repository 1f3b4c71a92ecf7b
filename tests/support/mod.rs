//! Test support shared by the integration test binaries.
#![allow(dead_code)]

pub mod controller;
pub mod fakepve;
pub mod kube;
pub mod rbac;

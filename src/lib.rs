//! sombrero: keeps Proxmox VE VM templates ("golden images") as a platform team declares them.

pub mod api;
pub mod builder;
pub mod cli;
pub mod config_reads;
pub mod controller;
pub mod engine;
pub mod image;
pub mod poll;
pub mod privileges;
pub mod promote;
pub mod proxmox;
pub mod retention;
pub mod ssh;
pub mod telemetry;
pub mod validate;

//! sombrero: keeps Proxmox VE VM templates ("golden images") as a platform team declares them.

pub mod api;
pub mod image;
pub mod retention;
pub mod proxmox;

//! sombrero: keeps Proxmox VE VM templates ("golden images") as a platform team declares them.

pub mod api;
pub mod proxmox;

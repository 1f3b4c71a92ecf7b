# Clone a VM from the latest validated template of a sombrero GoldenImage. Two ways to find it:
#
# configmap: sombrero writes template_id, template_name and node into the GoldenImage's
#   spec.output ConfigMap once a template passed validation and was promoted.
# tags: exactly one template of each image carries both the image tag
#   sombrero.<namespace>.<name> and the channel tag sombrero-latest; sombrero moves them only
#   after validation: the controller, or in a pipeline without a cluster
#   `sombrero build -f image.yaml --promote` (a plain `sombrero build` sets no channel tag). (Long or unusual names are shortened with a hash: read the exact tag from
#   the template's Tags in the Proxmox UI, or use the ConfigMap.)

data "kubernetes_config_map_v1" "template" {
  count = var.template_source == "configmap" ? 1 : 0
  metadata {
    name      = var.config_map_name
    namespace = var.image_namespace
  }
}

data "proxmox_virtual_environment_vms" "latest" {
  count = var.template_source == "tags" ? 1 : 0
  tags  = ["sombrero.${var.image_namespace}.${var.image_name}", "sombrero-latest"]
  # Clones copy their template's tags: only templates count.
  filter {
    name   = "template"
    values = ["true"]
  }
  lifecycle {
    postcondition {
      condition     = length(self.vms) == 1
      error_message = "expected exactly one template tagged sombrero-latest for ${var.image_namespace}/${var.image_name}, found ${length(self.vms)}"
    }
  }
}

locals {
  template_id = (var.template_source == "configmap"
    ? tonumber(data.kubernetes_config_map_v1.template[0].data["template_id"])
  : data.proxmox_virtual_environment_vms.latest[0].vms[0].vm_id)
  template_node = (var.template_source == "configmap"
    ? data.kubernetes_config_map_v1.template[0].data["node"]
  : data.proxmox_virtual_environment_vms.latest[0].vms[0].node_name)
}

resource "proxmox_virtual_environment_vm" "app" {
  name      = "app-1"
  node_name = var.node_name
  # Our own tags: without them the clone would copy the template's, channel tag included.
  tags = ["app"]

  clone {
    vm_id     = local.template_id
    node_name = local.template_node
    full      = true
  }

  agent {
    enabled = true # the template ships qemu-guest-agent
  }

  initialization {
    ip_config {
      ipv4 {
        address = "dhcp"
      }
    }
    user_account {
      username = "ubuntu"
      keys     = [var.ssh_public_key]
    }
  }

  # A newer template changes local.template_id. Remove this to replace VMs on every new
  # template (immutable servers); keep it to move only new VMs onto it.
  lifecycle {
    ignore_changes = [clone]
  }
}

output "template_id" {
  value = local.template_id
}

output "vm_id" {
  value = proxmox_virtual_environment_vm.app.vm_id
}

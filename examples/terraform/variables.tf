variable "proxmox_endpoint" {
  type        = string
  description = "Proxmox VE API URL, e.g. https://pve1.example.net:8006/"
}

variable "proxmox_api_token" {
  type        = string
  sensitive   = true
  default     = null
  description = "API token (user@realm!id=secret); null reads PROXMOX_VE_API_TOKEN."
}

variable "kubeconfig" {
  type        = string
  default     = "~/.kube/config"
  description = "Kubeconfig of the cluster sombrero runs in (template_source = configmap)."
}

variable "template_source" {
  type        = string
  default     = "configmap"
  description = "How to find the latest validated template: configmap (the GoldenImage's spec.output ConfigMap) or tags (the Proxmox channel tags)."
  validation {
    condition     = contains(["configmap", "tags"], var.template_source)
    error_message = "template_source must be configmap or tags."
  }
}

variable "image_namespace" {
  type        = string
  default     = "images"
  description = "Namespace of the GoldenImage."
}

variable "image_name" {
  type        = string
  default     = "ubuntu-24.04-minimal"
  description = "Name of the GoldenImage."
}

variable "config_map_name" {
  type        = string
  default     = "ubuntu-24.04-minimal-template"
  description = "The GoldenImage's spec.output.configMapName."
}

variable "node_name" {
  type        = string
  default     = "pve1"
  description = "Node the new VM runs on."
}

variable "ssh_public_key" {
  type        = string
  description = "Public key for the VM's user (cloud-init)."
}

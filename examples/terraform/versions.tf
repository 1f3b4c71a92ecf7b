terraform {
  required_version = ">= 1.5"
  required_providers {
    # bpg/proxmox: the maintained Proxmox VE provider.
    proxmox = {
      source  = "bpg/proxmox"
      version = ">= 0.66, < 1.0"
    }
    # Only for template_source = "configmap".
    kubernetes = {
      source  = "hashicorp/kubernetes"
      version = ">= 2.30, < 3.0"
    }
  }
}

provider "proxmox" {
  endpoint  = var.proxmox_endpoint
  api_token = var.proxmox_api_token # "user@realm!tokenid=secret"; use PROXMOX_VE_API_TOKEN instead
}

provider "kubernetes" {
  config_path = var.kubeconfig
}

#!/usr/bin/env bash
# mmdebstrap customize hook of scripts/real-guest-image.sh: makes the root file system a
# cloud-style image. Usage: real-guest-customize.sh ROOTFS REPO_KEY REPO_URL LABEL
set -euo pipefail
R="$1" KEY="$2" URL="$3" LABEL="$4"

# The only apt source: the local signed repository (no internet for the guest). mmdebstrap leaves
# the host's sources it was given in sources.list.d (0000*.sources): with them `apt-get update`
# waited out two resolver timeouts for the public mirror (244 s of a 10 s step).
rm -f "$R/etc/apt/sources.list" "$R"/etc/apt/sources.list.d/*
mkdir -p "$R/etc/apt/keyrings" "$R/etc/apt/sources.list.d"
install -m 0644 "$KEY" "$R/etc/apt/keyrings/sombrero-test-repo.gpg"
cat >"$R/etc/apt/sources.list.d/sombrero-test.sources" <<SRC
Types: deb
URIs: $URL
Suites: ./
Signed-By: /etc/apt/keyrings/sombrero-test-repo.gpg
SRC

# cloud-init: NoCloud (PVE's cloud-init drive) and nothing to probe; keep the apt source above
# (cloud-init would otherwise write a sources.list for the public Debian mirror); hostname in /etc/hosts
# so sudo does not wait for DNS; Debian's default user as on Debian's cloud images.
cat >"$R/etc/cloud/cloud.cfg.d/01_sombrero_test.cfg" <<'CFG'
datasource_list: [ NoCloud, None ]
manage_etc_hosts: true
apt:
  preserve_sources_list: true
CFG

cat >"$R/etc/network/interfaces" <<'NET'
# Interfaces are configured by cloud-init (interfaces.d/50-cloud-init).
source /etc/network/interfaces.d/*

auto lo
iface lo inet loopback
NET
mkdir -p "$R/etc/network/interfaces.d"

printf 'LABEL=%s / ext4 defaults,errors=remount-ro 0 1\n' "$LABEL" >"$R/etc/fstab"
printf 'LANG=C.UTF-8\n' >"$R/etc/default/locale"
printf 'localhost\n' >"$R/etc/hostname"
printf '127.0.0.1 localhost\n::1 localhost ip6-localhost ip6-loopback\n' >"$R/etc/hosts"

# GRUB reads a static grub.cfg that boots the kernel symlinks, so the newest installed kernel
# (linux-update-symlinks moves them) is the one that boots.
kernel=/vmlinuz initrd=/initrd.img
if [[ -e "$R/boot/vmlinuz" ]]; then kernel=/boot/vmlinuz initrd=/boot/initrd.img; fi
[[ -e "$R$kernel" && -e "$R$initrd" ]] || { echo "no kernel symlinks $kernel/$initrd in the image" >&2; exit 1; }
mkdir -p "$R/boot/grub/i386-pc"
cp /usr/lib/grub/i386-pc/*.mod /usr/lib/grub/i386-pc/*.lst "$R/boot/grub/i386-pc/"
cat >"$R/boot/grub/grub.cfg" <<GRUB
set default=0
set timeout=0
menuentry 'Debian GNU/Linux 12' {
    search --no-floppy --label $LABEL --set=root
    linux $kernel root=LABEL=$LABEL ro console=tty0 console=ttyS0,115200
    initrd $initrd
}
GRUB

# What a published cloud image ships: never booted.
rm -f "$R"/etc/ssh/ssh_host_*
: >"$R/etc/machine-id"
rm -f "$R/var/lib/dbus/machine-id"
rm -rf "$R"/var/lib/cloud/* "$R"/var/log/cloud-init*
chroot "$R" apt-get clean
rm -rf "$R"/var/lib/apt/lists/*
find "$R/var/log" -type f -exec truncate -s 0 {} +

#!/usr/bin/env bash
# Build the real Debian 12 guest the real-guest tests boot under QEMU (tests/real_guest.rs,
# tests/fakepve/qemu_backend.py), from Debian's own packages, into .cache/real-guest/:
#
#   debian-12.qcow2   a cloud-style image (2 GiB virtual): cloud-init (NoCloud), openssh-server,
#                     sudo, ifupdown; WITHOUT qemu-guest-agent (the build installs it); no SSH host
#                     keys, an empty machine-id, cloud-init never run, LANG=C.UTF-8. Its kernel is
#                     bookworm's point-release one, one version behind bookworm-security's.
#   repo/             a flat, signed apt repository (apt-ftparchive; a throwaway gpg key the image
#                     trusts) with the upgrades of the image (the newer kernel, a NEW package: only
#                     full-upgrade installs it) and the closure of what the recipe installs.
#                     The image's only apt source is http://10.0.2.100/ (a QEMU guestfwd to it).
#   image.env         facts the tests read (kernel versions, repository address).
#   vmlinuz           the image's kernel (the harness's KVM probe boots it).
#
# Image and repository are fetched at the same moment, so a routine upgrade has little to do
# except the kernel. No loop devices or mounts: mkfs.ext4 -d, sfdisk, grub-mkimage.
#
# Missing prerequisites are installed with apt-get (the machine is Debian 12, as root).
# A rebuild is skipped when the stamp records the sha256 of this script and
# scripts/real-guest-customize.sh: a cached run is instant.
#
# Usage: scripts/real-guest-image.sh                    build or reuse
#        REAL_GUEST_FORCE=1 scripts/real-guest-image.sh rebuild regardless
# The last line printed on success is the absolute cache directory.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
CACHE="$ROOT/.cache/real-guest"
SELF="$ROOT/scripts/real-guest-image.sh"

# What the recipe installs (commands::REQUIRED) and the tests' spec adds; the repository holds
# their closure. Change it and the stamp changes (it hashes this file).
RECIPE_PACKAGES="qemu-guest-agent cloud-init jq"
IMAGE_PACKAGES="linux-image-cloud-amd64/bookworm,systemd-sysv,udev,dbus,openssh-server,cloud-init,cloud-guest-utils,fdisk,sudo,ifupdown,isc-dhcp-client,iproute2,netbase,e2fsprogs,procps,initramfs-tools,ca-certificates,locales"
# The guest reaches the repository here: user-mode networking's guestfwd (qemu_backend.py).
REPO_URL="http://10.0.2.100/"
DISK_SIZE_MIB=2048
LABEL="debian-root"

log() { printf 'real-guest-image: %s\n' "$*" >&2; }
die() { printf 'real-guest-image: error: %s\n' "$*" >&2; exit 1; }
now_s() { date +%s; }

mkdir -p "$ROOT/.cache"
exec 9>"$ROOT/.cache/real-guest.lock"
flock 9

want="$(cat "$SELF" "$ROOT/scripts/real-guest-customize.sh" | sha256sum | cut -d' ' -f1)"
have=""
[[ -f "$CACHE/stamp" ]] && have="$(cat "$CACHE/stamp")"
if [[ "${REAL_GUEST_FORCE:-}" != 1 && "$have" == "$want" && -f "$CACHE/debian-12.qcow2" \
      && -f "$CACHE/repo/InRelease" && -f "$CACHE/image.env" ]]; then
    log "reused $CACHE (stamp matches)"
    echo "$CACHE"
    exit 0
fi

# --- prerequisites -------------------------------------------------------------------------
declare -A NEED=(
    [qemu-system-x86_64]=qemu-system-x86 [qemu-img]=qemu-utils [mmdebstrap]=mmdebstrap
    [grub-mkimage]=grub-common [xorriso]=xorriso [apt-ftparchive]=apt-utils
    [sfdisk]=fdisk [mkfs.ext4]=e2fsprogs [gpg]=gpg [flock]=util-linux
)
missing=()
for cmd in "${!NEED[@]}"; do
    command -v "$cmd" >/dev/null 2>&1 || missing+=("${NEED[$cmd]}")
done
[[ -f /usr/lib/grub/i386-pc/boot.img ]] || missing+=(grub-pc-bin)
if ((${#missing[@]})); then
    install_cmd="apt-get update && apt-get install -y --no-install-recommends qemu-system-x86 qemu-utils mmdebstrap grub-pc-bin grub-common xorriso apt-utils fdisk e2fsprogs gpg"
    [[ $(id -u) == 0 ]] || die "missing ${missing[*]}; run as root: $install_cmd"
    log "installing ${missing[*]} with apt-get"
    export DEBIAN_FRONTEND=noninteractive
    apt-get -o DPkg::Lock::Timeout=900 update -q >&2
    apt-get -o DPkg::Lock::Timeout=900 install -y -q --no-install-recommends \
        qemu-system-x86 qemu-utils mmdebstrap grub-pc-bin grub-common xorriso apt-utils \
        fdisk e2fsprogs gpg >&2
fi
[[ $(id -u) == 0 ]] || die "mmdebstrap --mode=root needs root; rerun as root"

# --- build in a scratch directory, then swap it in ----------------------------------------
start="$(now_s)"
WORK="$(mktemp -d "$ROOT/.cache/real-guest.build.XXXXXX")"
# --one-file-system: never into a mount mmdebstrap could not take down (its /proc while a process
# outside held it), so the host's /proc or /dev is never walked.
cleanup() {
    local m
    for m in proc sys dev; do
        ! mountpoint -q "$WORK/rootfs/$m" 2>/dev/null || umount -R -l "$WORK/rootfs/$m" || true
    done
    rm -rf --one-file-system "$WORK" || true
}
trap cleanup EXIT
ROOTFS="$WORK/rootfs"
OUT="$WORK/out"
mkdir -p "$OUT/repo" "$WORK/gnupg"
chmod 700 "$WORK/gnupg"

# Throwaway repository key; the image trusts its public half, nothing else.
export GNUPGHOME="$WORK/gnupg"
gpg --batch --quiet --pinentry-mode loopback --passphrase '' \
    --quick-gen-key 'sombrero real-guest test repository' ed25519 sign never 2>&1 >&2
gpg --batch --export >"$WORK/repo-key.gpg"

# The host's own apt sources (bookworm, -updates, -security as this machine is set up), pasted
# into the chroot by mmdebstrap (one-line or deb822 files alike).
HOST_SOURCES=()
for f in /etc/apt/sources.list /etc/apt/sources.list.d/*.list /etc/apt/sources.list.d/*.sources; do
    [[ -f "$f" ]] && grep -Eq '^[[:space:]]*[^#[:space:]]' "$f" && HOST_SOURCES+=("$f")
done
((${#HOST_SOURCES[@]})) || die "this host has no apt sources (/etc/apt/sources.list[.d]); mmdebstrap \
needs Debian bookworm's main, bookworm-updates and bookworm-security"

log "mmdebstrap bookworm (takes ~2 minutes)..."
# The kernel is bookworm's (linux-image-cloud-amd64/bookworm); everything else is the newest from
# bookworm, -updates and -security, as a published cloud image of today would be.
mmdebstrap --mode=root --variant=minbase --components=main \
    --include="$IMAGE_PACKAGES" \
    --setup-hook='mkdir -p "$1/etc/default" && printf "LANG=C.UTF-8\n" >"$1/etc/default/locale"' \
    --customize-hook='rm -f "$1"/var/cache/apt/archives/*.deb' \
    --customize-hook='chroot "$1" apt-get -y -q -d full-upgrade >&2' \
    --customize-hook="chroot \"\$1\" apt-get -y -q -d install $RECIPE_PACKAGES >&2" \
    --customize-hook="mv \"\$1\"/var/cache/apt/archives/*.deb \"$OUT/repo/\"" \
    --customize-hook="$ROOT/scripts/real-guest-customize.sh \"\$1\" \"$WORK/repo-key.gpg\" \"$REPO_URL\" \"$LABEL\"" \
    bookworm "$ROOTFS" "${HOST_SOURCES[@]}" >&2

# mmdebstrap unmounts what it mounted; if a mount is left (busy), the image would copy it.
if left="$(findmnt -rn -o TARGET | grep -F "$ROOTFS/")"; then
    die "still mounted inside the root file system (a process held it): $left"
fi

# The guest reaches only loopback: any other apt source would make apt wait on timeouts.
sources="$(cd "$ROOTFS/etc/apt" && { ls sources.list sources.list.d/* 2>/dev/null || true; } | tr '\n' ' ')"
[[ "$sources" == "sources.list.d/sombrero-test.sources " ]] || die "the image's apt sources are \
'$sources', not only sources.list.d/sombrero-test.sources"

# --- facts ---------------------------------------------------------------------------------
old_kernel="$(cd "$ROOTFS/boot" && ls vmlinuz-* | sed 's/^vmlinuz-//' | sort -V | tail -1)"
new_kernel="$(cd "$OUT/repo" && ls linux-image-6*-cloud-amd64_*.deb 2>/dev/null \
    | sed 's/^linux-image-\([^_]*\)_.*/\1/' | sort -V | tail -1)"
[[ -n "$old_kernel" ]] || die "no kernel in the image"
[[ -n "$new_kernel" && "$new_kernel" != "$old_kernel" ]] || die "the repository offers no newer \
kernel than the image's $old_kernel (bookworm and bookworm-security carry the same one today?); \
the real-guest tests need one real upgrade"
ls "$OUT"/repo/linux-image-cloud-amd64_*.deb >/dev/null 2>&1 || die "no kernel metapackage upgrade in the repository"

# --- apt repository --------------------------------------------------------------------------
log "indexing and signing the repository ($(ls "$OUT/repo" | wc -l) packages)"
(
    cd "$OUT/repo"
    apt-ftparchive packages . >Packages
    gzip -9kn Packages
    apt-ftparchive -o APT::FTPArchive::Release::Origin=sombrero-test \
        -o APT::FTPArchive::Release::Label=sombrero-test \
        -o APT::FTPArchive::Release::Suite=bookworm \
        -o APT::FTPArchive::Release::Codename=bookworm release . >Release
    gpg --batch --yes --clearsign -o InRelease Release
    gpg --batch --yes -abs -o Release.gpg Release
)
cp "$WORK/repo-key.gpg" "$OUT/repo-key.gpg"
# The image's kernel on its own: the harness boots it to probe whether KVM works.
cp "$ROOTFS/boot/vmlinuz-$old_kernel" "$OUT/vmlinuz"

# --- bootable disk without loop devices ------------------------------------------------------
log "ext4 file system, MBR, GRUB and qcow2"
part_start=2048
disk_bytes=$((DISK_SIZE_MIB * 1024 * 1024))
part_bytes=$((disk_bytes - part_start * 512))
truncate -s "$part_bytes" "$WORK/root.ext4"
mkfs.ext4 -q -F -L "$LABEL" -d "$ROOTFS" "$WORK/root.ext4" >&2
truncate -s "$disk_bytes" "$WORK/disk.raw"
printf 'label: dos\nstart=%d, type=83, bootable\n' "$part_start" | sfdisk -q "$WORK/disk.raw" >&2
dd if="$WORK/root.ext4" of="$WORK/disk.raw" bs=1M seek=1 conv=notrunc,sparse status=none
rm -f "$WORK/root.ext4"
cat >"$WORK/early.cfg" <<EOF
search --no-floppy --label $LABEL --set=root
set prefix=(\$root)/boot/grub
EOF
grub-mkimage -O i386-pc -o "$WORK/core.img" -c "$WORK/early.cfg" -p /boot/grub \
    biosdisk part_msdos ext2 search search_label normal configfile linux echo gzio test
core_sectors=$(( ($(stat -c %s "$WORK/core.img") + 511) / 512 ))
((core_sectors < part_start - 1)) || die "GRUB core image ($core_sectors sectors) does not fit before the partition"
# boot.img's code (not the partition table) into the MBR; it loads core.img from sector 1.
dd if=/usr/lib/grub/i386-pc/boot.img of="$WORK/disk.raw" bs=440 count=1 conv=notrunc status=none
dd if="$WORK/core.img" of="$WORK/disk.raw" bs=512 seek=1 conv=notrunc status=none
qemu-img convert -c -O qcow2 "$WORK/disk.raw" "$OUT/debian-12.qcow2"
rm -f "$WORK/disk.raw"

cat >"$OUT/image.env" <<EOF
# Written by scripts/real-guest-image.sh.
IMAGE=debian-12.qcow2
IMAGE_KERNEL=$old_kernel
REPO_KERNEL=$new_kernel
REPO_URL=$REPO_URL
RECIPE_PACKAGES="$RECIPE_PACKAGES"
BUILT_AT=$(date -u +%Y-%m-%dT%H:%M:%SZ)
EOF
printf '%s\n' "$want" >"$OUT/stamp"

rm -rf "$CACHE"
mv "$OUT" "$CACHE"
log "built in $(( $(now_s) - start ))s: image kernel $old_kernel, repository kernel $new_kernel, \
$(du -h --apparent-size "$CACHE/debian-12.qcow2" | cut -f1) qcow2, $(ls "$CACHE"/repo/*.deb | wc -l) packages"
echo "$CACHE"

#!/usr/bin/env bash
# Builds the sombrero container image without a container engine: an OCI image layout (the
# format registries and runtimes read) assembled from the sombrero binary and a minimal root
# filesystem, the same one the Dockerfile's distroless base gives:
#   /usr/local/bin/sombrero        the binary (ENTRYPOINT; CMD ["controller"])
#   the shared libraries it links  (glibc, libgcc_s: from this machine, found with ldd)
#   /etc/ssl/certs/ca-certificates.crt, /etc/passwd and /etc/group with nonroot = 65532, /tmp
# run as USER 65532:65532, port 8080. One layer; files owned by root, timestamps at
# SOURCE_DATE_EPOCH (default 0), so the same inputs give the same digest.
#
# Usage: scripts/image.sh [--binary PATH] [--out DIR] [--tag TAG] [--gzip] [--archive FILE]
#   --binary   default target/release/sombrero (`make image` builds it first)
#   --out      the OCI layout directory, default target/image/oci (replaced)
#   --tag      the ref name in index.json, default the crate version
#   --gzip     compress the layer (for pushing; the tests skip it to save time)
#   --archive  also write the layout as one tar (an `oci-archive:`), e.g. for
#              `skopeo copy oci-archive:FILE docker://registry.example.com/platform/sombrero:TAG`
# Prints the manifest digest (sha256:...) last.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
die() { printf 'image: error: %s\n' "$*" >&2; exit 1; }

version="$(sed -n 's/^version = "\(.*\)"$/\1/p' "$ROOT/Cargo.toml" | head -n1)"
binary="$ROOT/target/release/sombrero" out="$ROOT/target/image/oci" tag="$version" gzip=0 archive=""
while [[ $# -gt 0 ]]; do
    case "$1" in
        --binary) binary="$2"; shift 2 ;;
        --out) out="$2"; shift 2 ;;
        --tag) tag="$2"; shift 2 ;;
        --gzip) gzip=1; shift ;;
        --archive) archive="$2"; shift 2 ;;
        *) die "unknown argument $1 (see the usage at the top of $0)" ;;
    esac
done
[[ -x "$binary" ]] || die "no executable at $binary: build it with \`cargo build --release --locked --bin sombrero\` (or run \`make image\`)"
for tool in ldd tar sha256sum; do
    command -v "$tool" >/dev/null || die "'$tool' not found (apt-get install libc-bin tar coreutils)"
done
certs=/etc/ssl/certs/ca-certificates.crt
[[ -f "$certs" ]] || die "$certs not found: apt-get install ca-certificates"
epoch="${SOURCE_DATE_EPOCH:-0}"
case "$(uname -m)" in
    x86_64) arch=amd64 ;;
    aarch64) arch=arm64 ;;
    *) die "unsupported machine $(uname -m) (x86_64 or aarch64)" ;;
esac

work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
rootfs="$work/rootfs"
mkdir -p "$rootfs"/{usr/local/bin,usr/lib,usr/lib64,etc/ssl/certs,tmp}
chmod 1777 "$rootfs/tmp"
install -m 0755 "$binary" "$rootfs/usr/local/bin/sombrero"
cp "$certs" "$rootfs/etc/ssl/certs/ca-certificates.crt"
# Debian's merged /usr: /lib and /lib64 point into /usr, so the loader path baked into the
# binary (/lib64/ld-linux-x86-64.so.2) and ldd's paths resolve inside the image too.
ln -s usr/lib "$rootfs/lib"
ln -s usr/lib64 "$rootfs/lib64"
# Every library ldd resolves, plus the loader; a static binary has none (ldd says so).
libs="$(ldd "$binary" 2>&1 || true)"
if grep -q 'not found' <<<"$libs"; then
    die "$binary needs libraries this machine lacks:"$'\n'"$libs"
fi
while read -r path; do
    [[ -n "$path" ]] || continue
    real="$(readlink -f "$path")"
    dest="$rootfs/usr${path#/usr}"
    mkdir -p "$(dirname "$dest")"
    cp "$real" "$dest"
done < <(grep -o '/[^ )]*' <<<"$libs" | sort -u)
cat >"$rootfs/etc/passwd" <<'EOF'
root:x:0:0:root:/root:/sbin/nologin
nonroot:x:65532:65532:nonroot:/home/nonroot:/sbin/nologin
EOF
cat >"$rootfs/etc/group" <<'EOF'
root:x:0:
nonroot:x:65532:
EOF
printf 'hosts: files dns\n' >"$rootfs/etc/nsswitch.conf"

rm -rf "$out"
mkdir -p "$out/blobs/sha256"
blob() { # blob <file> -> moves it into the layout, prints "<digest> <size>"
    local d s
    d="$(sha256sum "$1" | cut -d' ' -f1)"
    s="$(stat -c %s "$1")"
    mv "$1" "$out/blobs/sha256/$d"
    printf '%s %s\n' "$d" "$s"
}

tar --sort=name --mtime="@$epoch" --owner=0 --group=0 --numeric-owner --format=posix \
    --pax-option=exthdr.name=%d/PaxHeaders/%f,delete=atime,delete=ctime \
    -C "$rootfs" -cf "$work/layer.tar" .
diff_id="$(sha256sum "$work/layer.tar" | cut -d' ' -f1)"
layer_type=application/vnd.oci.image.layer.v1.tar
if [[ $gzip == 1 ]]; then
    gzip -n -9 "$work/layer.tar"
    mv "$work/layer.tar.gz" "$work/layer.tar"
    layer_type+="+gzip"
fi
read -r layer_digest layer_size < <(blob "$work/layer.tar")

created="$(date -u -d "@$epoch" +%Y-%m-%dT%H:%M:%SZ)"
# The runtime settings; keep in step with the Dockerfile (tests/integration/chart.rs compares them).
cat >"$work/config.json" <<EOF
{"architecture":"$arch","os":"linux","created":"$created","config":{"User":"65532:65532","Entrypoint":["/usr/local/bin/sombrero"],"Cmd":["controller"],"ExposedPorts":{"8080/tcp":{}},"Env":["PATH=/usr/local/bin:/usr/bin:/bin","SSL_CERT_FILE=/etc/ssl/certs/ca-certificates.crt"],"Labels":{"org.opencontainers.image.title":"sombrero","org.opencontainers.image.version":"$version"}},"rootfs":{"type":"layers","diff_ids":["sha256:$diff_id"]},"history":[{"created":"$created","created_by":"scripts/image.sh"}]}
EOF
read -r config_digest config_size < <(blob "$work/config.json")
cat >"$work/manifest.json" <<EOF
{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json","config":{"mediaType":"application/vnd.oci.image.config.v1+json","digest":"sha256:$config_digest","size":$config_size},"layers":[{"mediaType":"$layer_type","digest":"sha256:$layer_digest","size":$layer_size}]}
EOF
read -r manifest_digest manifest_size < <(blob "$work/manifest.json")
printf '{"imageLayoutVersion":"1.0.0"}\n' >"$out/oci-layout"
cat >"$out/index.json" <<EOF
{"schemaVersion":2,"mediaType":"application/vnd.oci.image.index.v1+json","manifests":[{"mediaType":"application/vnd.oci.image.manifest.v1+json","digest":"sha256:$manifest_digest","size":$manifest_size,"platform":{"architecture":"$arch","os":"linux"},"annotations":{"org.opencontainers.image.ref.name":"$tag"}}]}
EOF
if [[ -n "$archive" ]]; then
    mkdir -p "$(dirname "$archive")"
    tar --sort=name --mtime="@$epoch" --owner=0 --group=0 --numeric-owner -C "$out" -cf "$archive" .
    printf 'image: wrote %s\n' "$archive" >&2
fi
printf 'image: %s (%s, layer %s bytes) in %s\n' "$tag" "$layer_type" "$layer_size" "$out" >&2
printf 'sha256:%s\n' "$manifest_digest"

#!/usr/bin/env bash
# Build the real control-plane binaries the integration tests run against
# (kube-apiserver, kubectl, etcd), plus helm and sombrero-health (Argo CD Lua
# and Flux kstatus health), from the pinned Go modules in tests/tools/,
# into .cache/tools/bin/ under the repo root.
#
# A build is skipped when the binaries exist and the stamp next to them
# records the same sha256 of the module's go.mod/go.sum/*.go files and the
# same `go version`; a cached run needs neither network nor compilation.
#
# Usage: scripts/test-tools.sh            build or reuse, print the bin dir
#        TEST_TOOLS_FORCE=1 scripts/test-tools.sh   rebuild regardless
# The last line printed on success is the absolute bin directory.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
TOOLS="$ROOT/tests/tools"
BIN="$ROOT/.cache/tools/bin"

log() { printf 'test-tools: %s\n' "$*" >&2; }
die() { printf 'test-tools: error: %s\n' "$*" >&2; exit 1; }

if ! command -v go >/dev/null 2>&1; then
    die "'go' not found on PATH. Install Go >= 1.26 (the tarball from go.dev/dl unpacked
  into /usr/local/go with /usr/local/go/bin on PATH, or any Go >= 1.21 with the default
  GOTOOLCHAIN=auto, which fetches go1.26 from the Go module proxy), then rerun."
fi

# -mod=readonly: build exactly what go.mod/go.sum pin; never rewrite them.
# -buildvcs=false: don't stamp (or fail on) the enclosing git checkout.
# CGO_ENABLED=0 (below): static binaries, same result with or without a C compiler.
GO_BUILD_FLAGS=(-mod=readonly -buildvcs=false -trimpath)

mkdir -p "$BIN"
# Serialise concurrent runs (e.g. parallel test binaries calling this script).
if command -v flock >/dev/null 2>&1; then
    exec 9>"$BIN/.lock"
    flock 9
fi

now_ms() { date +%s%3N; }

# build_module <module dir under tests/tools> <extra -ldflags> <binary>=<package> ...
build_module() {
    local mod="$1" ldflags="-s -w $2"; shift 2
    local dir="$TOOLS/$mod"
    local stamp="$BIN/.$mod.stamp"
    local want have="" missing=0 spec name pkg start took tmp
    local -a names=() pkgs=()
    for spec in "$@"; do
        names+=("${spec%%=*}")
        pkgs+=("${spec#*=}")
    done

    # Inputs: go.mod, go.sum, every .go file of the module, the build flags and
    # the toolchain (`go version` inside the module, where GOTOOLCHAIN applies).
    want="$(
        cd "$dir"
        {
            go version
            printf 'CGO_ENABLED=0 %s -ldflags=%s\n' "${GO_BUILD_FLAGS[*]}" "$ldflags"
            find . -name '*.go' -o -name go.mod -o -name go.sum | LC_ALL=C sort | xargs sha256sum
        } | sha256sum | cut -d' ' -f1
    )"
    [[ -f "$stamp" ]] && have="$(cat "$stamp")"
    for name in "${names[@]}"; do
        [[ -x "$BIN/$name" ]] || missing=1
    done
    if [[ "${TEST_TOOLS_FORCE:-}" != 1 && $missing == 0 && "$have" == "$want" ]]; then
        log "reused ${names[*]} (tests/tools/$mod, stamp matches)"
        return
    fi

    log "building ${names[*]} from tests/tools/$mod ($(cd "$dir" && go version)); a cold build takes minutes..."
    start="$(now_ms)"
    tmp="$(mktemp -d "$BIN/.build.XXXXXX")"
    if ! (cd "$dir" && GOWORK=off CGO_ENABLED=0 nice go build "${GO_BUILD_FLAGS[@]}" \
            -ldflags="$ldflags" -o "$tmp/" "${pkgs[@]}"); then
        rm -rf "$tmp"
        die "go build failed in tests/tools/$mod (see output above)"
    fi
    for i in "${!names[@]}"; do
        # go build -o dir/ names each binary after the last path element of its package.
        mv -f "$tmp/$(basename "${pkgs[$i]}")" "$BIN/${names[$i]}"
    done
    rm -rf "$tmp"
    printf '%s\n' "$want" >"$stamp"
    took=$(( $(now_ms) - start ))
    log "built ${names[*]} in $((took / 1000)).$(printf '%03d' $((took % 1000)))s"
}

total_start="$(now_ms)"
build_module etcd "" etcd=./cmd/etcd

# Stamp the Kubernetes version into the binaries as the release build does;
# otherwise /version and `kubectl version` say "v0.0.0-master+$Format:%H$",
# which kubectl (and version parsers) reject.
K8S_VERSION="$(awk '$1 == "k8s.io/kubernetes" { print $2; exit }' "$TOOLS/k8s/go.mod")"
[[ "$K8S_VERSION" =~ ^v([0-9]+)\.([0-9]+)\. ]] || die "cannot read the k8s.io/kubernetes version from tests/tools/k8s/go.mod"
K8S_LDFLAGS=""
for pkg in k8s.io/component-base/version k8s.io/client-go/pkg/version; do
    K8S_LDFLAGS+=" -X $pkg.gitVersion=$K8S_VERSION -X $pkg.gitMajor=${BASH_REMATCH[1]}"
    K8S_LDFLAGS+=" -X $pkg.gitMinor=${BASH_REMATCH[2]} -X $pkg.gitTreeState=clean"
done
build_module k8s "$K8S_LDFLAGS" kube-apiserver=./cmd/kube-apiserver kubectl=./cmd/kubectl

# helm (tests/integration/chart.rs): built from its own cmd/helm through go.mod's `tool`
# directive (a main package cannot be imported). As helm's release Makefile
# does, stamp its version, and the Kubernetes version `helm template`/`lint`
# assume without a cluster (the test apiserver's, instead of helm's 1.20).
HELM_VERSION="$(awk '$1 == "helm.sh/helm/v3" { print $2; exit }' "$TOOLS/helm/go.mod")"
[[ -n "$HELM_VERSION" ]] || die "cannot read the helm.sh/helm/v3 version from tests/tools/helm/go.mod"
[[ "$K8S_VERSION" =~ ^v([0-9]+)\.([0-9]+)\. ]]
HELM_LDFLAGS="-X helm.sh/helm/v3/internal/version.version=$HELM_VERSION -X helm.sh/helm/v3/internal/version.gitTreeState=clean"
for pkg in helm.sh/helm/v3/pkg/chartutil helm.sh/helm/v3/pkg/lint/rules; do
    HELM_LDFLAGS+=" -X $pkg.k8sVersionMajor=${BASH_REMATCH[1]} -X $pkg.k8sVersionMinor=${BASH_REMATCH[2]}"
done
build_module helm "$HELM_LDFLAGS" helm=helm.sh/helm/v3/cmd/helm
# Argo CD Lua health scripts (gopher-lua) and Flux's kstatus (tests/integration/health.rs).
build_module health "" sombrero-health=./cmd/sombrero-health
took=$(( $(now_ms) - total_start ))
log "done in $((took / 1000)).$(printf '%03d' $((took % 1000)))s; binaries in $BIN"
echo "$BIN"

#!/usr/bin/env bash
# Start a throw-away Kubernetes control plane (etcd + kube-apiserver, no
# controllers, no nodes) on loopback, the way controller-runtime's envtest
# does, and write an admin kubeconfig. Everything lives in one temp dir that
# is removed on exit / Ctrl-C.
#
# Usage:
#   scripts/dev-apiserver.sh           run in the foreground until Ctrl-C
#   scripts/dev-apiserver.sh --smoke   start, wait for /readyz, `kubectl get ns`, stop
#
# Binaries come from scripts/test-tools.sh (.cache/tools/bin/) unless
# TEST_ASSET_ETCD / TEST_ASSET_KUBE_APISERVER / TEST_ASSET_KUBECTL point
# elsewhere (same variable names as envtest).
# DEV_APISERVER_KUBECONFIG=<path>: also copy the kubeconfig there.
# DEV_APISERVER_KEEP=1: keep the temp dir (certs, logs, etcd data) on exit.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
MODE=run
case "${1:-}" in
    "") ;;
    --smoke) MODE=smoke ;;
    -h|--help) sed -n '2,16p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "dev-apiserver: unknown argument '$1' (try --help)" >&2; exit 2 ;;
esac

log() { printf 'dev-apiserver: %s\n' "$*" >&2; }
die() { printf 'dev-apiserver: error: %s\n' "$*" >&2; exit 1; }
now_ms() { date +%s%3N; }

for tool in openssl curl; do
    command -v "$tool" >/dev/null 2>&1 || die "'$tool' not found (apt-get install $tool)"
done

if [[ -z "${TEST_ASSET_ETCD:-}" || -z "${TEST_ASSET_KUBE_APISERVER:-}" || -z "${TEST_ASSET_KUBECTL:-}" ]]; then
    BIN="$("$ROOT/scripts/test-tools.sh" | tail -n1)"
fi
ETCD="${TEST_ASSET_ETCD:-$BIN/etcd}"
APISERVER="${TEST_ASSET_KUBE_APISERVER:-$BIN/kube-apiserver}"
KUBECTL="${TEST_ASSET_KUBECTL:-$BIN/kubectl}"

DIR="$(mktemp -d "${TMPDIR:-/tmp}/sombrero-apiserver.XXXXXX")"
ETCD_PID=""
API_PID=""

stop_pid() { # stop_pid <pid>: SIGTERM, wait up to 10 s, then SIGKILL
    local pid="$1" i
    [[ -n "$pid" ]] && kill -0 "$pid" 2>/dev/null || return 0
    kill -TERM "$pid" 2>/dev/null || true
    for i in $(seq 100); do
        kill -0 "$pid" 2>/dev/null || break
        sleep 0.1
    done
    kill -KILL "$pid" 2>/dev/null || true
    wait "$pid" 2>/dev/null || true
}
cleanup() {
    local rc=$?
    trap - EXIT INT TERM
    stop_pid "$API_PID"
    stop_pid "$ETCD_PID"
    if [[ "${DEV_APISERVER_KEEP:-}" == 1 ]]; then
        log "kept $DIR"
    else
        rm -rf "$DIR"
    fi
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# A free loopback TCP port: random in 20000-59999, nothing listening on it, not yet handed out.
USED_PORTS=" "
free_port() {
    local p
    while :; do
        p=$(( (RANDOM * 32768 + RANDOM) % 40000 + 20000 ))
        [[ "$USED_PORTS" == *" $p "* ]] && continue
        if ! (exec 3<>"/dev/tcp/127.0.0.1/$p") 2>/dev/null; then
            USED_PORTS+="$p "
            echo "$p"
            return
        fi
    done
}
ETCD_CLIENT_PORT="$(free_port)"; USED_PORTS+="$ETCD_CLIENT_PORT "
ETCD_PEER_PORT="$(free_port)"; USED_PORTS+="$ETCD_PEER_PORT "
API_PORT="$(free_port)"

# --- certificates -------------------------------------------------------------
# One CA signs the serving cert and the admin client cert; a separate RSA key
# pair signs service-account tokens.
PKI="$DIR/pki"
mkdir -p "$PKI"
(
    cd "$PKI"
    openssl ecparam -name prime256v1 -genkey -noout -out ca.key
    openssl req -x509 -new -sha256 -key ca.key -subj "/CN=sombrero-test-ca" -days 7 -out ca.crt \
        -config <(printf '[req]\ndistinguished_name=dn\nx509_extensions=ext\n[dn]\n[ext]\nbasicConstraints=critical,CA:TRUE\nkeyUsage=critical,keyCertSign,cRLSign,digitalSignature\nsubjectKeyIdentifier=hash\n')

    # sign <name> <subject> <extensions>
    sign() {
        openssl ecparam -name prime256v1 -genkey -noout -out "$1.key"
        openssl req -new -sha256 -key "$1.key" -subj "$2" -out "$1.csr"
        openssl x509 -req -sha256 -in "$1.csr" -CA ca.crt -CAkey ca.key -CAcreateserial -days 7 \
            -out "$1.crt" -extfile <(printf '%b' "$3") 2>/dev/null
        rm -f "$1.csr"
    }
    sign apiserver "/CN=kube-apiserver" \
        'basicConstraints=critical,CA:FALSE\nkeyUsage=critical,digitalSignature,keyEncipherment\nextendedKeyUsage=serverAuth\nsubjectAltName=DNS:localhost,IP:127.0.0.1\n'
    sign admin "/O=system:masters/CN=admin" \
        'basicConstraints=critical,CA:FALSE\nkeyUsage=critical,digitalSignature,keyEncipherment\nextendedKeyUsage=clientAuth\n'

    openssl genrsa -out sa.key 2048 2>/dev/null
    openssl rsa -in sa.key -pubout -out sa.pub 2>/dev/null
)

# --- etcd -----------------------------------------------------------------------
ETCD_URL="http://127.0.0.1:$ETCD_CLIENT_PORT"
start_ms="$(now_ms)"
"$ETCD" \
    --data-dir="$DIR/etcd" \
    --listen-client-urls="$ETCD_URL" \
    --advertise-client-urls="$ETCD_URL" \
    --listen-peer-urls="http://127.0.0.1:$ETCD_PEER_PORT" \
    --unsafe-no-fsync=true \
    >"$DIR/etcd.log" 2>&1 &
ETCD_PID=$!

wait_for() { # wait_for <what> <pid> <timeout s> <command...>
    local what="$1" pid="$2" deadline=$(( $(now_ms) + $3 * 1000 ))
    shift 3
    until "$@" >/dev/null 2>&1; do
        kill -0 "$pid" 2>/dev/null || die "$what exited early; log: $DIR/$what.log
$(tail -n 20 "$DIR/$what.log")"
        (( $(now_ms) < deadline )) || die "$what not ready in time; log: $DIR/$what.log"
        sleep 0.1
    done
}
wait_for etcd "$ETCD_PID" 30 curl -fsS "$ETCD_URL/health"
etcd_ms=$(( $(now_ms) - start_ms ))

# --- kube-apiserver -----------------------------------------------------------------
API_URL="https://127.0.0.1:$API_PORT"
start_ms="$(now_ms)"
"$APISERVER" \
    --etcd-servers="$ETCD_URL" \
    --tls-cert-file="$PKI/apiserver.crt" \
    --tls-private-key-file="$PKI/apiserver.key" \
    --secure-port="$API_PORT" \
    --bind-address=127.0.0.1 \
    --service-cluster-ip-range=10.0.0.0/24 \
    --allow-privileged=true \
    --disable-admission-plugins=ServiceAccount \
    --authorization-mode=RBAC \
    --service-account-issuer="$API_URL/" \
    --service-account-key-file="$PKI/sa.pub" \
    --service-account-signing-key-file="$PKI/sa.key" \
    --client-ca-file="$PKI/ca.crt" \
    >"$DIR/kube-apiserver.log" 2>&1 &
API_PID=$!
wait_for kube-apiserver "$API_PID" 60 curl -fsS --cacert "$PKI/ca.crt" \
    --cert "$PKI/admin.crt" --key "$PKI/admin.key" "$API_URL/readyz"
api_ms=$(( $(now_ms) - start_ms ))

# --- kubeconfig ---------------------------------------------------------------------
b64() { base64 -w0 <"$1"; }
KUBECONFIG_FILE="$DIR/kubeconfig"
cat >"$KUBECONFIG_FILE" <<EOF
apiVersion: v1
kind: Config
clusters:
- name: sombrero-test
  cluster:
    server: $API_URL
    certificate-authority-data: $(b64 "$PKI/ca.crt")
users:
- name: admin
  user:
    client-certificate-data: $(b64 "$PKI/admin.crt")
    client-key-data: $(b64 "$PKI/admin.key")
contexts:
- name: sombrero-test
  context:
    cluster: sombrero-test
    user: admin
current-context: sombrero-test
EOF
chmod 600 "$KUBECONFIG_FILE"
if [[ -n "${DEV_APISERVER_KUBECONFIG:-}" ]]; then
    cp "$KUBECONFIG_FILE" "$DEV_APISERVER_KUBECONFIG"
fi

log "etcd ready in ${etcd_ms} ms ($ETCD_URL), kube-apiserver /readyz in ${api_ms} ms ($API_URL)"

if [[ "$MODE" == smoke ]]; then
    "$KUBECTL" --kubeconfig "$KUBECONFIG_FILE" get ns
    log "smoke test passed"
    exit 0
fi

log "logs: $DIR/{etcd,kube-apiserver}.log"
log "export KUBECONFIG=${DEV_APISERVER_KUBECONFIG:-$KUBECONFIG_FILE}   (Ctrl-C stops and removes everything)"
set +e
wait -n "$ETCD_PID" "$API_PID"
tail -n 20 "$DIR/etcd.log" "$DIR/kube-apiserver.log" >&2
die "a control-plane process exited unexpectedly (logs above; DEV_APISERVER_KEEP=1 keeps $DIR)"

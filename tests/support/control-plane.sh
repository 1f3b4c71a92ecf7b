#!/usr/bin/env bash
# Runs etcd + kube-apiserver for the tests, and tears both down (and deletes $CP_DIR) when stdin
# closes: the test process holds our stdin, so however it ends, nothing is leaked.
# Inputs (env; prefixed CP_ because etcd reads every ETCD_* variable): CP_ETCD, CP_APISERVER,
# CP_DIR (with pki/ filled by the caller), CP_ADDR, CP_ETCD_PORT, CP_PEER_PORT, CP_API_PORT.
set -u
cd "$CP_DIR"
"$CP_ETCD" \
  --name=test --data-dir="$CP_DIR/etcd" \
  --listen-client-urls="http://$CP_ADDR:$CP_ETCD_PORT" --advertise-client-urls="http://$CP_ADDR:$CP_ETCD_PORT" \
  --listen-peer-urls="http://$CP_ADDR:$CP_PEER_PORT" --initial-advertise-peer-urls="http://$CP_ADDR:$CP_PEER_PORT" \
  --initial-cluster="test=http://$CP_ADDR:$CP_PEER_PORT" \
  --unsafe-no-fsync=true --log-level=warn >"$CP_DIR/etcd.log" 2>&1 &
etcd_pid=$!
"$CP_APISERVER" \
  --etcd-servers="http://$CP_ADDR:$CP_ETCD_PORT" \
  --bind-address="$CP_ADDR" --secure-port="$CP_API_PORT" \
  --tls-cert-file="$CP_DIR/pki/serving.crt" --tls-private-key-file="$CP_DIR/pki/serving.key" \
  --client-ca-file="$CP_DIR/pki/ca.crt" \
  --service-cluster-ip-range=10.0.0.0/24 --allow-privileged=true \
  --disable-admission-plugins=ServiceAccount --authorization-mode=RBAC \
  --service-account-issuer="https://$CP_ADDR:$CP_API_PORT/" \
  --service-account-key-file="$CP_DIR/pki/sa.pub" \
  --service-account-signing-key-file="$CP_DIR/pki/sa.key" \
  --enable-priority-and-fairness=false \
  >"$CP_DIR/apiserver.log" 2>&1 &
api_pid=$!
cleanup() {
  # SIGKILL: a graceful apiserver shutdown can hang once etcd is gone, and tests keep no state.
  kill -KILL "$api_pid" "$etcd_pid" 2>/dev/null
  wait "$api_pid" "$etcd_pid" 2>/dev/null
  rm -rf "$CP_DIR"
}
trap cleanup EXIT TERM INT
# Block until the test process goes away (EOF on stdin), or a server dies.
while read -r -t 1 _ || [ $? -gt 128 ]; do
  kill -0 "$api_pid" 2>/dev/null && kill -0 "$etcd_pid" 2>/dev/null || {
    echo "control plane process exited; logs:" >&2
    tail -n 30 "$CP_DIR/etcd.log" "$CP_DIR/apiserver.log" >&2
    exit 1
  }
done

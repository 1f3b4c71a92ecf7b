#!/usr/bin/env bash
# Runs etcd + kube-apiserver for the tests, and tears both down (and deletes $DIR) when stdin
# closes: the test process holds our stdin, so however it ends, nothing is leaked.
# Inputs (env): ETCD, KUBE_APISERVER, DIR (with pki/ filled by the caller), ADDR, ETCD_PORT,
# PEER_PORT, API_PORT.
set -u
cd "$DIR"
"$ETCD" \
  --name=test --data-dir="$DIR/etcd" \
  --listen-client-urls="http://$ADDR:$ETCD_PORT" --advertise-client-urls="http://$ADDR:$ETCD_PORT" \
  --listen-peer-urls="http://$ADDR:$PEER_PORT" --initial-advertise-peer-urls="http://$ADDR:$PEER_PORT" \
  --initial-cluster="test=http://$ADDR:$PEER_PORT" \
  --unsafe-no-fsync=true --log-level=warn >"$DIR/etcd.log" 2>&1 &
etcd_pid=$!
"$KUBE_APISERVER" \
  --etcd-servers="http://$ADDR:$ETCD_PORT" \
  --bind-address="$ADDR" --secure-port="$API_PORT" \
  --tls-cert-file="$DIR/pki/serving.crt" --tls-private-key-file="$DIR/pki/serving.key" \
  --client-ca-file="$DIR/pki/ca.crt" \
  --service-cluster-ip-range=10.0.0.0/24 --allow-privileged=true \
  --disable-admission-plugins=ServiceAccount --authorization-mode=RBAC \
  --service-account-issuer="https://$ADDR:$API_PORT/" \
  --service-account-key-file="$DIR/pki/sa.key" \
  --service-account-signing-key-file="$DIR/pki/sa.key" \
  --enable-priority-and-fairness=false \
  >"$DIR/apiserver.log" 2>&1 &
api_pid=$!
cleanup() {
  kill "$api_pid" "$etcd_pid" 2>/dev/null
  wait "$api_pid" "$etcd_pid" 2>/dev/null
  rm -rf "$DIR"
}
trap cleanup EXIT TERM INT
# Block until the test process goes away (EOF on stdin), or a server dies.
while read -r -t 1 _ || [ $? -gt 128 ]; do
  kill -0 "$api_pid" 2>/dev/null && kill -0 "$etcd_pid" 2>/dev/null || {
    echo "control plane process exited; logs:" >&2
    tail -n 30 "$DIR/etcd.log" "$DIR/apiserver.log" >&2
    exit 1
  }
done

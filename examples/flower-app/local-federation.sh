#!/usr/bin/env bash
# A whole Flower federation on this machine: one SuperLink and N SuperNodes on 127.0.0.1 (free
# ports), each node holding one partition; runs this app on it with `flwr run`, then stops every
# process it started. Everything it writes goes to a work folder (default: a new temp folder).
#
#   examples/flower-app/local-federation.sh [--nodes N] [--tls] [--data DIR] [--work DIR] [--]
#                                           [flwr run options]
#
#   --nodes N   number of SuperNodes = task.num_clients (default 2)
#   --data DIR  node-local data: node k reads only DIR/site<k> (node config data-path), its
#               client's files in a format floral reads (docs/deploy.md, "Node-local data")
#   --tls       TLS on every connection and SuperNode authentication: makes a CA, a SuperLink
#               certificate for 127.0.0.1 and one EC key pair per node, and registers the nodes'
#               public keys with `flwr supernode register` before they connect
#   after --     passed to `flwr run`, e.g. --run-config 'train.rounds=20'
#
# Needs: pip install 'floral-lora[flower]' (and openssl, ssh-keygen for --tls).
set -euo pipefail

APP="$(cd "$(dirname "$0")" && pwd)"
NODES=2
TLS=0
WORK=""
DATA=""
while [[ $# -gt 0 ]]; do
  case "$1" in
    --nodes) NODES="$2"; shift 2 ;;
    --tls) TLS=1; shift ;;
    --work) WORK="$2"; shift 2 ;;
    --data) DATA="$(cd "$2" && pwd)"; shift 2 ;;
    --) shift; break ;;
    *) break ;;
  esac
done
WORK="${WORK:-$(mktemp -d -t floral-federation-XXXXXX)}"
mkdir -p "$WORK/flwr-home" "$WORK/logs"
export FLWR_HOME="$WORK/flwr-home" FLWR_TELEMETRY_ENABLED=0 FLWR_DISABLE_UPDATE_CHECK=1

PIDS=()
stop_all() {  # each process leads its own group: stop it and the app processes it started
  for pid in "${PIDS[@]}"; do kill -TERM -- "-$pid" 2>/dev/null || true; done
  for pid in "${PIDS[@]}"; do wait "$pid" 2>/dev/null || true; done
}
trap stop_all EXIT

free_port() {
  python -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

wait_for_port() {  # port, log file
  for _ in $(seq 1 600); do
    if python -c "import socket,sys; sys.exit(socket.socket().connect_ex(('127.0.0.1', $1)))"; then
      return 0
    fi
    sleep 0.2
  done
  echo "nothing listens on 127.0.0.1:$1; see $2" >&2
  exit 1
}

make_credentials() {  # a CA, the SuperLink's certificate for 127.0.0.1, one key pair per node
  local c="$WORK/credentials"
  mkdir -p "$c"
  openssl req -x509 -newkey rsa:3072 -nodes -days 30 -subj "/CN=floral test CA" \
    -keyout "$c/ca.key" -out "$c/ca.crt" 2>/dev/null
  openssl req -newkey rsa:3072 -nodes -subj "/CN=127.0.0.1" \
    -keyout "$c/server.key" -out "$c/server.csr" 2>/dev/null
  printf 'subjectAltName=IP:127.0.0.1,DNS:localhost\n' > "$c/san.ext"
  openssl x509 -req -in "$c/server.csr" -CA "$c/ca.crt" -CAkey "$c/ca.key" -CAcreateserial \
    -days 30 -extfile "$c/san.ext" -out "$c/server.pem" 2>/dev/null
  for ((k = 0; k < NODES; k++)); do
    ssh-keygen -q -t ecdsa -b 384 -N "" -C "floral-node-$k" -f "$c/node$k"
  done
}

LINK_PORT="$(free_port)"
if [[ $TLS == 1 ]]; then
  make_credentials
  C="$WORK/credentials"
  LINK_SECURITY=(--ssl-ca-certfile "$C/ca.crt" --ssl-certfile "$C/server.pem"
                 --ssl-keyfile "$C/server.key" --enable-supernode-auth)
  CONNECTION="root-certificates = \"$C/ca.crt\""
else
  LINK_SECURITY=(--insecure)
  CONNECTION="insecure = true"
fi

echo "work folder: $WORK"
echo "+ flower-superlink ${LINK_SECURITY[*]} --host 127.0.0.1 --port $LINK_PORT" \
  "--disable-runtime-dependency-installation"
setsid flower-superlink "${LINK_SECURITY[@]}" --host 127.0.0.1 --port "$LINK_PORT" \
  --disable-runtime-dependency-installation > "$WORK/logs/superlink.log" 2>&1 &
PIDS+=($!)
wait_for_port "$LINK_PORT" "$WORK/logs/superlink.log"

cat > "$FLWR_HOME/config.toml" <<EOF
[superlink]
default = "local-federation"

[superlink.local-federation]
address = "127.0.0.1:$LINK_PORT"
$CONNECTION
EOF

for ((k = 0; k < NODES; k++)); do
  NODE_PORT="$(free_port)"
  if [[ $TLS == 1 ]]; then
    echo "+ flwr supernode register $C/node$k.pub local-federation"
    flwr supernode register "$C/node$k.pub" local-federation
    NODE_SECURITY=(--root-certificates "$C/ca.crt" --auth-supernode-private-key "$C/node$k")
  else
    NODE_SECURITY=(--insecure)
  fi
  NODE_CONFIG="partition-id=$k num-partitions=$NODES state-dir=\"$WORK/node$k-state\" audit-file=\"$WORK/logs/node$k-audit.jsonl\""
  if [[ -n $DATA ]]; then
    NODE_CONFIG="partition-id=$k data-path=\"$DATA/site$k\" state-dir=\"$WORK/node$k-state\" audit-file=\"$WORK/logs/node$k-audit.jsonl\""
  fi
  echo "+ flower-supernode ${NODE_SECURITY[*]} --superlink 127.0.0.1:$LINK_PORT" \
    "--host 127.0.0.1 --port $NODE_PORT --node-config '$NODE_CONFIG'"
  setsid flower-supernode "${NODE_SECURITY[@]}" --superlink "127.0.0.1:$LINK_PORT" \
    --host 127.0.0.1 --port "$NODE_PORT" --node-config "$NODE_CONFIG" \
    > "$WORK/logs/supernode$k.log" 2>&1 &
  PIDS+=($!)
  wait_for_port "$NODE_PORT" "$WORK/logs/supernode$k.log"
done

RUN_CONFIG="task.num_clients=$NODES output.dir=\"$WORK/results\""
echo "+ flwr run $APP local-federation --run-config '$RUN_CONFIG' $* --stream"
flwr run "$APP" local-federation --run-config "$RUN_CONFIG" "$@" --stream
echo "results: $WORK/results"

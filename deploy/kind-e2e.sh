#!/usr/bin/env bash
# End-to-end test on kind: a cluster without kube-proxy, service-agent as a
# DaemonSet, and a ClusterIP Service reached by name from a pod. Nothing else
# serves Services in that cluster, CoreDNS included (it reaches the API server
# through the `kubernetes` ClusterIP), so a passing run means the agent did.
#
# Needs docker and kind (and kubectl). Run from anywhere:
#   deploy/kind-e2e.sh
# Environment:
#   KEEP_CLUSTER=1   keep the cluster at the end (deleted by default)
#   CLUSTER_NAME     kind cluster name (default service-lb-e2e)
#   TIMEOUT          wait for each rollout this long (default 180s)
set -euo pipefail

CLUSTER=${CLUSTER_NAME:-service-lb-e2e}
TIMEOUT=${TIMEOUT:-180s}
IMAGE=service-agent:dev
AGNHOST=registry.k8s.io/e2e-test-images/agnhost:2.45
URL=http://echo.default.svc.cluster.local/hostname
REQUESTS=30
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
DEPLOY=$ROOT/deploy

log() { printf '\n== %s\n' "$*"; }
die() {
    printf 'error: %s\n' "$*" >&2
    exit 1
}
need() {
    command -v "$1" >/dev/null 2>&1 || die "$1 is required but not found in PATH; install it: $2"
}
# kubectl against the test cluster only, whatever the current context is.
k() { kubectl --context "kind-$CLUSTER" "$@"; }

need docker "https://docs.docker.com/engine/install/"
need kind "https://kind.sigs.k8s.io/docs/user/quick-start/#installation"
need kubectl "https://kubernetes.io/docs/tasks/tools/"
docker info >/dev/null 2>&1 ||
    die "docker is installed but its daemon is not reachable (is it running, may this user use it?)"
if kind get clusters 2>/dev/null | grep -qx "$CLUSTER"; then
    die "a kind cluster named $CLUSTER already exists; delete it first: kind delete cluster --name $CLUSTER"
fi

cleanup() {
    local status=$?
    if [[ $status -ne 0 ]]; then
        printf '\n== FAILED (exit %s); cluster state:\n' "$status" >&2
        k get nodes -o wide >&2 || true
        k get pods -A -o wide >&2 || true
        k -n kube-system logs daemonset/service-agent --tail=100 >&2 || true
    fi
    if [[ ${KEEP_CLUSTER:-0} == 1 ]]; then
        log "keeping cluster $CLUSTER (kubectl --context kind-$CLUSTER; delete: kind delete cluster --name $CLUSTER)"
    else
        log "deleting cluster $CLUSTER"
        kind delete cluster --name "$CLUSTER" || true
    fi
    exit "$status"
}

log "building image $IMAGE (deploy/Dockerfile)"
(cd "$ROOT" && docker build -f deploy/Dockerfile -t "$IMAGE" .)

log "creating kind cluster $CLUSTER without kube-proxy"
trap cleanup EXIT
kind create cluster --name "$CLUSTER" --config "$DEPLOY/kind-config.yaml"

# The pinned maps must live on the node's bpffs (the agent's container cannot
# propagate a mount of its own to the host without being privileged).
log "mounting bpffs on the nodes"
for node in $(kind get nodes --name "$CLUSTER"); do
    docker exec "$node" sh -c \
        'mountpoint -q /sys/fs/bpf || mount -t bpf bpf /sys/fs/bpf; mount --make-shared /sys/fs/bpf'
done

log "loading $IMAGE into the nodes"
kind load docker-image "$IMAGE" --name "$CLUSTER"

log "deploying service-agent"
k apply -f "$DEPLOY/serviceaccount.yaml" \
    -f "$DEPLOY/clusterrole.yaml" \
    -f "$DEPLOY/clusterrolebinding.yaml"
# The agent cannot reach the API server through the `kubernetes` ClusterIP it
# is about to serve: point it at the control-plane node directly.
apiserver=$(k get node "$CLUSTER-control-plane" \
    -o jsonpath='{.status.addresses[?(@.type=="InternalIP")].address}')
[[ -n $apiserver ]] || die "cannot find the control-plane node's InternalIP"
kubectl set env --local -f "$DEPLOY/daemonset.yaml" -o yaml \
    KUBERNETES_SERVICE_HOST="$apiserver" KUBERNETES_SERVICE_PORT=6443 |
    k apply -f -
k -n kube-system rollout status daemonset/service-agent --timeout="$TIMEOUT"

log "waiting for the nodes and CoreDNS (which needs the agent)"
k wait --for=condition=Ready nodes --all --timeout="$TIMEOUT"
k -n kube-system rollout status deployment/coredns --timeout="$TIMEOUT"

log "deploying the echo Service (3 agnhost netexec replicas)"
k apply -f - <<YAML
apiVersion: apps/v1
kind: Deployment
metadata:
  name: echo
  namespace: default
spec:
  replicas: 3
  selector:
    matchLabels:
      app: echo
  template:
    metadata:
      labels:
        app: echo
    spec:
      containers:
        - name: netexec
          image: $AGNHOST
          args: [netexec, --http-port=8080]
          ports:
            - name: http
              containerPort: 8080
          readinessProbe:
            httpGet:
              path: /healthz
              port: 8080
            periodSeconds: 2
---
apiVersion: v1
kind: Service
metadata:
  name: echo
  namespace: default
spec:
  type: ClusterIP
  selector:
    app: echo
  ports:
    - name: http
      protocol: TCP
      port: 80
      targetPort: 8080
YAML
k rollout status deployment/echo --timeout="$TIMEOUT"

log "starting the client pod"
k run client --image="$AGNHOST" --restart=Never -- pause
k wait --for=condition=Ready pod/client --timeout="$TIMEOUT"

log "fetching $URL $REQUESTS times from the client pod"
# The loop runs in the pod: $i and the positional parameters are the pod
# shell's, hence the single quotes.
# shellcheck disable=SC2016
answers=$(k exec client -- sh -c '
    i=0
    while [ "$i" -lt "$1" ]; do
        curl -sS --max-time 5 "$2" || printf FAILED
        echo
        i=$((i + 1))
    done' sh "$REQUESTS" "$URL")

failed=$(grep -c '^FAILED$' <<<"$answers" || true)
hostnames=$(grep -v -e '^FAILED$' -e '^$' <<<"$answers" | sort | uniq -c || true)
distinct=$(grep -c . <<<"$hostnames" || true)

log "summary"
echo "requests: $REQUESTS, failed: $failed, distinct backends: $distinct"
echo "answers per backend:"
echo "$hostnames"
echo "agent's view (service-agent list on one node):"
k -n kube-system exec daemonset/service-agent -- service-agent list || true

if ((distinct < 2)); then
    die "expected answers from at least 2 distinct backends, got $distinct"
fi
log "PASS: $distinct backends answered through the ClusterIP"

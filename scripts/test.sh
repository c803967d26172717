#!/usr/bin/env bash
# The whole test suite, as CI runs it (make test):
#   1. go test -race ./... — unit tests, and integration tests against real
#      peers (rpcbind, rpcinfo, Ganesha, the nlmpeer probe) that run in
#      private network namespaces. NLMHA_REQUIRE_PEERS=1 turns a missing peer
#      into a failure rather than a skip, so nothing is silently left out.
#   2. the real Linux kernel client (QEMU) against nlmd (NLM and NSM):
#      basic, procs, twoclients, notify (a client reboots) and restart
#      (nlmd is killed and restarted; clients reclaim).
# Namespaces, port 111 and QEMU networking need root: without it, the runs
# go through sudo.
set -euo pipefail
cd "$(dirname "$0")/.."
export NLMHA_REQUIRE_PEERS=1
export NLMHA_SHARED_TOOLS=${NLMHA_SHARED_TOOLS:-$(cd .. && pwd)/shared/tools}
sudo=()
if [ "$(id -u)" -ne 0 ]; then
	sudo=(sudo --preserve-env=NLMHA_REQUIRE_PEERS,NLMHA_SHARED_TOOLS,GOPATH,GOCACHE,GOMODCACHE,GOFLAGS,HOME env "PATH=$PATH")
fi
echo "== go test -race ./..."
"${sudo[@]}" go test -race -count=1 -timeout 30m ./...
echo "== kernel client scenarios"
go build -o bin/ ./cmd/...
go build -o bin/etcd-server ./internal/etcdtest/etcdserver
# shellcheck disable=SC2086 # KERNEL_SCENARIOS is a list; empty = run.sh's default set
"${sudo[@]}" integration/kernelclient/run.sh ${KERNEL_SCENARIOS:-}

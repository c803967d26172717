#!/usr/bin/env bash
# The whole test suite, as CI runs it (make test). Tests that need real
# peers fail rather than skip when NLMHA_REQUIRE_PEERS=1, so nothing is
# silently left out. Namespaces and port 111 need root: without it, the
# go test run goes through sudo.
set -euo pipefail
cd "$(dirname "$0")/.."
export NLMHA_REQUIRE_PEERS=1
sudo=()
if [ "$(id -u)" -ne 0 ]; then
	sudo=(sudo --preserve-env=NLMHA_REQUIRE_PEERS,GOPATH,GOCACHE,GOMODCACHE,GOFLAGS,HOME env "PATH=$PATH")
fi
"${sudo[@]}" go test -race -count=1 -timeout 20m ./...

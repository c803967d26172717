# nlmha — see README.md. The two commands a fresh Debian machine needs:
#   make run    build nlmd and start it on loopback with its embedded defaults
#   make test   install what the tests need, then pass them (CI runs this)

GO         ?= go
FUZZTIME   ?= 10s
COUNT      ?= 5
REPEAT     ?= 1
DURATION   ?= 10
STATICCHECK = honnef.co/go/tools/cmd/staticcheck@v0.8.2
# Debian packages the tests start for real: rpcbind/rpcinfo for the
# portmapper interop, nfs-common for rpc.statd and sm-notify (NSM interop),
# iproute2 and util-linux for private network namespaces, resource-agents
# (ocf-tester) and libxml2-utils (its xmllint) for the Pacemaker agent,
# systemd (systemd-analyze) to check the unit.
# The peer tools beside the repository install what they need themselves
# (nlmpeer: libnfs, Ganesha, nfs-common; kernel-client: QEMU and friends).
TEST_DEBS   = rpcbind nfs-common iproute2 util-linux resource-agents libxml2-utils systemd strace
SHARED     ?= $(abspath ../shared)
NLMPEER     = $(SHARED)/tools/nlmpeer

.PHONY: all build run test deps lint unit bench bench-baseline fuzz soak clean install

all: build

build:
	$(GO) build -o bin/ ./cmd/...

# On loopback: the system rpcbind if one runs, else nlmd's own portmapper
# (port 111 needs root; without it nlmd serves and says so). As root the
# state lives in /var/lib/nlmha, otherwise in cache/state.
ROOT       := $(filter 0,$(shell id -u))
RUN_STATE  ?= $(if $(ROOT),/var/lib/nlmha,$(CURDIR)/cache/state)
run: build
	bin/nlmd --listen 127.0.0.1 --state-dir $(RUN_STATE) $(RUN_ARGS)

deps:
	scripts/deps.sh $(TEST_DEBS)
	@test -d $(NLMPEER) || { echo "peer tools not found at $(SHARED)/tools (set SHARED=)"; exit 1; }
	@if [ -x $(NLMPEER)/cache/bin/nlmprobe ] && command -v ganesha.nfsd >/dev/null; then :; \
	 else $(if $(ROOT),,sudo) $(NLMPEER)/setup.sh; fi

lint:
	@unformatted=$$(gofmt -l $$(find . -name '*.go' -not -path './cache/*')); \
	if [ -n "$$unformatted" ]; then echo "gofmt needed:"; echo "$$unformatted"; exit 1; fi
	$(GO) vet ./...
	$(GO) run $(STATICCHECK) ./...

test: deps lint
	NLMHA_SHARED_TOOLS=$(SHARED)/tools scripts/test.sh

unit:
	$(GO) test -race -short ./...

# Go benchmarks, then nlmbench and the peer load generator against nlmd and
# the NFS-Ganesha baseline side by side (needs root; results in cache/bench),
# each figure next to bench/baseline.tsv. bench-baseline records the last
# run's figures there (BENCH_RECORD=1 make bench: run and record).
bench:
	NLMHA_SHARED_TOOLS=$(SHARED)/tools COUNT=$(COUNT) REPEAT=$(REPEAT) DURATION=$(DURATION) scripts/bench.sh

bench-baseline:
	scripts/bench.sh --record

fuzz:
	scripts/fuzz.sh $(FUZZTIME)

# Randomized failover sequences for as long as asked: over real nlmd
# (needs root, like make test) and on the pure lifecycle model.
SOAK             ?= 10m
SOAK_MODEL_SEEDS ?= 20000
soak: deps
	NLMHA_REQUIRE_PEERS=1 NLMHA_FAILOVER_DURATION=$(SOAK) $(GO) test -count=1 -timeout 0 -run '^TestFailoverRandom$$' -v ./integration
	$(GO) test -count=1 -timeout 0 -run '^TestLifecycleModel$$' -v ./hacallout -lifecycle.seeds $(SOAK_MODEL_SEEDS)

# Install for systemd and the cluster managers (DESTDIR for packaging).
DESTDIR    ?=
install: build
	install -D -m 0755 bin/nlmd $(DESTDIR)/usr/sbin/nlmd
	install -D -m 0755 bin/nlmadmin $(DESTDIR)/usr/sbin/nlmadmin
	install -D -m 0644 packaging/nlmd.service $(DESTDIR)/lib/systemd/system/nlmd.service
	install -D -m 0755 hacallout/ocf/nlmha $(DESTDIR)/usr/lib/ocf/resource.d/nlmha/nlmha
	install -D -m 0755 hacallout/ctdb/nlmha-nfs-callout $(DESTDIR)/usr/libexec/nlmha/nlmha-nfs-callout
	test -e $(DESTDIR)/etc/nlmha/nlmd.yaml || install -D -m 0644 packaging/nlmd.yaml $(DESTDIR)/etc/nlmha/nlmd.yaml

clean:
	rm -rf bin

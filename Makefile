# nlmha — see README.md. The two commands a fresh Debian machine needs:
#   make run    build nlmd and start it on loopback with its embedded defaults
#   make test   install what the tests need, then pass them (CI runs this)

GO         ?= go
FUZZTIME   ?= 10s
BENCHTIME  ?= 2s
STATICCHECK = honnef.co/go/tools/cmd/staticcheck@v0.8.2
# Debian packages the tests start for real: rpcbind/rpcinfo for the
# portmapper interop, iproute2 and util-linux for private network namespaces.
TEST_DEBS   = rpcbind iproute2 util-linux

.PHONY: all build run test deps lint unit bench fuzz clean

all: build

build:
	$(GO) build -o bin/ ./cmd/...

run: build
	bin/nlmd

deps:
	scripts/deps.sh $(TEST_DEBS)

lint:
	@unformatted=$$(gofmt -l $$(find . -name '*.go' -not -path './cache/*')); \
	if [ -n "$$unformatted" ]; then echo "gofmt needed:"; echo "$$unformatted"; exit 1; fi
	$(GO) vet ./...
	$(GO) run $(STATICCHECK) ./...

test: deps lint
	scripts/test.sh

unit:
	$(GO) test -race -short ./...

bench:
	$(GO) test -run '^$$' -bench . -benchmem -benchtime $(BENCHTIME) ./...

fuzz:
	scripts/fuzz.sh $(FUZZTIME)

clean:
	rm -rf bin

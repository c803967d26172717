package etcddlm

import (
	"context"
	"fmt"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	clientv3 "go.etcd.io/etcd/client/v3"
	"go.uber.org/zap"

	"github.com/nlmha/nlmha/dlm"
	"github.com/nlmha/nlmha/dlm/dlmtest"
	"github.com/nlmha/nlmha/internal/etcdtest"
)

// etcds holds, per top-level test, the etcd member it runs: a separate
// process (internal/etcdtest), so that -race instruments only the backend.
var etcds sync.Map // top-level test name → []string endpoints

var prefixes atomic.Int64

// endpoints returns the endpoints of the etcd of t's top-level test,
// starting a member the first time (for as long as the test that started
// it: a top-level test with subtests calls it first).
func endpoints(t testing.TB) []string {
	t.Helper()
	top, _, _ := strings.Cut(t.Name(), "/")
	if eps, ok := etcds.Load(top); ok {
		return eps.([]string)
	}
	// No fsync: a test machine that crashes loses nothing that matters.
	c := etcdtest.StartCluster(t, 1, etcdtest.WithArgs("--unsafe-no-fsync"))
	etcds.Store(top, c.Endpoints())
	t.Cleanup(func() { etcds.Delete(top) })
	return c.Endpoints()
}

func client(t testing.TB) *clientv3.Client {
	t.Helper()
	cli, err := clientv3.New(clientv3.Config{Endpoints: endpoints(t), DialTimeout: 5 * time.Second, Logger: zap.NewNop()})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { cli.Close() })
	return cli
}

// newBackend returns a backend on a prefix of its own, as node.
func newBackendAt(t testing.TB, prefix, node string) *Backend {
	t.Helper()
	b, err := New(context.Background(), Config{Client: client(t), Prefix: prefix, Node: node})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { b.Close() })
	return b
}

func freshPrefix() string { return fmt.Sprintf("/test%d/", prefixes.Add(1)) }

func TestContract(t *testing.T) {
	endpoints(t) // one member for every case
	dlmtest.Run(t, func(t *testing.T) dlm.Backend { return newBackendAt(t, freshPrefix(), "n1") })
}

func TestContractRetrying(t *testing.T) {
	endpoints(t)
	dlmtest.Run(t, func(t *testing.T) dlm.Backend { return dlmtest.Retrying(newBackendAt(t, freshPrefix(), "n1")) })
}

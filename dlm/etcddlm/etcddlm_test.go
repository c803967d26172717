package etcddlm

import (
	"context"
	"fmt"
	"net/url"
	"os"
	"sync/atomic"
	"testing"
	"time"

	clientv3 "go.etcd.io/etcd/client/v3"
	"go.etcd.io/etcd/server/v3/embed"
	"go.uber.org/zap"

	"github.com/nlmha/nlmha/dlm"
	"github.com/nlmha/nlmha/dlm/dlmtest"
)

var (
	endpoints []string
	prefixes  atomic.Int64
)

// TestMain runs one etcd member, in process, for the package's tests;
// every backend gets a prefix of its own.
func TestMain(m *testing.M) {
	dir, err := os.MkdirTemp("", "etcddlm-test")
	if err != nil {
		panic(err)
	}
	cfg := embed.NewConfig()
	cfg.Dir = dir
	cfg.Logger = "zap"
	cfg.LogLevel = "error"
	cfg.ZapLoggerBuilder = embed.NewZapLoggerBuilder(zap.NewNop())
	cfg.UnsafeNoFsync = true // tests: a crash of the machine loses nothing that matters
	cfg.AutoCompactionMode = "revision"
	cfg.AutoCompactionRetention = "1000"
	lc, _ := url.Parse("http://127.0.0.1:0")
	cfg.ListenClientUrls = []url.URL{*lc}
	cfg.AdvertiseClientUrls = []url.URL{*lc}
	lp, _ := url.Parse("http://127.0.0.1:0")
	cfg.ListenPeerUrls = []url.URL{*lp}
	cfg.AdvertisePeerUrls = []url.URL{*lp}
	cfg.InitialCluster = cfg.Name + "=" + lp.String()
	e, err := embed.StartEtcd(cfg)
	if err != nil {
		panic(err)
	}
	select {
	case <-e.Server.ReadyNotify():
	case <-time.After(30 * time.Second):
		panic("etcd did not start")
	}
	endpoints = []string{e.Clients[0].Addr().String()}
	code := m.Run()
	e.Close()
	os.RemoveAll(dir)
	os.Exit(code)
}

func client(t testing.TB) *clientv3.Client {
	t.Helper()
	cli, err := clientv3.New(clientv3.Config{Endpoints: endpoints, DialTimeout: 5 * time.Second, Logger: zap.NewNop()})
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
	dlmtest.Run(t, func(t *testing.T) dlm.Backend { return newBackendAt(t, freshPrefix(), "n1") })
}

func TestContractRetrying(t *testing.T) {
	dlmtest.Run(t, func(t *testing.T) dlm.Backend { return dlmtest.Retrying(newBackendAt(t, freshPrefix(), "n1")) })
}

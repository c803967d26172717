package etcdtest

import (
	"fmt"
	"net"
	"net/url"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	clientv3 "go.etcd.io/etcd/client/v3"
	"go.etcd.io/etcd/server/v3/embed"
)

// Embedded starts a single-member etcd inside the test process, on
// loopback in a temporary directory, and returns it with a client of it.
// Both are closed when the test ends; the server's log (errors only) goes
// to a file that is shown if the test failed. Use it where a test needs an
// etcd but not separate processes to kill.
func Embedded(t testing.TB) (*embed.Etcd, *clientv3.Client) {
	t.Helper()
	dir := t.TempDir()
	logPath := filepath.Join(dir, "etcd.log")
	var e *embed.Etcd
	for attempt := 1; ; attempt++ {
		var err error
		e, err = startEmbedded(dir, logPath, attempt)
		if err == nil {
			break
		}
		// Only a port taken between our probe and etcd's bind is worth
		// another try.
		if !strings.Contains(err.Error(), "address already in use") || attempt == bindAttempts {
			t.Fatalf("etcdtest: starting embedded etcd: %v\n%s", err, tail(logPath, logDumpBytes))
		}
	}
	t.Cleanup(func() {
		e.Close()
		if t.Failed() {
			t.Logf("etcdtest: embedded etcd log (%s):\n%s", logPath, tail(logPath, logDumpBytes))
		}
	})

	select {
	case <-e.Server.ReadyNotify():
	case err := <-e.Err():
		t.Fatalf("etcdtest: embedded etcd failed: %v", err)
	case <-time.After(defaultStartTimeout):
		t.Fatalf("etcdtest: embedded etcd not ready after %v", defaultStartTimeout)
	}

	ep := e.Clients[0].Addr().String()
	cli, err := clientv3.New(clientConfig([]string{"http://" + ep}))
	if err != nil {
		t.Fatalf("etcdtest: client: %v", err)
	}
	// Registered after e.Close, so it runs first.
	t.Cleanup(func() { cli.Close() })
	return e, cli
}

func startEmbedded(dir, logPath string, attempt int) (*embed.Etcd, error) {
	ports, err := freePorts([]string{"127.0.0.1"})
	if err != nil {
		return nil, err
	}
	u := func(port int) url.URL {
		return url.URL{Scheme: "http", Host: net.JoinHostPort("127.0.0.1", strconv.Itoa(port))}
	}
	cfg := embed.NewConfig()
	cfg.Name = "embedded"
	// Each attempt gets a fresh directory: a failed start may have written
	// a member ID for ports it never got.
	cfg.Dir = filepath.Join(dir, fmt.Sprintf("data%d", attempt))
	cfg.ListenClientUrls = []url.URL{u(ports[0])}
	cfg.AdvertiseClientUrls = cfg.ListenClientUrls
	cfg.ListenPeerUrls = []url.URL{u(ports[1])}
	cfg.AdvertisePeerUrls = cfg.ListenPeerUrls
	cfg.InitialCluster = cfg.InitialClusterFromName(cfg.Name)
	cfg.InitialClusterToken = "nlmha-embedded"
	// With no peers, short ticks only make the first election (up to one
	// election timeout, 1 s by default) quicker.
	cfg.TickMs, cfg.ElectionMs = 10, 100
	// Lock churn would otherwise grow the history without bound.
	cfg.AutoCompactionMode = embed.CompactorModeRevision
	cfg.AutoCompactionRetention = "1000"
	cfg.Logger = "zap"
	cfg.LogLevel = "error"
	cfg.LogOutputs = []string{logPath}
	return embed.StartEtcd(cfg)
}

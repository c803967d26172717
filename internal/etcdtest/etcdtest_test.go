package etcdtest

import (
	"context"
	"net"
	"net/url"
	"testing"
	"time"

	clientv3 "go.etcd.io/etcd/client/v3"
)

// One cluster walks through every lifecycle step in turn: starting
// members costs more than the steps themselves.
func TestCluster(t *testing.T) {
	c := StartCluster(t, 3)
	cli := c.Client(t)

	put(t, cli, "k", "v1")
	expect(t, cli, "k", "v1")

	// Kill the leader: the survivors elect another and take writes.
	old := leader(t, c)
	if err := c.Kill(old); err != nil {
		t.Fatal(err)
	}
	killed := time.Now()
	now := leader(t, c)
	if now == old {
		t.Fatalf("leader still m%d after it was killed", old)
	}
	t.Logf("m%d killed; m%d leads after %v", old, now, time.Since(killed).Round(time.Millisecond))
	put(t, cli, "k", "v2")

	// Restarted on its data, the killed member rejoins and catches up.
	if err := c.Start(old); err != nil {
		t.Fatal(err)
	}
	waitHealthy(t, c)
	expect(t, c.Client(t, old), "k", "v2")

	// A paused member is left out; the others keep serving. (A client
	// of all members could be stuck on the paused one until its
	// keepalive gives up, so write through the others.)
	l := leader(t, c)
	follower := (l + 1) % c.Size()
	if err := c.Pause(follower); err != nil {
		t.Fatal(err)
	}
	put(t, c.Client(t, l), "k", "v3")
	if err := c.Resume(follower); err != nil {
		t.Fatal(err)
	}
	waitHealthy(t, c)
	expect(t, c.Client(t, follower), "k", "v3")

	// A stopped leader hands over before it goes.
	old = leader(t, c)
	if err := c.Stop(old); err != nil {
		t.Fatal(err)
	}
	if now := leader(t, c); now == old {
		t.Fatalf("leader still m%d after it was stopped", old)
	}
	if err := c.Start(old); err != nil {
		t.Fatal(err)
	}
	waitHealthy(t, c)

	// Everyone down and up again: the data is still there.
	start := time.Now()
	if err := c.RestartAll(); err != nil {
		t.Fatal(err)
	}
	t.Logf("RestartAll took %v", time.Since(start).Round(time.Millisecond))
	expect(t, cli, "k", "v3")
}

func TestClusterSingleMember(t *testing.T) {
	c := StartCluster(t, 1)
	cli := c.Client(t)
	put(t, cli, "k", "v")
	if err := c.Kill(0); err != nil {
		t.Fatal(err)
	}
	if err := c.Kill(0); err == nil {
		t.Fatal("killing a dead member: no error")
	}
	if err := c.RestartAll(); err != nil {
		t.Fatal(err)
	}
	expect(t, cli, "k", "v")
}

// A port taken between choosing it and etcd binding it costs a retry on
// other ports, not the test.
func TestClusterRetriesTakenPort(t *testing.T) {
	// Each member on its own address (all loopback on Linux), as a test
	// that cuts members apart would have them.
	hosts := []string{"127.0.0.11", "127.0.0.12", "127.0.0.13"}
	taken, err := net.Listen("tcp", hosts[1]+":0")
	if err != nil {
		t.Fatal(err)
	}
	defer taken.Close()
	attempts := 0
	pick := func(hosts []string) ([]int, error) {
		attempts++
		ports, err := freePorts(hosts)
		if attempts == 1 && err == nil {
			ports[3] = taken.Addr().(*net.TCPAddr).Port // m1's peer port
		}
		return ports, err
	}
	c := StartCluster(t, 3, WithHosts(hosts...), func(c *config) { c.pickPorts = pick })
	if attempts != 2 {
		t.Errorf("%d attempts, want 2", attempts)
	}
	for i, ep := range c.Endpoints() {
		if u, err := url.Parse(ep); err != nil || u.Hostname() != hosts[i] {
			t.Errorf("m%d's endpoint %s is not on %s", i, ep, hosts[i])
		}
	}
	put(t, c.Client(t), "k", "v")
}

func TestEmbedded(t *testing.T) {
	start := time.Now()
	e, cli := Embedded(t)
	t.Logf("embedded etcd ready in %v at %s", time.Since(start).Round(time.Millisecond), e.Clients[0].Addr())
	put(t, cli, "k", "v")
	expect(t, cli, "k", "v")
}

func leader(t *testing.T, c *Cluster) int {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	i, err := c.Leader(ctx)
	if err != nil {
		t.Fatal(err)
	}
	return i
}

func waitHealthy(t *testing.T, c *Cluster) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	if err := c.WaitHealthy(ctx); err != nil {
		t.Fatal(err)
	}
}

func put(t *testing.T, cli *clientv3.Client, k, v string) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	if _, err := cli.Put(ctx, k, v); err != nil {
		t.Fatalf("put %s=%s: %v", k, v, err)
	}
}

func expect(t *testing.T, cli *clientv3.Client, k, want string) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	resp, err := cli.Get(ctx, k)
	if err != nil {
		t.Fatalf("get %s: %v", k, err)
	}
	if len(resp.Kvs) != 1 || string(resp.Kvs[0].Value) != want {
		t.Fatalf("get %s: %v, want %q", k, resp.Kvs, want)
	}
}

package integration

import (
	"context"
	"encoding/json"
	"fmt"
	"net/netip"
	"path/filepath"
	"testing"
	"time"

	"github.com/nlmha/nlmha/hacallout"
	"github.com/nlmha/nlmha/internal/etcdtest"
	"github.com/nlmha/nlmha/nlm"
	"github.com/nlmha/nlmha/sunrpc"
)

// startEtcd runs a one-member etcd (a process of its own) and returns its
// client URL.
func startEtcd(t *testing.T) string {
	t.Helper()
	return etcdtest.StartCluster(t, 1).Endpoint(0)
}

// newEtcdCluster starts n nlmd on the etcd backend, each with a name and
// a state directory of its own: the NSM state of virtual servers is in
// etcd, nothing but etcd is shared.
func newEtcdCluster(t *testing.T, n int, endpoint string, extra ...string) *cluster {
	c := &cluster{t: t, bin: binary(t, "nlmd"), state: t.TempDir()}
	for i := range n {
		sock := filepath.Join(t.TempDir(), "nlmd.sock")
		args := nlmdArgs(t.TempDir(), append([]string{"--listen-mode", "vip", "--serve-unknown=false", "--rpcbind", "none",
			"--control-socket", sock, "--log-level", "info", "--backend", "etcd", "--etcd-endpoints", endpoint,
			"--etcd-prefix", "/it/", "--node-name", fmt.Sprintf("node%d", i+1), "--lease-ttl", "2s"}, extra...)...)
		c.nodes = append(c.nodes, &clusterNode{n: i, sock: sock, args: args})
		c.start(i)
	}
	return c
}

// etcdClient is a simulated client host calling one virtual server.
type etcdClient struct {
	name string
	addr netip.Addr
	rpc  *nlm.Client
}

func newEtcdClient(t *testing.T, name string, addr, vip netip.Addr) *etcdClient {
	t.Helper()
	rc, err := sunrpc.Dial(context.Background(), sunrpc.UDP, netip.AddrPortFrom(vip, nlmPort),
		sunrpc.ClientOptions{Local: addr, Retransmit: 100 * time.Millisecond, MaxRetransmit: 500 * time.Millisecond})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { rc.Close() })
	return &etcdClient{name: name, addr: addr, rpc: nlm.NewClient(rc, nlm.Vers4)}
}

func (c *etcdClient) lock(file string, start, n uint64, block, reclaim bool) *nlm.LockArgs {
	return &nlm.LockArgs{Cookie: []byte("c"), Block: block, Exclusive: true, Reclaim: reclaim, State: 1,
		Lock: nlm.Lock{CallerName: []byte(c.name), FH: []byte(file), OH: []byte(c.name), SVID: 7, Offset: start, Len: n}}
}

// do calls until the virtual server answers (it may be moving).
func (c *etcdClient) do(t *testing.T, fn func(ctx context.Context) (nlm.Stat, error)) nlm.Stat {
	t.Helper()
	stop := make(chan struct{})
	timer := time.AfterFunc(20*time.Second, func() { close(stop) })
	defer timer.Stop()
	st, ok := callUntil(stop, fn, nil)
	if !ok {
		t.Fatalf("%s: no answer in 20 s", c.name)
	}
	return st
}

func (c *etcdClient) Lock(t *testing.T, file string, start, n uint64, block, reclaim bool) nlm.Stat {
	t.Helper()
	return c.do(t, func(ctx context.Context) (nlm.Stat, error) {
		r, err := c.rpc.Lock(ctx, c.lock(file, start, n, block, reclaim))
		return r.Stat, err
	})
}

func (c *etcdClient) Unlock(t *testing.T, file string, start, n uint64) nlm.Stat {
	t.Helper()
	return c.do(t, func(ctx context.Context) (nlm.Stat, error) {
		a := c.lock(file, start, n, false, false)
		r, err := c.rpc.Unlock(ctx, &nlm.UnlockArgs{Cookie: a.Cookie, Lock: a.Lock})
		return r.Stat, err
	})
}

func (c *etcdClient) Test(t *testing.T, file string, start, n uint64) nlm.TestRes {
	t.Helper()
	var res nlm.TestRes
	c.do(t, func(ctx context.Context) (nlm.Stat, error) {
		a := c.lock(file, start, n, false, false)
		r, err := c.rpc.Test(ctx, &nlm.TestArgs{Cookie: a.Cookie, Exclusive: true, Lock: a.Lock})
		res = r
		return r.Stat, err
	})
	return res
}

// TestEtcdCrossNode: two nlmd nodes on one etcd serve the same files
// through two virtual servers. A lock through one conflicts through the
// other; a blocked request through node 2 is granted by an unlock
// through node 1, its GRANTED coming from its own virtual server. Then
// node 2 is killed and node 1 takes its virtual server over: the dead
// node's lock stays, reclaimable; a request that conflicts with nothing
// is granted at once, one that conflicts with the reclaimable lock waits
// (DENIED_GRACE_PERIOD), the reclaim succeeds, and the grace period ends
// as soon as nothing is left to reclaim. Last, a planned move back to a
// restarted node 2 adopts the records with no grace.
func TestEtcdCrossNode(t *testing.T) {
	if !inNetns(t) {
		return
	}
	ep := startEtcd(t)
	c := newEtcdCluster(t, 2, ep, "--grace-period", "60s")
	vip1, vip2 := netip.MustParseAddr("127.0.0.11"), netip.MustParseAddr("127.0.0.12")
	c.takeover(0, vip1, "")
	c.takeover(1, vip2, "")
	hostA, hostB, hostC := netip.MustParseAddr("127.0.1.1"), netip.MustParseAddr("127.0.1.2"), netip.MustParseAddr("127.0.1.3")
	lockdB := startClientLockd(t, hostB)
	lockdB.answer.Store(uint32(nlm.Granted))
	a := newEtcdClient(t, "client-a", hostA, vip1)
	b := newEtcdClient(t, "client-b", hostB, vip2)

	if st := a.Lock(t, "F", 0, 10, false, false); st != nlm.Granted {
		t.Fatalf("A's lock through node 1: %v", st)
	}
	if r := b.Test(t, "F", 5, 1); r.Stat != nlm.Denied || r.Holder.SVID != 7 {
		t.Fatalf("B's TEST through node 2: %v (holder %+v), want DENIED with A's lock", r.Stat, r.Holder)
	}
	if st := b.Lock(t, "F", 5, 1, false, false); st != nlm.Denied {
		t.Fatalf("B's LOCK through node 2: %v, want DENIED", st)
	}
	if st := b.Lock(t, "F", 0, 10, true, false); st != nlm.Blocked {
		t.Fatalf("B's blocking LOCK: %v, want BLOCKED", st)
	}
	unlocked := time.Now()
	if st := a.Unlock(t, "F", 0, 10); st != nlm.Granted {
		t.Fatalf("A's UNLOCK: %v", st)
	}
	cb := lockdB.next(t, 5*time.Second)
	if cb.proc != nlm.ProcGranted || cb.from.Addr() != vip2 || string(cb.args.Lock.FH) != "F" {
		t.Fatalf("B got proc %d from %v for %q, want GRANTED from %v", cb.proc, cb.from, cb.args.Lock.FH, vip2)
	}
	t.Logf("cross-node handoff: unlock on node 1 → GRANTED from node 2 in %v", time.Since(unlocked).Round(time.Millisecond))
	if st := a.Lock(t, "F", 0, 1, false, false); st != nlm.Denied {
		t.Fatalf("A's LOCK after B was granted: %v, want DENIED", st)
	}

	// Node 2 dies holding B's lock.
	c.kill(1)
	killed := time.Now()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	var took time.Duration
	for {
		// The owner key goes with node 2's lease (2 s).
		r, err := c.api(0).Takeover(ctx, vip2, "")
		if err == nil {
			if r.Planned || r.GraceUntil.IsZero() {
				t.Fatalf("takeover after a crash: %+v, want grace and no snapshot", r)
			}
			took = time.Since(killed)
			break
		}
		if ctx.Err() != nil {
			t.Fatalf("node 1 could not take %v over: %v", vip2, err)
		}
		time.Sleep(100 * time.Millisecond)
	}
	t.Logf("node 1 took %v over %v after node 2 was killed", vip2, took.Round(time.Millisecond))
	cc := newEtcdClient(t, "client-c", hostC, vip2)
	t0 := time.Now()
	if st := cc.Lock(t, "G", 0, 10, false, false); st != nlm.Granted {
		t.Fatalf("C's lock of another file through the moved address in grace: %v, want GRANTED at once", st)
	}
	t.Logf("first non-conflicting lock through the moved address granted %v after the takeover", time.Since(t0).Round(time.Millisecond))
	if st := cc.Lock(t, "F", 0, 10, false, false); st != nlm.DeniedGracePeriod {
		t.Fatalf("C's lock over B's unreclaimed lock: %v, want DENIED_GRACE_PERIOD", st)
	}
	if st := a.Lock(t, "F", 0, 10, false, false); st != nlm.Denied {
		t.Fatalf("A's lock through node 1 over B's unreclaimed lock: %v, want DENIED", st)
	}
	// B reclaims through its address, now on node 1.
	b2 := newEtcdClient(t, "client-b", hostB, vip2)
	if st := b2.Lock(t, "F", 0, 10, false, true); st != nlm.Granted {
		t.Fatalf("B's reclaim: %v", st)
	}
	// Nothing reclaimable is left: grace ends early.
	deadline := time.Now().Add(5 * time.Second)
	for {
		v, err := c.api(0).VIP(ctx, vip2)
		if err != nil {
			t.Fatal(err)
		}
		if !v.Grace.Active {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("grace still on 5 s after the last reclaim: %+v", v.Grace)
		}
		time.Sleep(100 * time.Millisecond)
	}
	if st := cc.Lock(t, "F", 0, 10, false, false); st != nlm.Denied {
		t.Fatalf("C's lock over B's reclaimed lock: %v, want DENIED", st)
	}

	// Planned move of vip2 to a restarted node 2: adopted, no grace.
	c.start(1)
	rel := c.release(0, vip2, true)
	if !rel.Snapshot || rel.Locks != 2 {
		t.Fatalf("release: %+v, want a handoff and 2 locks", rel)
	}
	tr := c.takeover(1, vip2, "")
	if !tr.Planned || !tr.GraceUntil.IsZero() || tr.Locks != 2 {
		t.Fatalf("planned takeover: %+v, want adopted records and no grace", tr)
	}
	b3 := newEtcdClient(t, "client-b", hostB, vip2)
	if st := b3.Lock(t, "F", 0, 10, false, false); st != nlm.Granted {
		t.Fatalf("B's lock (its own) after the planned move: %v", st)
	}
	if st := a.Lock(t, "F", 0, 10, false, false); st != nlm.Denied {
		t.Fatalf("A's lock over B's after the planned move: %v, want DENIED", st)
	}

	// The admin's view of the cluster, from node 1.
	adm := binary(t, "nlmadmin")
	var cs hacallout.ClusterStatus
	if err := json.Unmarshal([]byte(mustAdmin(t, adm, c.nodes[0].sock, "--json", "cluster", "status")), &cs); err != nil {
		t.Fatal(err)
	}
	owners := map[netip.Addr]string{}
	for _, v := range cs.VirtualServers {
		owners[v.VIP] = v.Owner
	}
	if len(cs.Nodes) != 2 || owners[vip1] != "node1" || owners[vip2] != "node2" || cs.Node != "node1" ||
		len(cs.Endpoints) != 1 || !cs.Endpoints[0].Healthy || time.Until(cs.LeaseDeadline) <= 0 {
		t.Fatalf("cluster status: %+v", cs)
	}
	var lr hacallout.LocksReply
	if err := json.Unmarshal([]byte(mustAdmin(t, adm, c.nodes[0].sock, "--json", "locks", "list")), &lr); err != nil {
		t.Fatal(err)
	}
	got := map[string]string{}
	for _, l := range lr.Locks {
		got[l.Caller] = l.Node
	}
	if len(lr.Locks) != 2 || got["client-b"] != "node2" || got["client-c"] != "node2" {
		t.Fatalf("locks listed on node 1: %+v; want B's and C's, served by node2", lr.Locks)
	}
	t.Logf("nlmadmin cluster status:\n%s", mustAdmin(t, adm, c.nodes[0].sock, "cluster", "status"))
}

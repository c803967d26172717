package integration

import (
	"context"
	"fmt"
	"net/netip"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/nlmha/nlmha/internal/etcdtest"
	"github.com/nlmha/nlmha/nlm"
	"github.com/nlmha/nlmha/nsm/nsmtest"
)

// faultRig is three nlmd nodes on a three-member etcd, each node reaching
// etcd through an address of its own (127.0.2.N) so that a routing rule
// can cut it off alone, and clients of every virtual server locking the
// same files through all of them.
type faultRig struct {
	t     *testing.T
	etcd  *etcdtest.Cluster
	c     *cluster
	vips  []netip.Addr
	k     *checker
	cls   []*simClient
	log   []string
	moves int
}

func (r *faultRig) step(format string, args ...any) {
	msg := fmt.Sprintf(format, args...)
	r.log = append(r.log, msg)
	r.t.Logf("%s  %s", time.Now().Format("15:04:05.000"), msg)
}

// etcdVia is the address node i reaches etcd by.
func etcdVia(i int) string { return fmt.Sprintf("127.0.2.%d", i+1) }

func ipRun(t *testing.T, args ...string) {
	t.Helper()
	if out, err := exec.Command("ip", args...).CombinedOutput(); err != nil {
		t.Fatalf("ip %s: %v\n%s", strings.Join(args, " "), err, out)
	}
}

// alive reports whether node i's process runs.
func (r *faultRig) alive(i int) bool {
	p := r.c.nodes[i].p
	if p == nil {
		return false
	}
	select {
	case <-p.done:
		return false
	default:
		return true
	}
}

// fenced reports whether node i fenced itself (it serves nothing until
// restarted).
func (r *faultRig) fenced(i int) bool {
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	st, err := r.c.api(i).Cluster(ctx)
	return err == nil && st.SelfFenced
}

// servedBy returns the node serving vip, or -1.
func (r *faultRig) servedBy(vip netip.Addr) int {
	for i := range r.c.nodes {
		if !r.alive(i) {
			continue
		}
		ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
		v, err := r.c.api(i).VIP(ctx, vip)
		cancel()
		if err == nil && v.State == "serving" {
			return i
		}
	}
	return -1
}

// recover restarts what is dead or fenced, as the cluster manager would
// (a fenced node is restarted: it owns nothing and may serve again).
func (r *faultRig) recover() {
	for i := range r.c.nodes {
		switch {
		case !r.alive(i):
			r.step("node %d is down: restarting it", i)
			r.c.start(i)
		case r.fenced(i):
			r.step("node %d fenced itself: restarting it", i)
			r.c.kill(i)
			r.c.start(i)
		}
	}
}

// ensure makes every virtual server served: one nobody serves is taken
// over by a live, unfenced node, retried while the previous owner's
// lease has not run out (or its sockets are still held).
func (r *faultRig) ensure(prefer int) {
	for _, vip := range r.vips {
		if r.servedBy(vip) >= 0 {
			continue
		}
		deadline := time.Now().Add(45 * time.Second)
		for {
			n := -1
			for j := range r.c.nodes {
				i := (prefer + j) % len(r.c.nodes)
				if r.alive(i) && !r.fenced(i) {
					n = i
					break
				}
			}
			if n >= 0 {
				ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
				res, err := r.c.api(n).Takeover(ctx, vip, "")
				cancel()
				if err == nil {
					r.moves++
					r.step("%v taken over by node %d (epoch %d, planned %v, grace until %s)", vip, n, res.Epoch, res.Planned,
						res.GraceUntil.Format("15:04:05.000"))
					break
				}
				if time.Now().After(deadline) {
					r.t.Fatalf("%v: no node could take it over: %v", vip, err)
				}
			}
			time.Sleep(100 * time.Millisecond)
		}
	}
}

// progress waits until the clients were granted at least n more locks.
func (r *faultRig) progress(what string, n int64, within time.Duration) {
	r.t.Helper()
	total := func() int64 {
		var s int64
		for _, c := range r.cls {
			s += c.grants.Load()
		}
		return s
	}
	start := total()
	deadline := time.Now().Add(within)
	for total() < start+n {
		if time.Now().After(deadline) {
			r.t.Fatalf("%s: only %d locks granted in %v (want %d)", what, total()-start, within, n)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// TestEtcdFaults: three nlmd on a three-member etcd, clients of three
// virtual servers locking the same files through all of them, and faults
// one after the other while they do: an etcd member killed, the etcd
// leader killed, an nlmd killed, an nlmd paused past its lease and resumed
// after another node took its virtual server over, an nlmd cut off from
// etcd while its clients keep calling it, and all of etcd restarted. The
// checker runs throughout: no two conflicting holders at any instant,
// across all nodes, and no acknowledged lock lost (every holder's lock is
// there after every fault, and every reclaim succeeds).
func TestEtcdFaults(t *testing.T) {
	binary(t, "nlmd")
	if !inNetns(t) {
		return
	}
	// Routing rules ahead of the local table, so that a node's address
	// to etcd can be blackholed (only inside this namespace).
	ipRun(t, "rule", "add", "pref", "100", "table", "local")
	ipRun(t, "rule", "del", "pref", "0", "table", "local")
	peers := simClients(t)
	r := &faultRig{t: t, k: &checker{}}
	r.etcd = etcdtest.StartCluster(t, 3, etcdtest.WithClientsOnAllAddresses())
	r.c = &cluster{t: t, bin: binary(t, "nlmd"), state: t.TempDir()}
	for i := range 3 {
		sock := filepath.Join(t.TempDir(), "nlmd.sock")
		// A state directory of its own: the NSM state is in etcd.
		args := nlmdArgs(t.TempDir(), "--listen-mode", "vip", "--serve-unknown=false", "--rpcbind", "none",
			"--control-socket", sock, "--log-level", "info", "--backend", "etcd",
			"--etcd-endpoints", strings.Join(r.etcd.EndpointsVia(etcdVia(i)), ","), "--etcd-prefix", "/faults/",
			"--node-name", fmt.Sprintf("node%d", i), "--lease-ttl", "3s",
			"--grace-period", "20s", "--grace-quiet", "1s", "--notify-timeout", "20s")
		r.c.nodes = append(r.c.nodes, &clusterNode{n: i, sock: sock, args: args})
		r.c.start(i)
	}
	for i := range 3 {
		v := netip.AddrFrom4([4]byte{127, 0, 0, byte(21 + i)})
		r.vips = append(r.vips, v)
		r.c.takeover(i, v, "")
	}
	files := []string{"shared-0", "shared-1", "shared-2", "shared-3"}
	byAddr := map[netip.Addr]*simClient{}
	for vi, v := range r.vips {
		for i := range 4 {
			c := newSimClient(t, r.k, i, v, files)
			c.shared = true
			r.cls = append(r.cls, c)
		}
		// A holder keeps a lock on one of the shared files for the whole
		// test, and is slow to reclaim it: until it does, the others must
		// not get it, through any node.
		h := newSimClient(t, r.k, 100, v, []string{files[vi]})
		h.shared, h.hold, h.slow = true, true, 700*time.Millisecond
		r.cls = append(r.cls, h)
	}
	for _, c := range r.cls {
		byAddr[c.addr] = c
	}
	peers.OnNotify(func(n nsmtest.Notification) {
		if cl := byAddr[n.To]; cl != nil && n.From.Addr() == cl.vip {
			cl.notified.Add(1)
			select {
			case cl.reclaim <- struct{}{}:
			default:
			}
		}
	})
	for _, c := range r.cls {
		if c.hold {
			h := holding{owner: c.name, start: 0, end: 100, excl: true}
			if st, _ := c.lock(nil, c.files[0], h, false); st != nlm.Granted {
				t.Fatalf("%s: holder's lock %v", c.name, st)
			}
			r.k.acquire(c.key(c.files[0]), h)
			c.held, c.file = &h, c.files[0]
		}
	}
	stop := make(chan struct{})
	var wg sync.WaitGroup
	for _, c := range r.cls {
		wg.Go(func() { c.run(stop) })
	}
	defer func() {
		select {
		case <-stop:
		default:
			close(stop)
		}
		wg.Wait()
	}()
	probe := newSimClient(t, r.k, 200, r.vips[0], nil)
	// holders: each holder's lock is still there, seen through another
	// virtual server than its own.
	holders := func(when string) {
		for _, c := range r.cls {
			if !c.hold {
				continue
			}
			other := r.vips[(indexOf(r.vips, c.vip)+1)%len(r.vips)]
			probe = newSimClient(t, r.k, 200, other, nil)
			stopAt := make(chan struct{})
			timer := time.AfterFunc(30*time.Second, func() { close(stopAt) })
			for {
				st, ok := probe.call(stopAt, func(ctx context.Context) (nlm.Stat, error) {
					l := nlm.Lock{CallerName: []byte("probe"), FH: []byte(c.files[0]), OH: []byte("probe"), SVID: 9, Offset: 0, Len: 100}
					res, err := probe.rpc.Test(ctx, &nlm.TestArgs{Cookie: []byte("t"), Exclusive: true, Lock: l})
					return res.Stat, err
				})
				if !ok {
					t.Fatalf("%s: TEST of %s's lock through %v: no answer", when, c.name, other)
				}
				if st == nlm.DeniedGracePeriod {
					time.Sleep(100 * time.Millisecond)
					continue
				}
				if st != nlm.Denied {
					r.k.violate("%s: %s's lock on %s not found through %v (TEST %v): an acknowledged lock was lost", when, c.name, c.files[0], other, st)
				}
				break
			}
			timer.Stop()
		}
	}
	// graceOver: every virtual server's grace period ends well before its
	// 20 s: it ends when nothing is left to reclaim, which needs every
	// client of a moved address notified (from the monitor records in
	// etcd: the nodes share no directory) and reclaiming. After it, the
	// purge has run: the holders' locks must have survived it.
	graceOver := func(what string) {
		deadline := time.Now().Add(12 * time.Second)
		for _, vip := range r.vips {
			for {
				n := r.servedBy(vip)
				if n >= 0 {
					ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
					v, err := r.c.api(n).VIP(ctx, vip)
					cancel()
					if err == nil && !v.Grace.Active {
						break
					}
				}
				if time.Now().After(deadline) {
					t.Fatalf("after %s: %v still in grace 12 s on: its clients were not all notified, or did not reclaim\nsteps:\n%s",
						what, vip, strings.Join(r.log, "\n"))
				}
				time.Sleep(100 * time.Millisecond)
			}
		}
	}
	settle := func(what string) {
		r.recover()
		r.ensure(0)
		r.progress(what, 20, 30*time.Second)
		graceOver(what)
		holders(what)
		if v := r.k.report(); len(v) > 0 {
			t.Fatalf("after %s: %d violations:\n%s\nsteps:\n%s", what, len(v), strings.Join(v, "\n"), strings.Join(r.log, "\n"))
		}
	}
	r.progress("start", 50, 30*time.Second)
	holders("start")

	// 1. An etcd follower killed, then restarted.
	ctx := context.Background()
	lctx, cancel := context.WithTimeout(ctx, 20*time.Second)
	leader, err := r.etcd.Leader(lctx)
	cancel()
	if err != nil {
		t.Fatal(err)
	}
	follower := (leader + 1) % 3
	r.step("etcd: killing member %d (a follower)", follower)
	if err := r.etcd.Kill(follower); err != nil {
		t.Fatal(err)
	}
	r.progress("etcd member down", 50, 30*time.Second)
	if err := r.etcd.Start(follower); err != nil {
		t.Fatal(err)
	}
	settle("etcd member killed")

	// 2. The etcd leader killed, then restarted.
	lctx, cancel = context.WithTimeout(ctx, 20*time.Second)
	leader, err = r.etcd.Leader(lctx)
	cancel()
	if err != nil {
		t.Fatal(err)
	}
	r.step("etcd: killing member %d (the leader)", leader)
	if err := r.etcd.Kill(leader); err != nil {
		t.Fatal(err)
	}
	r.progress("etcd leader down", 50, 30*time.Second)
	if err := r.etcd.Start(leader); err != nil {
		t.Fatal(err)
	}
	settle("etcd leader killed")

	// 3. An nlmd killed: its virtual server taken over elsewhere.
	r.step("nlmd: kill -9 node 1")
	r.c.kill(1)
	r.ensure(2)
	settle("nlmd killed")

	// 4. An nlmd paused past its lease; another node takes its virtual
	// server over (once the paused one, resumed, lets go of the address).
	victim := r.servedBy(r.vips[2])
	if victim < 0 {
		t.Fatal("nobody serves", r.vips[2])
	}
	r.step("nlmd: SIGSTOP node %d (serving %v) for 5 s", victim, r.vips[2])
	p := r.c.nodes[victim].p
	p.cmd.Process.Signal(syscall.SIGSTOP)
	time.Sleep(5 * time.Second)
	var taken sync.WaitGroup
	taken.Go(func() {
		// The takeover: the claim moves in etcd at once (fencing the
		// paused node); the address follows once it is free.
		other := (victim + 1) % 3
		if !r.alive(other) || r.fenced(other) {
			other = (victim + 2) % 3
		}
		deadline := time.Now().Add(30 * time.Second)
		for time.Now().Before(deadline) {
			cctx, cancel := context.WithTimeout(ctx, 10*time.Second)
			_, err := r.c.api(other).Takeover(cctx, r.vips[2], "")
			cancel()
			if err == nil {
				r.moves++
				return
			}
			time.Sleep(100 * time.Millisecond)
		}
	})
	time.Sleep(500 * time.Millisecond)
	r.step("nlmd: SIGCONT node %d", victim)
	p.cmd.Process.Signal(syscall.SIGCONT)
	taken.Wait()
	if !r.fenced(victim) {
		t.Errorf("node %d, resumed after its lease ran out, did not report itself fenced", victim)
	}
	settle("nlmd paused past its lease")

	// 5. An nlmd cut off from etcd while its clients keep calling it.
	cut := r.servedBy(r.vips[0])
	if cut < 0 {
		t.Fatal("nobody serves", r.vips[0])
	}
	r.step("network: cutting node %d (serving %v) off from etcd", cut, r.vips[0])
	ipRun(t, "rule", "add", "pref", "10", "to", etcdVia(cut), "blackhole")
	fenceBy := time.Now().Add(10 * time.Second)
	for !r.fenced(cut) {
		if time.Now().After(fenceBy) {
			t.Fatalf("node %d, cut off from etcd, did not fence itself in 10 s", cut)
		}
		time.Sleep(100 * time.Millisecond)
	}
	r.step("node %d fenced itself", cut)
	r.ensure(cut + 1)
	ipRun(t, "rule", "del", "pref", "10", "to", etcdVia(cut), "blackhole")
	settle("nlmd cut off from etcd")

	// 6. All of etcd restarted.
	r.step("etcd: restarting every member")
	if err := r.etcd.RestartAll(); err != nil {
		t.Fatal(err)
	}
	settle("etcd restarted")

	close(stop)
	wg.Wait()
	var grants, denied, grace, reclaims int64
	for _, c := range r.cls {
		grants += c.grants.Load()
		denied += c.denied.Load()
		grace += c.graceDenied.Load()
		reclaims += c.reclaims.Load()
	}
	if v := r.k.report(); len(v) > 0 {
		t.Fatalf("%d violations:\n%s", len(v), strings.Join(v, "\n"))
	}
	t.Logf("faults: 6; takeovers: %d; locks granted %d, denied %d, DENIED_GRACE_PERIOD %d, reclaims %d; violations 0",
		r.moves, grants, denied, grace, reclaims)
}

func indexOf(list []netip.Addr, a netip.Addr) int {
	for i, x := range list {
		if x == a {
			return i
		}
	}
	return -1
}

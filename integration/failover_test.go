package integration

import (
	"context"
	"fmt"
	"math/rand/v2"
	"net/netip"
	"path/filepath"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/nlmha/nlmha/hacallout"
	"github.com/nlmha/nlmha/nlm"
	"github.com/nlmha/nlmha/nsm/nsmtest"
	"github.com/nlmha/nlmha/sunrpc"
	"github.com/nlmha/nlmha/virtualserver"
)

// ---- a cluster of nlmd processes on one host ---------------------------

// cluster is several nlmd on this host sharing one state directory (as
// nodes share it on a cluster file system) and the ports, each bound to
// the virtual servers it serves (listen mode vip).
type cluster struct {
	t     *testing.T
	bin   string
	state string
	nodes []*clusterNode
}

type clusterNode struct {
	n    int
	p    *proc
	sock string
	args []string
}

func newCluster(t *testing.T, n int, extra ...string) *cluster {
	c := &cluster{t: t, bin: binary(t, "nlmd"), state: t.TempDir()}
	for i := range n {
		sock := filepath.Join(t.TempDir(), "nlmd.sock")
		args := nlmdArgs(c.state, append([]string{"--listen-mode", "vip", "--serve-unknown=false", "--rpcbind", "none",
			"--control-socket", sock, "--log-level", "info"}, extra...)...)
		c.nodes = append(c.nodes, &clusterNode{n: i, sock: sock, args: args})
		c.start(i)
	}
	return c
}

func (c *cluster) start(i int) {
	nd := c.nodes[i]
	nd.p = startDaemon(c.t, c.bin, nd.args...)
	waitFile(c.t, nd.sock)
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	for {
		if _, err := c.api(i).Status(ctx); err == nil {
			return
		}
		if ctx.Err() != nil {
			c.t.Fatalf("node %d does not answer", i+1)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

func (c *cluster) kill(i int) {
	c.nodes[i].p.stop(syscall.SIGKILL, 5*time.Second)
}

func (c *cluster) api(i int) *hacallout.Client { return hacallout.NewClient(c.nodes[i].sock) }

func (c *cluster) takeover(i int, vip netip.Addr, name string) hacallout.TakeoverResult {
	c.t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	r, err := c.api(i).Takeover(ctx, vip, name)
	if err != nil {
		c.t.Fatalf("takeover of %v on node %d: %v", vip, i+1, err)
	}
	return r
}

// release releases vip on node i, writing a snapshot or not (without one,
// the next node starts it as after a crash: grace and reclaim).
func (c *cluster) release(i int, vip netip.Addr, snapshot bool) hacallout.ReleaseResult {
	c.t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	r, err := c.api(i).Release(ctx, vip, snapshot)
	if err != nil {
		c.t.Fatalf("release of %v on node %d: %v", vip, i+1, err)
	}
	return r
}

// ---- the invariant checker ------------------------------------------------

// checker keeps what clients hold as the server acknowledged it: from the
// GRANTED reply until the client sends UNLOCK. Two conflicting holdings at
// once, or a held lock that a reclaim or a TEST finds gone, is a violation.
type checker struct {
	mu         sync.Mutex
	held       map[string][]holding // by virtual server and file
	violations []string
}

type holding struct {
	owner      string
	start, end uint64
	excl       bool
}

func (k *checker) acquire(file string, h holding) {
	k.mu.Lock()
	defer k.mu.Unlock()
	for _, o := range k.held[file] {
		if o.owner != h.owner && (o.excl || h.excl) && o.start < h.end && h.start < o.end {
			k.violations = append(k.violations, fmt.Sprintf("%s: %s granted [%d,%d) while %s holds [%d,%d)", file, h.owner, h.start, h.end, o.owner, o.start, o.end))
		}
	}
	if k.held == nil {
		k.held = map[string][]holding{}
	}
	k.held[file] = append(k.held[file], h)
}

func (k *checker) release(file string, h holding) {
	k.mu.Lock()
	defer k.mu.Unlock()
	list := k.held[file]
	for i, o := range list {
		if o == h {
			k.held[file] = append(list[:i], list[i+1:]...)
			return
		}
	}
}

func (k *checker) violate(format string, args ...any) {
	k.mu.Lock()
	k.violations = append(k.violations, fmt.Sprintf(format, args...))
	k.mu.Unlock()
}

func (k *checker) report() []string {
	k.mu.Lock()
	defer k.mu.Unlock()
	return append([]string(nil), k.violations...)
}

// ---- simulated clients ---------------------------------------------------

// simClient is one NFS client host: its own address, its own lockd and
// statd endpoint (the simulated peers answer at every address), locking
// through one virtual server, reclaiming what it holds when that virtual
// server's SM_NOTIFY arrives.
type simClient struct {
	t     *testing.T
	k     *checker
	addr  netip.Addr
	name  string
	vip   netip.Addr
	files []string
	hold  bool // keeps one lock for the whole test
	// shared: its files are the same files whatever virtual server they
	// are locked through (a shared backend): the checker keys them alone.
	shared  bool
	slow    time.Duration // waits this long before reclaiming
	rng     *rand.Rand
	rpc     *nlm.Client
	reclaim chan struct{}

	mu   sync.Mutex
	held *holding
	file string

	grants, denied, graceDenied, errors, reclaims, notified atomic.Int64
}

func newSimClient(t *testing.T, k *checker, i int, vip netip.Addr, files []string) *simClient {
	a := netip.AddrFrom4([4]byte{127, 1, vip.As4()[3], byte(i + 1)})
	c := &simClient{t: t, k: k, addr: a, name: fmt.Sprintf("client-%v", a), vip: vip, files: files,
		rng: rand.New(rand.NewPCG(uint64(i), uint64(vip.As4()[3]))), reclaim: make(chan struct{}, 1)}
	rc, err := sunrpc.Dial(context.Background(), sunrpc.UDP, netip.AddrPortFrom(vip, nlmPort),
		sunrpc.ClientOptions{Local: a, Retransmit: 50 * time.Millisecond, MaxRetransmit: 200 * time.Millisecond})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { rc.Close() })
	c.rpc = nlm.NewClient(rc, nlm.Vers4)
	return c
}

// key is what the checker knows file by.
func (c *simClient) key(file string) string {
	if c.shared {
		return file
	}
	return c.vip.String() + "/" + file
}

func (c *simClient) args(file string, h holding, reclaim bool) *nlm.LockArgs {
	return &nlm.LockArgs{Cookie: []byte("c"), Exclusive: h.excl, Reclaim: reclaim, State: 1,
		Lock: nlm.Lock{CallerName: []byte(c.name), FH: []byte(file), OH: []byte(c.name), SVID: 1, Offset: h.start, Len: h.end - h.start}}
}

// call retries through the moments the address has no server (a move in
// progress answers with ICMP unreachable or not at all) until the answer.
func (c *simClient) call(stop <-chan struct{}, fn func(ctx context.Context) (nlm.Stat, error)) (nlm.Stat, bool) {
	return callUntil(stop, fn, &c.errors)
}

// callUntil makes a call until it is answered (or stop), each try bounded
// by a second, counting the failed tries in errs when given.
func callUntil(stop <-chan struct{}, fn func(ctx context.Context) (nlm.Stat, error), errs *atomic.Int64) (nlm.Stat, bool) {
	for {
		ctx, cancel := context.WithTimeout(context.Background(), time.Second)
		st, err := fn(ctx)
		cancel()
		if err == nil {
			return st, true
		}
		if errs != nil {
			errs.Add(1)
		}
		select {
		case <-stop:
			return 0, false
		case <-time.After(10 * time.Millisecond):
		}
	}
}

func (c *simClient) lock(stop <-chan struct{}, file string, h holding, reclaim bool) (nlm.Stat, bool) {
	return c.call(stop, func(ctx context.Context) (nlm.Stat, error) {
		r, err := c.rpc.Lock(ctx, c.args(file, h, reclaim))
		return r.Stat, err
	})
}

func (c *simClient) unlock(stop <-chan struct{}, file string, h holding) (nlm.Stat, bool) {
	return c.call(stop, func(ctx context.Context) (nlm.Stat, error) {
		a := c.args(file, h, false)
		r, err := c.rpc.Unlock(ctx, &nlm.UnlockArgs{Cookie: a.Cookie, Lock: a.Lock})
		return r.Stat, err
	})
}

// run locks and unlocks until stop: one lock at a time, held for a moment
// (or for good, for a holder), reclaimed after a notification.
func (c *simClient) run(stop <-chan struct{}) {
	for {
		select {
		case <-stop:
			return
		case <-c.reclaim:
			c.doReclaim(stop)
			continue
		default:
		}
		c.mu.Lock()
		held, file := c.held, c.file
		c.mu.Unlock()
		if held != nil {
			if c.hold {
				select {
				case <-stop:
					return
				case <-c.reclaim:
					c.doReclaim(stop)
				}
				continue
			}
			c.mu.Lock()
			c.held = nil
			c.mu.Unlock()
			c.k.release(c.key(file), *held)
			for {
				// DENIED_GRACE_PERIOD means "again later" (the address is
				// moving); a Linux client retries it too.
				st, ok := c.unlock(stop, file, *held)
				if !ok || st == nlm.Granted {
					break
				}
				if st != nlm.DeniedGracePeriod {
					c.k.violate("%s: UNLOCK %s answered %v", c.name, file, st)
					break
				}
				c.graceDenied.Add(1)
				time.Sleep(10 * time.Millisecond)
			}
			continue
		}
		file = c.files[c.rng.IntN(len(c.files))]
		start := uint64(c.rng.IntN(8)) * 10
		h := holding{owner: c.name, start: start, end: start + 10 + uint64(c.rng.IntN(3))*10, excl: c.rng.IntN(3) > 0}
		st, ok := c.lock(stop, file, h, false)
		if !ok {
			return
		}
		switch st {
		case nlm.Granted:
			c.grants.Add(1)
			c.k.acquire(c.key(file), h)
			c.mu.Lock()
			c.held, c.file = &h, file
			c.mu.Unlock()
		case nlm.Denied:
			c.denied.Add(1)
		case nlm.DeniedGracePeriod:
			c.graceDenied.Add(1)
			time.Sleep(20 * time.Millisecond)
		default:
			c.k.violate("%s: LOCK %s answered %v", c.name, file, st)
		}
		time.Sleep(time.Duration(c.rng.IntN(5)) * time.Millisecond)
	}
}

func (c *simClient) doReclaim(stop <-chan struct{}) {
	if c.slow > 0 {
		time.Sleep(c.slow)
	}
	c.mu.Lock()
	held, file := c.held, c.file
	c.mu.Unlock()
	if held == nil {
		return
	}
	st, ok := c.lock(stop, file, *held, true)
	if !ok {
		return
	}
	c.reclaims.Add(1)
	if st != nlm.Granted {
		c.k.violate("%s: reclaim of [%d,%d) on %s answered %v: an acknowledged lock was lost", c.name, held.start, held.end, file, st)
	}
}

// ---- the test --------------------------------------------------------------

// Acceptance: three nlmd on one host, virtual servers X (moving) and Y
// (staying on node 1), clients of each locking all along. X moves 100
// times between the nodes by release and takeover (planned: no grace, no
// reclaim) and three times by killing its node (unplanned: SM_NOTIFY from
// X, reclaim in X's grace, which ends early once its clients have
// reclaimed; a new lock through X waits for the end of the grace period),
// and once by the control API without a snapshot (the same, with node 1
// alive and serving Y).
// Throughout: no two conflicting holders at once, no acknowledged lock
// lost, and Y's clients never see a grace period.
func TestFailover(t *testing.T) {
	binary(t, "nlmd")
	if !inNetns(t) {
		return
	}
	const planned = 100
	peers := simClients(t)
	c := newCluster(t, 3, "--grace-period", "30s", "--grace-quiet", "1s", "--notify-timeout", "20s")
	x, y := vip, vip3
	c.takeover(0, x, "vip-x")
	c.takeover(0, y, "vip-y")

	k := &checker{}
	var xs, ys []*simClient
	fileSet := func(prefix string) []string {
		var f []string
		for i := range 6 {
			f = append(f, fmt.Sprintf("%s-file-%d", prefix, i))
		}
		return f
	}
	for i := range 10 {
		xs = append(xs, newSimClient(t, k, i, x, fileSet("x")))
		ys = append(ys, newSimClient(t, k, i, y, fileSet("y")))
	}
	// Holders keep a lock of their own for the whole test; one of X's is
	// slow to reclaim (but within the quiet time a client is granted).
	for i := range 3 {
		for _, set := range []*[]*simClient{&xs, &ys} {
			vipOf := x
			if set == &ys {
				vipOf = y
			}
			h := newSimClient(t, k, 100+i, vipOf, []string{fmt.Sprintf("%v-hold-%d", vipOf, i)})
			h.hold = true
			*set = append(*set, h)
		}
	}
	xs[len(xs)-1].slow = 500 * time.Millisecond // within --grace-quiet
	byAddr := map[netip.Addr]*simClient{}
	for _, cl := range append(append([]*simClient(nil), xs...), ys...) {
		byAddr[cl.addr] = cl
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
	// The holders take their locks first.
	for _, cl := range append(append([]*simClient(nil), xs...), ys...) {
		if cl.hold {
			h := holding{owner: cl.name, start: 0, end: 100, excl: true}
			if st, _ := cl.lock(nil, cl.files[0], h, false); st != nlm.Granted {
				t.Fatalf("%s: holder lock %v", cl.name, st)
			}
			k.acquire(cl.vip.String()+"/"+cl.files[0], h)
			cl.held, cl.file = &h, cl.files[0]
		}
	}
	stop := make(chan struct{})
	var wg sync.WaitGroup
	for _, cl := range append(append([]*simClient(nil), xs...), ys...) {
		wg.Go(func() { cl.run(stop) })
	}
	probe := newSimClient(t, k, 200, x, nil)

	// checkHolders: every holder's lock is where it was (TEST from another
	// owner through the virtual server reports it).
	checkHolders := func(when string) {
		for _, cl := range append(append([]*simClient(nil), xs...), ys...) {
			if !cl.hold {
				continue
			}
			pr := probe
			if cl.vip == y {
				pr = ys[0]
			}
			a := pr.args(cl.files[0], holding{start: 0, end: 1, excl: true}, false)
			a.Lock.SVID = 77
			var r nlm.TestRes
			pr.call(nil, func(ctx context.Context) (nlm.Stat, error) {
				var err error
				tc := pr.rpc
				if cl.vip != pr.vip {
					return 0, fmt.Errorf("wrong client")
				}
				r, err = tc.Test(ctx, &nlm.TestArgs{Cookie: a.Cookie, Exclusive: true, Lock: a.Lock})
				return r.Stat, err
			})
			if r.Stat != nlm.Denied || string(r.Holder.OH) != cl.name {
				k.violate("%s: %s's lock on %s: TEST answered %v holder %q", when, cl.name, cl.files[0], r.Stat, r.Holder.OH)
			}
		}
	}

	where := 0 // node serving X
	var moves []time.Duration
	start := time.Now()
	for i := range planned {
		time.Sleep(30 * time.Millisecond) // let the clients work
		to := (where + 1 + i%2) % 3
		t0 := time.Now()
		rel := c.release(where, x, true)
		tk := c.takeover(to, x, "vip-x")
		moves = append(moves, time.Since(t0))
		if !rel.Snapshot || !tk.Planned || !tk.GraceUntil.IsZero() || tk.Refused != 0 {
			t.Fatalf("planned move %d: release %+v, takeover %+v", i+1, rel, tk)
		}
		where = to
		if i%10 == 9 {
			checkHolders(fmt.Sprintf("after planned move %d", i+1))
		}
	}
	plannedTook := time.Since(start)

	// Moves through grace and reclaim: first one by the control API from
	// node 1 (which goes on serving Y) to node 2 without a snapshot, then
	// three by killing X's node (never node 1).
	type unplanned struct {
		how           string
		notified      int
		graceRefused  bool
		graceLasted   time.Duration
		why           string
		reclaimsAfter int64
	}
	var ups []unplanned
	for i := range 4 {
		viaAPI := i == 0
		if viaAPI && where != 0 {
			c.release(where, x, true)
			c.takeover(0, x, "vip-x")
			where = 0
		}
		if !viaAPI && where == 0 {
			c.release(0, x, true)
			c.takeover(1, x, "vip-x")
			where = 1
		}
		time.Sleep(200 * time.Millisecond)
		dead, to := where, 3-where // node 2 ↔ node 3
		if viaAPI {
			to = 1 // node 1 → node 2
		}
		before := int64(0)
		for _, cl := range xs {
			before += cl.reclaims.Load()
		}
		peers.Reset()
		how := "node killed"
		if viaAPI {
			how = "control API, no snapshot"
			if rel := c.release(where, x, false); rel.Snapshot {
				t.Fatalf("release without a snapshot: %+v", rel)
			}
		} else {
			c.kill(dead)
		}
		tk := c.takeover(to, x, "vip-x")
		if tk.Planned || tk.GraceUntil.IsZero() || tk.Notifying == 0 {
			t.Fatalf("takeover after a release without snapshot or a death (%s): %+v", how, tk)
		}
		// A new lock through X waits for the end of X's grace period.
		st, _ := probe.lock(nil, "x-probe", holding{owner: probe.name, start: 0, end: 1, excl: true}, false)
		up := unplanned{how: how}
		up.graceRefused = st == nlm.DeniedGracePeriod
		// ... which ends early, once X's clients have reclaimed.
		deadline := time.Now().Add(25 * time.Second)
		var vs hacallout.VIPStatus
		for time.Now().Before(deadline) {
			ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
			vs, _ = c.api(to).VIP(ctx, x)
			cancel()
			if !vs.Grace.Active {
				break
			}
			time.Sleep(50 * time.Millisecond)
		}
		up.graceLasted, up.why = vs.Grace.Ended.Sub(vs.Grace.Started), vs.Grace.Why
		if st, _ := probe.lock(nil, "x-probe", holding{owner: probe.name, start: 0, end: 1, excl: true}, false); st != nlm.Granted {
			t.Fatalf("a new lock through X after its grace period: %v", st)
		}
		probe.unlock(nil, "x-probe", holding{owner: probe.name, start: 0, end: 1, excl: true})
		for _, n := range peers.Notifications() {
			if n.From.Addr() == x && n.MonName == "vip-x" {
				up.notified++
			}
		}
		after := int64(0)
		for _, cl := range xs {
			after += cl.reclaims.Load()
		}
		up.reclaimsAfter = after - before
		ups = append(ups, up)
		checkHolders("after a move through grace (" + how + ")")
		if !viaAPI {
			c.start(dead) // back, empty
		}
		where = to
	}
	close(stop)
	wg.Wait()
	checkHolders("at the end")

	// Verdicts.
	for _, v := range k.report() {
		t.Error(v)
	}
	var xg, xd, xgr, xe, yg, yd, ygr, ye int64
	for _, cl := range xs {
		xg, xd, xgr, xe = xg+cl.grants.Load(), xd+cl.denied.Load(), xgr+cl.graceDenied.Load(), xe+cl.errors.Load()
	}
	for _, cl := range ys {
		yg, yd, ygr, ye = yg+cl.grants.Load(), yd+cl.denied.Load(), ygr+cl.graceDenied.Load(), ye+cl.errors.Load()
	}
	if ygr != 0 {
		t.Errorf("Y's clients saw %d DENIED_GRACE_PERIOD while X moved", ygr)
	}
	if ye != 0 {
		t.Errorf("Y's clients had %d failed calls while X moved", ye)
	}
	if yg < 100 || xg < 100 {
		t.Errorf("too little load: X %d grants, Y %d", xg, yg)
	}
	for i, up := range ups {
		if !up.graceRefused || up.why != virtualserver.EndReclaimed || up.graceLasted > 10*time.Second || up.notified < 13 || up.reclaimsAfter == 0 {
			t.Errorf("move through grace %d: %+v", i+1, up)
		}
	}
	med := median(moves)
	t.Logf("planned moves: %d in %v, each (release + takeover) median %v, max %v", planned, plannedTook.Round(time.Millisecond), med, maxOf(moves))
	for i, up := range ups {
		t.Logf("move through grace %d (%s): %d clients notified from X, grace ended after %v (%s), %d reclaims", i+1, up.how, up.notified,
			up.graceLasted.Round(time.Millisecond), up.why, up.reclaimsAfter)
	}
	t.Logf("X's clients: %d grants, %d denied, %d DENIED_GRACE_PERIOD, %d calls retried over moves", xg, xd, xgr, xe)
	t.Logf("Y's clients: %d grants, %d denied, %d DENIED_GRACE_PERIOD, %d failed calls", yg, yd, ygr, ye)
	t.Logf("violations: %d", len(k.report()))
}

func median(d []time.Duration) time.Duration {
	s := append([]time.Duration(nil), d...)
	for i := range s {
		for j := i + 1; j < len(s); j++ {
			if s[j] < s[i] {
				s[i], s[j] = s[j], s[i]
			}
		}
	}
	return s[len(s)/2]
}

func maxOf(d []time.Duration) time.Duration {
	var m time.Duration
	for _, v := range d {
		m = max(m, v)
	}
	return m
}

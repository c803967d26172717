package integration

import (
	"context"
	"errors"
	"fmt"
	"maps"
	"math/rand/v2"
	"net/netip"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/nlmha/nlmha/hacallout"
	"github.com/nlmha/nlmha/nlm"
	"github.com/nlmha/nlmha/nsm"
	"github.com/nlmha/nlmha/nsm/nsmtest"
	"github.com/nlmha/nlmha/sunrpc"
)

// TestFailoverRandom runs randomized, seeded sequences of what a cluster
// does to virtual servers, over three real nlmd processes (listen mode
// vip, one shared state directory, configuration files for SIGHUP) and
// simulated clients, each with its own address and statd, locking all
// along. Each sequence draws its steps from: planned moves; kill -9 of a
// node (its virtual servers taken over elsewhere, unplanned); planned
// moves during the grace period and during the notification that follow;
// releases without snapshot; SIGTERM and restart; SIGHUP moving a virtual
// server; a client's statd unreachable for a while; a client rebooting
// (SM_NOTIFY); grace ended by hand; time passing.
//
// Checked from the clients' side: no two conflicting locks are ever held
// (a lock counts as held from its acknowledgement until its UNLOCK is
// sent); every reclaim of a lock a client held is granted (unless an admin
// ended the grace period first); and after every step, with the clients
// paused, each virtual server's owner holds exactly the locks its clients
// hold — none lost, none left over — except those waiting to be
// reclaimed. Also: no SM_NOTIFY finds no socket to leave from.
//
// A failing sequence prints its seed and step list; the seed replays the
// same steps (timing aside): NLMHA_FAILOVER_SEED=N. make test runs
// NLMHA_FAILOVER_SEQUENCES sequences (default 8, about a minute); make
// soak runs them for NLMHA_FAILOVER_DURATION.
func TestFailoverRandom(t *testing.T) {
	binary(t, "nlmd")
	if !inNetns(t) {
		return
	}
	peers := simClients(t)
	seqs, _ := strconv.Atoi(os.Getenv("NLMHA_FAILOVER_SEQUENCES"))
	if seqs <= 0 {
		seqs = 8
	}
	var until time.Time
	if d, err := time.ParseDuration(os.Getenv("NLMHA_FAILOVER_DURATION")); err == nil && d > 0 {
		until, seqs = time.Now().Add(d), 1<<30
	}
	first := rand.Uint64() >> 1
	if s, err := strconv.ParseUint(os.Getenv("NLMHA_FAILOVER_SEED"), 10, 64); err == nil {
		first, seqs, until = s, 1, time.Time{}
	}
	total := map[string]int{}
	steps := 0
	for i := range seqs {
		if !until.IsZero() && time.Now().After(until) {
			break
		}
		seed := first + uint64(i)
		h := newRandomRun(t, peers, seed)
		err := h.run()
		for k, n := range h.stats {
			total[k] += n
		}
		steps += len(h.steps)
		if err != nil {
			t.Fatalf("seed %d (replay: NLMHA_FAILOVER_SEED=%d go test ./integration -run TestFailoverRandom -v): %v\nsteps:\n  %s",
				seed, seed, err, strings.Join(h.steps, "\n  "))
		}
		t.Logf("sequence %d (seed %d): %d steps, %v; violations 0", i+1, seed, len(h.steps), h.summary())
	}
	t.Logf("all: %d steps: %v; violations 0", steps, total)
}

var randomVIPs = []struct {
	addr netip.Addr
	name string
}{{netip.MustParseAddr("127.0.0.2"), "vip-x"}, {netip.MustParseAddr("127.0.0.3"), "vip-y"}}

// randomRun is one sequence: its cluster, clients and bookkeeping.
type randomRun struct {
	t       *testing.T
	seed    uint64
	rng     *rand.Rand
	peers   *nsmtest.Peers
	bin     string
	state   string
	nodes   []*randomNode
	k       *checker
	clients []*rndClient
	byAddr  map[netip.Addr]*rndClient
	// gen counts, per virtual server, the moments its locks may have been
	// lost (a node killed, a release without snapshot): a grant received
	// across one may have to be reclaimed.
	gen   map[netip.Addr]*atomic.Uint64
	owner map[netip.Addr]int // node serving each virtual server
	steps []string
	stats map[string]int
	stop  chan struct{}
	wg    sync.WaitGroup
}

type randomNode struct {
	i      int
	p      *proc
	sock   string
	config string
	vips   []netip.Addr // its configuration file's list: what it serves
	mem    []netip.Addr // the list it read last (at its start or last SIGHUP)
	alive  bool
}

func newRandomRun(t *testing.T, peers *nsmtest.Peers, seed uint64) *randomRun {
	h := &randomRun{t: t, seed: seed, rng: rand.New(rand.NewPCG(seed, seed^0xda942042e4dd58b5)), peers: peers,
		bin: binary(t, "nlmd"), state: t.TempDir(), k: &checker{}, byAddr: map[netip.Addr]*rndClient{},
		gen: map[netip.Addr]*atomic.Uint64{}, owner: map[netip.Addr]int{}, stats: map[string]int{}, stop: make(chan struct{})}
	for _, v := range randomVIPs {
		h.gen[v.addr] = &atomic.Uint64{}
	}
	return h
}

func (h *randomRun) step(format string, args ...any) {
	h.steps = append(h.steps, fmt.Sprintf(format, args...))
}

func (h *randomRun) summary() string {
	var g, d, gd, rc int64
	for _, c := range h.clients {
		g, d, gd, rc = g+c.grants.Load(), d+c.denied.Load(), gd+c.graceDenied.Load(), rc+c.reclaims.Load()
	}
	return fmt.Sprintf("%v; clients: %d grants, %d denied, %d DENIED_GRACE_PERIOD, %d reclaims granted", h.stats, g, d, gd, rc)
}

// ---- nodes ----------------------------------------------------------------

func (h *randomRun) writeConfig(n *randomNode) {
	var b strings.Builder
	b.WriteString("vips:\n")
	for _, a := range n.vips {
		for _, v := range randomVIPs {
			if v.addr == a {
				fmt.Fprintf(&b, "  - addr: %s\n    name: %s\n", v.addr, v.name)
			}
		}
	}
	if len(n.vips) == 0 {
		b.Reset()
		b.WriteString("vips: []\n")
	}
	if err := os.WriteFile(n.config, []byte(b.String()), 0o600); err != nil {
		h.t.Fatal(err)
	}
}

func (h *randomRun) startNode(n *randomNode) {
	h.writeConfig(n)
	// A simulated client does one call at a time: told to reclaim while a
	// call of it is lost (cut off by a kill or a release), it reclaims only
	// once that call times out (1 s) and is answered. The quiet time must
	// exceed that, as --grace-quiet must exceed a real client's delay
	// between answering SM_NOTIFY and reclaiming.
	args := nlmdArgs(h.state, "--config", n.config, "--listen-mode", "vip", "--serve-unknown=false", "--rpcbind", "none",
		"--control-socket", n.sock, "--log-level", "info", "--grace-period", "30s", "--grace-quiet", "2s", "--notify-timeout", "60s",
		"--shutdown-timeout", "10s")
	os.Remove(n.sock)
	n.p = startDaemon(h.t, h.bin, args...)
	n.alive, n.mem = true, slices.Clone(n.vips)
	ctx, cancel := context.WithTimeout(context.Background(), 15*time.Second)
	defer cancel()
	for {
		if _, err := hacallout.NewClient(n.sock).Status(ctx); err == nil {
			return
		}
		if ctx.Err() != nil {
			h.t.Fatalf("node %d does not answer", n.i+1)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

func (h *randomRun) api(n int) *hacallout.Client { return hacallout.NewClient(h.nodes[n].sock) }

func ctx30() (context.Context, context.CancelFunc) {
	return context.WithTimeout(context.Background(), 30*time.Second)
}

// setConfigured keeps node n's configuration file saying what it serves,
// so that a restart or a SIGHUP takes over exactly that.
func (h *randomRun) setConfigured(n int, vip netip.Addr, on bool) {
	nd := h.nodes[n]
	nd.vips = slices.DeleteFunc(nd.vips, func(a netip.Addr) bool { return a == vip })
	if on {
		nd.vips = append(nd.vips, vip)
	}
	h.writeConfig(nd)
}

func (h *randomRun) takeover(n int, vip netip.Addr) (hacallout.TakeoverResult, error) {
	ctx, cancel := ctx30()
	defer cancel()
	r, err := h.api(n).Takeover(ctx, vip, nameOf(vip))
	if err != nil {
		return r, fmt.Errorf("takeover of %v on node %d: %w", vip, n+1, err)
	}
	h.owner[vip] = n
	h.setConfigured(n, vip, true)
	return r, nil
}

func (h *randomRun) release(n int, vip netip.Addr, snapshot bool) (hacallout.ReleaseResult, error) {
	ctx, cancel := ctx30()
	defer cancel()
	r, err := h.api(n).Release(ctx, vip, snapshot)
	if err != nil {
		return r, fmt.Errorf("release of %v on node %d: %w", vip, n+1, err)
	}
	h.owner[vip] = -1
	h.setConfigured(n, vip, false)
	return r, nil
}

func nameOf(vip netip.Addr) string {
	for _, v := range randomVIPs {
		if v.addr == vip {
			return v.name
		}
	}
	return ""
}

func (h *randomRun) alive(except int) []int {
	var out []int
	for _, n := range h.nodes {
		if n.alive && n.i != except {
			out = append(out, n.i)
		}
	}
	return out
}

// lossy brackets something after which a virtual server's locks may be
// gone (its node killed, a release without snapshot): every holder of it
// must reclaim, and a grant that crosses it too.
func (h *randomRun) lossy(vips []netip.Addr, do func()) {
	for _, v := range vips {
		h.gen[v].Add(1)
	}
	do()
	for _, v := range vips {
		h.gen[v].Add(1)
	}
	for _, c := range h.clients {
		if slices.Contains(vips, c.vip) {
			c.mu.Lock()
			if c.held != nil {
				c.needsReclaim, c.maybeLost = true, false
			}
			c.mu.Unlock()
		}
	}
}

// ---- the sequence -----------------------------------------------------------

func (h *randomRun) run() (err error) {
	defer func() {
		close(h.stop)
		h.wg.Wait()
		for _, n := range h.nodes {
			if n.alive {
				n.p.stop(syscall.SIGTERM, 15*time.Second)
			}
		}
		for _, c := range h.clients {
			h.peers.SetDead(c.addr, false)
		}
		if err == nil {
			err = h.nodeLogs()
		}
	}()
	h.peers.Reset()
	for i := range 3 {
		n := &randomNode{i: i, sock: filepath.Join(h.t.TempDir(), "nlmd.sock"), config: filepath.Join(h.t.TempDir(), "nlmd.yaml")}
		h.nodes = append(h.nodes, n)
		h.startNode(n)
	}
	for i, v := range randomVIPs {
		if _, err := h.takeover(i, v.addr); err != nil {
			return err
		}
	}
	for vi, v := range randomVIPs {
		for i := range 7 {
			c := newRndClient(h, vi*16+i, v.addr)
			c.hold = i < 3 // holders keep their lock for long stretches
			h.clients = append(h.clients, c)
			h.byAddr[c.addr] = c
		}
	}
	h.peers.OnNotify(func(n nsmtest.Notification) {
		if c := h.byAddr[n.To]; c != nil && n.From.Addr() == c.vip {
			select {
			case c.reclaimReq <- struct{}{}:
			default:
			}
		}
	})
	for _, c := range h.clients {
		h.wg.Go(func() { c.run(h.stop) })
	}
	nsteps := 10 + h.rng.IntN(8)
	for range nsteps {
		if err := h.randomStep(); err != nil {
			return err
		}
		if err := h.check(false); err != nil {
			return err
		}
	}
	// The end: every statd answers again; every grace period ends; the
	// clients must hold what the servers hold.
	h.step("statds back; wait for every grace period to end")
	for _, c := range h.clients {
		h.peers.SetDead(c.addr, false)
	}
	deadline := time.Now().Add(60 * time.Second)
	for {
		inGrace := false
		for _, v := range randomVIPs {
			ctx, cancel := ctx30()
			st, err := h.api(h.owner[v.addr]).VIP(ctx, v.addr)
			cancel()
			if err != nil {
				return fmt.Errorf("status of %v: %w", v.addr, err)
			}
			inGrace = inGrace || st.Grace.Active
		}
		if !inGrace {
			break
		}
		if time.Now().After(deadline) {
			return errors.New("grace periods still on 60 s after the last step")
		}
		time.Sleep(100 * time.Millisecond)
	}
	time.Sleep(300 * time.Millisecond) // the last reclaims
	return h.check(true)
}

// randomStep draws one step and does it.
func (h *randomRun) randomStep() error {
	vip := randomVIPs[h.rng.IntN(len(randomVIPs))].addr
	from := h.owner[vip]
	others := h.alive(from)
	switch r := h.rng.IntN(100); {
	case r < 22 && len(others) > 0: // planned move
		to := others[h.rng.IntN(len(others))]
		h.step("planned move of %v: node %d → %d", vip, from+1, to+1)
		return h.plannedMove(vip, from, to)
	case r < 34 && len(others) > 0: // kill -9 of the node serving vip; its virtual servers go elsewhere
		return h.killNode(from)
	case r < 42 && len(others) > 0: // release without snapshot
		to := others[h.rng.IntN(len(others))]
		h.step("release of %v without snapshot: node %d → %d", vip, from+1, to+1)
		var err error
		h.lossy([]netip.Addr{vip}, func() { _, err = h.release(from, vip, false) })
		if err != nil {
			return err
		}
		h.stats["no-snapshot"]++
		if _, err := h.takeover(to, vip); err != nil {
			return err
		}
		return h.maybeMoveAgain(vip)
	case r < 50: // SIGTERM and restart
		return h.restartNode(from)
	case r < 57 && len(others) > 0: // SIGHUP: the address leaves one configuration and enters another
		to := others[h.rng.IntN(len(others))]
		h.step("SIGHUP move of %v: node %d → %d", vip, from+1, to+1)
		return h.sighupMove(vip, from, to)
	case r < 66: // a client's statd is unreachable for a while
		c := h.clients[h.rng.IntN(len(h.clients))]
		d := time.Duration(500+h.rng.IntN(3500)) * time.Millisecond
		h.step("%s's statd unreachable for %v", c.name, d)
		h.peers.SetDead(c.addr, true)
		time.AfterFunc(d, func() { h.peers.SetDead(c.addr, false) })
		h.stats["statd silent"]++
	case r < 73: // a client reboots
		c := h.clients[h.rng.IntN(len(h.clients))]
		h.step("%s reboots", c.name)
		h.stats["client reboot"]++
		select {
		case c.rebootReq <- struct{}{}:
		default:
		}
	case r < 78: // grace ended by hand
		return h.endGrace(vip)
	case r < 83: // a dead node comes back
		for _, n := range h.nodes {
			if !n.alive {
				h.step("node %d back (empty)", n.i+1)
				n.vips = nil
				h.startNode(n)
				h.stats["node back"]++
				break
			}
		}
	default:
		d := time.Duration(100+h.rng.IntN(900)) * time.Millisecond
		h.step("let the clients work %v", d)
		time.Sleep(d)
		return nil
	}
	time.Sleep(time.Duration(h.rng.IntN(300)) * time.Millisecond)
	return nil
}

func (h *randomRun) plannedMove(vip netip.Addr, from, to int) error {
	rel, err := h.release(from, vip, true)
	if err != nil {
		return err
	}
	tk, err := h.takeover(to, vip)
	if err != nil {
		return err
	}
	if !rel.Snapshot || !tk.Planned || tk.Refused != 0 || tk.GraceResumed != (rel.GraceLeft > 0) {
		return fmt.Errorf("planned move of %v: release %+v, takeover %+v", vip, rel, tk)
	}
	h.stats["planned"]++
	if tk.GraceResumed {
		h.stats["planned during grace"]++
	}
	return nil
}

// maybeMoveAgain moves a virtual server just taken over unplanned once
// more, half of the time, at once or a moment later: during its grace
// period, while its clients are being notified.
func (h *randomRun) maybeMoveAgain(vip netip.Addr) error {
	if h.rng.IntN(2) == 0 {
		return nil
	}
	// Half of the time at once, while SM_NOTIFYs and reclaims are on
	// their way; else a moment later.
	if h.rng.IntN(2) == 0 {
		time.Sleep(time.Duration(h.rng.IntN(30)) * time.Millisecond)
	} else {
		time.Sleep(time.Duration(h.rng.IntN(400)) * time.Millisecond)
	}
	from := h.owner[vip]
	others := h.alive(from)
	if len(others) == 0 {
		return nil
	}
	to := others[h.rng.IntN(len(others))]
	h.step("  planned move of %v during its grace period: node %d → %d", vip, from+1, to+1)
	return h.plannedMove(vip, from, to)
}

func (h *randomRun) killNode(dead int) error {
	var vips []netip.Addr
	for v, n := range h.owner {
		if n == dead {
			vips = append(vips, v)
		}
	}
	slices.SortFunc(vips, netip.Addr.Compare)
	h.step("kill -9 node %d (serving %v)", dead+1, vips)
	if h.rng.IntN(2) == 0 {
		// One of their clients' statd will not hear of it for a while: it
		// reclaims late, maybe after another move.
		var cs []*rndClient
		for _, c := range h.clients {
			if slices.Contains(vips, c.vip) && c.hold {
				cs = append(cs, c)
			}
		}
		if len(cs) > 0 {
			c := cs[h.rng.IntN(len(cs))]
			d := time.Duration(1000+h.rng.IntN(3000)) * time.Millisecond
			h.step("  %s's statd unreachable for %v", c.name, d)
			h.peers.SetDead(c.addr, true)
			time.AfterFunc(d, func() { h.peers.SetDead(c.addr, false) })
		}
	}
	h.lossy(vips, func() {
		h.nodes[dead].p.stop(syscall.SIGKILL, 5*time.Second)
		h.nodes[dead].alive = false
	})
	h.stats["kill -9"]++
	for _, v := range vips {
		h.owner[v] = -1
		rest := h.alive(-1)
		to := rest[h.rng.IntN(len(rest))]
		tk, err := h.takeover(to, v)
		if err != nil {
			return err
		}
		if tk.Planned {
			return fmt.Errorf("takeover of %v after its node died used a snapshot: %+v", v, tk)
		}
		h.step("  %v taken over by node %d (grace until %v, notifying %d)", v, to+1, tk.GraceUntil.Format("15:04:05.000"), tk.Notifying)
		if err := h.maybeMoveAgain(v); err != nil {
			return err
		}
	}
	h.nodes[dead].vips = nil
	return nil
}

// restartNode stops node n with SIGTERM (every virtual server released
// with a snapshot) and starts it again, which takes its configured
// virtual servers over from those snapshots.
func (h *randomRun) restartNode(n int) error {
	nd := h.nodes[n]
	h.step("SIGTERM and restart of node %d (serving %v)", n+1, nd.vips)
	if err := nd.p.stop(syscall.SIGTERM, 20*time.Second); err != nil {
		h.k.violate("node %d: SIGTERM: %v", n+1, err)
	}
	h.startNode(nd)
	for _, v := range nd.vips {
		if err := h.waitServed(n, v); err != nil {
			return err
		}
	}
	h.stats["SIGTERM restart"]++
	return nil
}

func (h *randomRun) waitServed(n int, vip netip.Addr) error {
	deadline := time.Now().Add(20 * time.Second)
	for {
		ctx, cancel := ctx30()
		st, err := h.api(n).VIP(ctx, vip)
		cancel()
		if err == nil && st.State == "serving" {
			h.owner[vip] = n
			return nil
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("node %d does not serve %v: %+v %v", n+1, vip, st, err)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// sighupMove moves a virtual server by configuration: out of the old
// node's list and SIGHUP (if that list is where it came from; else a
// release by the API), into the new node's list and SIGHUP.
func (h *randomRun) sighupMove(vip netip.Addr, from, to int) error {
	if slices.Contains(h.nodes[from].mem, vip) {
		h.setConfigured(from, vip, false)
		h.hup(from)
		deadline := time.Now().Add(20 * time.Second)
		for {
			ctx, cancel := ctx30()
			st, err := h.api(from).VIP(ctx, vip)
			cancel()
			if err == nil && st.State == "released" {
				break
			}
			if time.Now().After(deadline) {
				return fmt.Errorf("SIGHUP did not release %v on node %d: %+v %v", vip, from+1, st, err)
			}
			time.Sleep(20 * time.Millisecond)
		}
		h.owner[vip] = -1
		h.stats["SIGHUP release"]++
	} else if _, err := h.release(from, vip, true); err != nil {
		return err
	}
	if slices.Contains(h.nodes[to].mem, vip) {
		// The list it read last has it already (it served it before, and
		// it left by the API): a SIGHUP would change nothing.
		_, err := h.takeover(to, vip)
		return err
	}
	h.setConfigured(to, vip, true)
	h.hup(to)
	h.stats["SIGHUP takeover"]++
	return h.waitServed(to, vip)
}

// hup makes node n read its configuration again. Its list then is what
// it serves (the harness keeps every list so), and the reload takes over
// or releases only what changed since the list it read last.
func (h *randomRun) hup(n int) {
	nd := h.nodes[n]
	nd.p.cmd.Process.Signal(syscall.SIGHUP)
	nd.mem = slices.Clone(nd.vips)
}

// endGrace ends the virtual server's grace period by hand, if it is in
// one. What its clients have not reclaimed by then is theirs no more:
// they are taken to learn it at once (see the lifecycle model).
func (h *randomRun) endGrace(vip netip.Addr) error {
	ctx, cancel := ctx30()
	defer cancel()
	n := h.owner[vip]
	st, err := h.api(n).VIP(ctx, vip)
	if err != nil || !st.Grace.Active {
		return err
	}
	h.step("grace of %v ended by hand", vip)
	held, err := h.serverLocks(vip)
	if err != nil {
		return err
	}
	for _, c := range h.clients {
		if c.vip == vip {
			c.forfeit(held)
		}
	}
	if _, err := h.api(n).Grace(ctx, vip, "end"); err != nil {
		return fmt.Errorf("ending the grace period of %v: %w", vip, err)
	}
	h.stats["grace ended by hand"]++
	return nil
}

// check pauses the clients and compares what each virtual server's owner
// holds with what its clients hold.
func (h *randomRun) check(final bool) error {
	for _, c := range h.clients {
		if !c.pause(20 * time.Second) {
			h.k.violate("%s still busy 20 s into a check", c.name)
		}
	}
	defer func() {
		for _, c := range h.clients {
			c.resume()
		}
	}()
	want := map[string]bool{} // locks that must be there
	may := map[string]bool{}  // locks that may be there (waiting to be reclaimed)
	for _, c := range h.clients {
		c.mu.Lock()
		if c.held != nil {
			k := lockKey(c.vip, c.name, c.file, c.held.start, c.held.end, c.held.excl)
			if c.needsReclaim || (c.maybeLost && !final) {
				may[k] = true
			} else {
				want[k] = true
			}
			if final && c.needsReclaim {
				h.k.violate("%s still has %s/%s [%d,%d) to reclaim at the end", c.name, c.vip, c.file, c.held.start, c.held.end)
			}
		}
		c.mu.Unlock()
	}
	have := map[string]bool{}
	for _, v := range randomVIPs {
		held, err := h.serverLocks(v.addr)
		if err != nil {
			return err
		}
		maps.Copy(have, held)
	}
	for k := range want {
		if !have[k] {
			h.k.violate("an acknowledged lock is gone: %s", k)
		}
	}
	for k := range have {
		if !want[k] && !may[k] {
			h.k.violate("a lock no client holds: %s", k)
		}
	}
	if v := h.k.report(); len(v) > 0 {
		return errors.New(strings.Join(v, "\n"))
	}
	return nil
}

// serverLocks returns the locks vip's owner holds, by lockKey.
func (h *randomRun) serverLocks(vip netip.Addr) (map[string]bool, error) {
	ctx, cancel := ctx30()
	defer cancel()
	r, err := h.api(h.owner[vip]).Locks(ctx, vip.String(), "", "", 0)
	if err != nil {
		return nil, fmt.Errorf("locks of %v: %w", vip, err)
	}
	have := map[string]bool{}
	for _, l := range r.Locks {
		if l.Blocked {
			continue
		}
		fh, _ := hexDecode(l.FH)
		end := l.End
		if end == 0 {
			end = ^uint64(0)
		}
		have[lockKey(l.VIP, l.Caller, strings.TrimPrefix(string(fh), l.VIP.String()+"/"), l.Start, end, l.Exclusive)] = true
	}
	return have, nil
}

func lockKey(vip netip.Addr, caller, file string, start, end uint64, excl bool) string {
	return fmt.Sprintf("%v %s %s [%d,%d) excl=%v", vip, caller, file, start, end, excl)
}

func hexDecode(s string) ([]byte, error) {
	out := make([]byte, len(s)/2)
	for i := range out {
		v, err := strconv.ParseUint(s[2*i:2*i+2], 16, 8)
		if err != nil {
			return nil, err
		}
		out[i] = byte(v)
	}
	return out, nil
}

// nodeLogs looks through the nodes' output for what must never happen.
func (h *randomRun) nodeLogs() error {
	for _, n := range h.nodes {
		out := n.p.out.String()
		for _, bad := range []string{"no UDP socket serves", "panic:", "DATA RACE"} {
			if strings.Contains(out, bad) {
				return fmt.Errorf("node %d logged %q:\n%s", n.i+1, bad, out)
			}
		}
	}
	return nil
}

// ---- clients ----------------------------------------------------------------

// rndClient is one client host: its own address and statd, locking
// through one virtual server, one lock at a time, reclaiming when told.
type rndClient struct {
	h     *randomRun
	addr  netip.Addr
	name  string
	vip   netip.Addr
	files []string
	hold  bool // keeps its lock for long stretches
	rng   *rand.Rand
	rpc   *nlm.Client
	nsm   *sunrpc.Client
	state int32 // its statd's state number

	reclaimReq, rebootReq chan struct{}

	// op is held while the client does anything; a check takes it to
	// pause the client between operations.
	op     sync.Mutex
	paused bool // the check holds op

	mu           sync.Mutex
	held         *holding
	file         string
	needsReclaim bool
	maybeLost    bool // granted across a lossy moment (see doOne)
	// forfeited is a lock an admin's end of grace took: a reclaim of it
	// that is granted anyway is given back.
	forfeited *holding

	grants, denied, graceDenied, reclaims atomic.Int64
}

func newRndClient(h *randomRun, i int, vip netip.Addr) *rndClient {
	a := netip.AddrFrom4([4]byte{127, 2, vip.As4()[3], byte(i + 1)})
	c := &rndClient{h: h, addr: a, name: fmt.Sprintf("c%d-%v", i, a), vip: vip, state: 1,
		rng: rand.New(rand.NewPCG(h.seed, uint64(i))), reclaimReq: make(chan struct{}, 1), rebootReq: make(chan struct{}, 1)}
	for f := range 3 {
		c.files = append(c.files, fmt.Sprintf("f%d", f))
	}
	// Half over TCP (as Linux clients mount), half over UDP.
	tr := sunrpc.UDP
	if i%2 == 1 {
		tr = sunrpc.TCP
	}
	rc, err := sunrpc.Dial(context.Background(), tr, netip.AddrPortFrom(vip, nlmPort),
		sunrpc.ClientOptions{Local: a, Retransmit: 50 * time.Millisecond, MaxRetransmit: 200 * time.Millisecond})
	if err != nil {
		h.t.Fatal(err)
	}
	h.t.Cleanup(func() { rc.Close() })
	c.rpc = nlm.NewClient(rc, nlm.Vers4)
	if c.nsm, err = sunrpc.Dial(context.Background(), sunrpc.UDP, netip.AddrPortFrom(vip, nsmPort),
		sunrpc.ClientOptions{Local: a, Retransmit: 100 * time.Millisecond, MaxRetransmit: 400 * time.Millisecond}); err != nil {
		h.t.Fatal(err)
	}
	h.t.Cleanup(func() { c.nsm.Close() })
	return c
}

func (c *rndClient) fh(file string) []byte { return []byte(c.vip.String() + "/" + file) }

func (c *rndClient) args(file string, hd holding, reclaim bool) *nlm.LockArgs {
	return &nlm.LockArgs{Cookie: []byte("c"), Exclusive: hd.excl, Reclaim: reclaim, State: c.state,
		Lock: nlm.Lock{CallerName: []byte(c.name), FH: c.fh(file), OH: []byte(c.name), SVID: 1, Offset: hd.start, Len: hd.end - hd.start}}
}

// call retries through the moments the address has no server until the
// answer comes.
func (c *rndClient) call(stop <-chan struct{}, fn func(ctx context.Context) (nlm.Stat, error)) (nlm.Stat, bool) {
	return callUntil(stop, fn, nil)
}

func (c *rndClient) lock(stop <-chan struct{}, file string, hd holding, reclaim bool) (nlm.Stat, bool) {
	return c.call(stop, func(ctx context.Context) (nlm.Stat, error) {
		r, err := c.rpc.Lock(ctx, c.args(file, hd, reclaim))
		return r.Stat, err
	})
}

// unlock sends UNLOCK until it is answered (DENIED_GRACE_PERIOD: again
// later, as a Linux client does).
func (c *rndClient) unlock(stop <-chan struct{}, file string, hd holding) {
	for {
		st, ok := c.call(stop, func(ctx context.Context) (nlm.Stat, error) {
			a := c.args(file, hd, false)
			r, err := c.rpc.Unlock(ctx, &nlm.UnlockArgs{Cookie: a.Cookie, Lock: a.Lock})
			return r.Stat, err
		})
		if !ok || st == nlm.Granted {
			return
		}
		if st != nlm.DeniedGracePeriod {
			c.h.k.violate("%s: UNLOCK %s answered %v", c.name, file, st)
			return
		}
		time.Sleep(20 * time.Millisecond)
	}
}

func (c *rndClient) pause(wait time.Duration) bool {
	done := make(chan struct{})
	go func() { c.op.Lock(); close(done) }()
	select {
	case <-done:
		c.paused = true
		return true
	case <-time.After(wait):
		go func() { <-done; c.op.Unlock() }()
		return false
	}
}

func (c *rndClient) resume() {
	if c.paused {
		c.paused = false
		c.op.Unlock()
	}
}

func (c *rndClient) run(stop <-chan struct{}) {
	for {
		select {
		case <-stop:
			return
		case <-c.reclaimReq:
			c.op.Lock()
			c.doReclaim(stop)
			c.op.Unlock()
			continue
		case <-c.rebootReq:
			c.op.Lock()
			c.doReboot(stop)
			c.op.Unlock()
			continue
		default:
		}
		c.op.Lock()
		c.doOne(stop)
		c.op.Unlock()
		time.Sleep(time.Duration(2+c.rng.IntN(20)) * time.Millisecond)
	}
}

// doOne does one operation: unlock what it holds, or lock something. A
// client waiting to reclaim does nothing else (Linux lets no new request
// out to the server meanwhile).
func (c *rndClient) doOne(stop <-chan struct{}) {
	c.mu.Lock()
	held, file, waiting := c.held, c.file, c.needsReclaim
	c.mu.Unlock()
	if waiting {
		return
	}
	if held != nil {
		if c.hold && c.rng.IntN(50) > 0 {
			return
		}
		c.mu.Lock()
		c.held, c.maybeLost = nil, false
		c.mu.Unlock()
		c.h.k.release(c.vip.String()+"/"+file, *held)
		c.unlock(stop, file, *held)
		return
	}
	file = c.files[c.rng.IntN(len(c.files))]
	start := uint64(c.rng.IntN(6)) * 10
	hd := holding{owner: c.name, start: start, end: start + 10 + uint64(c.rng.IntN(3))*10, excl: c.rng.IntN(3) > 0}
	g0 := c.h.gen[c.vip].Load()
	st, ok := c.lock(stop, file, hd, false)
	if !ok {
		return
	}
	switch st {
	case nlm.Granted:
		c.grants.Add(1)
		c.h.k.acquire(c.vip.String()+"/"+file, hd)
		c.mu.Lock()
		c.held, c.file = &hd, file
		// Granted across a moment the locks may have been lost: by the
		// node that is gone (which monitored the client first, so the next
		// owner will tell it to reclaim) or by the next owner (which need
		// not). Until one or the other shows, it may be missing.
		c.maybeLost = c.h.gen[c.vip].Load() != g0
		c.mu.Unlock()
	case nlm.Denied:
		c.denied.Add(1)
	case nlm.DeniedGracePeriod:
		c.graceDenied.Add(1)
		time.Sleep(30 * time.Millisecond)
	default:
		c.h.k.violate("%s: LOCK %s answered %v", c.name, file, st)
	}
}

func (c *rndClient) doReclaim(stop <-chan struct{}) {
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
	c.mu.Lock()
	defer c.mu.Unlock()
	// By identity: a later lock of the same range is another lock.
	if c.forfeited != nil && c.forfeited == held {
		// An admin ended the grace period while this reclaim was on its
		// way: the lock is not the client's any more.
		c.forfeited = nil
		if st == nlm.Granted {
			c.mu.Unlock()
			c.unlock(stop, file, *held)
			c.mu.Lock()
		}
		return
	}
	if st != nlm.Granted {
		c.h.k.violate("%s: reclaim of %s [%d,%d) answered %v: an acknowledged lock was lost", c.name, file, held.start, held.end, st)
		return
	}
	c.reclaims.Add(1)
	if c.held == held {
		c.needsReclaim, c.maybeLost = false, false
	}
}

// forfeit: the grace period ends by hand. A lock the server holds is the
// client's still (kept, reclaimed, or granted by the next owner); one it
// does not hold is lost, whether or not the client has been told yet to
// reclaim it (its statd may be unreachable: it learns later, and its
// reclaim in some later grace period must not count).
func (c *rndClient) forfeit(server map[string]bool) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.held == nil {
		return
	}
	if server[lockKey(c.vip, c.name, c.file, c.held.start, c.held.end, c.held.excl)] {
		c.maybeLost = false
		return
	}
	c.h.k.release(c.vip.String()+"/"+c.file, *c.held)
	c.forfeited = c.held
	c.held, c.needsReclaim, c.maybeLost = nil, false, false
}

// doReboot: the client host restarts — it forgets its locks — and its
// statd tells the server (SM_NOTIFY, mon_name its address, a new state).
func (c *rndClient) doReboot(stop <-chan struct{}) {
	c.mu.Lock()
	if c.held != nil {
		c.h.k.release(c.vip.String()+"/"+c.file, *c.held)
	}
	c.held, c.needsReclaim, c.maybeLost, c.forfeited = nil, false, false, nil
	c.state += 2
	args := (&nsm.StatChge{MonName: c.addr.String(), State: c.state}).Append(nil)
	c.mu.Unlock()
	c.call(stop, func(ctx context.Context) (nlm.Stat, error) {
		_, err := c.nsm.Call(ctx, nsm.Prog, nsm.Vers, nsm.ProcNotify, args)
		return 0, err
	})
}

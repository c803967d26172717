package main

import (
	"context"
	"errors"
	"fmt"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	flag "github.com/spf13/pflag"

	"github.com/nlmha/nlmha/hacallout"
	"github.com/nlmha/nlmha/nlm"
	"github.com/nlmha/nlmha/nsm/nsmtest"
	"github.com/nlmha/nlmha/sunrpc"
)

// failoverOptions configure `nlmbench failover`.
type failoverOptions struct {
	clients  int
	rounds   int
	nlmd     string
	stateDir string
	quiet    time.Duration
}

var moveVIP = netip.MustParseAddr("127.0.0.2")

// runFailover measures moving a virtual server between two nlmd on this
// host (listen mode vip, one state directory) while N clients hold a lock
// each through it: for a planned move (release, then takeover) and an
// unplanned one (the owner killed, then takeover), the time during which
// a new, non-conflicting lock through the address cannot be granted, and
// for the unplanned one the time to notify every client and to end the
// grace period. Needs root in a private network namespace (port 111 for
// the simulated clients' portmapper); scripts/bench.sh runs it so.
func runFailover(args []string) int {
	var o failoverOptions
	fs := flag.NewFlagSet("nlmbench failover", flag.ContinueOnError)
	fs.IntVar(&o.clients, "clients", 1000, "client hosts holding a lock each through the virtual server")
	fs.IntVar(&o.rounds, "rounds", 5, "moves of each kind")
	self, _ := os.Executable()
	fs.StringVar(&o.nlmd, "nlmd", filepath.Join(filepath.Dir(self), "nlmd"), "the nlmd binary")
	fs.StringVar(&o.stateDir, "state-dir", "", "the shared state directory (default: a new one under $TMPDIR)")
	fs.DurationVar(&o.quiet, "grace-quiet", 5*time.Second, "nlmd --grace-quiet")
	if err := fs.Parse(args); err != nil {
		if errors.Is(err, flag.ErrHelp) {
			return 0
		}
		return 2
	}
	if err := failover(o); err != nil {
		fmt.Fprintln(os.Stderr, "nlmbench failover:", err)
		return 1
	}
	return 0
}

type benchNode struct {
	cmd  *exec.Cmd
	sock string
	args []string
}

func (n *benchNode) start() error {
	n.cmd = exec.Command(n.args[0], n.args[1:]...)
	n.cmd.Stderr = os.Stderr
	if err := n.cmd.Start(); err != nil {
		return err
	}
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	for {
		if _, err := hacallout.NewClient(n.sock).Status(ctx); err == nil {
			return nil
		}
		if ctx.Err() != nil {
			return fmt.Errorf("nlmd at %s does not answer", n.sock)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

func (n *benchNode) kill() {
	n.cmd.Process.Signal(syscall.SIGKILL)
	n.cmd.Wait()
}

func (n *benchNode) stop() {
	n.cmd.Process.Signal(syscall.SIGTERM)
	n.cmd.Wait()
}

func (n *benchNode) api() *hacallout.Client { return hacallout.NewClient(n.sock) }

// benchClient is one client host holding one lock through the virtual
// server; told of a restart, it reclaims and goes on (a TEST), as a
// Linux client reclaims and then lets its applications' requests out.
type benchClient struct {
	addr netip.Addr
	rpc  *nlm.Client
	lock nlm.Lock
}

func (c *benchClient) call(fn func(ctx context.Context) error) error {
	for range 200 {
		ctx, cancel := context.WithTimeout(context.Background(), time.Second)
		err := fn(ctx)
		cancel()
		if err == nil {
			return nil
		}
		time.Sleep(5 * time.Millisecond)
	}
	return errors.New("no answer")
}

func failover(o failoverOptions) error {
	peers, err := nsmtest.Start(111)
	if err != nil {
		return fmt.Errorf("cannot serve the clients' portmapper on port 111 (run as root in a private network namespace): %w", err)
	}
	defer peers.Close()
	state := o.stateDir
	if state == "" {
		if state, err = os.MkdirTemp("", "nlmbench-failover-"); err != nil {
			return err
		}
		defer os.RemoveAll(state)
	}
	var nodes [2]*benchNode
	for i := range nodes {
		sock := filepath.Join(state, fmt.Sprintf("node%d.sock", i))
		nodes[i] = &benchNode{sock: sock, args: []string{o.nlmd, "--listen-mode", "vip", "--serve-unknown=false", "--rpcbind", "none",
			"--state-dir", filepath.Join(state, "shared"), "--control-socket", sock, "--log-level", "warn",
			"--grace-period", "90s", "--grace-quiet", o.quiet.String()}}
		if err := nodes[i].start(); err != nil {
			return err
		}
		defer nodes[i].stop()
	}
	ctx := context.Background()
	owner := 0
	if _, err := nodes[owner].api().Takeover(ctx, moveVIP, "vip"); err != nil {
		return err
	}

	// The clients, each holding a lock on a file of its own.
	clients := make([]*benchClient, o.clients)
	byAddr := map[netip.Addr]*benchClient{}
	for i := range clients {
		a := netip.AddrFrom4([4]byte{127, 2, byte(i / 250), byte(1 + i%250)})
		rc, err := sunrpc.Dial(ctx, sunrpc.UDP, netip.AddrPortFrom(moveVIP, 4045), sunrpc.ClientOptions{Local: a, Retransmit: 50 * time.Millisecond})
		if err != nil {
			return err
		}
		defer rc.Close()
		c := &benchClient{addr: a, rpc: nlm.NewClient(rc, nlm.Vers4),
			lock: nlm.Lock{CallerName: []byte(a.String()), FH: []byte("held-" + a.String()), OH: []byte("o"), SVID: 1, Len: 1}}
		clients[i], byAddr[a] = c, c
	}
	var wg sync.WaitGroup
	var lockErr atomic.Value
	sem := make(chan struct{}, 64)
	for _, c := range clients {
		sem <- struct{}{}
		wg.Go(func() {
			defer func() { <-sem }()
			var r nlm.Res
			err := c.call(func(ctx context.Context) (err error) {
				r, err = c.rpc.Lock(ctx, &nlm.LockArgs{Cookie: []byte("c"), Exclusive: true, Lock: c.lock, State: 1})
				return err
			})
			if err == nil && r.Stat != nlm.Granted {
				err = fmt.Errorf("client %v: LOCK %v", c.addr, r.Stat)
			}
			if err != nil {
				lockErr.Store(err)
			}
		})
	}
	wg.Wait()
	if err, _ := lockErr.Load().(error); err != nil {
		return err
	}
	var reclaimed atomic.Int64
	peers.OnNotify(func(n nsmtest.Notification) {
		c := byAddr[n.To]
		if c == nil || n.From.Addr() != moveVIP {
			return
		}
		go func() {
			c.call(func(ctx context.Context) error {
				_, err := c.rpc.Lock(ctx, &nlm.LockArgs{Cookie: []byte("r"), Exclusive: true, Reclaim: true, Lock: c.lock, State: 3})
				return err
			})
			reclaimed.Add(1)
			c.call(func(ctx context.Context) error {
				_, err := c.rpc.Test(ctx, &nlm.TestArgs{Cookie: []byte("t"), Exclusive: true, Lock: c.lock})
				return err
			})
		}()
	})

	// The probe: a client that locks a fresh file and unlocks it, again
	// and again, recording when each lock was granted.
	probeAddr := netip.MustParseAddr("127.3.0.1")
	prc, err := sunrpc.Dial(ctx, sunrpc.UDP, netip.AddrPortFrom(moveVIP, 4045),
		sunrpc.ClientOptions{Local: probeAddr, Retransmit: 2 * time.Millisecond, MaxRetransmit: 10 * time.Millisecond})
	if err != nil {
		return err
	}
	defer prc.Close()
	probe := nlm.NewClient(prc, nlm.Vers4)
	var pmu sync.Mutex
	var grants []time.Time
	stop := make(chan struct{})
	var pwg sync.WaitGroup
	pwg.Go(func() {
		for i := 0; ; i++ {
			select {
			case <-stop:
				return
			default:
			}
			l := nlm.Lock{CallerName: []byte("probe"), FH: []byte("probe-" + strconv.Itoa(i)), OH: []byte("p"), SVID: 1, Len: 1}
			cctx, cancel := context.WithTimeout(ctx, 200*time.Millisecond)
			r, err := probe.Lock(cctx, &nlm.LockArgs{Cookie: []byte("p"), Exclusive: true, Lock: l, State: 1})
			cancel()
			if err != nil || r.Stat != nlm.Granted {
				time.Sleep(time.Millisecond)
				continue
			}
			pmu.Lock()
			grants = append(grants, time.Now())
			pmu.Unlock()
			cctx, cancel = context.WithTimeout(ctx, 200*time.Millisecond)
			probe.Unlock(cctx, &nlm.UnlockArgs{Cookie: []byte("u"), Lock: l})
			cancel()
		}
	})
	defer func() { close(stop); pwg.Wait() }()
	// gap is the longest stretch without a granted probe lock around a
	// move that began at t0.
	gap := func(t0, t1 time.Time) time.Duration {
		pmu.Lock()
		defer pmu.Unlock()
		var worst time.Duration
		var prev time.Time
		for _, g := range grants {
			if !prev.IsZero() && g.After(t0.Add(-time.Second)) && prev.Before(t1) {
				worst = max(worst, g.Sub(prev))
			}
			prev = g
		}
		return worst
	}
	settle := func() { time.Sleep(300 * time.Millisecond) }

	var pg, pr, pt []time.Duration
	for range o.rounds {
		settle()
		to := 1 - owner
		t0 := time.Now()
		rel, err := nodes[owner].api().Release(ctx, moveVIP, true)
		if err != nil {
			return err
		}
		t1 := time.Now()
		tk, err := nodes[to].api().Takeover(ctx, moveVIP, "vip")
		if err != nil {
			return err
		}
		t2 := time.Now()
		if !tk.Planned || tk.Locks < o.clients {
			return fmt.Errorf("planned takeover: %+v (release %+v)", tk, rel)
		}
		owner = to
		settle()
		g := gap(t0, t2)
		pg, pr, pt = append(pg, g), append(pr, t1.Sub(t0)), append(pt, t2.Sub(t1))
		fmt.Printf("move=planned clients=%d gap_ms=%.1f release_ms=%.1f takeover_ms=%.1f\n", o.clients, ms(g), ms(t1.Sub(t0)), ms(t2.Sub(t1)))
	}
	fmt.Printf("RESULT move=planned clients=%d rounds=%d gap_ms=%.1f release_ms=%.1f takeover_ms=%.1f\n",
		o.clients, o.rounds, ms(med(pg)), ms(med(pr)), ms(med(pt)))

	var ug, un, ur, ue []time.Duration
	for range o.rounds {
		settle()
		to := 1 - owner
		peers.Reset()
		reclaimed.Store(0)
		nodes[owner].kill()
		t0 := time.Now()
		tk, err := nodes[to].api().Takeover(ctx, moveVIP, "vip")
		if err != nil {
			return err
		}
		if tk.Planned {
			return fmt.Errorf("unplanned takeover loaded a snapshot: %+v", tk)
		}
		if err := peers.WaitNotified(o.clients, time.Minute); err != nil {
			return fmt.Errorf("%d of %d clients notified", peers.Notified(), o.clients)
		}
		tn := time.Now()
		for reclaimed.Load() < int64(o.clients) && time.Since(t0) < time.Minute {
			time.Sleep(time.Millisecond)
		}
		tr := time.Now()
		var vs hacallout.VIPStatus
		for time.Since(t0) < 2*time.Minute {
			if vs, err = nodes[to].api().VIP(ctx, moveVIP); err == nil && !vs.Grace.Active {
				break
			}
			time.Sleep(5 * time.Millisecond)
		}
		te := time.Now()
		settle()
		g := gap(t0, te)
		ug, un, ur, ue = append(ug, g), append(un, tn.Sub(t0)), append(ur, tr.Sub(t0)), append(ue, te.Sub(t0))
		fmt.Printf("move=unplanned clients=%d gap_ms=%.1f notified_all_ms=%.1f reclaimed_all_ms=%.1f grace_over_ms=%.1f why=%q\n",
			o.clients, ms(g), ms(tn.Sub(t0)), ms(tr.Sub(t0)), ms(te.Sub(t0)), vs.Grace.Why)
		if err := nodes[owner].start(); err != nil {
			return err
		}
		owner = to
	}
	fmt.Printf("RESULT move=unplanned clients=%d rounds=%d gap_ms=%.1f notified_all_ms=%.1f reclaimed_all_ms=%.1f grace_over_ms=%.1f grace_quiet_ms=%.0f\n",
		o.clients, o.rounds, ms(med(ug)), ms(med(un)), ms(med(ur)), ms(med(ue)), ms(o.quiet))
	return nil
}

func ms(d time.Duration) float64 { return float64(d.Microseconds()) / 1000 }

func med(d []time.Duration) time.Duration {
	s := slices.Clone(d)
	slices.Sort(s)
	return s[len(s)/2]
}

package main

import (
	"context"
	"errors"
	"fmt"
	"math/rand/v2"
	"net"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	flag "github.com/spf13/pflag"

	"github.com/nlmha/nlmha/hacallout"
	"github.com/nlmha/nlmha/nlm"
	"github.com/nlmha/nlmha/nsm/nsmtest"
	"github.com/nlmha/nlmha/sunrpc"
	"github.com/nlmha/nlmha/sunrpc/xdr"
)

// failoverOptions configure `nlmbench failover`.
type failoverOptions struct {
	clients  int
	rounds   int
	moves    []string
	nlmd     string
	stateDir string
	quiet    time.Duration
	// etcd, when set, runs the nodes on the etcd backend at these
	// endpoints (shared records: an unplanned move stalls only what
	// conflicts with an unreclaimed lock).
	etcd     string
	leaseTTL time.Duration
}

var moveVIP = netip.MustParseAddr("127.0.0.2")

// runFailover measures moving a virtual server between two nlmd on this
// host (listen mode vip, one state directory) while N clients hold a lock
// each through it: for a planned move (release, then takeover) and an
// unplanned one (the owner killed, then takeover), the time during which
// a new, non-conflicting lock through the address cannot be granted, and
// for the unplanned one the time to notify every client and to end the
// grace period, and what each client's reclaim cost: its LOCK's latency
// and the new owner's CPU time per client, which stay flat as N grows
// when the grace period's bookkeeping is O(1) per client. Needs root in a
// private network namespace (port 111 for the simulated clients'
// portmapper); scripts/bench.sh runs it so.
func runFailover(args []string) int {
	var o failoverOptions
	fs := flag.NewFlagSet("nlmbench failover", flag.ContinueOnError)
	fs.IntVar(&o.clients, "clients", 1000, "client hosts holding a lock each through the virtual server")
	fs.IntVar(&o.rounds, "rounds", 5, "moves of each kind")
	fs.StringSliceVar(&o.moves, "moves", []string{"planned", "unplanned"}, "kinds of moves to measure")
	self, _ := os.Executable()
	fs.StringVar(&o.nlmd, "nlmd", filepath.Join(filepath.Dir(self), "nlmd"), "the nlmd binary")
	fs.StringVar(&o.stateDir, "state-dir", "", "the shared state directory (default: a new one under $TMPDIR)")
	fs.DurationVar(&o.quiet, "grace-quiet", 5*time.Second, "nlmd --grace-quiet")
	fs.StringVar(&o.etcd, "etcd", "", "run the nodes with --backend etcd on these endpoints (comma-separated client URLs)")
	fs.DurationVar(&o.leaseTTL, "lease-ttl", 2*time.Second, "nlmd --lease-ttl with --etcd: how long a killed node keeps its virtual server")
	if err := fs.Parse(args); err != nil {
		if errors.Is(err, flag.ErrHelp) {
			return 0
		}
		return 2
	}
	if o.clients < 1 || o.clients > maxHosts {
		fmt.Fprintf(os.Stderr, "nlmbench failover: --clients %d: want 1 to %d\n", o.clients, maxHosts)
		return 2
	}
	for _, m := range o.moves {
		if m != "planned" && m != "unplanned" {
			fmt.Fprintf(os.Stderr, "nlmbench failover: --moves %q: want planned and/or unplanned\n", m)
			return 2
		}
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

// procCPU is the CPU time a process used so far: the sum over its
// threads of /proc/PID/task/TID/schedstat (nanoseconds; /proc/PID/stat
// counts in 10 ms ticks, too coarse for a thousand clients).
func procCPU(pid int) time.Duration {
	tasks, _ := os.ReadDir(fmt.Sprintf("/proc/%d/task", pid))
	var sum time.Duration
	for _, t := range tasks {
		b, err := os.ReadFile(fmt.Sprintf("/proc/%d/task/%s/schedstat", pid, t.Name()))
		if err != nil {
			continue
		}
		f := strings.Fields(string(b))
		if len(f) > 0 {
			ns, _ := strconv.ParseInt(f[0], 10, 64)
			sum += time.Duration(ns)
		}
	}
	return sum
}

// maxHosts is how many client hosts hostAddr numbers.
const maxHosts = 4 * 60000

// hostAddr is the address of simulated client host i: 127.10-13.x.y,
// apart from the probe's 127.3.0.1 and the virtual server's 127.0.0.2.
func hostAddr(i int) netip.Addr {
	return netip.AddrFrom4([4]byte{127, 10 + byte(i/60000), byte(i % 60000 / 240), 1 + byte(i%240)})
}

// hosts carries the NLM calls of many simulated client hosts over one UDP
// socket: each call leaves with its host's address as source (IP_PKTINFO)
// and its reply is matched by an XID from one counter. A socket and a
// reader goroutine per host would take 100 000 descriptors (the hard
// limit here is 20 000) and 100 MB of stacks at 100 000 hosts.
type hosts struct {
	srv  *sunrpc.Server
	port uint16
	to   netip.AddrPort
	xid  atomic.Uint32
}

func newHosts(to netip.AddrPort) (*hosts, error) {
	pc, err := net.ListenPacket("udp4", "0.0.0.0:0")
	if err != nil {
		return nil, err
	}
	h := &hosts{srv: &sunrpc.Server{UDPBuffer: 8 << 20}, to: to, port: uint16(pc.LocalAddr().(*net.UDPAddr).Port)}
	serve, err := h.srv.AttachPacket(pc)
	if err != nil {
		pc.Close()
		return nil, fmt.Errorf("client hosts' socket: %w", err)
	}
	go serve()
	h.xid.Store(rand.Uint32())
	return h, nil
}

func (h *hosts) close() { h.srv.Close() }

// call sends an NLM v4 call from host and returns its results. It is
// retransmitted after 50 ms, then at doubling intervals up to a second,
// until ctx ends (as a client's lockd retransmits over UDP).
func (h *hosts) call(ctx context.Context, host netip.Addr, proc uint32, args []byte) (*xdr.Decoder, error) {
	xid := h.xid.Add(1)
	reply := make(chan []byte, 1)
	h.srv.ExpectReply(h.to, xid, func(msg []byte) {
		select {
		case reply <- msg:
		default: // a reply to a retransmission
		}
	})
	defer h.srv.ForgetReply(h.to, xid)
	msg := sunrpc.AppendCall(nil, &sunrpc.CallHeader{XID: xid, RPCVers: sunrpc.RPCVersion, Prog: nlm.Prog, Vers: nlm.Vers4, Proc: proc})
	msg = append(msg, args...)
	from := netip.AddrPortFrom(host, h.port)
	wait := 50 * time.Millisecond
	timer := time.NewTimer(wait)
	defer timer.Stop()
	for {
		if err := h.srv.SendPacket(from, h.to, msg); err != nil {
			return nil, err
		}
		select {
		case m := <-reply:
			rh, res, err := sunrpc.ParseReply(m)
			if err == nil {
				err = rh.Err()
			}
			if err != nil {
				return nil, err
			}
			return xdr.NewDecoder(res), nil
		case <-ctx.Done():
			return nil, fmt.Errorf("%v: no answer: %w", host, ctx.Err())
		case <-timer.C:
			wait = min(2*wait, time.Second)
			timer.Reset(wait)
		}
	}
}

// benchClient is one client host holding one lock through the virtual
// server; told of a restart, it reclaims and goes on (a TEST), as a
// Linux client reclaims and then lets its applications' requests out.
type benchClient struct {
	addr netip.Addr
	lock nlm.Lock
	// this round's reclaim: whether it began, when its LOCK left and when
	// its answer came
	reclaiming atomic.Bool
	sent, done time.Time
}

func (c *benchClient) lockCall(ctx context.Context, h *hosts, reclaim bool, cookie string) (nlm.Res, error) {
	state := int32(1)
	if reclaim {
		state = 3
	}
	args := (&nlm.LockArgs{Cookie: []byte(cookie), Exclusive: true, Reclaim: reclaim, Lock: c.lock, State: state}).Append(nil, nlm.Vers4)
	var r nlm.Res
	d, err := h.call(ctx, c.addr, nlm.ProcLock, args)
	if err != nil {
		return r, err
	}
	r.Decode(d)
	return r, d.Err()
}

func (c *benchClient) test(ctx context.Context, h *hosts) error {
	args := (&nlm.TestArgs{Cookie: []byte("t"), Exclusive: true, Lock: c.lock}).Append(nil, nlm.Vers4)
	_, err := h.call(ctx, c.addr, nlm.ProcTest, args)
	return err
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
		if o.etcd != "" {
			nodes[i].args = append(nodes[i].args, "--backend", "etcd", "--etcd-endpoints", o.etcd,
				"--etcd-prefix", fmt.Sprintf("/nlmbench-%d/", os.Getpid()), "--node-name", fmt.Sprintf("node%d", i), "--lease-ttl", o.leaseTTL.String())
		}
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
	hs, err := newHosts(netip.AddrPortFrom(moveVIP, 4045))
	if err != nil {
		return err
	}
	defer hs.close()
	clients := make([]*benchClient, o.clients)
	byAddr := make(map[netip.Addr]*benchClient, o.clients)
	for i := range clients {
		a := hostAddr(i)
		c := &benchClient{addr: a,
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
			cctx, cancel := context.WithTimeout(ctx, time.Minute)
			r, err := c.lockCall(cctx, hs, false, "c")
			cancel()
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
	var reclaimed, reclaimFailed, graceRetries atomic.Int64
	peers.OnNotify(func(n nsmtest.Notification) {
		c := byAddr[n.To]
		if c == nil || n.From.Addr() != moveVIP || !c.reclaiming.CompareAndSwap(false, true) {
			return
		}
		go func() {
			cctx, cancel := context.WithTimeout(ctx, time.Minute)
			defer cancel()
			c.sent = time.Now()
			r, err := c.lockCall(cctx, hs, true, "r")
			// A store that is busy or out of reach asks the client to try
			// again (DENIED_GRACE_PERIOD); a Linux client does.
			for err == nil && r.Stat == nlm.DeniedGracePeriod && cctx.Err() == nil {
				graceRetries.Add(1)
				time.Sleep(100 * time.Millisecond)
				r, err = c.lockCall(cctx, hs, true, "r")
			}
			c.done = time.Now()
			if err != nil || r.Stat != nlm.Granted {
				reclaimFailed.Add(1)
			}
			reclaimed.Add(1)
			c.test(cctx, hs)
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
			if err != nil {
				// Unanswered: asked again, as a client does (the server
				// may have granted it just before it died: with --etcd
				// the lock is kept, and given up here it would stay).
				i--
				time.Sleep(time.Millisecond)
				continue
			}
			if r.Stat != nlm.Granted {
				time.Sleep(time.Millisecond)
				continue
			}
			pmu.Lock()
			grants = append(grants, time.Now())
			pmu.Unlock()
			// Sent until answered, as a client does, but beside the probe's
			// next locks: a lock the probe still held when its server died
			// would otherwise stay, never reclaimed (the probe reclaims
			// nothing), and a grace period over kept records (--etcd)
			// would wait for it to its end.
			pwg.Go(func() {
				for {
					cctx, cancel := context.WithTimeout(ctx, 200*time.Millisecond)
					r, err := probe.Unlock(cctx, &nlm.UnlockArgs{Cookie: []byte("u"), Lock: l})
					cancel()
					if err == nil && r.Stat != nlm.DeniedGracePeriod {
						return
					}
					select {
					case <-stop:
						return
					case <-time.After(5 * time.Millisecond):
					}
				}
			})
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
	// grantAfter is when the probe was first granted a lock after t, if
	// it was.
	grantAfter := func(t time.Time) time.Time {
		pmu.Lock()
		defer pmu.Unlock()
		i, _ := slices.BinarySearchFunc(grants, t, time.Time.Compare)
		if i < len(grants) {
			return grants[i]
		}
		return time.Time{}
	}
	settle := func() { time.Sleep(300 * time.Millisecond) }

	var pg, pr, pt []time.Duration
	for range o.roundsOf("planned") {
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
	if len(pg) > 0 {
		fmt.Printf("RESULT move=planned clients=%d rounds=%d gap_ms=%.1f release_ms=%.1f takeover_ms=%.1f\n",
			o.clients, o.rounds, ms(med(pg)), ms(med(pr)), ms(med(pt)))
	}

	var ug, un, ur, ue, rp50, rp99, rper, rcpu, ufg, ulw []time.Duration
	for range o.roundsOf("unplanned") {
		settle()
		to := 1 - owner
		peers.Reset()
		reclaimed.Store(0)
		reclaimFailed.Store(0)
		for _, c := range clients {
			c.reclaiming.Store(false)
		}
		nodes[owner].kill()
		killed := time.Now()
		cpu0 := procCPU(nodes[to].cmd.Process.Pid)
		t0 := time.Now()
		tk, err := nodes[to].api().Takeover(ctx, moveVIP, "vip")
		for o.etcd != "" && err != nil && time.Since(killed) < time.Minute {
			// The dead node owns the address until its lease runs out.
			time.Sleep(20 * time.Millisecond)
			t0 = time.Now()
			tk, err = nodes[to].api().Takeover(ctx, moveVIP, "vip")
		}
		if err != nil {
			return err
		}
		leaseWait := t0.Sub(killed)
		if tk.Planned {
			return fmt.Errorf("unplanned takeover loaded a snapshot: %+v", tk)
		}
		if err := peers.WaitNotified(o.clients, 2*time.Minute); err != nil {
			return fmt.Errorf("%d of %d clients notified", peers.Notified(), o.clients)
		}
		tn := time.Now()
		for reclaimed.Load() < int64(o.clients) && time.Since(t0) < 2*time.Minute {
			time.Sleep(time.Millisecond)
		}
		tr := time.Now()
		cpu := procCPU(nodes[to].cmd.Process.Pid) - cpu0
		if n := reclaimed.Load(); n < int64(o.clients) {
			return fmt.Errorf("%d of %d clients reclaimed", n, o.clients)
		}
		if n := reclaimFailed.Load(); n > 0 {
			return fmt.Errorf("%d of %d reclaims failed", n, o.clients)
		}
		if n := graceRetries.Swap(0); n > 0 {
			fmt.Printf("(%d reclaims answered DENIED_GRACE_PERIOD and sent again)\n", n)
		}
		// The grace period is over at the probe's first lock granted since
		// the kill: during it only reclaims are. (Asking the control API
		// instead would load nlmd: its status walks every client, 7 ms at
		// 10 000 clients and 0.5 s at 100 000.)
		var te time.Time
		var vs hacallout.VIPStatus
		if o.etcd != "" {
			// A lock of a fresh file is granted in grace too: ask.
			for time.Since(t0) < 3*time.Minute {
				if vs, err = nodes[to].api().VIP(ctx, moveVIP); err != nil {
					return err
				}
				if !vs.Grace.Active {
					te = vs.Grace.Ended
					break
				}
				time.Sleep(20 * time.Millisecond)
			}
		} else {
			for te.IsZero() && time.Since(t0) < 3*time.Minute {
				time.Sleep(5 * time.Millisecond)
				te = grantAfter(t0)
			}
			if vs, err = nodes[to].api().VIP(ctx, moveVIP); err != nil {
				return err
			}
		}
		if te.IsZero() {
			return errors.New("the grace period did not end in 3 minutes")
		}
		firstGrant := time.Duration(0)
		if fg := grantAfter(t0); !fg.IsZero() {
			firstGrant = fg.Sub(t0)
		}
		settle()
		g := gap(t0, te)
		// Each reclaim's LOCK round trip, and the reclaim phase (first
		// reclaim sent to last answered) per client.
		lat := make([]time.Duration, len(clients))
		first, last := clients[0].sent, clients[0].done
		for i, c := range clients {
			lat[i] = c.done.Sub(c.sent)
			if c.sent.Before(first) {
				first = c.sent
			}
			if c.done.After(last) {
				last = c.done
			}
		}
		slices.Sort(lat)
		p50, p99, per := lat[len(lat)/2], lat[min(len(lat)-1, len(lat)*99/100)], last.Sub(first)/time.Duration(o.clients)
		cpuPer := cpu / time.Duration(o.clients)
		ug, un, ur, ue = append(ug, g), append(un, tn.Sub(t0)), append(ur, tr.Sub(t0)), append(ue, te.Sub(t0))
		ufg, ulw = append(ufg, firstGrant), append(ulw, leaseWait)
		rp50, rp99, rper, rcpu = append(rp50, p50), append(rp99, p99), append(rper, per), append(rcpu, cpuPer)
		fmt.Printf("move=unplanned clients=%d gap_ms=%.1f first_grant_ms=%.1f lease_wait_ms=%.0f notified_all_ms=%.1f reclaimed_all_ms=%.1f grace_over_ms=%.1f reclaim_p50_us=%.0f reclaim_p99_us=%.0f reclaim_us_per_client=%.1f nlmd_cpu_us_per_client=%.1f why=%q\n",
			o.clients, ms(g), ms(firstGrant), ms(leaseWait), ms(tn.Sub(t0)), ms(tr.Sub(t0)), ms(te.Sub(t0)), us(p50), us(p99), us(per), us(cpuPer), vs.Grace.Why)
		if err := nodes[owner].start(); err != nil {
			return err
		}
		owner = to
	}
	if len(ug) > 0 {
		fmt.Printf("RESULT move=unplanned clients=%d rounds=%d gap_ms=%.1f first_grant_ms=%.1f lease_wait_ms=%.0f notified_all_ms=%.1f reclaimed_all_ms=%.1f grace_over_ms=%.1f grace_quiet_ms=%.0f reclaim_p50_us=%.0f reclaim_p99_us=%.0f reclaim_us_per_client=%.1f nlmd_cpu_us_per_client=%.1f\n",
			o.clients, o.rounds, ms(med(ug)), ms(med(ufg)), ms(med(ulw)), ms(med(un)), ms(med(ur)), ms(med(ue)), ms(o.quiet), us(med(rp50)), us(med(rp99)), us(med(rper)), us(med(rcpu)))
	}
	return nil
}

// roundsOf is how many moves of kind to make: --rounds, or none when
// --moves leaves the kind out.
func (o failoverOptions) roundsOf(kind string) int {
	if slices.Contains(o.moves, kind) {
		return o.rounds
	}
	return 0
}

func ms(d time.Duration) float64 { return float64(d.Microseconds()) / 1000 }

func us(d time.Duration) float64 { return float64(d.Nanoseconds()) / 1000 }

func med(d []time.Duration) time.Duration {
	s := slices.Clone(d)
	slices.Sort(s)
	return s[len(s)/2]
}

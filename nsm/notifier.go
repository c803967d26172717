package nsm

import (
	"container/heap"
	"context"
	"errors"
	"math/rand/v2"
	"net/netip"
	"sync"
	"time"

	"github.com/nlmha/nlmha/sunrpc"
)

// NotifyConfig tunes the notifier: what sm-notify does at boot, per
// virtual server. The zero value gives sm-notify's schedule.
type NotifyConfig struct {
	// Disabled leaves notification to someone else (the records stay in
	// the notify list, for an export to nfs-utils' format).
	Disabled bool
	// Window is how many peers may await their first answer at once
	// (default 256). A peer that has not answered within its first timeout
	// stops counting, so dead peers never hold up live ones.
	Window int
	// Timeout is the first retransmission timeout (default 2 s); it doubles
	// up to MaxTimeout (default 120 s).
	Timeout    time.Duration
	MaxTimeout time.Duration
	// GiveUp ends the notification of a peer that never answered (default
	// 15 min, as sm-notify; negative: never). Its record stays in the notify
	// list for the next start.
	GiveUp time.Duration
	// Requery is how many times SM_NOTIFY is sent before the peer's
	// portmapper is asked again for its statd's port (default 4).
	Requery int
	// PortmapPort is the peers' portmapper port (default 111; tests).
	PortmapPort uint16
}

func (c NotifyConfig) withDefaults() NotifyConfig {
	if c.Window <= 0 {
		c.Window = 256
	}
	if c.Timeout <= 0 {
		c.Timeout = 2 * time.Second
	}
	if c.MaxTimeout <= 0 {
		c.MaxTimeout = 120 * time.Second
	}
	c.MaxTimeout = max(c.MaxTimeout, c.Timeout)
	if c.GiveUp == 0 {
		c.GiveUp = 15 * time.Minute
	}
	if c.Requery <= 0 {
		c.Requery = 4
	}
	if c.PortmapPort == 0 {
		c.PortmapPort = sunrpc.PmapPort
	}
	return c
}

// Progress is how far the notification of a virtual server's peers got.
type Progress struct {
	VIP   netip.Addr
	State int32 // the state number being announced
	// Total peers; Done answered; Failed were given up (or cannot be
	// reached from the virtual server's address).
	Total, Done, Failed int
	Started             time.Time
	Finished            time.Time // zero while running
}

// Pending is the number of peers still being notified.
func (p Progress) Pending() int { return p.Total - p.Done - p.Failed }

// target is one peer being notified.
type target struct {
	file    string
	rec     *Record
	addr    netip.Addr
	port    uint16 // the peer's statd; 0: ask its portmapper
	lookup  bool   // the call in flight asks the portmapper
	xid     uint32 // 0: no call in flight
	peer    netip.AddrPort
	timeout time.Duration
	due     time.Time
	sends   int
	fresh   bool // counts against the window
	idx     int  // in the heap; -1 when not queued
	over    bool
}

// targetHeap orders targets by due time.
type targetHeap []*target

func (h targetHeap) Len() int           { return len(h) }
func (h targetHeap) Less(i, j int) bool { return h[i].due.Before(h[j].due) }
func (h targetHeap) Swap(i, j int)      { h[i], h[j] = h[j], h[i]; h[i].idx = i; h[j].idx = j }
func (h *targetHeap) Push(x any)        { t := x.(*target); t.idx = len(*h); *h = append(*h, t) }
func (h *targetHeap) Pop() any {
	old := *h
	t := old[len(old)-1]
	old[len(old)-1] = nil
	*h = old[:len(old)-1]
	t.idx = -1
	return t
}

type delivery struct {
	t   *target
	xid uint32
	msg []byte
}

// job notifies one virtual server's peers: a single goroutine, an event
// loop over a heap of retransmission deadlines, so that ten thousand
// peers cost ten thousand small structs rather than goroutines, and each
// reply is matched by the RPC server's socket reader.
type job struct {
	cfg     NotifyConfig
	rpc     *sunrpc.Server
	from    netip.AddrPort
	args    []byte // the encoded stat_chge, the same for every peer
	targets []*target
	queue   targetHeap
	// inbox takes replies from the socket reader without ever blocking
	// it or losing one (a lost reply costs its peer a retransmission
	// timeout): a list under a lock, and a doorbell.
	inboxMu sync.Mutex
	inbox   []delivery
	bell    chan struct{}
	xid     uint32
	fresh   int
	left    int
	sendBuf []byte // the call being sent; SendPacket does not keep it
	// acked hears of each peer whose statd answered (its file in notify/).
	// Until every peer has had its first SM_NOTIFY and the window is empty
	// the files wait in held: moving them is bookkeeping (one lost costs a
	// repeat notification after a crash) and took as much CPU as the first
	// pass itself (100 000 peers: 1.3 s of renames), which is what the
	// clients wait for to reclaim.
	acked   func(file string)
	held    []string
	holding bool
	logf    func(msg string, args ...any)
	warnf   func(msg string, args ...any)
	// settled hears of each client's outcome (its address; whether its
	// statd answered), for the grace period.
	settled func(client netip.Addr, answered bool)

	mu      sync.Mutex
	prog    Progress
	outcome map[netip.Addr]bool // settled clients: answered or not
}

func newJob(cfg NotifyConfig, rpc *sunrpc.Server, from netip.AddrPort, monName string, state int32, recs []loaded, now time.Time) *job {
	c := StatChge{MonName: monName, State: state}
	j := &job{
		cfg: cfg, rpc: rpc, from: from, args: c.Append(nil),
		bell:    make(chan struct{}, 1),
		outcome: map[netip.Addr]bool{},
		xid:     rand.Uint32(),
		prog:    Progress{VIP: from.Addr(), State: state, Total: len(recs), Started: now},
	}
	// One allocation for all targets, not one each.
	ts := make([]target, len(recs))
	j.targets = make([]*target, len(recs))
	for i, l := range recs {
		ts[i] = target{file: l.file, rec: l.rec, idx: -1}
		j.targets[i] = &ts[i]
	}
	return j
}

// clients returns the notification state of each client: "done",
// "failed" or "pending".
func (j *job) clients() map[netip.Addr]string {
	j.mu.Lock()
	defer j.mu.Unlock()
	out := make(map[netip.Addr]string, len(j.targets))
	for _, t := range j.targets {
		if len(t.rec.Addrs) > 0 {
			out[t.rec.Addrs[0].Unmap()] = "pending"
		}
	}
	for a, ok := range j.outcome {
		if ok {
			out[a] = "done"
		} else {
			out[a] = "failed"
		}
	}
	return out
}

func (j *job) progress() Progress {
	j.mu.Lock()
	defer j.mu.Unlock()
	return j.prog
}

func (j *job) nextXID() uint32 {
	j.xid++
	if j.xid == 0 {
		j.xid++
	}
	return j.xid
}

// run notifies every target until each answered or was given up, or ctx
// ends. It returns when the last one is settled.
func (j *job) run(ctx context.Context) {
	defer func() { j.finish(ctx.Err() != nil) }()
	j.left = len(j.targets)
	j.holding = true
	start := time.Now()
	var deadline time.Time
	if j.cfg.GiveUp > 0 {
		deadline = start.Add(j.cfg.GiveUp)
	}
	timer := time.NewTimer(time.Hour)
	defer timer.Stop()
	next := 0
	for {
		now := time.Now()
		for j.fresh < j.cfg.Window && next < len(j.targets) {
			j.begin(j.targets[next], now)
			next++
		}
		if j.holding && next == len(j.targets) && j.fresh == 0 {
			j.release()
		}
		if j.left == 0 {
			return
		}
		if !deadline.IsZero() && !now.Before(deadline) {
			for _, t := range j.targets {
				j.fail(t, "gave up")
			}
			return
		}
		wake := deadline
		if len(j.queue) > 0 && (wake.IsZero() || j.queue[0].due.Before(wake)) {
			wake = j.queue[0].due
		}
		timer.Reset(max(0, wake.Sub(now)))
		select {
		case <-j.bell:
			j.inboxMu.Lock()
			batch := j.inbox
			j.inbox = nil
			j.inboxMu.Unlock()
			now := time.Now()
			for _, d := range batch {
				j.handle(d, now)
			}
		case <-timer.C:
		case <-ctx.Done():
			return
		}
		now = time.Now()
		for len(j.queue) > 0 && !j.queue[0].due.After(now) {
			j.expire(heap.Pop(&j.queue).(*target), now)
		}
	}
}

// release hands the held files on, and any later one at once.
func (j *job) release() {
	j.holding = false
	if j.acked != nil {
		for _, f := range j.held {
			j.acked(f)
		}
	}
	j.held = nil
}

// finish withdraws the reply routes of the calls still in flight, hands
// the held files on and stamps the progress. Stopped (the virtual server
// is released, or nlmd stops), it leaves the held files where they are:
// moving thousands would hold the release up (1.6 s after 100 000), and a
// client left in notify/ is only told once more by the next owner.
func (j *job) finish(stopped bool) {
	if stopped {
		j.held, j.holding = nil, false
	} else {
		j.release()
	}
	for _, t := range j.targets {
		if t.xid != 0 {
			j.rpc.ForgetReply(t.peer, t.xid)
			t.xid = 0
		}
	}
	j.mu.Lock()
	j.prog.Finished = time.Now()
	j.mu.Unlock()
}

func (j *job) begin(t *target, now time.Time) {
	t.timeout = j.cfg.Timeout
	switch {
	case len(t.rec.Addrs) == 0:
		j.fail(t, "no address")
		return
	case t.rec.Addrs[0].Unmap().Is4() != j.from.Addr().Is4():
		j.fail(t, "address family differs from the virtual server's")
		return
	}
	t.addr = t.rec.Addrs[0].Unmap()
	t.lookup = true
	t.fresh = true
	j.fresh++
	j.send(t, now)
}

// send (re)transmits the target's call and queues its retransmission.
// A retransmission reuses the XID, so a late answer to an earlier copy
// still counts.
func (j *job) send(t *target, now time.Time) {
	prog, vers, proc := uint32(Prog), uint32(Vers), uint32(ProcNotify)
	if t.lookup {
		prog, vers, proc = sunrpc.PmapProg, sunrpc.PmapVers2, sunrpc.PmapProcGetPort
		if t.addr.Is6() {
			vers, proc = sunrpc.RpcbVers3, sunrpc.RpcbProcGetAddr
		}
	}
	if t.xid == 0 {
		t.xid = j.nextXID()
		t.peer = netip.AddrPortFrom(t.addr, t.port)
		if t.lookup {
			t.peer = netip.AddrPortFrom(t.addr, j.cfg.PortmapPort)
		}
		xid := t.xid
		j.rpc.ExpectReply(t.peer, xid, func(msg []byte) {
			j.inboxMu.Lock()
			j.inbox = append(j.inbox, delivery{t: t, xid: xid, msg: msg})
			j.inboxMu.Unlock()
			select {
			case j.bell <- struct{}{}:
			default:
			}
		})
	}
	h := sunrpc.CallHeader{XID: t.xid, RPCVers: sunrpc.RPCVersion, Prog: prog, Vers: vers, Proc: proc}
	msg := sunrpc.AppendCall(j.sendBuf[:0], &h)
	switch {
	case !t.lookup:
		msg = append(msg, j.args...)
	case t.addr.Is6():
		msg = sunrpc.AppendGetAddrArgs(msg, Prog, Vers, sunrpc.NetID(sunrpc.UDP, true))
	default:
		msg = sunrpc.AppendGetPortArgs(msg, Prog, Vers, sunrpc.UDP)
	}
	// A failed send is retried like a lost one, even for want of a socket
	// on the address: one that comes a moment later (a listener still being
	// set up) must not cost the clients their reclaims.
	if err := j.rpc.SendPacket(j.from, t.peer, msg); err != nil {
		logf := j.logf
		if errors.Is(err, sunrpc.ErrNoSocket) && j.warnf != nil {
			// The address's socket should be there before any notification
			// leaves (a takeover attaches it first): worth a warning.
			logf = j.warnf
		}
		logf("nsm: sending SM_NOTIFY failed; will retry", "peer", t.peer, "err", err)
	}
	j.sendBuf = msg
	t.sends++
	j.schedule(t, now.Add(t.timeout))
}

func (j *job) schedule(t *target, due time.Time) {
	t.due = due
	if t.idx >= 0 {
		heap.Fix(&j.queue, t.idx)
	} else {
		heap.Push(&j.queue, t)
	}
}

// endCall withdraws the call in flight.
func (j *job) endCall(t *target) {
	if t.xid != 0 {
		j.rpc.ForgetReply(t.peer, t.xid)
		t.xid = 0
	}
}

func (j *job) unfresh(t *target) {
	if t.fresh {
		t.fresh = false
		j.fresh--
	}
}

// handle takes a reply.
func (j *job) handle(d delivery, now time.Time) {
	t := d.t
	if t.over || d.xid != t.xid {
		return
	}
	rh, res, err := sunrpc.ParseReply(d.msg)
	if err == nil {
		err = rh.Err()
	}
	if t.lookup {
		var port uint16
		if err == nil {
			if t.addr.Is6() {
				port, err = sunrpc.ParseGetAddrResult(res)
			} else {
				port, err = sunrpc.ParseGetPortResult(res)
			}
		}
		j.endCall(t)
		if err != nil || port == 0 {
			// No statd registered (yet): ask again later, as sm-notify
			// defers such a host.
			j.unfresh(t)
			j.schedule(t, now.Add(j.cfg.MaxTimeout))
			return
		}
		t.port, t.lookup, t.sends, t.timeout = port, false, 0, j.cfg.Timeout
		j.send(t, now)
		return
	}
	j.endCall(t)
	if err != nil {
		// A statd that answers but refuses: look it up again later.
		j.unfresh(t)
		t.lookup = true
		t.timeout = min(2*t.timeout, j.cfg.MaxTimeout)
		j.schedule(t, now.Add(t.timeout))
		return
	}
	j.settle(t)
	j.mu.Lock()
	j.prog.Done++
	j.outcome[t.addr] = true
	j.mu.Unlock()
	switch {
	case j.holding:
		j.held = append(j.held, t.file)
	case j.acked != nil:
		j.acked(t.file)
	}
	if j.settled != nil {
		j.settled(t.addr, true)
	}
}

// expire handles a target whose timeout passed: retransmit with a longer
// timeout, and now and then ask its portmapper again (its statd may have
// restarted on another port).
func (j *job) expire(t *target, now time.Time) {
	if t.over {
		return
	}
	j.unfresh(t)
	if t.xid == 0 {
		// A deferred peer: ask its portmapper afresh.
		t.lookup, t.sends = true, 0
	} else {
		t.timeout = min(2*t.timeout, j.cfg.MaxTimeout)
		if !t.lookup && t.sends >= j.cfg.Requery {
			j.endCall(t)
			t.lookup, t.sends = true, 0
		}
	}
	j.send(t, now)
}

func (j *job) settle(t *target) {
	t.over = true
	j.endCall(t)
	j.unfresh(t)
	if t.idx >= 0 {
		heap.Remove(&j.queue, t.idx)
	}
	j.left--
}

func (j *job) fail(t *target, why string) {
	if t.over {
		return
	}
	j.settle(t)
	j.mu.Lock()
	j.prog.Failed++
	if len(t.rec.Addrs) > 0 {
		j.outcome[t.rec.Addrs[0].Unmap()] = false
	}
	j.mu.Unlock()
	if j.settled != nil && len(t.rec.Addrs) > 0 {
		j.settled(t.rec.Addrs[0].Unmap(), false)
	}
	j.logf("nsm: could not notify a peer", "vip", j.from.Addr(), "peer", t.rec.MonName, "why", why)
}

// acker hands the files of notified peers to done off the event loop,
// which passes them on without ever waiting; done gets them in batches.
type acker struct {
	done  func(files []string)
	mu    sync.Mutex
	files []string
	fin   bool
	bell  chan struct{}
	wg    sync.WaitGroup
}

func newAcker(done func(files []string)) *acker {
	r := &acker{done: done, bell: make(chan struct{}, 1)}
	r.wg.Go(func() {
		for {
			<-r.bell
			r.mu.Lock()
			files, fin := r.files, r.fin
			r.files = nil
			r.mu.Unlock()
			if len(files) > 0 {
				r.done(files)
			}
			if fin {
				return
			}
		}
	})
	return r
}

func (r *acker) ring() {
	select {
	case r.bell <- struct{}{}:
	default:
	}
}

func (r *acker) add(f string) {
	r.mu.Lock()
	r.files = append(r.files, f)
	r.mu.Unlock()
	r.ring()
}

// close hands over what is left and waits.
func (r *acker) close() {
	r.mu.Lock()
	r.fin = true
	r.mu.Unlock()
	r.ring()
	r.wg.Wait()
}

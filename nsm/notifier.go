package nsm

import (
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

// delivery is a reply to call xid of target t (a portmapper query, or
// SM_NOTIFY).
type delivery struct {
	t     int
	xid   uint32
	query bool
	v6    bool
	msg   []byte
}

// job notifies one virtual server's peers: a single goroutine, an event
// loop that drives the notification's schedule (fanout) with the clock,
// the socket and the replies, so that ten thousand peers cost ten
// thousand small structs rather than goroutines, and each reply is
// matched by the RPC server's socket reader.
type job struct {
	rpc     *sunrpc.Server
	from    netip.AddrPort
	args    []byte   // the encoded stat_chge, the same for every peer
	targets []target // the peers: the schedule's targets by index
	fan     *fanout
	// inbox takes replies from the socket reader without ever blocking
	// it or losing one (a lost reply costs its peer a retransmission
	// timeout): a list under a lock, and a doorbell.
	inboxMu sync.Mutex
	inbox   []delivery
	bell    chan struct{}
	// The calls an apply makes, sent together at its end: encoded one
	// after the other in sendBuf (SendPackets keeps none of it).
	sendBuf []byte
	calls   []queued
	pkts    []sunrpc.Packet
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
	// notifying hears of the first pass and of the answers taken; inPass
	// is set until the first pass is over (counted there).
	notifying *notifying
	inPass    bool

	mu      sync.Mutex
	prog    Progress
	outcome []outcome // by target
}

// target is a peer to notify, as the notify list names it: its record's
// file, its address (none known: invalid), its name for the log (an
// SM_MON record's mon_name; a client goes by its address), and whether it
// is a client. A start reads a client's address in its file's name; the
// targets live as long as the notification, 100 000 of them: they hold
// no more than that.
type target struct {
	file   string
	addr   netip.Addr
	name   string
	client bool
}

func targetOf(l loaded) target {
	t := target{file: l.file, client: l.rec.Kind == KindClient}
	if len(l.rec.Addrs) > 0 {
		t.addr = l.rec.Addrs[0].Unmap()
	}
	if !t.client {
		t.name = l.rec.MonName
	}
	return t
}

func (t *target) String() string {
	if t.name != "" {
		return t.name
	}
	return t.addr.String()
}

// outcome is how a target's notification ended.
type outcome uint8

const (
	pending outcome = iota
	answered
	failed
)

func newJob(cfg NotifyConfig, rpc *sunrpc.Server, from netip.AddrPort, monName string, state int32, targets []target, now time.Time) *job {
	c := StatChge{MonName: monName, State: state}
	j := &job{
		rpc: rpc, from: from, args: c.Append(nil),
		bell:    make(chan struct{}, 1),
		outcome: make([]outcome, len(targets)),
		prog:    Progress{VIP: from.Addr(), State: state, Total: len(targets), Started: now},
	}
	j.targets = targets
	addrs := make([]netip.Addr, len(targets))
	for i, t := range targets {
		addrs[i] = t.addr
	}
	j.fan = newFanout(cfg, from.Addr(), addrs, rand.Uint32())
	return j
}

// clients returns the notification state of each client: "done",
// "failed" or "pending".
func (j *job) clients() map[netip.Addr]string {
	j.mu.Lock()
	defer j.mu.Unlock()
	out := make(map[netip.Addr]string, len(j.targets))
	for i, t := range j.targets {
		if t.addr.IsValid() && j.outcome[i] == pending && out[t.addr] == "" {
			out[t.addr] = "pending"
		}
	}
	// A settled target's outcome stands over another's pending one.
	for i, t := range j.targets {
		switch j.outcome[i] {
		case answered:
			out[t.addr] = "done"
		case failed:
			if t.addr.IsValid() {
				out[t.addr] = "failed"
			}
		}
	}
	return out
}

func (j *job) progress() Progress {
	j.mu.Lock()
	defer j.mu.Unlock()
	return j.prog
}

// run notifies every target until each answered or was given up, or ctx
// ends. It returns when the last one is settled.
func (j *job) run(ctx context.Context) {
	defer func() { j.finish(ctx.Err() != nil) }()
	j.holding = true
	j.fan.Start(time.Now())
	j.apply()
	timer := time.NewTimer(time.Hour)
	defer timer.Stop()
	for !j.fan.Over() {
		timer.Reset(max(0, time.Until(j.fan.Next())))
		select {
		case <-j.bell:
			j.inboxMu.Lock()
			batch := j.inbox
			j.inbox = nil
			j.inboxMu.Unlock()
			now := time.Now()
			if j.notifying != nil {
				j.notifying.answered(now)
			}
			for _, d := range batch {
				j.handle(d, now)
			}
		case <-timer.C:
		case <-ctx.Done():
			return
		}
		j.fan.Tick(time.Now())
		j.apply()
	}
}

// apply does what the schedule asks for, in order, but for the calls:
// they leave together at the end (see flush).
func (j *job) apply() {
	for _, a := range j.fan.Actions() {
		switch a.kind {
		case actQuery, actNotify:
			j.queue(a)
		case actEndCall:
			j.rpc.ForgetReply(a.peer, a.xid)
		case actDone:
			j.done(a.target)
		case actFailed:
			j.fail(a.target, a.why)
		case actFirstPass:
			j.release()
			j.endPass()
		}
	}
	j.flush()
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

// endPass counts the first pass over (once).
func (j *job) endPass() {
	if j.inPass && j.notifying != nil {
		j.notifying.passed()
	}
	j.inPass = false
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
	j.fan.Stop()
	j.apply()
	j.endPass()
	j.mu.Lock()
	j.prog.Finished = time.Now()
	j.mu.Unlock()
}

// queue encodes a call for the next flush; a new one has its replies
// routed to the inbox first.
func (j *job) queue(a fanAction) {
	query, v6 := a.kind == actQuery, a.peer.Addr().Is6()
	if a.newCall {
		t, xid := a.target, a.xid
		j.rpc.ExpectReply(a.peer, xid, func(msg []byte) {
			j.inboxMu.Lock()
			j.inbox = append(j.inbox, delivery{t: t, xid: xid, query: query, v6: v6, msg: msg})
			j.inboxMu.Unlock()
			select {
			case j.bell <- struct{}{}:
			default:
			}
		})
	}
	prog, vers, proc := uint32(Prog), uint32(Vers), uint32(ProcNotify)
	if query {
		prog, vers, proc = sunrpc.PmapProg, sunrpc.PmapVers2, sunrpc.PmapProcGetPort
		if v6 {
			vers, proc = sunrpc.RpcbVers3, sunrpc.RpcbProcGetAddr
		}
	}
	h := sunrpc.CallHeader{XID: a.xid, RPCVers: sunrpc.RPCVersion, Prog: prog, Vers: vers, Proc: proc}
	msg := sunrpc.AppendCall(j.sendBuf, &h)
	switch {
	case !query:
		msg = append(msg, j.args...)
	case v6:
		msg = sunrpc.AppendGetAddrArgs(msg, Prog, Vers, sunrpc.NetID(sunrpc.UDP, true))
	default:
		msg = sunrpc.AppendGetPortArgs(msg, Prog, Vers, sunrpc.UDP)
	}
	j.sendBuf = msg
	j.calls = append(j.calls, queued{to: a.peer, end: len(msg)})
}

// queued is a call encoded in sendBuf, up to end.
type queued struct {
	to  netip.AddrPort
	end int
}

// flush sends the queued calls: a window's worth of peers begin at once,
// and a batch of answers makes as many calls, so they go in bursts with a
// system call for dozens (SendPackets).
func (j *job) flush() {
	if len(j.calls) == 0 {
		return
	}
	pkts, start := j.pkts[:0], 0
	for _, c := range j.calls {
		pkts = append(pkts, sunrpc.Packet{To: c.to, Msg: j.sendBuf[start:c.end]})
		start = c.end
	}
	// A failed send is retried like a lost one, even for want of a socket
	// on the address: one that comes a moment later (a listener still being
	// set up) must not cost the clients their reclaims. So the schedule
	// hears nothing of it.
	if err := j.rpc.SendPackets(j.from, pkts); err != nil {
		for _, p := range pkts {
			if p.Err == nil {
				continue
			}
			logf := j.logf
			if errors.Is(p.Err, sunrpc.ErrNoSocket) && j.warnf != nil {
				// The address's socket should be there before any
				// notification leaves (a takeover attaches it first): worth
				// a warning.
				logf = j.warnf
			}
			logf("nsm: sending SM_NOTIFY failed; will retry", "peer", p.To, "err", p.Err)
		}
	}
	clear(pkts)
	j.pkts, j.calls, j.sendBuf = pkts[:0], j.calls[:0], j.sendBuf[:0]
}

// handle passes a reply on to the schedule, which drops it if its call
// is over.
func (j *job) handle(d delivery, now time.Time) {
	rh, res, err := sunrpc.ParseReply(d.msg)
	if err == nil {
		err = rh.Err()
	}
	if !d.query {
		j.fan.NotifyReply(now, d.t, d.xid, err == nil)
		return
	}
	var port uint16
	if err == nil {
		if d.v6 {
			port, err = sunrpc.ParseGetAddrResult(res)
		} else {
			port, err = sunrpc.ParseGetPortResult(res)
		}
	}
	if err != nil {
		port = 0
	}
	j.fan.PortReply(now, d.t, d.xid, port)
}

// done records target i, whose statd answered.
func (j *job) done(i int) {
	t := &j.targets[i]
	j.mu.Lock()
	j.prog.Done++
	j.outcome[i] = answered
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

// fail records target i given up.
func (j *job) fail(i int, why fanWhy) {
	t := &j.targets[i]
	j.mu.Lock()
	j.prog.Failed++
	j.outcome[i] = failed
	j.mu.Unlock()
	if j.settled != nil && t.addr.IsValid() {
		j.settled(t.addr, false)
	}
	j.logf("nsm: could not notify a peer", "vip", j.from.Addr(), "peer", t.String(), "why", why.String())
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

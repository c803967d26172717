package nsm

import (
	"container/heap"
	"net/netip"
	"time"
)

// fanout is the schedule of one notification — which peer to send what,
// and when — as a pure state machine: inputs (Start, PortReply,
// NotifyReply, Tick) come in with the time; what to do comes out as
// actions (Actions) and the time of the next Tick (Next). It reads no
// clock, owns no socket and starts no goroutine: job drives it. Answers
// only record; the Tick that follows a batch of them acts on them
// (begins peers the room they made allows, ends the first pass), after
// retransmitting whatever is due, in that order.
//
// Each peer is first asked for its statd's port through its portmapper,
// then sent SM_NOTIFY there. A call is retransmitted, with the same XID
// (so that a late answer to an earlier copy still counts), after a
// timeout that starts at Timeout and doubles up to MaxTimeout; after
// Requery sends of SM_NOTIFY the portmapper is asked again (the statd may
// have restarted on another port). A portmapper that knows no statd, or a
// statd that refuses, defers the peer: it is asked again later. A peer is
// done once its statd answers, and failed when it has no address, one of
// the other family than the virtual server's, or when GiveUp has passed
// since Start.
//
// At most Window peers await their first answer at once; a peer stops
// counting once it answered or its first timeout passed, so dead peers
// never hold up live ones. Peers begin in the order given.
type fanout struct {
	cfg NotifyConfig
	v4  bool // the virtual server's family: a peer of the other one is out of reach

	ts     []fanTarget
	queue  fanHeap   // the targets waiting for a timeout, by due time
	begun  int       // targets begun, in order
	fresh  int       // targets counting against the window
	left   int       // targets neither done nor failed
	xid    uint32    // the last XID given out
	giveUp time.Time // zero: never
	// passed is set once every target has had its first send and none
	// counts against the window any more (see actFirstPass).
	passed bool
	now    time.Time // of the last input

	out []fanAction
}

// fanTarget is one peer's state.
type fanTarget struct {
	addr    netip.Addr
	due     time.Time
	timeout time.Duration
	i       int    // in fanout.ts
	idx     int    // in the queue; -1 when not queued
	sends   int    // of the current kind of call since the last change
	xid     uint32 // the call in flight; 0: none (a new one starts at the next send)
	port    uint16 // the peer's statd; 0 until its portmapper told
	query   bool   // the call (in flight or next) asks the portmapper
	fresh   bool   // counts against the window
	over    bool   // done or failed
}

// fanAction is what the driver does now, in the order given.
type fanAction struct {
	// The call: where it goes (the peer's portmapper for a query, its
	// statd for a notify) and its XID. newCall marks the first copy of an
	// XID: the driver routes its replies from then until actEndCall.
	peer    netip.AddrPort
	target  int
	xid     uint32
	kind    fanKind
	newCall bool
	why     fanWhy // actFailed
}

type fanKind uint8

const (
	actQuery     fanKind = iota + 1 // send the portmapper query (GETPORT, or GETADDR over IPv6)
	actNotify                       // send SM_NOTIFY
	actEndCall                      // stop routing the replies of a call
	actDone                         // the peer's statd answered
	actFailed                       // the peer is given up (why)
	actFirstPass                    // every peer had its first send and answered or timed out once
)

// fanWhy says why a peer failed.
type fanWhy uint8

const (
	whyNoAddress fanWhy = iota + 1
	whyFamily
	whyGaveUp
)

func (w fanWhy) String() string {
	switch w {
	case whyNoAddress:
		return "no address"
	case whyFamily:
		return "address family differs from the virtual server's"
	case whyGaveUp:
		return "gave up"
	}
	return "?"
}

// newFanout returns the schedule of a notification from a virtual server
// of from's family to peers at addrs (an invalid address: none known). cfg
// has its defaults; XIDs follow xid.
func newFanout(cfg NotifyConfig, from netip.Addr, addrs []netip.Addr, xid uint32) *fanout {
	f := &fanout{cfg: cfg, v4: from.Is4(), ts: make([]fanTarget, len(addrs)), left: len(addrs), xid: xid}
	for i, a := range addrs {
		f.ts[i] = fanTarget{i: i, addr: a, idx: -1}
	}
	return f
}

// Start begins the notification at now: the first window's sends.
func (f *fanout) Start(now time.Time) {
	f.now = now
	if f.cfg.GiveUp > 0 {
		f.giveUp = now.Add(f.cfg.GiveUp)
	}
	f.step(now)
}

// Tick advances to now: retransmits the calls whose timeout passed,
// begins peers as the window allows, and gives up at the deadline.
func (f *fanout) Tick(now time.Time) {
	f.now = now
	for len(f.queue) > 0 && !f.queue[0].due.After(now) {
		f.expire(heap.Pop(&f.queue).(*fanTarget), now)
	}
	f.step(now)
}

// step begins what the window allows and gives up at the deadline.
func (f *fanout) step(now time.Time) {
	for f.fresh < f.cfg.Window && f.begun < len(f.ts) {
		f.begin(&f.ts[f.begun], now)
		f.begun++
	}
	if !f.passed && f.begun == len(f.ts) && f.fresh == 0 {
		f.passed = true
		f.emit(fanAction{kind: actFirstPass, target: -1})
	}
	if f.left == 0 {
		return
	}
	if !f.giveUp.IsZero() && !now.Before(f.giveUp) {
		for i := range f.ts {
			f.fail(&f.ts[i], whyGaveUp)
		}
	}
}

// PortReply takes the answer to portmapper query xid of target t: the
// statd's port, 0 when it has none registered or the query failed.
func (f *fanout) PortReply(now time.Time, t int, xid uint32, port uint16) {
	f.now = now
	p := f.current(t, xid, true)
	if p == nil {
		return
	}
	f.endCall(p)
	if port == 0 {
		// No statd registered (yet): ask again later, as sm-notify
		// defers such a host.
		f.unfresh(p)
		f.schedule(p, now.Add(f.cfg.MaxTimeout))
		return
	}
	p.port, p.query, p.sends, p.timeout = port, false, 0, f.cfg.Timeout
	f.send(p, now)
}

// NotifyReply takes the answer to SM_NOTIFY call xid of target t: ok
// when the statd accepted it.
func (f *fanout) NotifyReply(now time.Time, t int, xid uint32, ok bool) {
	f.now = now
	p := f.current(t, xid, false)
	if p == nil {
		return
	}
	f.endCall(p)
	if !ok {
		// A statd that answers but refuses: look it up again later.
		f.unfresh(p)
		p.query = true
		p.timeout = min(2*p.timeout, f.cfg.MaxTimeout)
		f.schedule(p, now.Add(p.timeout))
		return
	}
	f.settle(p)
	f.emit(fanAction{kind: actDone, target: t})
}

// current returns target t if xid is its call in flight, of the kind
// said; nil for an answer that comes too late (the call ended, the target
// is over) or makes no sense.
func (f *fanout) current(t int, xid uint32, query bool) *fanTarget {
	if t < 0 || t >= len(f.ts) {
		return nil
	}
	p := &f.ts[t]
	if p.over || xid == 0 || xid != p.xid || p.query != query {
		return nil
	}
	return p
}

// Stop ends the calls in flight, for a notification that stops short.
func (f *fanout) Stop() {
	for i := range f.ts {
		f.endCall(&f.ts[i])
	}
}

// Actions returns what to do, in order, since the last call; the slice is
// reused by the next input.
func (f *fanout) Actions() []fanAction {
	out := f.out
	f.out = f.out[:0]
	return out
}

// Next is when Tick must run next: the earliest timeout, or the give-up
// deadline; the time of the last input when answers made room in the
// window (or ended the first pass) since the last Tick. Zero once every
// target is over.
func (f *fanout) Next() time.Time {
	if f.left == 0 {
		return time.Time{}
	}
	if (f.begun < len(f.ts) && f.fresh < f.cfg.Window) || (!f.passed && f.begun == len(f.ts) && f.fresh == 0) {
		return f.now
	}
	wake := f.giveUp
	if len(f.queue) > 0 && (wake.IsZero() || f.queue[0].due.Before(wake)) {
		wake = f.queue[0].due
	}
	return wake
}

// Over reports whether every target is done or failed.
func (f *fanout) Over() bool { return f.left == 0 }

func (f *fanout) emit(a fanAction) { f.out = append(f.out, a) }

func (f *fanout) nextXID() uint32 {
	f.xid++
	if f.xid == 0 {
		f.xid++
	}
	return f.xid
}

func (f *fanout) begin(p *fanTarget, now time.Time) {
	p.timeout = f.cfg.Timeout
	switch {
	case !p.addr.IsValid():
		f.fail(p, whyNoAddress)
		return
	case p.addr.Unmap().Is4() != f.v4:
		f.fail(p, whyFamily)
		return
	}
	p.addr = p.addr.Unmap()
	p.query = true
	p.fresh = true
	f.fresh++
	f.send(p, now)
}

// send (re)transmits the target's call and queues its retransmission.
// A retransmission reuses the XID, so a late answer to an earlier copy
// still counts.
func (f *fanout) send(p *fanTarget, now time.Time) {
	a := fanAction{kind: actNotify, target: p.i, peer: netip.AddrPortFrom(p.addr, p.port)}
	if p.query {
		a.kind, a.peer = actQuery, netip.AddrPortFrom(p.addr, f.cfg.PortmapPort)
	}
	if p.xid == 0 {
		p.xid = f.nextXID()
		a.newCall = true
	}
	a.xid = p.xid
	f.emit(a)
	p.sends++
	f.schedule(p, now.Add(p.timeout))
}

func (f *fanout) schedule(p *fanTarget, due time.Time) {
	p.due = due
	if p.idx >= 0 {
		heap.Fix(&f.queue, p.idx)
	} else {
		heap.Push(&f.queue, p)
	}
}

// endCall ends the call in flight.
func (f *fanout) endCall(p *fanTarget) {
	if p.xid != 0 {
		a := fanAction{kind: actEndCall, target: p.i, xid: p.xid, peer: netip.AddrPortFrom(p.addr, p.port)}
		if p.query {
			a.peer = netip.AddrPortFrom(p.addr, f.cfg.PortmapPort)
		}
		f.emit(a)
		p.xid = 0
	}
}

func (f *fanout) unfresh(p *fanTarget) {
	if p.fresh {
		p.fresh = false
		f.fresh--
	}
}

// expire handles a target whose timeout passed: retransmit with a longer
// timeout, and now and then ask its portmapper again (its statd may have
// restarted on another port).
func (f *fanout) expire(p *fanTarget, now time.Time) {
	if p.over {
		return
	}
	f.unfresh(p)
	if p.xid == 0 {
		// A deferred peer: ask its portmapper afresh.
		p.query, p.sends = true, 0
	} else {
		p.timeout = min(2*p.timeout, f.cfg.MaxTimeout)
		if !p.query && p.sends >= f.cfg.Requery {
			f.endCall(p)
			p.query, p.sends = true, 0
		}
	}
	f.send(p, now)
}

func (f *fanout) settle(p *fanTarget) {
	p.over = true
	f.endCall(p)
	f.unfresh(p)
	if p.idx >= 0 {
		heap.Remove(&f.queue, p.idx)
	}
	f.left--
}

func (f *fanout) fail(p *fanTarget, why fanWhy) {
	if p.over {
		return
	}
	f.settle(p)
	f.emit(fanAction{kind: actFailed, target: p.i, why: why})
}

// fanHeap orders targets by due time.
type fanHeap []*fanTarget

func (h fanHeap) Len() int           { return len(h) }
func (h fanHeap) Less(i, j int) bool { return h[i].due.Before(h[j].due) }
func (h fanHeap) Swap(i, j int)      { h[i], h[j] = h[j], h[i]; h[i].idx = i; h[j].idx = j }
func (h *fanHeap) Push(x any)        { t := x.(*fanTarget); t.idx = len(*h); *h = append(*h, t) }
func (h *fanHeap) Pop() any {
	old := *h
	t := old[len(old)-1]
	old[len(old)-1] = nil
	*h = old[:len(old)-1]
	t.idx = -1
	return t
}

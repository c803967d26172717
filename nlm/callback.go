package nlm

import (
	"container/heap"
	"context"
	crand "crypto/rand"
	"encoding/binary"
	"errors"
	"log/slog"
	"math/rand/v2"
	"net/netip"
	"sync"
	"sync/atomic"
	"time"

	"github.com/nlmha/nlmha/dlm"
	"github.com/nlmha/nlmha/nlm/lockmgr"
	"github.com/nlmha/nlmha/sunrpc"
	"github.com/nlmha/nlmha/sunrpc/xdr"
	"github.com/nlmha/nlmha/virtualserver"
)

// CallbackConfig tunes the calls the service makes to clients. Zero values
// take the defaults in brackets.
type CallbackConfig struct {
	// Retransmit [1s] is the first UDP retransmission interval within one
	// attempt of a GRANTED call, doubling up to MaxRetransmit [8s].
	Retransmit, MaxRetransmit time.Duration
	// Attempt [10s] bounds one attempt: a GRANTED call and its reply, a
	// GRANTED_MSG and the client's GRANTED_RES, a port lookup.
	Attempt time.Duration
	// Retry [1s] is the pause after a failed attempt, doubling up to
	// MaxRetry [30s], with a quarter of jitter either way.
	Retry, MaxRetry time.Duration
	// Lifetime [5m] is how long a GRANTED callback is retried. After it the
	// lock stays granted: a client that is still waiting finds it held on
	// its next (periodic) LOCK, and one that rebooted is cleaned up by its
	// reboot notification. (Linux lockd retries for as long as the block
	// exists; a bound keeps a vanished client from costing work forever.)
	Lifetime time.Duration
	// ResLifetime [10s] is how long a *_RES may wait to be sent.
	ResLifetime time.Duration
	// PortTTL [1m] is how long a client's lockd port is remembered;
	// NoPortTTL [30s] how long a failed lookup is, doubling up to 8 times
	// that while it keeps failing.
	PortTTL, NoPortTTL time.Duration
	// Workers [16] bounds the attempts in progress at once; Peers [4096]
	// the clients with callbacks outstanding; PeerQueue [1024] the
	// callbacks waiting for one client. A callback past a bound is dropped
	// and counted (a GRANTED's lock stays granted, as above).
	Workers, Peers, PeerQueue int
}

func (c *CallbackConfig) defaults() {
	set := func(d *time.Duration, v time.Duration) {
		if *d <= 0 {
			*d = v
		}
	}
	set(&c.Retransmit, time.Second)
	set(&c.MaxRetransmit, 8*time.Second)
	set(&c.Attempt, 10*time.Second)
	set(&c.Retry, time.Second)
	set(&c.MaxRetry, 30*time.Second)
	set(&c.Lifetime, 5*time.Minute)
	set(&c.ResLifetime, 10*time.Second)
	set(&c.PortTTL, time.Minute)
	set(&c.NoPortTTL, 30*time.Second)
	for _, n := range []struct {
		p *int
		v int
	}{{&c.Workers, 16}, {&c.Peers, 4096}, {&c.PeerQueue, 1024}} {
		if *n.p <= 0 {
			*n.p = n.v
		}
	}
}

// callbacks makes the calls the service makes to clients — GRANTED and
// GRANTED_MSG for blocked requests that got their lock, *_RES answering
// *_MSG — with bounded work whatever clients do:
//
//   - per client (virtual server, address, NLM version, transport) one
//     attempt at a time, its callbacks queued behind it (bounded), one
//     TCP connection reused for all of them, its lockd port remembered
//     (a failed lookup too, for longer and longer);
//   - a fixed pool of workers runs the attempts, and a GRANTED_MSG waiting
//     for its GRANTED_RES holds no worker;
//   - a failed attempt puts the whole client back by a jittered,
//     growing delay, so thousands of callbacks to a vanished host cost a
//     handful of attempts, not waves in lock-step;
//   - a *_RES is sent once, never retransmitted: toward a (spoofable)
//     source, one reply's worth at most.
type callbacks struct {
	callbackDeps
	ctx  context.Context
	stop context.CancelFunc
	wg   sync.WaitGroup
	salt [4]byte
	seq  atomic.Uint64
	work chan *peer
	bell chan struct{}

	mu       sync.Mutex
	peers    map[peerKey]*peer
	due      peerHeap // peers waiting for a moment: a retry, a GRANTED_RES deadline
	awaiting map[string]*peer
}

type peerKey struct {
	vip, addr netip.Addr
	vers      uint32
	t         sunrpc.Transport
}

// peer is one client's callbacks.
type peer struct {
	key    peerKey
	jobs   []*cbJob
	vs     *virtualserver.Server
	busy   bool      // a worker has it, or a GRANTED_MSG awaits its answer
	at     time.Time // when it may run next (in the heap while idx >= 0)
	idx    int
	delay  time.Duration // the current retry delay
	port   uint16
	portAt time.Time // port known until, or lookups refused until (port 0)
	noPort time.Duration
	client *sunrpc.Client // the TCP connection, reused
	// The GRANTED_MSG in flight: its cookie and the answer once it came.
	cookie string
	answer chan Stat
}

type cbJob struct {
	host     *dlm.Host
	deadline time.Time
	// a GRANTED callback
	grant *lockmgr.Grant
	// resent: the grant may have been called back and taken already (a
	// previous owner's pending grant, adopted): a refusal may only mean
	// that the client has it, so it is settled, never taken back.
	resent bool
	args   []byte
	// or a *_RES
	proc uint32
	body []byte
}

// callbackDeps is what the callback sender uses: it sends from the
// service's sockets, and ends the grants it called back about itself (a
// backend update each) — it does not call back up into the service.
type callbackDeps struct {
	cfg     CallbackConfig
	rpc     *sunrpc.Server
	port    uint16
	vss     *virtualserver.Registry
	backend dlm.Backend
	mgr     *lockmgr.Manager
	stats   *Stats
	log     *slog.Logger
}

func newCallbacks(d callbackDeps) *callbacks {
	c := &callbacks{callbackDeps: d, peers: map[peerKey]*peer{}, awaiting: map[string]*peer{},
		bell: make(chan struct{}, 1)}
	c.cfg.defaults()
	c.work = make(chan *peer, c.cfg.Workers)
	c.ctx, c.stop = context.WithCancel(context.Background())
	crand.Read(c.salt[:])
	for range c.cfg.Workers {
		c.wg.Go(c.worker)
	}
	c.wg.Go(c.scheduler)
	return c
}

func (c *callbacks) close() {
	c.stop()
	c.wg.Wait()
	c.mu.Lock()
	for _, p := range c.peers {
		if p.client != nil {
			p.client.Close()
		}
	}
	c.mu.Unlock()
}

// cookie returns a cookie unique to this process run, so GRANTED_RES can be
// matched without trusting the client's address alone (Linux does the same).
func (c *callbacks) cookie() []byte {
	b := make([]byte, 12)
	copy(b, c.salt[:])
	binary.BigEndian.PutUint64(b[4:], c.seq.Add(1))
	return b
}

func (c *callbacks) ring() {
	select {
	case c.bell <- struct{}{}:
	default:
	}
}

// enqueue adds a job for the client key; it reports false when a bound
// left it out.
func (c *callbacks) enqueue(key peerKey, vs *virtualserver.Server, j *cbJob) bool {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.ctx.Err() != nil {
		return false
	}
	p := c.peers[key]
	if p == nil {
		if len(c.peers) >= c.cfg.Peers {
			c.sweepLocked(time.Now())
		}
		if len(c.peers) >= c.cfg.Peers {
			c.stats.CallbacksDropped.Add(1)
			return false
		}
		p = &peer{key: key, idx: -1}
		c.peers[key] = p
	}
	if len(p.jobs) >= c.cfg.PeerQueue {
		c.stats.CallbacksDropped.Add(1)
		return false
	}
	p.vs = vs
	p.jobs = append(p.jobs, j)
	if !p.busy && p.idx < 0 {
		c.scheduleLocked(p, time.Now())
	}
	return true
}

// scheduleLocked puts p in the heap for at; c.mu is held.
func (c *callbacks) scheduleLocked(p *peer, at time.Time) {
	p.at = at
	if p.idx >= 0 {
		heap.Fix(&c.due, p.idx)
	} else {
		heap.Push(&c.due, p)
	}
	c.ring()
}

// scheduler hands peers whose moment has come to the workers.
func (c *callbacks) scheduler() {
	t := time.NewTimer(time.Hour)
	defer t.Stop()
	sweep := time.Now()
	for {
		now := time.Now()
		var run []*peer
		c.mu.Lock()
		for len(c.due) > 0 && !c.due[0].at.After(now) {
			p := heap.Pop(&c.due).(*peer)
			p.busy = true
			run = append(run, p)
		}
		wait := time.Minute
		if len(c.due) > 0 {
			wait = c.due[0].at.Sub(now)
		}
		if now.Sub(sweep) > c.cfg.PortTTL {
			c.sweepLocked(now)
			sweep = now
		}
		c.mu.Unlock()
		for _, p := range run {
			select {
			case c.work <- p:
			case <-c.ctx.Done():
				return
			}
		}
		t.Reset(max(wait, 0))
		select {
		case <-t.C:
		case <-c.bell:
		case <-c.ctx.Done():
			return
		}
	}
}

// sweepLocked forgets idle clients whose port is not worth keeping; c.mu
// is held.
func (c *callbacks) sweepLocked(now time.Time) {
	for k, p := range c.peers {
		if len(p.jobs) == 0 && !p.busy && p.idx < 0 && now.After(p.portAt) {
			if p.client != nil {
				p.client.Close()
			}
			delete(c.peers, k)
		}
	}
}

func (c *callbacks) worker() {
	for {
		select {
		case p := <-c.work:
			c.attempt(p)
		case <-c.ctx.Done():
			return
		}
	}
}

var errNoAnswer = errors.New("nlm: no GRANTED_RES")

// attempt runs the first callback of p that is still wanted. p is busy
// (only this worker has it).
func (c *callbacks) attempt(p *peer) {
	now := time.Now()
	c.mu.Lock()
	if p.answer != nil {
		// A GRANTED_MSG was waiting for its GRANTED_RES: the answer, or
		// the time is up.
		c.mu.Unlock()
		select {
		case st := <-p.answer:
			c.finishMsg(p, st, nil)
		default:
			c.finishMsg(p, 0, errNoAnswer)
		}
		return
	}
	j, expired := c.nextJobLocked(p, now)
	vs := p.vs
	c.mu.Unlock()
	c.settle(c.ctx, expired)
	if j == nil {
		return
	}
	if j.grant == nil {
		c.sendRes(p, vs, j)
		c.next(p, nil)
		return
	}
	ctx, cancel := context.WithTimeout(c.ctx, c.cfg.Attempt)
	defer cancel()
	client, err := c.client(ctx, p, vs)
	if err != nil {
		c.next(p, err)
		return
	}
	if j.grant.Waiter.Async {
		c.sendMsg(ctx, p, vs, client, j)
		return
	}
	if j.args == nil {
		// Made at the first attempt, not when queued: a release that
		// grants thousands at once answers its caller first. The cookie
		// stays the same over retries.
		j.args = grantArgs(vs, j.grant, c.cookie())
	}
	res, err := client.Call(ctx, Prog, p.key.vers, ProcGranted, j.args)
	if err != nil {
		c.forgetPort(p)
		c.next(p, err)
		return
	}
	var r Res
	d := xdr.NewDecoder(res)
	r.Decode(d)
	if d.Err() != nil {
		c.next(p, d.Err())
		return
	}
	c.next(p, c.granted(j, r.Stat))
}

// nextJobLocked drops from the head of p's queue what is no longer wanted
// (its lifetime over) and returns the first left (with none, p goes idle)
// and the grants given up, to settle once c.mu is released. c.mu is held.
func (c *callbacks) nextJobLocked(p *peer, now time.Time) (*cbJob, []lockmgr.Grant) {
	var expired []lockmgr.Grant
	for len(p.jobs) > 0 && now.After(p.jobs[0].deadline) {
		j := p.jobs[0]
		p.jobs = p.jobs[1:]
		if j.grant != nil && c.ctx.Err() == nil {
			c.stats.CallbacksGivenUp.Add(1)
			c.log.Warn("nlm: giving up on a GRANTED callback; the lock stays granted",
				"client", j.host.HostKey.String(), "svid", j.grant.Waiter.Owner.SVID, "range", j.grant.Waiter.Range.String())
			expired = append(expired, *j.grant)
		}
	}
	if len(p.jobs) == 0 {
		p.busy = false
		p.jobs = nil
		return nil, expired
	}
	return p.jobs[0], expired
}

// next ends an attempt: on success the next callback of p goes at once;
// on failure all of p's wait a jittered, growing delay.
func (c *callbacks) next(p *peer, err error) {
	c.mu.Lock()
	defer c.mu.Unlock()
	now := time.Now()
	if err == nil {
		if len(p.jobs) > 0 {
			p.jobs = p.jobs[1:]
		}
		p.delay = 0
	} else {
		c.stats.CallbackFailures.Add(1)
		p.delay = min(max(2*p.delay, c.cfg.Retry), c.cfg.MaxRetry)
	}
	if len(p.jobs) == 0 {
		p.busy, p.jobs = false, nil
		return
	}
	p.busy = false
	at := now
	if err != nil {
		at = now.Add(jitter(p.delay))
		c.log.Debug("nlm: callback failed; retrying", "client", p.key.addr, "err", err, "in", at.Sub(now), "queued", len(p.jobs))
	}
	c.scheduleLocked(p, at)
}

// jitter spreads d by a quarter either way, so that clients that failed
// together do not come back together.
func jitter(d time.Duration) time.Duration {
	return d - d/4 + time.Duration(rand.Int64N(int64(d)/2+1))
}

// granted handles a client's answer to GRANTED: nil when the callback is
// done (taken, or refused and taken back).
func (c *callbacks) granted(j *cbJob, st Stat) error {
	switch st {
	case Granted:
		c.stats.GrantedCallbacks.Add(1)
		c.settle(c.ctx, []lockmgr.Grant{*j.grant})
		return nil
	case DeniedGracePeriod:
		return errors.New("nlm: the client is in its grace period")
	}
	if j.resent {
		// Linux answers a GRANTED for a lock it no longer waits for with
		// DENIED — also when it took the same grant before. Releasing the
		// lock could take it from a client that holds it; keeping it
		// costs at most a lock its owner does not know of, until its
		// next unlock, FREE_ALL or reboot.
		c.log.Info("nlm: client refused a grant sent again; keeping the lock", "client", j.host.HostKey.String(), "answer", st)
		c.settle(c.ctx, []lockmgr.Grant{*j.grant})
		return nil
	}
	// The client no longer wants it (the waiting process gave up):
	// release exactly what the grant took.
	c.log.Info("nlm: client refused a granted lock; releasing it", "client", j.host.HostKey.String(), "answer", st)
	c.stats.RefusedCallbacks.Add(1)
	c.ungrant(c.ctx, *j.grant)
	return nil
}

// sendMsg sends GRANTED_MSG and leaves p waiting for the GRANTED_RES
// (or the end of the attempt) without holding the worker.
func (c *callbacks) sendMsg(ctx context.Context, p *peer, vs *virtualserver.Server, client *sunrpc.Client, j *cbJob) {
	cookie := c.cookie()
	a := grantArgs(vs, j.grant, cookie)
	ans := make(chan Stat, 1)
	c.mu.Lock()
	p.cookie, p.answer = string(cookie), ans
	c.awaiting[p.cookie] = p
	c.mu.Unlock()
	var err error
	if p.key.t == sunrpc.UDP {
		err = c.datagram(p, vs, ProcGrantedMsg, a)
	} else {
		// Some clients treat *_MSG as one-way and never reply to the call
		// itself: what counts is the GRANTED_RES.
		short, cancel := context.WithTimeout(ctx, min(c.cfg.Attempt, time.Second))
		_, err = client.Call(short, Prog, p.key.vers, ProcGrantedMsg, a)
		cancel()
		if errors.Is(err, context.DeadlineExceeded) {
			err = nil
		}
	}
	if err != nil {
		c.forgetPort(p)
		c.finishMsg(p, 0, err)
		return
	}
	c.mu.Lock()
	c.scheduleLocked(p, time.Now().Add(c.cfg.Attempt)) // the attempt's end, if no answer comes first
	c.mu.Unlock()
}

// finishMsg ends a GRANTED_MSG attempt.
func (c *callbacks) finishMsg(p *peer, st Stat, err error) {
	c.mu.Lock()
	if p.idx >= 0 {
		heap.Remove(&c.due, p.idx)
	}
	delete(c.awaiting, p.cookie)
	p.cookie, p.answer = "", nil
	var j *cbJob
	if len(p.jobs) > 0 {
		j = p.jobs[0]
	}
	c.mu.Unlock()
	if err == nil && j != nil {
		err = c.granted(j, st)
	}
	c.next(p, err)
}

// grantedRes delivers a client's GRANTED_RES to the callback that sent the
// cookie, if the answer comes from that client's address.
func (c *callbacks) grantedRes(from netip.Addr, cookie []byte, st Stat) {
	c.mu.Lock()
	p := c.awaiting[string(cookie)]
	if p == nil || p.key.addr != from.Unmap() || p.answer == nil {
		c.mu.Unlock()
		c.log.Debug("nlm: GRANTED_RES matches no callback", "from", from)
		return
	}
	select {
	case p.answer <- st:
	default:
	}
	// Run it now, not at the attempt's end.
	c.scheduleLocked(p, time.Now())
	c.mu.Unlock()
}

// grant queues a GRANTED (or GRANTED_MSG) callback for each grant. What
// does not fit in the queues is logged once per client host and call, and
// settled: the lock stays granted, and the client finds it on its next
// request.
func (c *callbacks) grant(grants []lockmgr.Grant) { c.send(grants, false) }

// resend calls back grants that may have been called back before (see
// cbJob.resent).
func (c *callbacks) resend(grants []lockmgr.Grant) { c.send(grants, true) }

func (c *callbacks) send(grants []lockmgr.Grant, resent bool) {
	now := time.Now()
	var full *dlm.Host
	var dropped []lockmgr.Grant
	for i := range grants {
		g := &grants[i]
		w := g.Waiter
		vs, ok := c.hostVS(w.Owner.Host)
		if !ok {
			continue
		}
		j := &cbJob{host: w.Owner.Host, grant: g, resent: resent, deadline: now.Add(c.cfg.Lifetime)}
		key := peerKey{vip: vs.Addr(), addr: w.Owner.Host.Addr, vers: w.Vers, t: sunrpc.Transport(w.Transport)}
		if c.enqueue(key, vs, j) {
			continue
		}
		dropped = append(dropped, *g)
		if full != w.Owner.Host {
			full = w.Owner.Host
			c.log.Warn("nlm: too many callbacks outstanding; the client will find its lock on its next request",
				"client", w.Owner.Host.HostKey.String())
		}
	}
	c.settle(c.ctx, dropped)
}

func grantArgs(vs *virtualserver.Server, g *lockmgr.Grant, cookie []byte) []byte {
	w := g.Waiter
	a := TestArgs{Cookie: cookie, Exclusive: w.Exclusive, Lock: Lock{
		CallerName: []byte(vs.Name()), FH: []byte(g.FH), OH: w.OH, SVID: w.Owner.SVID,
	}}
	a.Lock.Offset, a.Lock.Len = WireRange(w.Vers, w.Range)
	return a.Append(nil, w.Vers)
}

// respond queues the *_RES call answering a *_MSG request, to go from the
// virtual server's NLM port over the transport the request came on.
func (c *callbacks) respond(call *Call, proc uint32, body []byte) {
	vs, ok := c.vss.Lookup(call.VIP)
	if !ok {
		return
	}
	addr := call.Remote.Addr().Unmap()
	key := peerKey{vip: vs.Addr(), addr: addr, vers: call.Vers, t: call.Transport}
	j := &cbJob{host: &dlm.Host{HostKey: dlm.HostKey{VIP: vs.Addr(), Addr: addr}}, proc: proc, body: body,
		deadline: time.Now().Add(c.cfg.ResLifetime)}
	c.enqueue(key, vs, j)
}

// sendRes sends a *_RES once: over UDP one datagram from the NLM socket,
// over TCP one call on the client's connection. No port known and none to
// be found: it is dropped.
func (c *callbacks) sendRes(p *peer, vs *virtualserver.Server, j *cbJob) {
	ctx, cancel := context.WithTimeout(c.ctx, c.cfg.Attempt)
	defer cancel()
	var err error
	if p.key.t == sunrpc.UDP {
		if err = c.lookup(ctx, p, vs); err == nil {
			err = c.datagram(p, vs, j.proc, j.body)
		}
	} else {
		var client *sunrpc.Client
		if client, err = c.client(ctx, p, vs); err == nil {
			_, err = client.Call(ctx, Prog, p.key.vers, j.proc, j.body)
		}
	}
	if err != nil {
		c.stats.ResDropped.Add(1)
		c.log.Debug("nlm: _RES call not sent", "client", p.key.addr, "proc", j.proc, "err", err)
	}
}

// datagram sends one call to p's lockd from the virtual server's NLM
// socket, once: no retransmission, and no reply awaited.
func (c *callbacks) datagram(p *peer, vs *virtualserver.Server, proc uint32, args []byte) error {
	h := sunrpc.CallHeader{XID: uint32(c.seq.Add(1)) ^ binary.BigEndian.Uint32(c.salt[:]), RPCVers: sunrpc.RPCVersion,
		Prog: Prog, Vers: p.key.vers, Proc: proc, Cred: sunrpc.NewAuthSys(&sunrpc.AuthSysCred{MachineName: vs.Name()})}
	return c.rpc.SendPacket(netip.AddrPortFrom(vs.Addr(), c.port), netip.AddrPortFrom(p.key.addr, p.port),
		append(sunrpc.AppendCall(nil, &h), args...))
}

// client returns p's RPC client, finding its lockd's port first: over UDP
// one that sends from the NLM socket, with the virtual server's address;
// over TCP p's connection, made once and reused.
func (c *callbacks) client(ctx context.Context, p *peer, vs *virtualserver.Server) (*sunrpc.Client, error) {
	if err := c.lookup(ctx, p, vs); err != nil {
		return nil, err
	}
	to := netip.AddrPortFrom(p.key.addr, p.port)
	opts := sunrpc.ClientOptions{
		Local:         vs.Addr(),
		Retransmit:    c.cfg.Retransmit,
		MaxRetransmit: c.cfg.MaxRetransmit,
		Cred:          sunrpc.NewAuthSys(&sunrpc.AuthSysCred{MachineName: vs.Name()}),
	}
	if p.key.t == sunrpc.UDP && c.rpc != nil {
		return c.rpc.PacketClient(netip.AddrPortFrom(vs.Addr(), c.port), to, opts), nil
	}
	c.mu.Lock()
	cl := p.client
	c.mu.Unlock()
	if cl != nil && cl.Remote() == to {
		return cl, nil
	}
	cl, err := sunrpc.Dial(ctx, p.key.t, to, opts)
	if err != nil {
		return nil, err
	}
	c.mu.Lock()
	if p.client != nil {
		p.client.Close()
	}
	p.client = cl
	c.mu.Unlock()
	return cl, nil
}

var errNoPort = errors.New("nlm: the client's lockd could not be found lately")

// lookup finds the client's lockd through its rpcbind, unless known, or
// unless a lookup failed lately: that is remembered too, for longer each
// time, so that a host without rpcbind is not asked again and again.
func (c *callbacks) lookup(ctx context.Context, p *peer, vs *virtualserver.Server) error {
	now := time.Now()
	c.mu.Lock()
	port, until := p.port, p.portAt
	c.mu.Unlock()
	if now.Before(until) {
		if port == 0 {
			return errNoPort
		}
		return nil
	}
	c.stats.PortLookups.Add(1)
	got, err := sunrpc.LookupPort(ctx, p.key.addr, vs.Addr(), Prog, p.key.vers, p.key.t,
		sunrpc.ClientOptions{Retransmit: c.cfg.Retransmit, MaxRetransmit: c.cfg.MaxRetransmit})
	c.mu.Lock()
	defer c.mu.Unlock()
	if err != nil || got == 0 {
		p.noPort = min(max(2*p.noPort, c.cfg.NoPortTTL), 8*c.cfg.NoPortTTL)
		p.port, p.portAt = 0, now.Add(jitter(p.noPort))
		if err == nil {
			err = errNoPort
		}
		return err
	}
	p.port, p.portAt, p.noPort = got, now.Add(c.cfg.PortTTL), 0
	return nil
}

// forgetPort makes the next attempt look the port up again (the client's
// lockd may have restarted elsewhere).
func (c *callbacks) forgetPort(p *peer) {
	c.mu.Lock()
	if p.port != 0 {
		p.portAt = time.Time{}
	}
	if p.client != nil {
		p.client.Close()
		p.client = nil
	}
	c.mu.Unlock()
}

// cancelHosts drops every callback to a matching host.
func (c *callbacks) cancelHosts(match func(*dlm.Host) bool) {
	c.mu.Lock()
	defer c.mu.Unlock()
	for _, p := range c.peers {
		keep := p.jobs[:0]
		for i, j := range p.jobs {
			// The head of a busy peer is in an attempt: its end drops it.
			if match(j.host) && !(p.busy && i == 0) {
				continue
			}
			keep = append(keep, j)
		}
		clear(p.jobs[len(keep):])
		p.jobs = keep
		if p.busy && len(p.jobs) > 0 && match(p.jobs[0].host) {
			p.jobs[0].deadline = time.Time{} // dropped at the attempt's end
		}
	}
}

// peerHeap orders waiting peers by the moment they may run.
type peerHeap []*peer

func (h peerHeap) Len() int           { return len(h) }
func (h peerHeap) Less(i, j int) bool { return h[i].at.Before(h[j].at) }
func (h peerHeap) Swap(i, j int)      { h[i], h[j] = h[j], h[i]; h[i].idx = i; h[j].idx = j }
func (h *peerHeap) Push(x any)        { p := x.(*peer); p.idx = len(*h); *h = append(*h, p) }
func (h *peerHeap) Pop() any {
	old := *h
	p := old[len(old)-1]
	old[len(old)-1] = nil
	*h = old[:len(old)-1]
	p.idx = -1
	return p
}

// hostVS finds the virtual server a host belongs to, if served here.
func (c *callbacks) hostVS(h *dlm.Host) (*virtualserver.Server, bool) {
	vs, ok := c.vss.Get(h.VIP)
	return vs, ok && vs.Serving()
}

// grantClaim is what ending a grant acts under: the claim of the virtual
// server serving the waiter here now — not the epoch it was queued in,
// which a planned move leaves behind with the records (a shared backend
// keeps them). Once the virtual server has moved on from this node, the
// grant is the next owner's business (the edit is fenced).
func (c *callbacks) grantClaim(g *lockmgr.Grant) dlm.Claim {
	if vs, ok := c.vss.Get(g.Waiter.Owner.Host.VIP); ok {
		return vs.Claim()
	}
	return dlm.Claim{VIP: g.Waiter.Owner.Host.VIP, Epoch: g.Waiter.Epoch}
}

// ungrant takes back a grant the client refused, and calls back what
// that makes grantable.
func (c *callbacks) ungrant(ctx context.Context, g lockmgr.Grant) {
	var res lockmgr.Result
	err := c.backend.Update(ctx, []byte(g.FH), c.grantClaim(&g), func(f *dlm.File) error {
		res = c.mgr.Ungrant(f, g.Waiter)
		return nil
	})
	if err != nil {
		if !errors.Is(err, dlm.ErrFenced) {
			c.log.Warn("nlm: cannot take back a refused grant", "err", err)
		}
		return
	}
	c.grant(res.Grants)
}

// settle ends pending grants whose callback was answered, given up or
// left out, one update per file and claim (a release may leave thousands
// of one file's grants out of a full queue at once).
func (c *callbacks) settle(ctx context.Context, grants []lockmgr.Grant) {
	if len(grants) == 0 || ctx.Err() != nil {
		return
	}
	type group struct {
		fh    string
		claim dlm.Claim
	}
	byGroup := map[group][]*dlm.Waiter{}
	var order []group
	for i := range grants {
		g := &grants[i]
		k := group{g.FH, c.grantClaim(g)}
		if _, ok := byGroup[k]; !ok {
			order = append(order, k)
		}
		byGroup[k] = append(byGroup[k], g.Waiter)
	}
	for _, k := range order {
		ws := byGroup[k]
		err := c.backend.Update(ctx, []byte(k.fh), k.claim, func(f *dlm.File) error {
			for _, w := range ws {
				c.mgr.Settle(f, w)
			}
			return nil
		})
		if err != nil && !errors.Is(err, dlm.ErrFenced) {
			c.log.Debug("nlm: cannot settle granted callbacks", "err", err)
		}
	}
}

package nlm

import (
	"context"
	"crypto/rand"
	"encoding/binary"
	"errors"
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
	// attempt, doubling up to MaxRetransmit [8s].
	Retransmit, MaxRetransmit time.Duration
	// Attempt [10s] bounds one attempt of a callback.
	Attempt time.Duration
	// Retry [1s] is the pause after a failed attempt, doubling up to
	// MaxRetry [30s].
	Retry, MaxRetry time.Duration
	// Lifetime [5m] is how long a GRANTED callback is retried. After it the
	// lock stays granted: a client that is still waiting finds it held on
	// its next (periodic) LOCK, and one that rebooted is cleaned up by its
	// reboot notification.
	Lifetime time.Duration
	// ResLifetime [10s] bounds a *_RES call.
	ResLifetime time.Duration
	// PortTTL [1m] is how long a client's lockd port is remembered.
	PortTTL time.Duration
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
}

// callbacks runs the calls the service makes to clients, each in its own
// goroutine, and keeps track of them so they can be cancelled when their
// client or virtual server goes away.
type callbacks struct {
	s    *Service
	cfg  CallbackConfig
	ctx  context.Context
	stop context.CancelFunc
	wg   sync.WaitGroup
	salt [4]byte
	seq  atomic.Uint64

	mu       sync.Mutex
	byHost   map[*dlm.Host]map[*task]struct{}
	awaiting map[string]*task // GRANTED_MSG cookie → the callback waiting for GRANTED_RES
	ports    map[portKey]portEntry
}

type task struct {
	host   *dlm.Host
	cancel context.CancelFunc
	res    chan Stat
}

type portKey struct {
	vip, addr netip.Addr
	vers      uint32
	t         sunrpc.Transport
}

type portEntry struct {
	port    uint16
	expires time.Time
}

func newCallbacks(s *Service) *callbacks {
	c := &callbacks{s: s, cfg: s.cfg.Callbacks, byHost: map[*dlm.Host]map[*task]struct{}{},
		awaiting: map[string]*task{}, ports: map[portKey]portEntry{}}
	c.cfg.defaults()
	c.ctx, c.stop = context.WithCancel(context.Background())
	rand.Read(c.salt[:])
	return c
}

func (c *callbacks) close() {
	c.stop()
	c.wg.Wait()
}

// cookie returns a cookie unique to this process run, so GRANTED_RES can be
// matched without trusting the client's address alone (Linux does the same).
func (c *callbacks) cookie() []byte {
	b := make([]byte, 12)
	copy(b, c.salt[:])
	binary.BigEndian.PutUint64(b[4:], c.seq.Add(1))
	return b
}

func (c *callbacks) start(h *dlm.Host, lifetime time.Duration) (*task, context.Context, bool) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.ctx.Err() != nil {
		return nil, nil, false
	}
	ctx, cancel := context.WithTimeout(c.ctx, lifetime)
	t := &task{host: h, cancel: cancel, res: make(chan Stat, 1)}
	if c.byHost[h] == nil {
		c.byHost[h] = map[*task]struct{}{}
	}
	c.byHost[h][t] = struct{}{}
	c.wg.Add(1)
	return t, ctx, true
}

func (c *callbacks) done(t *task) {
	t.cancel()
	c.mu.Lock()
	if m := c.byHost[t.host]; m != nil {
		delete(m, t)
		if len(m) == 0 {
			delete(c.byHost, t.host)
		}
	}
	c.mu.Unlock()
	c.wg.Done()
}

// cancelHosts stops every callback to a matching host.
func (c *callbacks) cancelHosts(match func(*dlm.Host) bool) {
	c.mu.Lock()
	defer c.mu.Unlock()
	for h, ts := range c.byHost {
		if match(h) {
			for t := range ts {
				t.cancel()
			}
		}
	}
}

// grant sends a GRANTED (or GRANTED_MSG) callback for each grant.
func (c *callbacks) grant(grants []lockmgr.Grant) {
	for _, g := range grants {
		t, ctx, ok := c.start(g.Waiter.Owner.Host, c.cfg.Lifetime)
		if !ok {
			return
		}
		go func() {
			defer c.done(t)
			c.runGrant(ctx, t, g)
		}()
	}
}

var errNoAnswer = errors.New("nlm: no GRANTED_RES")

func (c *callbacks) runGrant(ctx context.Context, t *task, g lockmgr.Grant) {
	w := g.Waiter
	log := c.s.log.With("client", w.Owner.Host.HostKey.String(), "svid", w.Owner.SVID, "range", w.Range.String())
	vs, ok := c.s.hostVS(w.Owner.Host)
	if !ok {
		return
	}
	cookie := c.cookie()
	a := TestArgs{Cookie: cookie, Exclusive: w.Exclusive, Lock: Lock{
		CallerName: []byte(vs.Name()), FH: []byte(g.FH), OH: w.OH, SVID: w.Owner.SVID,
	}}
	a.Lock.Offset, a.Lock.Len = WireRange(w.Vers, w.Range)
	args := a.Append(nil, w.Vers)
	if w.Async {
		c.mu.Lock()
		c.awaiting[string(cookie)] = t
		c.mu.Unlock()
		defer func() {
			c.mu.Lock()
			delete(c.awaiting, string(cookie))
			c.mu.Unlock()
		}()
	}
	delay := c.cfg.Retry
	for {
		stat, err := c.sendGranted(ctx, vs, w, args, t)
		if err == nil {
			switch stat {
			case Granted:
				c.s.stats.GrantedCallbacks.Add(1)
				log.Debug("nlm: client took the granted lock")
				return
			case DeniedGracePeriod:
				err = errors.New("client is in its grace period")
			default:
				// The client no longer wants it (the waiting process gave
				// up): release exactly what the grant took.
				log.Info("nlm: client refused a granted lock; releasing it", "answer", stat)
				c.s.stats.RefusedCallbacks.Add(1)
				c.s.ungrant(c.ctx, g)
				return
			}
		}
		c.s.stats.CallbackFailures.Add(1)
		if ctx.Err() != nil {
			if c.ctx.Err() == nil && !errors.Is(ctx.Err(), context.Canceled) {
				log.Warn("nlm: giving up on a GRANTED callback; the lock stays granted", "err", err)
			}
			return
		}
		log.Debug("nlm: GRANTED callback failed; retrying", "err", err, "in", delay)
		select {
		case <-ctx.Done():
			return
		case <-time.After(delay):
		}
		delay = min(2*delay, c.cfg.MaxRetry)
	}
}

// sendGranted makes one attempt: GRANTED and its reply, or GRANTED_MSG and
// the client's GRANTED_RES.
func (c *callbacks) sendGranted(ctx context.Context, vs *virtualserver.Server, w *dlm.Waiter, args []byte, t *task) (Stat, error) {
	ctx, cancel := context.WithTimeout(ctx, c.cfg.Attempt)
	defer cancel()
	tr := sunrpc.Transport(w.Transport)
	client, err := c.client(ctx, vs, w.Owner.Host.Addr, w.Vers, tr)
	if err != nil {
		return 0, err
	}
	defer client.Close()
	if !w.Async {
		res, err := client.Call(ctx, Prog, w.Vers, ProcGranted, args)
		if err != nil {
			c.forgetPort(vs, w.Owner.Host.Addr, w.Vers, tr)
			return 0, err
		}
		var r Res
		d := xdr.NewDecoder(res)
		r.Decode(d)
		return r.Stat, d.Err()
	}
	// Some clients treat *_MSG as one-way and never reply to the call
	// itself: what counts is the GRANTED_RES.
	callErr := make(chan error, 1)
	go func() {
		_, err := client.Call(ctx, Prog, w.Vers, ProcGrantedMsg, args)
		callErr <- err
	}()
	for {
		select {
		case st := <-t.res:
			return st, nil
		case err := <-callErr:
			if err != nil && ctx.Err() == nil {
				c.forgetPort(vs, w.Owner.Host.Addr, w.Vers, tr)
				return 0, err
			}
			callErr = nil // replied (or timed out with the attempt): keep waiting for the RES
		case <-ctx.Done():
			return 0, errNoAnswer
		}
	}
}

// grantedRes delivers a client's GRANTED_RES to the callback that sent the
// cookie, if the answer comes from that client's address.
func (c *callbacks) grantedRes(from netip.Addr, cookie []byte, st Stat) {
	c.mu.Lock()
	t := c.awaiting[string(cookie)]
	c.mu.Unlock()
	if t == nil || t.host.Addr != from.Unmap() {
		c.s.log.Debug("nlm: GRANTED_RES matches no callback", "from", from)
		return
	}
	select {
	case t.res <- st:
	default:
	}
}

// respond sends the *_RES call answering a *_MSG request, from the virtual
// server's NLM port, over the transport the request came on.
func (c *callbacks) respond(req *sunrpc.Request, proc uint32, body []byte) {
	vs, ok := c.s.cfg.VirtualServers.Lookup(req.Local.Addr())
	if !ok {
		return
	}
	host := &dlm.Host{HostKey: dlm.HostKey{VIP: vs.Addr(), Addr: req.Remote.Addr()}}
	t, ctx, ok := c.start(host, c.cfg.ResLifetime)
	if !ok {
		return
	}
	vers, tr, addr := req.Vers, req.Transport, req.Remote.Addr()
	go func() {
		defer c.done(t)
		client, err := c.client(ctx, vs, addr, vers, tr)
		if err != nil {
			c.s.log.Debug("nlm: cannot reach the client for a _RES call", "client", addr, "err", err)
			return
		}
		defer client.Close()
		if _, err := client.Call(ctx, Prog, vers, proc, body); err != nil {
			c.forgetPort(vs, addr, vers, tr)
			c.s.log.Debug("nlm: _RES call unanswered", "client", addr, "proc", proc, "err", err)
		}
	}()
}

// client returns an RPC client to the lockd of the client at addr, with
// the virtual server's address as source: over UDP from the NLM socket
// itself, over TCP from a fresh connection.
func (c *callbacks) client(ctx context.Context, vs *virtualserver.Server, addr netip.Addr, vers uint32, tr sunrpc.Transport) (*sunrpc.Client, error) {
	port, err := c.port(ctx, vs, addr, vers, tr)
	if err != nil {
		return nil, err
	}
	to := netip.AddrPortFrom(addr, port)
	opts := sunrpc.ClientOptions{
		Local:         vs.Addr(),
		Retransmit:    c.cfg.Retransmit,
		MaxRetransmit: c.cfg.MaxRetransmit,
		Cred:          sunrpc.NewAuthSys(&sunrpc.AuthSysCred{MachineName: vs.Name()}),
	}
	if tr == sunrpc.UDP && c.s.cfg.RPC != nil {
		return c.s.cfg.RPC.PacketClient(netip.AddrPortFrom(vs.Addr(), c.s.cfg.Port), to, opts), nil
	}
	return sunrpc.Dial(ctx, tr, to, opts)
}

// port finds the client's lockd through the client's rpcbind, remembering
// the answer for a while.
func (c *callbacks) port(ctx context.Context, vs *virtualserver.Server, addr netip.Addr, vers uint32, tr sunrpc.Transport) (uint16, error) {
	k := portKey{vip: vs.Addr(), addr: addr, vers: vers, t: tr}
	now := time.Now()
	c.mu.Lock()
	e, ok := c.ports[k]
	c.mu.Unlock()
	if ok && now.Before(e.expires) {
		return e.port, nil
	}
	p, err := sunrpc.LookupPort(ctx, addr, vs.Addr(), Prog, vers, tr, sunrpc.ClientOptions{Retransmit: c.cfg.Retransmit, MaxRetransmit: c.cfg.MaxRetransmit})
	if err != nil {
		return 0, err
	}
	c.mu.Lock()
	c.ports[k] = portEntry{port: p, expires: now.Add(c.cfg.PortTTL)}
	c.mu.Unlock()
	return p, nil
}

func (c *callbacks) forgetPort(vs *virtualserver.Server, addr netip.Addr, vers uint32, tr sunrpc.Transport) {
	c.mu.Lock()
	delete(c.ports, portKey{vip: vs.Addr(), addr: addr, vers: vers, t: tr})
	c.mu.Unlock()
}

// Package nlm serves the Network Lock Manager protocol (program 100021,
// versions 1, 3 and 4) keyed by virtual server: every request belongs to
// the virtual server whose address it was sent to, lock owners are
// (virtual server, client host, svid), and callbacks leave from that
// virtual server's address.
//
// The lock semantics live in the pure lock manager (nlm/lockmgr); this
// package decodes requests, finds the virtual server, runs the manager on
// the file's state through the dlm backend, encodes replies and performs
// the effects: GRANTED callbacks for blocked requests that became
// grantable, and *_RES calls answering *_MSG requests.
package nlm

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net/netip"
	"sync"
	"sync/atomic"
	"time"

	"github.com/nlmha/nlmha/dlm"
	"github.com/nlmha/nlmha/nlm/lockmgr"
	"github.com/nlmha/nlmha/nsm"
	"github.com/nlmha/nlmha/sunrpc"
	"github.com/nlmha/nlmha/sunrpc/xdr"
	"github.com/nlmha/nlmha/virtualserver"
)

// FHValidator tells whether a file handle is one the NFS server knows.
// Valid returns false (and no error) for a stale or unknown handle; an
// error means it could not tell, and the request goes ahead.
type FHValidator interface {
	Valid(ctx context.Context, fh []byte) (bool, error)
}

// Config configures a Service.
type Config struct {
	Backend        dlm.Backend
	VirtualServers *virtualserver.Registry
	Limits         lockmgr.Limits
	// RPC is the server that carries NLM, and Port its NLM port: UDP
	// callbacks and *_RES calls leave from that socket on the virtual
	// server's address.
	RPC  *sunrpc.Server
	Port uint16
	// FHValidator, if set, checks file handles (NLM4_STALE_FH for unknown ones).
	FHValidator FHValidator
	// Monitor, if set, monitors the client host of every monitored request
	// (LOCK, SHARE; not NM_LOCK) before it is served, so that the client's
	// reboots are noticed and it is told of ours.
	Monitor Monitor
	// UnprivilegedLocal accepts that callback from any local port; by
	// default, as Linux lockd, only from a privileged one, so that an
	// unprivileged local user cannot drop other clients' locks. For test
	// rigs.
	UnprivilegedLocal bool
	Callbacks         CallbackConfig
	Logger            *slog.Logger
	// Now is the clock grace periods are judged by (default time.Now).
	Now func() time.Time
}

// Monitor is the status monitor (NSM) as the lock manager uses it.
type Monitor interface {
	// Monitor makes sure the client (caller, addr) of the virtual server
	// vip is monitored; it returns once that is durable. An error fails the
	// request with DENIED_NOLOCKS, as Linux lockd does when statd cannot
	// monitor, except one wrapping virtualserver.ErrRetryLater: then the
	// request is not answered, and the client sends it again.
	Monitor(ctx context.Context, vip netip.Addr, caller string, addr netip.Addr) error
	// Generation changes whenever monitoring ends for some client; a host
	// seen monitored under the current generation still is.
	Generation() uint64
}

// Service is the NLM service.
type Service struct {
	cfg Config
	mgr lockmgr.Manager
	log *slog.Logger
	cb  *callbacks
	now func() time.Time
	ops sync.Pool // *op
	// secs is a coarse clock (unix seconds, ticking twice a second) for
	// lock ages, so that a LOCK reads no clock.
	secs    atomic.Uint32
	stopClk chan struct{}
	clkDone sync.WaitGroup
	stats   Stats
	// monitored maps a *dlm.Host to the NSM generation under which it was
	// last seen monitored, so that locking does not ask the NSM service
	// again while that holds. Sweep forgets idle hosts.
	monitored sync.Map
}

// Stats count the service's callbacks.
type Stats struct {
	GrantedCallbacks atomic.Uint64 // GRANTED callbacks the client took
	RefusedCallbacks atomic.Uint64 // ... it refused (the grant was taken back)
	CallbackFailures atomic.Uint64 // failed attempts (retried with backoff)
	CallbacksGivenUp atomic.Uint64 // GRANTED callbacks never answered in their lifetime (the lock stays granted)
	CallbacksDropped atomic.Uint64 // callbacks left out by a bound (peers, per-peer queue)
	ResDropped       atomic.Uint64 // *_RES calls not sent (no port known, or the send failed)
	PortLookups      atomic.Uint64 // lookups of clients' lockd ports (rpcbind queries)
	TooManyNames     atomic.Uint64 // requests refused: their address has too many caller_names
}

// Stats returns the service's counters.
func (s *Service) Stats() *Stats { return &s.stats }

// New returns a service; register its Programs with cfg.RPC.
func New(cfg Config) *Service {
	s := &Service{cfg: cfg, mgr: lockmgr.Manager{Limits: cfg.Limits}, log: cfg.Logger, now: cfg.Now}
	if s.log == nil {
		s.log = slog.New(slog.DiscardHandler)
	}
	if s.now == nil {
		s.now = time.Now
	}
	s.cb = newCallbacks(callbackDeps{cfg: cfg.Callbacks, rpc: cfg.RPC, port: cfg.Port, vss: cfg.VirtualServers,
		backend: cfg.Backend, mgr: &s.mgr, stats: &s.stats, log: s.log})
	s.secs.Store(uint32(s.now().Unix()))
	s.stopClk = make(chan struct{})
	if rg, ok := cfg.Backend.(dlm.RemoteGrants); ok {
		// Grants another node made for this node's virtual servers: called
		// back from here, where the waiter's virtual server is served.
		ch := rg.RemoteGrants()
		s.clkDone.Go(func() {
			for {
				select {
				case g := <-ch:
					w := g.Waiter
					s.cb.grant([]lockmgr.Grant{{FH: g.FH, Waiter: &w}})
				case <-s.stopClk:
					return
				}
			}
		})
	}
	s.clkDone.Go(func() {
		t := time.NewTicker(500 * time.Millisecond)
		defer t.Stop()
		for {
			select {
			case <-t.C:
				s.secs.Store(uint32(s.now().Unix()))
			case <-s.stopClk:
				return
			}
		}
	})
	return s
}

// Close cancels outstanding callbacks and waits for them to stop.
func (s *Service) Close() {
	s.cb.close()
	select {
	case <-s.stopClk:
	default:
		close(s.stopClk)
	}
	s.clkDone.Wait()
}

type handler func(s *Service, ctx context.Context, req *sunrpc.Request, res []byte) ([]byte, error)

// Programs returns NLM versions 1, 3 and 4 for registration: the lock
// procedures from the table (procs.go), the others here.
func (s *Service) Programs() []sunrpc.Program {
	bind := func(name string, h handler, nonIdempotent bool) sunrpc.Proc {
		return sunrpc.Proc{Name: name, NonIdempotent: nonIdempotent, Handler: func(ctx context.Context, req *sunrpc.Request, res []byte) ([]byte, error) {
			return h(s, ctx, req, res)
		}}
	}
	procs := make([]sunrpc.Proc, ProcFreeAll+1)
	procs[ProcNull] = bind("NULL", (*Service).null, false)
	for proc, p := range lockProcs {
		procs[proc] = sunrpc.Proc{Name: p.name, NonIdempotent: p.kind != pkTest || p.res != 0, Handler: (&procHandler{s, p}).handle}
	}
	// Results of asynchronous calls a client made of us: we make none,
	// so there is nothing to match them with (as in Linux lockd).
	for _, p := range []uint32{ProcTestRes, ProcLockRes, ProcCancelRes, ProcUnlockRes} {
		procs[p] = bind(fmt.Sprintf("RES_%d", p), (*Service).ignoreRes, false)
	}
	procs[ProcGrantedRes] = bind("GRANTED_RES", (*Service).handleGrantedRes, true)
	procs[ProcSMNotify] = bind("SM_NOTIFY", (*Service).handleSMNotify, true)
	procs[ProcFreeAll] = bind("FREE_ALL", (*Service).handleFreeAll, true)
	return []sunrpc.Program{
		{Name: "nlockmgr", Prog: Prog, Vers: Vers1, Procs: procs[:ProcSMNotify+1]},
		{Name: "nlockmgr", Prog: Prog, Vers: Vers3, Procs: procs},
		{Name: "nlockmgr", Prog: Prog, Vers: Vers4, Procs: procs},
	}
}

// ---- common steps -------------------------------------------------------

// ToRange converts a wire offset and length to a byte range. Version 4
// ranges must end by 2^63-1 (NLM4_FBIG beyond); versions 1 and 3 carry
// unsigned 32-bit values and must end by 2^32. Length 0 means to the end
// of the file.
func ToRange(vers uint32, off, n uint64) (dlm.Range, Stat) {
	limit := uint64(1 << 32)
	bad := DeniedNoLocks
	if vers == Vers4 {
		limit, bad = Offset64Max+1, FBig
	}
	if off >= limit || (n > 0 && n > limit-off) {
		return dlm.Range{}, bad
	}
	if n == 0 {
		return dlm.Range{Start: off, End: dlm.Inf}, Granted
	}
	return dlm.Range{Start: off, End: off + n}, Granted
}

// WireRange converts a byte range to a wire offset and length for vers.
// A version 1/3 peer cannot see past 4 GiB: ranges reaching beyond are
// reported as running to the end of the file.
func WireRange(vers uint32, r dlm.Range) (off, n uint64) {
	off = r.Start
	if r.End != dlm.Inf {
		n = r.End - r.Start
	}
	if vers != Vers4 {
		if off > Offset32Max {
			off = Offset32Max
		}
		if r.End == dlm.Inf || r.End > 1<<32 {
			n = 0
		}
	}
	return off, n
}

// op carries one request through the backend. Its functions are bound
// once, when the op is made, and ops are pooled: a request allocates no
// closure (Backend.Update is an interface call, so a closure built per
// request would escape to the heap).
type op struct {
	s       *Service
	vs      *virtualserver.Server // where the request came through; its claim fences the edit
	kind    opKind
	lock    lockmgr.LockArgs
	share   lockmgr.ShareArgs
	owner   *dlm.Owner
	host    *dlm.Host
	oh      []byte
	rng     dlm.Range
	excl    bool
	inGrace bool
	limited bool // the owner would be one name too many for its address
	res     lockmgr.Result
	update  func(*dlm.File) error
	read    func(*dlm.File)
}

type opKind uint8

const (
	opLock opKind = iota
	opUnlock
	opCancel
	opShare
	opUnshare
)

func (s *Service) getOp() *op {
	if o, ok := s.ops.Get().(*op); ok {
		return o
	}
	o := &op{s: s}
	o.update, o.read = o.apply, o.test
	return o
}

func (s *Service) putOp(o *op) {
	update, read := o.update, o.read
	*o = op{s: s, update: update, read: read}
	s.ops.Put(o)
}

func (o *op) apply(f *dlm.File) error {
	m := &o.s.mgr
	switch o.kind {
	case opLock:
		o.res = m.Lock(f, &o.lock)
	case opUnlock:
		o.res = m.Unlock(f, o.owner, o.rng)
	case opCancel:
		o.res = m.Cancel(f, o.owner, o.rng, o.excl)
	case opShare:
		o.res = m.Share(f, &o.share)
	case opUnshare:
		o.res = m.Unshare(f, o.host, o.oh)
	}
	return nil
}

// cutOff tells the releasing virtual server that this request goes
// unanswered, so that the next owner waits for the client to resend it.
func (o *op) cutOff() {
	switch {
	case o.owner != nil:
		o.vs.CutOff(o.owner.Host.Addr)
	case o.host != nil:
		o.vs.CutOff(o.host.Addr)
	}
}

// The in-memory backend keeps no records across the death of their node,
// so grace uses the rule without an epoch floor (lockmgr): a durable,
// shared backend supplies a floor instead.
func (o *op) test(f *dlm.File) {
	o.res = o.s.mgr.Test(f, o.owner, o.rng, o.excl, o.inGrace, o.vs.ReclaimFloor())
}

// prepare finds the virtual server, checks the range and the handle, and
// interns the owner into o. A status other than Granted is the reply.
func (s *Service) prepare(ctx context.Context, c *Call, l *Lock, o *op) Stat {
	vs, st := s.lookupVS(c)
	if st != Granted {
		return st
	}
	rng, st := ToRange(c.Vers, l.Offset, l.Len)
	if st != Granted {
		return st
	}
	if st := s.checkFH(ctx, c.Vers, l.FH); st != Granted {
		return st
	}
	o.vs, o.rng = vs, rng
	o.owner = s.cfg.Backend.OwnerOf(vs.Addr(), c.Remote.Addr(), l.CallerName, l.SVID)
	if o.owner == nil {
		o.limited = true
		return DeniedNoLocks
	}
	return Granted
}

// tooManyNames refuses a request whose caller_name would be one too many
// for its address (the backend's host limit): one address could otherwise
// make the service keep a host, an owner and a monitor record for every
// name it sends.
func (s *Service) tooManyNames(vs *virtualserver.Server, c *Call) {
	s.stats.TooManyNames.Add(1)
	s.log.Warn("nlm: refused: too many caller_names from one address", "vip", vs.Addr(), "client", c.Remote.Addr())
}

// fenced is the outcome of a request that raced with the release of its
// virtual server: it is not answered at all (sunrpc.ErrNoReply), so that
// the client sends it again and the next owner answers. Any answer from
// here would be wrong: DENIED_GRACE_PERIOD to a reclaim makes a Linux
// client give the lock up ("lockd: spurious grace period reject?!"), and
// GRANTED to an UNLOCK after the capture would leave the lock to the next
// owner. It is never put on the wire.
const fenced Stat = 1 << 31

// lookupVS finds the virtual server a request was sent to. One being
// released (or released) here is fenced; an address that is no virtual
// server at all fails.
func (s *Service) lookupVS(c *Call) (*virtualserver.Server, Stat) {
	vs, ok := s.cfg.VirtualServers.Lookup(c.VIP)
	if ok {
		return vs, Granted
	}
	if vs != nil {
		vs.CutOff(c.Remote.Addr())
		return nil, fenced
	}
	return nil, Failed
}

// reply is what a handler returns for a result with status st: the
// encoded result, or no reply at all for a fenced request.
func reply(res []byte, st Stat) ([]byte, error) {
	if st == fenced {
		return nil, sunrpc.ErrNoReply
	}
	return res, nil
}

// checkFH asks the validator about a version 4 handle (NFSv3's NLM); the
// older versions go with NFSv2 handles, which are not checked.
func (s *Service) checkFH(ctx context.Context, vers uint32, fh []byte) Stat {
	if s.cfg.FHValidator == nil || vers != Vers4 {
		return Granted
	}
	ok, err := s.cfg.FHValidator.Valid(ctx, fh)
	if err != nil {
		s.log.Debug("nlm: cannot validate file handle; serving the request", "err", err)
		return Granted
	}
	if !ok {
		return StaleFH
	}
	return Granted
}

// update runs o on one file under o.vs's claim — the backend fences it once
// the virtual server's release has begun — and performs the resulting
// grants.
func (s *Service) update(ctx context.Context, o *op, fh []byte) Stat {
	if err := s.cfg.Backend.Update(ctx, fh, o.vs.Claim(), o.update); err != nil {
		st := s.backendStat(err)
		if st == fenced {
			o.cutOff()
		}
		return st
	}
	s.cb.grant(o.res.Grants)
	return status(o.res.Status)
}

// backendStat turns a backend failure into a reply. A request that raced
// with the release of its virtual server is fenced.
//
// A shared store that cannot be reached, has no quorum, or keeps losing
// races on the file gets DENIED_GRACE_PERIOD: nothing was granted on what
// this node may not know, and a client waits and sends the request again
// (Linux's lockd does so for every procedure), where NLM4_FAILED would
// reach the application as an error.
func (s *Service) backendStat(err error) Stat {
	switch {
	case errors.Is(err, dlm.ErrFenced):
		return fenced
	case errors.Is(err, dlm.ErrUnavailable), errors.Is(err, dlm.ErrConflict):
		s.log.Warn("nlm: lock store unavailable; asking the client to retry", "err", err)
		return DeniedGracePeriod
	}
	s.log.Warn("nlm: lock backend failed", "err", err)
	return Failed
}

func status(st lockmgr.Status) Stat {
	switch st {
	case lockmgr.Granted:
		return Granted
	case lockmgr.Denied:
		return Denied
	case lockmgr.Blocked:
		return Blocked
	case lockmgr.DeniedGrace:
		return DeniedGracePeriod
	case lockmgr.Deadlock:
		return Deadlck
	}
	return DeniedNoLocks
}

func holder(vers uint32, l dlm.Lock) Holder {
	h := Holder{Exclusive: l.Exclusive, SVID: l.Owner.SVID, OH: l.Owner.OH()}
	h.Offset, h.Len = WireRange(vers, l.Range)
	return h
}

// ---- the operations, shared by the synchronous and _MSG procedures -------

func (s *Service) test(ctx context.Context, c *Call, a *TestArgs) TestRes {
	out := TestRes{Cookie: a.Cookie}
	o := s.getOp()
	defer s.putOp(o)
	if st := s.prepare(ctx, c, &a.Lock, o); st != Granted {
		if o.limited {
			s.tooManyNames(o.vs, c)
		}
		out.Stat = st.ForVersion(c.Vers)
		return out
	}
	o.excl, o.inGrace = a.Exclusive, o.vs.InGraceNow(s.now)
	if o.inGrace {
		o.vs.GraceRequest(c.Remote.Addr(), false)
	}
	if err := s.cfg.Backend.Read(ctx, a.Lock.FH, o.read); err != nil {
		out.Stat = s.backendStat(err).ForVersion(c.Vers)
		return out
	}
	out.Stat = status(o.res.Status).ForVersion(c.Vers)
	if o.res.HasHolder {
		out.Holder = holder(c.Vers, o.res.Holder)
	}
	return out
}

func (s *Service) lock(ctx context.Context, c *Call, a *LockArgs, monitor, async bool) Stat {
	o := s.getOp()
	defer s.putOp(o)
	if st := s.prepare(ctx, c, &a.Lock, o); st != Granted {
		if o.limited {
			s.tooManyNames(o.vs, c)
		}
		return st.ForVersion(c.Vers)
	}
	o.owner.SetOH(a.Lock.OH)
	o.kind = opLock
	o.lock = lockmgr.LockArgs{
		Owner: o.owner, Range: o.rng, Exclusive: a.Exclusive, Block: a.Block, Reclaim: a.Reclaim,
		InGrace: o.vs.InGraceNow(s.now), Epoch: o.vs.Epoch(), Floor: o.vs.ReclaimFloor(), Now: s.secs.Load(),
		OH: a.Lock.OH, Vers: c.Vers, Transport: uint8(c.Transport), Async: async,
	}
	if monitor {
		if st := s.monitor(ctx, o.owner.Host); st != Granted {
			return st.ForVersion(c.Vers)
		}
	}
	st := s.update(ctx, o, a.Lock.FH)
	if o.lock.InGrace {
		// After the reclaim is in: the grace period may end on the next one.
		o.vs.GraceRequest(c.Remote.Addr(), a.Reclaim)
	}
	return st.ForVersion(c.Vers)
}

func (s *Service) cancel(ctx context.Context, c *Call, a *CancelArgs) Stat {
	o := s.getOp()
	defer s.putOp(o)
	if st := s.prepare(ctx, c, &a.Lock, o); st != Granted {
		if o.limited {
			return Denied // a host that does not exist waits for nothing
		}
		return st.ForVersion(c.Vers)
	}
	s.graceNote(o.vs, c, false)
	o.kind, o.excl = opCancel, a.Exclusive
	return s.update(ctx, o, a.Lock.FH).ForVersion(c.Vers)
}

// graceNote tells a virtual server in grace of a client's request: its
// reclaims, and its first other request after them, end the grace period
// early (see virtualserver.Grace).
func (s *Service) graceNote(vs *virtualserver.Server, c *Call, reclaim bool) {
	if vs.InGraceNow(s.now) {
		vs.GraceRequest(c.Remote.Addr(), reclaim)
	}
}

func (s *Service) unlock(ctx context.Context, c *Call, a *UnlockArgs) Stat {
	o := s.getOp()
	defer s.putOp(o)
	if st := s.prepare(ctx, c, &a.Lock, o); st != Granted {
		if o.limited {
			return Granted // a host that does not exist holds nothing
		}
		return st.ForVersion(c.Vers)
	}
	s.graceNote(o.vs, c, false)
	// Fenced like the rest: an unlock applied here after the release took
	// its snapshot would leave the lock with the next owner. Unanswered, it
	// is sent again there.
	o.kind = opUnlock
	return s.update(ctx, o, a.Lock.FH).ForVersion(c.Vers)
}

// ---- procedure handlers -------------------------------------------------

func (s *Service) null(_ context.Context, _ *sunrpc.Request, res []byte) ([]byte, error) {
	return res, nil
}

func (s *Service) ignoreRes(_ context.Context, req *sunrpc.Request, res []byte) ([]byte, error) {
	return res, nil
}

// handleGrantedRes matches a client's answer to our GRANTED_MSG by the
// cookie we generated.
func (s *Service) handleGrantedRes(_ context.Context, req *sunrpc.Request, res []byte) ([]byte, error) {
	var a Res
	if err := req.DecodeArgs(func(d *xdr.Decoder) { a.Decode(d) }); err != nil {
		return nil, err
	}
	s.cb.grantedRes(req.Remote.Addr(), a.Cookie, a.Stat)
	return res, nil
}

// handleSMNotify is the private callback a local statd makes when a
// monitored host reboots. Like Linux lockd, only loopback callers from a
// privileged port count.
func (s *Service) handleSMNotify(ctx context.Context, req *sunrpc.Request, res []byte) ([]byte, error) {
	var a nsm.Status // sm_status, the NSM's wire type: its one definition
	if err := req.DecodeArgs(func(d *xdr.Decoder) { a.Decode(d) }); err != nil {
		return nil, err
	}
	if a := req.Remote.Addr(); a.IsValid() && !a.IsLoopback() {
		s.log.Warn("nlm: rejected SM_NOTIFY callback from a remote host", "remote", req.Remote)
		return res, nil
	}
	if req.Remote.Port() >= 1024 && !s.cfg.UnprivilegedLocal {
		s.log.Warn("nlm: rejected SM_NOTIFY callback from an unprivileged port", "remote", req.Remote)
		return res, nil
	}
	name := a.MonName
	s.log.Info("nlm: client rebooted; dropping its locks", "mon_name", name, "state", a.State)
	if err := s.Rebooted(ctx, dlm.Selector{Name: name}); err != nil {
		s.log.Warn("nlm: dropping a rebooted client's locks failed", "mon_name", name, "err", err)
	}
	return res, nil
}

// Rebooted is the one path of a client host's reboot, whoever noticed it
// (the NSM service, or a local statd's private callback): the state of
// the hosts sel selects is dropped on every virtual server they used, and
// their virtual servers' grace periods stop waiting for them — they have
// nothing left to reclaim. The drop needs no claim: it is right whoever
// serves the records.
func (s *Service) Rebooted(ctx context.Context, sel dlm.Selector) error {
	_, err := s.DropHosts(ctx, sel, dlm.Claim{})
	told := map[dlm.HostKey]bool{}
	tell := func(vip, addr netip.Addr) {
		k := dlm.HostKey{VIP: vip, Addr: addr}
		if told[k] {
			return
		}
		told[k] = true
		if vs, ok := s.cfg.VirtualServers.Get(vip); ok {
			vs.GraceRebooted(addr)
		}
	}
	for k := range sel.Keys {
		tell(k.VIP, k.Addr)
	}
	if len(sel.Keys) == 0 {
		s.cfg.Backend.Hosts(func(h *dlm.Host) bool {
			if sel.Match(h) {
				tell(h.VIP, h.Addr)
			}
			return true
		})
	}
	return err
}

func (s *Service) share(ctx context.Context, c *Call, a *ShareArgs, unshare bool) Stat {
	vs, st := s.lookupVS(c)
	if st != Granted {
		return st.ForVersion(c.Vers)
	}
	if st := s.checkFH(ctx, c.Vers, a.Share.FH); st != Granted {
		return st.ForVersion(c.Vers)
	}
	o := s.getOp()
	defer s.putOp(o)
	host := s.cfg.Backend.HostLimited(dlm.HostKey{VIP: vs.Addr(), Name: string(a.Share.CallerName), Addr: c.Remote.Addr()})
	if host == nil {
		if unshare {
			return Granted // a host that does not exist shares nothing
		}
		s.tooManyNames(vs, c)
		return DeniedNoLocks.ForVersion(c.Vers)
	}
	if unshare {
		o.kind, o.vs, o.host, o.oh = opUnshare, vs, host, a.Share.OH
		return s.update(ctx, o, a.Share.FH).ForVersion(c.Vers)
	}
	if st := s.monitor(ctx, host); st != Granted {
		return st.ForVersion(c.Vers)
	}
	o.kind, o.vs = opShare, vs
	o.share = lockmgr.ShareArgs{Host: host, OH: a.Share.OH, Mode: a.Share.Mode, Access: a.Share.Access,
		Reclaim: a.Reclaim, InGrace: vs.InGraceNow(s.now), Epoch: vs.Epoch(), Floor: vs.ReclaimFloor()}
	st = s.update(ctx, o, a.Share.FH)
	if o.share.InGrace {
		vs.GraceRequest(c.Remote.Addr(), a.Reclaim)
	}
	return st.ForVersion(c.Vers)
}

// handleFreeAll drops everything of a client host that says it rebooted:
// its locks, blocked requests and shares through this virtual server, from
// the address it calls from (as Linux does, so that one client cannot
// free another's locks by naming it). Fenced like every request: during a
// release it goes unanswered, and the client sends it again to the next
// owner, which by then holds what it frees.
func (s *Service) handleFreeAll(ctx context.Context, req *sunrpc.Request, res []byte) ([]byte, error) {
	var a Notify
	if err := req.DecodeArgs(func(d *xdr.Decoder) { a.Decode(d) }); err != nil {
		return nil, err
	}
	c := callOf(req)
	vs, st := s.lookupVS(&c)
	if st != Granted {
		return reply(res, st) // FREE_ALL has no result; a failure is silent
	}
	name, addr := string(a.Name), req.Remote.Addr()
	key := dlm.HostKey{VIP: vs.Addr(), Name: name, Addr: addr.Unmap()}
	_, err := s.DropHosts(ctx, dlm.Selector{Keys: map[dlm.HostKey]bool{key: true}}, vs.Claim())
	switch {
	case errors.Is(err, dlm.ErrFenced):
		vs.CutOff(addr)
		return nil, sunrpc.ErrNoReply
	case err != nil:
		s.log.Warn("nlm: FREE_ALL failed", "name", name, "err", err)
	}
	return res, nil
}

// DropHosts removes every lock, blocked request and share that sel
// selects, cancels the callbacks outstanding to its hosts (unless it
// selects only stale records), and grants what that makes grantable to
// others. It serves FREE_ALL and the purge at the end of grace, under
// their virtual server's claim, and reboot notifications and an admin's
// drop, unfenced (dlm.Claim); it reports how many hosts lost records.
func (s *Service) DropHosts(ctx context.Context, sel dlm.Selector, c dlm.Claim) (int, error) {
	if sel.Below == 0 {
		s.cb.cancelHosts(sel.Match)
	}
	hosts := map[string]map[*dlm.Host]bool{}
	err := s.dropAll(ctx, sel, c, func(f *dlm.File) { hosts[f.FH()] = selectedHosts(f, &sel) })
	seen := map[*dlm.Host]bool{}
	for _, hs := range hosts {
		for h := range hs {
			seen[h] = true
		}
	}
	return len(seen), err
}

// selectedHosts returns the hosts that have records in f that sel selects.
func selectedHosts(f *dlm.File, sel *dlm.Selector) map[*dlm.Host]bool {
	out := map[*dlm.Host]bool{}
	f.Records(func(h *dlm.Host, epoch uint64) bool {
		if sel.MatchRecord(h, epoch) {
			out[h] = true
		}
		return true
	})
	return out
}

// monitor has the NSM service monitor h unless it already did under the
// current generation: after the first lock of a client this costs an
// atomic load and a lookup.
func (s *Service) monitor(ctx context.Context, h *dlm.Host) Stat {
	m := s.cfg.Monitor
	if m == nil {
		return Granted
	}
	gen := m.Generation()
	if g, ok := s.monitored.Load(h); ok && g.(uint64) == gen {
		return Granted
	}
	if err := m.Monitor(ctx, h.VIP, h.Name, h.Addr); err != nil {
		if errors.Is(err, virtualserver.ErrRetryLater) {
			return fenced // the client sends it again
		}
		s.log.Warn("nlm: cannot monitor the client; refusing its lock", "host", h.HostKey, "err", err)
		return DeniedNoLocks
	}
	s.monitored.Store(h, gen)
	return Granted
}

// Sweep forgets what the service remembers of idle hosts (call it with
// the backend's Sweep): a host the backend forgets must not stay here.
func (s *Service) Sweep() {
	var gen uint64
	if s.cfg.Monitor != nil {
		gen = s.cfg.Monitor.Generation()
	}
	s.monitored.Range(func(k, v any) bool {
		if h := k.(*dlm.Host); h.Idle() || v.(uint64) != gen {
			s.monitored.Delete(k)
		}
		return true
	})
}

package nlm

import (
	"context"
	"net/netip"

	"github.com/nlmha/nlmha/sunrpc"
	"github.com/nlmha/nlmha/sunrpc/xdr"
)

// Call describes a request to the lock operations: the address it came to
// (its virtual server's), where from, in which NLM version and over which
// transport. The operations take a Call rather than the RPC request, so
// that something other than the RPC server (a backend's watch) can drive
// them.
type Call struct {
	VIP       netip.Addr
	Remote    netip.AddrPort
	Vers      uint32
	Transport sunrpc.Transport
}

func callOf(req *sunrpc.Request) Call {
	return Call{VIP: req.Local.Addr(), Remote: req.Remote, Vers: req.Vers, Transport: req.Transport}
}

// procKind is what a lock procedure does.
type procKind uint8

const (
	pkTest procKind = iota
	pkLock
	pkNMLock // LOCK for a client without a status monitor: not monitored
	pkCancel
	pkUnlock
	pkShare
	pkUnshare
	// pkGranted: GRANTED is a server-to-client call; we are the server and
	// hold no blocked client-side requests, so nothing matches it.
	pkGranted
)

// lockProc is one lock procedure. The _MSG ones do what their synchronous
// twins do, answer the call with a void reply, and send the result back
// as the res call from the virtual server's NLM port.
type lockProc struct {
	name string
	kind procKind
	res  uint32 // the _RES procedure of a _MSG one; 0 for the synchronous
}

var lockProcs = map[uint32]lockProc{
	ProcTest:       {"TEST", pkTest, 0},
	ProcLock:       {"LOCK", pkLock, 0},
	ProcCancel:     {"CANCEL", pkCancel, 0},
	ProcUnlock:     {"UNLOCK", pkUnlock, 0},
	ProcGranted:    {"GRANTED", pkGranted, 0},
	ProcTestMsg:    {"TEST_MSG", pkTest, ProcTestRes},
	ProcLockMsg:    {"LOCK_MSG", pkLock, ProcLockRes},
	ProcCancelMsg:  {"CANCEL_MSG", pkCancel, ProcCancelRes},
	ProcUnlockMsg:  {"UNLOCK_MSG", pkUnlock, ProcUnlockRes},
	ProcGrantedMsg: {"GRANTED_MSG", pkGranted, ProcGrantedRes},
	ProcShare:      {"SHARE", pkShare, 0},
	ProcUnshare:    {"UNSHARE", pkUnshare, 0},
	ProcNMLock:     {"NM_LOCK", pkNMLock, 0},
}

// procArgs holds the decoded arguments of any lock procedure, on the
// handler's stack: a handler allocates nothing.
type procArgs struct {
	test   TestArgs
	lock   LockArgs
	cancel CancelArgs
	unlock UnlockArgs
	share  ShareArgs
}

func (a *procArgs) decode(k procKind, d *xdr.Decoder, vers uint32) {
	switch k {
	case pkTest, pkGranted:
		a.test.Decode(d, vers)
	case pkLock, pkNMLock:
		a.lock.Decode(d, vers)
	case pkCancel:
		a.cancel.Decode(d, vers)
	case pkUnlock:
		a.unlock.Decode(d, vers)
	case pkShare, pkUnshare:
		a.share.Decode(d)
	}
}

// procHandler serves lock procedure p: decode, operate, encode (or send
// back as the _RES call). A method value rather than a closure, so that
// its body is compiled once, with the argument decoder on the stack.
type procHandler struct {
	s *Service
	p lockProc
}

func (h *procHandler) handle(ctx context.Context, req *sunrpc.Request, res []byte) ([]byte, error) {
	s, p := h.s, h.p
	var a procArgs
	if err := req.DecodeArgs(func(d *xdr.Decoder) { a.decode(p.kind, d, req.Vers) }); err != nil {
		return nil, err
	}
	c := callOf(req)
	if p.res == 0 {
		return reply(s.run(ctx, &c, p, &a, res))
	}
	if out, st := s.run(ctx, &c, p, &a, nil); st != fenced {
		s.cb.respond(&c, p.res, out)
	}
	return res, nil
}

// run performs lock procedure p and appends its encoded result to out.
func (s *Service) run(ctx context.Context, c *Call, p lockProc, a *procArgs, out []byte) ([]byte, Stat) {
	async := p.res != 0
	var r Res
	switch p.kind {
	case pkTest:
		t := s.test(ctx, c, &a.test)
		return t.Append(out, c.Vers), t.Stat
	case pkGranted:
		r = Res{Cookie: a.test.Cookie, Stat: Denied}
	case pkLock, pkNMLock:
		r = Res{Cookie: a.lock.Cookie, Stat: s.lock(ctx, c, &a.lock, p.kind == pkLock, async)}
	case pkCancel:
		r = Res{Cookie: a.cancel.Cookie, Stat: s.cancel(ctx, c, &a.cancel)}
	case pkUnlock:
		r = Res{Cookie: a.unlock.Cookie, Stat: s.unlock(ctx, c, &a.unlock)}
	case pkShare, pkUnshare:
		sr := ShareRes{Cookie: a.share.Cookie, Stat: s.share(ctx, c, &a.share, p.kind == pkUnshare)}
		return sr.Append(out), sr.Stat
	}
	return r.Append(out), r.Stat
}

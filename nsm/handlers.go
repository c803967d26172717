package nsm

import (
	"context"
	"errors"
	"fmt"
	"net/netip"
	"strings"
	"time"
	"unicode"

	"github.com/nlmha/nlmha/sunrpc"
	"github.com/nlmha/nlmha/sunrpc/xdr"
	"github.com/nlmha/nlmha/virtualserver"
)

// NLM's program and the procedures statd may call back (SM_MON checks
// them, as rpc.statd does).
const (
	nlmProg           = 100021
	nlmProcSMNotify   = 16
	nlmProcSMNotifyV4 = 24
)

type handler func(s *Service, ctx context.Context, req *sunrpc.Request, res []byte) ([]byte, error)

// Programs returns NSM version 1 for registration.
func (s *Service) Programs() []sunrpc.Program {
	bind := func(name string, h handler) sunrpc.Proc {
		return sunrpc.Proc{Name: name, NonIdempotent: true, Handler: func(ctx context.Context, req *sunrpc.Request, res []byte) ([]byte, error) {
			return h(s, ctx, req, res)
		}}
	}
	procs := []sunrpc.Proc{
		ProcNull:      {Name: "NULL", Handler: func(_ context.Context, _ *sunrpc.Request, res []byte) ([]byte, error) { return res, nil }},
		ProcStat:      bind("SM_STAT", (*Service).handleStat),
		ProcMon:       bind("SM_MON", (*Service).handleMon),
		ProcUnmon:     bind("SM_UNMON", (*Service).handleUnmon),
		ProcUnmonAll:  bind("SM_UNMON_ALL", (*Service).handleUnmonAll),
		ProcSimuCrash: bind("SM_SIMU_CRASH", (*Service).handleSimuCrash),
		ProcNotify:    bind("SM_NOTIFY", (*Service).handleNotify),
	}
	return []sunrpc.Program{{Name: "status", Prog: Prog, Vers: Vers, Procs: procs}}
}

// localCaller tells whether a caller may use the local-only procedures:
// from loopback, and from a privileged port unless the service is told
// otherwise. It says why not.
func (s *Service) localCaller(req *sunrpc.Request) (bool, string) {
	switch {
	case !req.Remote.Addr().Unmap().IsLoopback():
		return false, "not from this host"
	case req.Remote.Port() >= 1024 && !s.cfg.UnprivilegedLocal:
		return false, "not from a privileged port"
	}
	return true, ""
}

// validName accepts a host name that can be monitored: no '/', blanks or
// control characters (nfs-utils keeps them in file names and
// blank-separated lines).
func validName(n string) bool {
	if n == "" || len(n) > MaxStrLen {
		return false
	}
	for _, r := range n {
		if r == '/' || unicode.IsSpace(r) || unicode.IsControl(r) {
			return false
		}
	}
	return true
}

// resolve turns a host name into addresses through the name cache; an
// address stands for itself. A request over UDP does not wait for a
// lookup in progress: errPending, and it gets no reply (see names).
func (s *Service) resolve(ctx context.Context, req *sunrpc.Request, name string) ([]netip.Addr, error) {
	return s.names.resolve(ctx, name, req.Transport != sunrpc.UDP)
}

// vipOf finds the virtual server an SM_* request is about: the one whose
// name or address is my_name, else the one the request was sent to.
func (s *Service) vipOf(ctx context.Context, req *sunrpc.Request, myName string) (*vip, error) {
	if myName != "" {
		for _, vs := range s.cfg.VirtualServers.All() {
			if vs.Name() == myName || vs.Addr().String() == myName {
				return s.vipFor(ctx, vs)
			}
		}
	}
	return s.lookupVIP(ctx, req.Local.Addr())
}

// fromUs tells whether a call comes from our own notifier: from the NSM
// port of a virtual server of this node.
func (s *Service) fromUs(remote netip.AddrPort) bool {
	if remote.Port() != s.cfg.Port {
		return false
	}
	s.mu.Lock()
	_, ok := s.vips[remote.Addr().Unmap()]
	s.mu.Unlock()
	return ok
}

func (s *Service) handleStat(ctx context.Context, req *sunrpc.Request, res []byte) ([]byte, error) {
	var name string
	if err := req.DecodeArgs(func(d *xdr.Decoder) { name = d.String(MaxStrLen) }); err != nil {
		return nil, err
	}
	out := StatRes{Res: StatFail}
	if v, err := s.vipOf(ctx, req, ""); err == nil {
		out.State = v.currentState()
		if validName(name) {
			_, err := s.resolve(ctx, req, name)
			if errors.Is(err, errPending) {
				return nil, sunrpc.ErrNoReply // the retransmission finds the answer
			}
			if err == nil {
				out.Res = StatSucc
			}
		}
	}
	return out.Append(res), nil
}

func (s *Service) refuse(req *sunrpc.Request, what, why string, args ...any) {
	s.stats.Rejected.Add(1)
	s.log.Warn("nsm: refused "+what+": "+why, append([]any{"remote", req.Remote}, args...)...)
}

func (s *Service) handleMon(ctx context.Context, req *sunrpc.Request, res []byte) ([]byte, error) {
	var a Mon
	if err := req.DecodeArgs(func(d *xdr.Decoder) { a.Decode(d) }); err != nil {
		return nil, err
	}
	out := StatRes{Res: StatFail}
	id := &a.MonID.MyID
	v, verr := s.vipOf(ctx, req, id.MyName)
	if verr == nil {
		out.State = v.currentState()
	}
	local, why := s.localCaller(req)
	switch {
	case !local:
		s.refuse(req, "SM_MON", why)
	case verr != nil:
		s.refuse(req, "SM_MON", "no virtual server for it", "my_name", id.MyName, "local", req.Local, "err", verr)
	case id.Prog != nlmProg || (id.Proc != nlmProcSMNotify && id.Proc != nlmProcSMNotifyV4):
		s.refuse(req, "SM_MON", "the callback is not the lock manager's", "prog", id.Prog, "proc", id.Proc)
	case !validName(a.MonID.MonName) || len(id.MyName) > MaxStrLen || strings.ContainsFunc(id.MyName, unicode.IsSpace):
		s.refuse(req, "SM_MON", "bad host name", "mon_name", a.MonID.MonName, "my_name", id.MyName)
	default:
		addrs, err := s.resolve(ctx, req, a.MonID.MonName)
		if errors.Is(err, errPending) {
			return nil, sunrpc.ErrNoReply // the retransmission finds the answer
		}
		if err != nil {
			s.refuse(req, "SM_MON", "cannot resolve mon_name", "mon_name", a.MonID.MonName, "err", err)
			break
		}
		rec := &Record{Kind: KindSMMon, MonName: a.MonID.MonName, Addrs: addrs, MyName: id.MyName,
			Prog: id.Prog, Vers: id.Vers, Proc: id.Proc, Priv: Priv(a.Priv), Created: time.Now()}
		if err := s.add(ctx, v, rec.key(), func() *Record { return rec }); err != nil {
			s.log.Error("nsm: SM_MON failed", "mon_name", rec.MonName, "err", err)
			break
		}
		out.Res = StatSucc
	}
	return out.Append(res), nil
}

func sameID(r *Record, id *MyID) bool {
	return r.Kind == KindSMMon && r.MyName == id.MyName && r.Prog == id.Prog && r.Vers == id.Vers && r.Proc == id.Proc
}

// stateReply is sm_stat, the result of SM_UNMON and SM_UNMON_ALL.
func stateReply(res []byte, v *vip) []byte {
	var state int32
	if v != nil {
		state = v.currentState()
	}
	return xdr.AppendInt32(res, state)
}

func (s *Service) handleUnmon(ctx context.Context, req *sunrpc.Request, res []byte) ([]byte, error) {
	var a MonID
	if err := req.DecodeArgs(func(d *xdr.Decoder) { a.Decode(d) }); err != nil {
		return nil, err
	}
	v, err := s.vipOf(ctx, req, a.MyID.MyName)
	local, why := s.localCaller(req)
	switch {
	case !local:
		s.refuse(req, "SM_UNMON", why)
	case err != nil:
		s.refuse(req, "SM_UNMON", "no virtual server for it", "my_name", a.MyID.MyName, "err", err)
	default:
		s.removeIf(v, func(e *entry) bool { return sameID(e.rec, &a.MyID) && e.rec.MonName == a.MonName })
	}
	return stateReply(res, v), nil
}

func (s *Service) handleUnmonAll(ctx context.Context, req *sunrpc.Request, res []byte) ([]byte, error) {
	var a MyID
	if err := req.DecodeArgs(func(d *xdr.Decoder) { a.Decode(d) }); err != nil {
		return nil, err
	}
	v, err := s.vipOf(ctx, req, a.MyName)
	local, why := s.localCaller(req)
	switch {
	case !local:
		s.refuse(req, "SM_UNMON_ALL", why)
	case err != nil:
		s.refuse(req, "SM_UNMON_ALL", "no virtual server for it", "my_name", a.MyName, "err", err)
	default:
		s.removeIf(v, func(e *entry) bool { return sameID(e.rec, &a) })
	}
	return stateReply(res, v), nil
}

// handleSimuCrash makes the virtual server the request was sent to (or,
// sent to an address that is none, every virtual server of this node) act
// as if it had crashed and restarted: a new state number and
// notifications to all its peers.
func (s *Service) handleSimuCrash(ctx context.Context, req *sunrpc.Request, res []byte) ([]byte, error) {
	if len(req.Args) != 0 {
		return nil, fmt.Errorf("%w: SM_SIMU_CRASH takes no arguments", sunrpc.ErrGarbageArgs)
	}
	if local, why := s.localCaller(req); !local {
		s.refuse(req, "SM_SIMU_CRASH", why)
		return res, nil
	}
	targets := s.cfg.VirtualServers.All()
	if vs, ok := s.cfg.VirtualServers.Lookup(req.Local.Addr()); ok {
		targets = []*virtualserver.Server{vs}
	}
	for _, vs := range targets {
		v, err := s.vipFor(ctx, vs)
		if err == nil {
			_, err = s.restartAndNotify(v)
		}
		if err != nil {
			s.log.Error("nsm: SM_SIMU_CRASH", "vip", vs.Addr(), "err", err)
		}
	}
	return res, nil
}

func (s *Service) handleNotify(ctx context.Context, req *sunrpc.Request, res []byte) ([]byte, error) {
	var a StatChge
	if err := req.DecodeArgs(func(d *xdr.Decoder) { a.Decode(d) }); err != nil {
		return nil, err
	}
	// Only the matching happens here (through the index); the rest is
	// the reboot worker's, after the reply: a notification that matches
	// thousands of records must not hold an RPC worker, nor the others
	// behind it. Unanswered when the queue is full: the sender retransmits.
	n := &rebootNote{monName: a.MonName, sender: req.Remote.Addr().Unmap(), state: a.State, self: s.fromUs(req.Remote)}
	if !s.takeReboot(n) {
		s.stats.NotifyDropped.Add(1)
		return nil, sunrpc.ErrNoReply
	}
	return res, nil
}

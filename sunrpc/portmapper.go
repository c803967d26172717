package sunrpc

import (
	"context"
	"net/netip"
	"slices"
	"sync"
	"time"

	"github.com/nlmha/nlmha/sunrpc/xdr"
)

// Portmapper is an embedded portmapper for hosts and tests without rpcbind:
// portmap version 2 and rpcbind versions 3 and 4 (NULL, SET, UNSET,
// GETPORT/GETADDR, DUMP, GETTIME, GETVERSADDR). Register its Programs with
// a Server that listens on port 111.
//
// Like rpcbind, it takes SET and UNSET only from local callers, and only
// from privileged ports (only root can bind one, so an unprivileged local
// user cannot send NLM clients to a port of its own); registrations have
// owners, and only their owner or root removes one.
type Portmapper struct {
	// Now is the clock GETTIME reads (default time.Now).
	Now func() time.Time
	// Insecure also takes changes from unprivileged local ports, owned by
	// "unknown" (rpcbind -i; test rigs): such a caller can remove only
	// what such callers registered.
	Insecure bool

	mu      sync.Mutex
	entries []RPCB
}

// Entries returns a copy of the table.
func (p *Portmapper) Entries() []RPCB {
	p.mu.Lock()
	defer p.mu.Unlock()
	return slices.Clone(p.entries)
}

// Set adds an entry unless (prog, vers, netid) is already mapped, as rpcbind does.
func (p *Portmapper) Set(e RPCB) bool {
	p.mu.Lock()
	defer p.mu.Unlock()
	for _, x := range p.entries {
		if x.Prog == e.Prog && x.Vers == e.Vers && x.NetID == e.NetID {
			return false
		}
	}
	p.entries = append(p.entries, e)
	return true
}

// Unset removes the (prog, vers) entries of netid, or of every network id
// when netid is empty. It reports whether anything was removed.
func (p *Portmapper) Unset(prog, vers uint32, netid string) bool {
	p.mu.Lock()
	defer p.mu.Unlock()
	n := len(p.entries)
	p.entries = slices.DeleteFunc(p.entries, func(x RPCB) bool {
		return x.Prog == prog && x.Vers == vers && (netid == "" || x.NetID == netid)
	})
	return len(p.entries) != n
}

// RegisterSelf adds the portmapper's own entries (program 100000 versions
// 2–4) for the given port on TCP and UDP, IPv4 and, if v6, IPv6.
func (p *Portmapper) RegisterSelf(port uint16, v6 bool) {
	for _, vers := range []uint32{RpcbVers4, RpcbVers3, PmapVers2} {
		for _, t := range []Transport{TCP, UDP} {
			fams := []bool{false}
			if v6 {
				fams = append(fams, true)
			}
			for _, fam := range fams {
				reg := Registration{Prog: PmapProg, Vers: vers, Transport: t, V6: fam, Port: port}
				p.Set(RPCB{Prog: PmapProg, Vers: vers, NetID: reg.NetID(), Addr: reg.uaddr(), Owner: ownerRoot})
			}
		}
	}
}

// lookup finds the universal address of (prog, vers, netid).
func (p *Portmapper) lookup(prog, vers uint32, netid string) (string, bool) {
	p.mu.Lock()
	defer p.mu.Unlock()
	for _, x := range p.entries {
		if x.Prog == prog && x.Vers == vers && x.NetID == netid {
			return x.Addr, true
		}
	}
	return "", false
}

// Owners of registrations.
const (
	ownerRoot    = "superuser"
	ownerUnknown = "unknown"
)

// changer tells who may change the table with this request, and whether
// anyone: a local caller from a privileged port is root; from another
// local port only with Insecure, as "unknown"; nobody else.
func (p *Portmapper) changer(req *Request) (string, bool) {
	a := req.Remote.Addr()
	switch {
	case !a.IsValid() || !a.Unmap().IsLoopback():
		return "", false
	case req.Remote.Port() < 1024:
		return ownerRoot, true
	case p.Insecure:
		return ownerUnknown, true
	}
	return "", false
}

// unsetBy removes what Unset would, if owner may: root removes anything;
// another owner only when every matching entry is its own (rpcbind
// refuses the whole UNSET otherwise).
func (p *Portmapper) unsetBy(owner string, prog, vers uint32, netid string) bool {
	p.mu.Lock()
	defer p.mu.Unlock()
	n := 0
	for _, x := range p.entries {
		if x.Prog == prog && x.Vers == vers && (netid == "" || x.NetID == netid) {
			if owner != ownerRoot && x.Owner != owner {
				return false
			}
			n++
		}
	}
	p.entries = slices.DeleteFunc(p.entries, func(x RPCB) bool {
		return x.Prog == prog && x.Vers == vers && (netid == "" || x.NetID == netid)
	})
	return n > 0
}

// Programs returns the portmapper's program versions, ready for
// Server.Register.
func (p *Portmapper) Programs() []Program {
	null := Proc{Name: "NULL", Handler: func(_ context.Context, _ *Request, res []byte) ([]byte, error) { return res, nil }}
	v2 := Program{Name: "portmap", Prog: PmapProg, Vers: PmapVers2, Procs: []Proc{
		PmapProcNull:    null,
		PmapProcSet:     {Name: "SET", Handler: p.setV2, NonIdempotent: true},
		PmapProcUnset:   {Name: "UNSET", Handler: p.unsetV2, NonIdempotent: true},
		PmapProcGetPort: {Name: "GETPORT", Handler: p.getPort},
		PmapProcDump:    {Name: "DUMP", Handler: p.dumpV2},
	}}
	v3procs := []Proc{
		PmapProcNull:        null,
		PmapProcSet:         {Name: "SET", Handler: p.set, NonIdempotent: true},
		PmapProcUnset:       {Name: "UNSET", Handler: p.unset, NonIdempotent: true},
		RpcbProcGetAddr:     {Name: "GETADDR", Handler: p.getAddr},
		PmapProcDump:        {Name: "DUMP", Handler: p.dump},
		PmapProcCallit:      {},
		RpcbProcGetTime:     {Name: "GETTIME", Handler: p.getTime},
		RpcbProcUaddr2Taddr: {},
		RpcbProcTaddr2Uaddr: {},
	}
	v4procs := append(slices.Clone(v3procs),
		Proc{Name: "GETVERSADDR", Handler: p.getAddr}, // RpcbProcGetVersAddr
	)
	return []Program{
		v2,
		{Name: "rpcbind", Prog: PmapProg, Vers: RpcbVers3, Procs: v3procs},
		{Name: "rpcbind", Prog: PmapProg, Vers: RpcbVers4, Procs: v4procs},
	}
}

func decodeArgs[T any](req *Request, f func(*xdr.Decoder) T) (v T, err error) {
	err = req.DecodeArgs(func(d *xdr.Decoder) { v = f(d) })
	return v, err
}

func v2NetID(prot uint32) (string, bool) {
	switch prot {
	case IPProtoTCP:
		return "tcp", true
	case IPProtoUDP:
		return "udp", true
	}
	return "", false
}

func (p *Portmapper) setV2(_ context.Context, req *Request, res []byte) ([]byte, error) {
	m, err := decodeArgs(req, decodeMapping)
	if err != nil {
		return nil, err
	}
	netid, ok := v2NetID(m.Prot)
	owner, may := p.changer(req)
	if !ok || m.Port > 0xffff || !may {
		return xdr.AppendBool(res, false), nil
	}
	reg := Registration{Prog: m.Prog, Vers: m.Vers, Transport: TCP, Port: uint16(m.Port)}
	return xdr.AppendBool(res, p.Set(RPCB{Prog: m.Prog, Vers: m.Vers, NetID: netid, Addr: reg.uaddr(), Owner: owner})), nil
}

func (p *Portmapper) unsetV2(_ context.Context, req *Request, res []byte) ([]byte, error) {
	m, err := decodeArgs(req, decodeMapping)
	if err != nil {
		return nil, err
	}
	owner, may := p.changer(req)
	if !may {
		return xdr.AppendBool(res, false), nil
	}
	// Like rpcbind: version 2 UNSET ignores the protocol and removes both.
	a := p.unsetBy(owner, m.Prog, m.Vers, "tcp")
	b := p.unsetBy(owner, m.Prog, m.Vers, "udp")
	return xdr.AppendBool(res, a || b), nil
}

func (p *Portmapper) getPort(_ context.Context, req *Request, res []byte) ([]byte, error) {
	m, err := decodeArgs(req, decodeMapping)
	if err != nil {
		return nil, err
	}
	var port uint32
	if netid, ok := v2NetID(m.Prot); ok {
		if ua, ok := p.lookup(m.Prog, m.Vers, netid); ok {
			if ap, err := ParseUaddr(ua); err == nil {
				port = uint32(ap.Port())
			}
		}
	}
	return xdr.AppendUint32(res, port), nil
}

func (p *Portmapper) dumpV2(_ context.Context, _ *Request, res []byte) ([]byte, error) {
	for _, e := range p.Entries() {
		prot := uint32(0)
		switch e.NetID {
		case "tcp":
			prot = IPProtoTCP
		case "udp":
			prot = IPProtoUDP
		default:
			continue
		}
		ap, err := ParseUaddr(e.Addr)
		if err != nil {
			continue
		}
		res = xdr.AppendBool(res, true)
		res = appendMapping(res, Mapping{Prog: e.Prog, Vers: e.Vers, Prot: prot, Port: uint32(ap.Port())})
	}
	return xdr.AppendBool(res, false), nil
}

func (p *Portmapper) set(_ context.Context, req *Request, res []byte) ([]byte, error) {
	e, err := decodeArgs(req, decodeRPCB)
	if err != nil {
		return nil, err
	}
	owner, may := p.changer(req)
	if _, err := ParseUaddr(e.Addr); err != nil || !may {
		return xdr.AppendBool(res, false), nil
	}
	e.Owner = owner // what the caller is, not what it says (rpcbind does the same)
	return xdr.AppendBool(res, p.Set(e)), nil
}

func (p *Portmapper) unset(_ context.Context, req *Request, res []byte) ([]byte, error) {
	e, err := decodeArgs(req, decodeRPCB)
	if err != nil {
		return nil, err
	}
	owner, may := p.changer(req)
	if !may {
		return xdr.AppendBool(res, false), nil
	}
	return xdr.AppendBool(res, p.unsetBy(owner, e.Prog, e.Vers, e.NetID)), nil
}

// getAddr answers GETADDR and GETVERSADDR as rpcbind does: for the network
// id of the transport the call came over (r_netid is ignored), and with a
// wildcard registration answered by the address the caller reached us on
// (rpcbind's mergeaddr), so the caller gets an address it can use.
func (p *Portmapper) getAddr(_ context.Context, req *Request, res []byte) ([]byte, error) {
	e, err := decodeArgs(req, decodeRPCB)
	if err != nil {
		return nil, err
	}
	netid := e.NetID
	if req.Transport != 0 {
		netid = NetID(req.Transport, req.Local.IsValid() && !req.Local.Addr().Is4())
	}
	ua, ok := p.lookup(e.Prog, e.Vers, netid)
	if !ok {
		return xdr.AppendString(res, ""), nil
	}
	if ap, err := ParseUaddr(ua); err == nil && ap.Addr().IsUnspecified() {
		if l := req.Local.Addr(); l.IsValid() && l.Is4() == ap.Addr().Is4() {
			ua = FormatUaddr(netip.AddrPortFrom(l, ap.Port()))
		}
	}
	return xdr.AppendString(res, ua), nil
}

func (p *Portmapper) dump(_ context.Context, _ *Request, res []byte) ([]byte, error) {
	for _, e := range p.Entries() {
		res = xdr.AppendBool(res, true)
		res = appendRPCB(res, e)
	}
	return xdr.AppendBool(res, false), nil
}

func (p *Portmapper) getTime(_ context.Context, _ *Request, res []byte) ([]byte, error) {
	now := time.Now
	if p.Now != nil {
		now = p.Now
	}
	return xdr.AppendUint32(res, uint32(now().Unix())), nil
}

package sunrpc

import (
	"context"
	"errors"
	"fmt"
	"net/netip"
	"strconv"
	"strings"

	"github.com/nlmha/nlmha/sunrpc/xdr"
)

// Portmapper / rpcbind program (RFC 1833).
const (
	PmapProg = 100000
	PmapPort = 111

	PmapVers2 = 2 // portmap
	RpcbVers3 = 3 // rpcbind
	RpcbVers4 = 4

	// Procedures common to all versions.
	PmapProcNull  = 0
	PmapProcSet   = 1
	PmapProcUnset = 2
	// Version 2 names procedure 3 GETPORT; versions 3 and 4 GETADDR.
	PmapProcGetPort = 3
	RpcbProcGetAddr = 3
	PmapProcDump    = 4
	PmapProcCallit  = 5
	// Versions 3 and 4.
	RpcbProcGetTime     = 6
	RpcbProcUaddr2Taddr = 7
	RpcbProcTaddr2Uaddr = 8
	// Version 4.
	RpcbProcGetVersAddr = 9
	RpcbProcIndirect    = 10
	RpcbProcGetAddrList = 11
	RpcbProcGetStat     = 12
)

// DefaultRpcbindSocket is where rpcbind listens for local callers; a
// registration made through it is owned by the caller's uid, which rpcbind
// then protects from other users.
const DefaultRpcbindSocket = "/run/rpcbind.sock"

// maxRpcbString bounds the strings of an rpcb entry (netids, universal
// addresses and owners are short).
const maxRpcbString = 255

// Mapping is a portmap version 2 entry.
type Mapping struct {
	Prog, Vers, Prot, Port uint32
}

// RPCB is an rpcbind version 3/4 entry.
type RPCB struct {
	Prog, Vers uint32
	NetID      string // "tcp", "udp", "tcp6", "udp6", ...
	Addr       string // universal address
	Owner      string
}

// NetID names the rpcbind network id of a transport and address family.
func NetID(t Transport, v6 bool) string {
	if v6 {
		return t.String() + "6"
	}
	return t.String()
}

// ParseNetID is the inverse of NetID.
func ParseNetID(netid string) (t Transport, v6 bool, ok bool) {
	switch netid {
	case "tcp":
		return TCP, false, true
	case "udp":
		return UDP, false, true
	case "tcp6":
		return TCP, true, true
	case "udp6":
		return UDP, true, true
	}
	return 0, false, false
}

// FormatUaddr formats a universal address: the address in its usual text
// form followed by ".p1.p2", the port's high and low bytes.
func FormatUaddr(ap netip.AddrPort) string {
	p := ap.Port()
	return fmt.Sprintf("%s.%d.%d", ap.Addr().Unmap(), p>>8, p&0xff)
}

// ErrBadUaddr is wrapped by ParseUaddr errors.
var ErrBadUaddr = errors.New("sunrpc: malformed universal address")

// ParseUaddr parses a universal address for IPv4 or IPv6.
func ParseUaddr(s string) (netip.AddrPort, error) {
	i := strings.LastIndexByte(s, '.')
	if i < 0 {
		return netip.AddrPort{}, fmt.Errorf("%w: %q", ErrBadUaddr, s)
	}
	j := strings.LastIndexByte(s[:i], '.')
	if j < 0 {
		return netip.AddrPort{}, fmt.Errorf("%w: %q", ErrBadUaddr, s)
	}
	hi, err1 := strconv.ParseUint(s[j+1:i], 10, 8)
	lo, err2 := strconv.ParseUint(s[i+1:], 10, 8)
	a, err3 := netip.ParseAddr(s[:j])
	if err1 != nil || err2 != nil || err3 != nil {
		return netip.AddrPort{}, fmt.Errorf("%w: %q", ErrBadUaddr, s)
	}
	return netip.AddrPortFrom(a.Unmap(), uint16(hi<<8|lo)), nil
}

func appendMapping(b []byte, m Mapping) []byte {
	b = xdr.AppendUint32(b, m.Prog)
	b = xdr.AppendUint32(b, m.Vers)
	b = xdr.AppendUint32(b, m.Prot)
	return xdr.AppendUint32(b, m.Port)
}

func decodeMapping(d *xdr.Decoder) Mapping {
	return Mapping{Prog: d.Uint32(), Vers: d.Uint32(), Prot: d.Uint32(), Port: d.Uint32()}
}

func appendRPCB(b []byte, r RPCB) []byte {
	b = xdr.AppendUint32(b, r.Prog)
	b = xdr.AppendUint32(b, r.Vers)
	b = xdr.AppendString(b, r.NetID)
	b = xdr.AppendString(b, r.Addr)
	return xdr.AppendString(b, r.Owner)
}

func decodeRPCB(d *xdr.Decoder) RPCB {
	return RPCB{
		Prog:  d.Uint32(),
		Vers:  d.Uint32(),
		NetID: d.String(maxRpcbString),
		Addr:  d.String(maxRpcbString),
		Owner: d.String(maxRpcbString),
	}
}

// maxDumpEntries bounds a decoded DUMP reply.
const maxDumpEntries = 4096

// decodeList decodes an XDR optional-data linked list (pmaplist, rpcblist).
func decodeList[T any](d *xdr.Decoder, elem func(*xdr.Decoder) T) ([]T, error) {
	var out []T
	for d.Bool() {
		if len(out) == maxDumpEntries {
			return nil, fmt.Errorf("%w: more than %d entries", xdr.ErrTooLong, maxDumpEntries)
		}
		out = append(out, elem(d))
	}
	return out, d.Err()
}

// Rpcbind makes portmap (v2) and rpcbind (v3, v4) calls over a Client
// connected to a portmapper.
type Rpcbind struct{ C *Client }

func (r Rpcbind) callBool(ctx context.Context, vers, proc uint32, args []byte) (bool, error) {
	res, err := r.C.Call(ctx, PmapProg, vers, proc, args)
	if err != nil {
		return false, err
	}
	d := xdr.NewDecoder(res)
	ok := d.Bool()
	return ok, d.Err()
}

// SetV2 is PMAPPROC_SET.
func (r Rpcbind) SetV2(ctx context.Context, m Mapping) (bool, error) {
	return r.callBool(ctx, PmapVers2, PmapProcSet, appendMapping(nil, m))
}

// UnsetV2 is PMAPPROC_UNSET. Note that rpcbind drops the (prog, vers)
// mappings of every transport, whatever m.Prot says.
func (r Rpcbind) UnsetV2(ctx context.Context, m Mapping) (bool, error) {
	return r.callBool(ctx, PmapVers2, PmapProcUnset, appendMapping(nil, m))
}

// GetPort is PMAPPROC_GETPORT; 0 means not registered.
func (r Rpcbind) GetPort(ctx context.Context, prog, vers uint32, t Transport) (uint16, error) {
	res, err := r.C.Call(ctx, PmapProg, PmapVers2, PmapProcGetPort, AppendGetPortArgs(nil, prog, vers, t))
	if err != nil {
		return 0, err
	}
	return ParseGetPortResult(res)
}

// AppendGetPortArgs encodes the arguments of PMAPPROC_GETPORT, for callers
// that send the call themselves.
func AppendGetPortArgs(b []byte, prog, vers uint32, t Transport) []byte {
	return appendMapping(b, Mapping{Prog: prog, Vers: vers, Prot: t.Proto()})
}

// ParseGetPortResult decodes the result of PMAPPROC_GETPORT (0: not
// registered).
func ParseGetPortResult(res []byte) (uint16, error) {
	d := xdr.NewDecoder(res)
	p := d.Uint32()
	if d.Err() == nil && p > 0xffff {
		return 0, fmt.Errorf("%w: port %d", xdr.ErrBadEnum, p)
	}
	return uint16(p), d.Err()
}

// AppendGetAddrArgs encodes the arguments of RPCBPROC_GETADDR (versions 3
// and 4) for (prog, vers) on netid.
func AppendGetAddrArgs(b []byte, prog, vers uint32, netid string) []byte {
	return appendRPCB(b, RPCB{Prog: prog, Vers: vers, NetID: netid})
}

// ParseGetAddrResult decodes the result of RPCBPROC_GETADDR: the port of
// the universal address, 0 when the program is not registered.
func ParseGetAddrResult(res []byte) (uint16, error) {
	d := xdr.NewDecoder(res)
	ua := d.String(maxRpcbString)
	if d.Err() != nil {
		return 0, d.Err()
	}
	if ua == "" {
		return 0, nil
	}
	ap, err := ParseUaddr(ua)
	if err != nil {
		return 0, err
	}
	return ap.Port(), nil
}

// DumpV2 is PMAPPROC_DUMP.
func (r Rpcbind) DumpV2(ctx context.Context) ([]Mapping, error) {
	res, err := r.C.Call(ctx, PmapProg, PmapVers2, PmapProcDump, nil)
	if err != nil {
		return nil, err
	}
	return decodeList(xdr.NewDecoder(res), decodeMapping)
}

// Set is RPCBPROC_SET of version vers (3 or 4).
func (r Rpcbind) Set(ctx context.Context, vers uint32, e RPCB) (bool, error) {
	return r.callBool(ctx, vers, PmapProcSet, appendRPCB(nil, e))
}

// Unset is RPCBPROC_UNSET of version vers (3 or 4); an empty NetID removes
// the (prog, vers) entries of every network id.
func (r Rpcbind) Unset(ctx context.Context, vers uint32, e RPCB) (bool, error) {
	return r.callBool(ctx, vers, PmapProcUnset, appendRPCB(nil, e))
}

// GetAddr is RPCBPROC_GETADDR of version vers (3 or 4); "" means not
// registered. rpcbind answers for the network id of the transport the call
// travels on, not e.NetID.
func (r Rpcbind) GetAddr(ctx context.Context, vers uint32, e RPCB) (string, error) {
	res, err := r.C.Call(ctx, PmapProg, vers, RpcbProcGetAddr, appendRPCB(nil, e))
	if err != nil {
		return "", err
	}
	d := xdr.NewDecoder(res)
	s := d.String(maxRpcbString)
	return s, d.Err()
}

// Dump is RPCBPROC_DUMP of version vers (3 or 4).
func (r Rpcbind) Dump(ctx context.Context, vers uint32) ([]RPCB, error) {
	res, err := r.C.Call(ctx, PmapProg, vers, PmapProcDump, nil)
	if err != nil {
		return nil, err
	}
	return decodeList(xdr.NewDecoder(res), decodeRPCB)
}

// ErrNotRegistered is returned by LookupPort when the program is not registered.
var ErrNotRegistered = errors.New("sunrpc: program not registered")

// LookupPort asks the portmapper of host which port serves (prog, vers) on
// transport t, the way a callback finds a client's lockd or statd. The
// query itself travels over t: rpcbind answers GETADDR for the network id
// of the transport the query arrived on, whatever the request names (the
// Linux kernel's rpcbind client queries the same way). local is the source
// address (zero lets the kernel choose); opts tune the client.
func LookupPort(ctx context.Context, host, local netip.Addr, prog, vers uint32, t Transport, opts ClientOptions) (uint16, error) {
	opts.Local = local
	c, err := Dial(ctx, t, netip.AddrPortFrom(host, PmapPort), opts)
	if err != nil {
		return 0, err
	}
	defer c.Close()
	return Rpcbind{C: c}.Lookup(ctx, prog, vers, t, !host.Unmap().Is4())
}

// Lookup finds the port of (prog, vers) on transport t, which must be the
// transport of r.C for the rpcbind versions to answer for it: rpcbind v4
// GETVERSADDR (this version exactly), then v3 GETADDR, then portmap v2
// GETPORT for a portmapper too old for either.
func (r Rpcbind) Lookup(ctx context.Context, prog, vers uint32, t Transport, v6 bool) (uint16, error) {
	netid := NetID(t, v6)
	for _, q := range []struct{ vers, proc uint32 }{{RpcbVers4, RpcbProcGetVersAddr}, {RpcbVers3, RpcbProcGetAddr}} {
		res, err := r.C.Call(ctx, PmapProg, q.vers, q.proc, appendRPCB(nil, RPCB{Prog: prog, Vers: vers, NetID: netid}))
		if errors.Is(err, ErrProgMismatch) || errors.Is(err, ErrProcUnavail) {
			continue // an older portmapper
		}
		if err != nil {
			return 0, err
		}
		d := xdr.NewDecoder(res)
		ua := d.String(maxRpcbString)
		if d.Err() != nil {
			return 0, d.Err()
		}
		if ua == "" {
			return 0, fmt.Errorf("%w: %d v%d %s at %v", ErrNotRegistered, prog, vers, netid, r.C.Remote())
		}
		ap, err := ParseUaddr(ua)
		if err != nil {
			return 0, err
		}
		return ap.Port(), nil
	}
	if v6 {
		return 0, fmt.Errorf("%w: %d v%d %s at %v (portmap v2 has no IPv6)", ErrNotRegistered, prog, vers, netid, r.C.Remote())
	}
	p, err := r.GetPort(ctx, prog, vers, t)
	if err != nil {
		return 0, err
	}
	if p == 0 {
		return 0, fmt.Errorf("%w: %d v%d %s at %v", ErrNotRegistered, prog, vers, t, r.C.Remote())
	}
	return p, nil
}

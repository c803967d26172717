package dlm

import (
	"encoding/binary"
	"errors"
	"fmt"
	"net/netip"
)

// The binary form of one file's State, for a backend that stores each
// file as one value (etcd): every record of the file, with owners and
// hosts by value so that any node can intern them. Hosts and owners are
// listed once and records refer to them by index, so a file with many
// locks of one client costs a few bytes per lock.
//
//	version 1
//	hosts:   n, then n × (vip, name, addr)
//	owners:  n, then n × (host index, svid, oh)
//	seq
//	locks:   n, then n × lock
//	waiters: n, then n × waiter
//	pending: n, then n × waiter
//	shares:  n, then n × (host index, oh, mode, access, epoch)
//
// lock   = owner index, start, end, flags, since, epoch
// waiter = seq, lock, oh, vers, transport, prev locks (n × lock)
//
// Integers are unsigned varints (svid zig-zag), strings and byte strings
// a length and the bytes, addresses a length (0, 4 or 16) and the bytes.

const codecVersion = 1

// ErrCorrupt: a stored file state could not be decoded.
var ErrCorrupt = errors.New("dlm: corrupt file state")

// Interner turns keys decoded from a stored state into the backend's
// interned records.
type Interner interface {
	Host(key HostKey) *Host
	Owner(key OwnerKey) *Owner
}

const (
	flagExclusive = 1 << iota
	flagAsync
)

type encoder struct {
	buf    []byte
	hosts  map[*Host]uint64
	owners map[*Owner]uint64
	hl     []*Host
	ol     []*Owner
}

func (e *encoder) uv(x uint64)  { e.buf = binary.AppendUvarint(e.buf, x) }
func (e *encoder) bs(b []byte)  { e.uv(uint64(len(b))); e.buf = append(e.buf, b...) }
func (e *encoder) str(s string) { e.uv(uint64(len(s))); e.buf = append(e.buf, s...) }
func (e *encoder) addr(a netip.Addr) {
	if !a.IsValid() {
		e.uv(0)
		return
	}
	e.bs(a.AsSlice())
}

func (e *encoder) host(h *Host) uint64 {
	if i, ok := e.hosts[h]; ok {
		return i
	}
	i := uint64(len(e.hl))
	e.hosts[h] = i
	e.hl = append(e.hl, h)
	return i
}

func (e *encoder) owner(o *Owner) uint64 {
	if i, ok := e.owners[o]; ok {
		return i
	}
	e.host(o.Host)
	i := uint64(len(e.ol))
	e.owners[o] = i
	e.ol = append(e.ol, o)
	return i
}

// AppendState appends the binary form of s to buf.
func AppendState(buf []byte, s *State) []byte {
	e := &encoder{hosts: map[*Host]uint64{}, owners: map[*Owner]uint64{}}
	// First pass: number hosts and owners in a fixed order.
	visit(s.root, Range{0, Inf}, func(h *Held) bool { e.owner(h.owner); return true })
	var waiters, pending []*Waiter
	var shares []*Share
	var seq uint64
	if m := s.more; m != nil {
		waiters, pending, shares, seq = m.waiters, m.pending, m.shares, m.seq
	}
	for _, ws := range [][]*Waiter{waiters, pending} {
		for _, w := range ws {
			e.owner(w.Owner)
			for _, p := range w.Prev {
				e.owner(p.Owner)
			}
		}
	}
	for _, sh := range shares {
		e.host(sh.Host)
	}
	// Second pass: the tables, then the records.
	e.buf = append(buf, codecVersion)
	e.uv(uint64(len(e.hl)))
	for _, h := range e.hl {
		e.addr(h.VIP)
		e.str(h.Name)
		e.addr(h.Addr)
	}
	e.uv(uint64(len(e.ol)))
	for _, o := range e.ol {
		e.uv(e.hosts[o.Host])
		e.uv(uint64(uint32(o.SVID)<<1 ^ uint32(o.SVID>>31)))
		e.bs(o.OH())
	}
	e.uv(seq)
	e.uv(uint64(s.Len()))
	visit(s.root, Range{0, Inf}, func(h *Held) bool { e.lock(h.Lock()); return true })
	for _, ws := range [][]*Waiter{waiters, pending} {
		e.uv(uint64(len(ws)))
		for _, w := range ws {
			e.uv(w.Seq)
			flags := uint8(0)
			if w.Async {
				flags |= flagAsync
			}
			e.lock(Lock{Owner: w.Owner, Range: w.Range, Exclusive: w.Exclusive, Since: w.Since, Epoch: w.Epoch})
			e.bs(w.OH)
			e.uv(uint64(w.Vers))
			e.uv(uint64(w.Transport))
			e.uv(uint64(flags))
			e.uv(uint64(len(w.Prev)))
			for _, p := range w.Prev {
				e.lock(p)
			}
		}
	}
	e.uv(uint64(len(shares)))
	for _, sh := range shares {
		e.uv(e.hosts[sh.Host])
		e.bs(sh.OH)
		e.uv(uint64(sh.Mode))
		e.uv(uint64(sh.Access))
		e.uv(sh.Epoch)
	}
	return e.buf
}

func (e *encoder) lock(l Lock) {
	e.uv(e.owners[l.Owner])
	e.uv(l.Range.Start)
	e.uv(l.Range.End)
	var flags uint64
	if l.Exclusive {
		flags |= flagExclusive
	}
	e.uv(flags)
	e.uv(uint64(l.Since))
	e.uv(l.Epoch)
}

type decoder struct {
	b      []byte
	err    error
	hosts  []*Host
	owners []*Owner
}

func (d *decoder) fail(what string) {
	if d.err == nil {
		d.err = fmt.Errorf("%w: %s", ErrCorrupt, what)
	}
}

func (d *decoder) uv() uint64 {
	if d.err != nil {
		return 0
	}
	x, n := binary.Uvarint(d.b)
	if n <= 0 {
		d.fail("bad varint")
		return 0
	}
	d.b = d.b[n:]
	return x
}

// u32 reads a varint that must fit in 32 bits.
func (d *decoder) u32(what string) uint32 {
	x := d.uv()
	if x > 1<<32-1 {
		d.fail(what + " out of range")
	}
	return uint32(x)
}

// count reads a number of items each at least minBytes long, refusing one
// the remaining input cannot hold (so a forged count cannot make the
// decoder allocate more than the input's size).
func (d *decoder) count(minBytes int) int {
	n := d.uv()
	if n > uint64(len(d.b)/minBytes) {
		d.fail("count beyond the data")
		return 0
	}
	return int(n)
}

func (d *decoder) bytes(max int) []byte {
	n := d.uv()
	if n > uint64(len(d.b)) || n > uint64(max) {
		d.fail("string too long")
		return nil
	}
	out := d.b[:n:n]
	d.b = d.b[n:]
	return out
}

func (d *decoder) addr() netip.Addr {
	b := d.bytes(16)
	switch len(b) {
	case 0:
		return netip.Addr{}
	case 4:
		return netip.AddrFrom4([4]byte(b))
	case 16:
		return netip.AddrFrom16([16]byte(b))
	}
	d.fail("bad address")
	return netip.Addr{}
}

func (d *decoder) lock() Lock {
	i := d.uv()
	if d.err != nil {
		return Lock{}
	}
	if i >= uint64(len(d.owners)) {
		d.fail("owner index")
		return Lock{}
	}
	l := Lock{Owner: d.owners[i]}
	l.Range.Start = d.uv()
	l.Range.End = d.uv()
	if l.Range.Start >= l.Range.End && d.err == nil {
		d.fail("empty range")
	}
	l.Exclusive = d.uv()&flagExclusive != 0
	l.Since = d.u32("since")
	l.Epoch = d.uv()
	return l
}

// Limits of what a stored state may hold, the same as the wire allows.
const (
	maxNameLen = 1024 // caller_name (LM_MAXSTRLEN)
	maxOHLen   = 1024 // netobj
)

// DecodeState decodes the binary form of a file's state (AppendState),
// interning its hosts and owners through in. It refuses, with
// ErrCorrupt, anything AppendState could not have written: held locks
// that overlap under one owner, an unknown index, trailing bytes.
func DecodeState(fh string, data []byte, in Interner) (*State, error) {
	d := &decoder{b: data}
	if len(d.b) == 0 || d.b[0] != codecVersion {
		return nil, fmt.Errorf("%w: unknown version", ErrCorrupt)
	}
	d.b = d.b[1:]
	for range d.count(3) {
		vip := d.addr()
		name := d.bytes(maxNameLen)
		addr := d.addr()
		if d.err != nil {
			break
		}
		d.hosts = append(d.hosts, in.Host(HostKey{VIP: vip, Name: string(name), Addr: addr}))
	}
	for range d.count(3) {
		hi := d.uv()
		z := d.u32("svid")
		oh := d.bytes(maxOHLen)
		if d.err != nil {
			break
		}
		if hi >= uint64(len(d.hosts)) {
			d.fail("host index")
			break
		}
		o := in.Owner(OwnerKey{HostKey: d.hosts[hi].HostKey, SVID: int32(z>>1) ^ -int32(z&1)})
		if len(oh) > 0 {
			o.SetOH(oh)
		}
		d.owners = append(d.owners, o)
	}
	seq := d.uv()
	s := NewState(fh)
	f := &File{State: s}
	numbers := map[uint64]bool{} // waiter numbers are unique in a file
	var lastQueued uint64        // and ascend in the queue
	for range d.count(6) {
		l := d.lock()
		if d.err != nil {
			break
		}
		clash := false
		f.Overlapping(l.Range, func(h *Held) bool {
			clash = h.owner == l.Owner
			return !clash
		})
		if clash {
			d.fail("overlapping locks of one owner")
			break
		}
		f.Insert(l)
	}
	for list := range 2 {
		for range d.count(11) {
			w := &Waiter{Seq: d.uv()}
			l := d.lock()
			w.Owner, w.Range, w.Exclusive, w.Since, w.Epoch = l.Owner, l.Range, l.Exclusive, l.Since, l.Epoch
			if oh := d.bytes(maxOHLen); len(oh) > 0 {
				w.OH = append([]byte(nil), oh...)
			}
			w.Vers = d.u32("vers")
			t := d.uv()
			if t > 255 {
				d.fail("transport")
			}
			w.Transport = uint8(t)
			w.Async = d.uv()&flagAsync != 0
			for range d.count(6) {
				p := d.lock()
				if d.err != nil {
					break
				}
				w.Prev = append(w.Prev, p)
			}
			if d.err != nil {
				break
			}
			if w.Seq == 0 || numbers[w.Seq] || list == 0 && w.Seq < lastQueued {
				d.fail("waiter number")
				break
			}
			numbers[w.Seq] = true
			if list == 0 {
				lastQueued = w.Seq
			}
			if list == 0 {
				f.AddWaiter(w)
			} else {
				f.AddPending(w)
			}
		}
	}
	for range d.count(5) {
		hi := d.uv()
		oh := d.bytes(maxOHLen)
		sh := &Share{OH: append([]byte(nil), oh...), Mode: d.u32("mode"), Access: d.u32("access"), Epoch: d.uv()}
		if d.err != nil {
			break
		}
		if hi >= uint64(len(d.hosts)) {
			d.fail("host index")
			break
		}
		sh.Host = d.hosts[hi]
		f.AddShare(sh)
	}
	if d.err == nil && len(d.b) != 0 {
		d.fail("trailing bytes")
	}
	if d.err != nil {
		return nil, d.err
	}
	if s.more != nil {
		s.more.seq = max(s.more.seq, seq)
	}
	return s, nil
}

package nsm

import (
	"github.com/nlmha/nlmha/sunrpc/xdr"
)

// Program and procedures (the Network Status Monitor, X/Open XNFS).
const (
	Prog = 100024
	Vers = 1

	ProcNull      = 0
	ProcStat      = 1
	ProcMon       = 2
	ProcUnmon     = 3
	ProcUnmonAll  = 4
	ProcSimuCrash = 5
	ProcNotify    = 6
)

// Protocol limits.
const (
	MaxStrLen = 1024 // SM_MAXSTRLEN
	PrivSize  = 16   // SM_PRIV_SIZE
)

// Res is sm_res.
type Res uint32

// Results.
const (
	StatSucc Res = 0
	StatFail Res = 1
)

// MyID is my_id: the lock manager to call back when a monitored host
// reboots.
type MyID struct {
	MyName string
	Prog   uint32
	Vers   uint32
	Proc   uint32
}

// MonID is mon_id.
type MonID struct {
	MonName string
	MyID    MyID
}

// Mon is mon, the SM_MON argument.
type Mon struct {
	MonID MonID
	Priv  [PrivSize]byte
}

// StatRes is sm_stat_res (SM_STAT and SM_MON results).
type StatRes struct {
	Res   Res
	State int32
}

// StatChge is stat_chge, the SM_NOTIFY argument.
type StatChge struct {
	MonName string
	State   int32
}

// Status is the argument of the callback to a lock manager (my_proc).
type Status struct {
	MonName string
	State   int32
	Priv    [PrivSize]byte
}

func decodeMyID(d *xdr.Decoder, m *MyID) {
	m.MyName = d.String(MaxStrLen)
	m.Prog = d.Uint32()
	m.Vers = d.Uint32()
	m.Proc = d.Uint32()
}

func appendMyID(b []byte, m *MyID) []byte {
	b = xdr.AppendString(b, m.MyName)
	b = xdr.AppendUint32(b, m.Prog)
	b = xdr.AppendUint32(b, m.Vers)
	return xdr.AppendUint32(b, m.Proc)
}

// Decode decodes m.
func (m *MyID) Decode(d *xdr.Decoder) { decodeMyID(d, m) }

// Append encodes m.
func (m *MyID) Append(b []byte) []byte { return appendMyID(b, m) }

// Decode decodes m.
func (m *MonID) Decode(d *xdr.Decoder) {
	m.MonName = d.String(MaxStrLen)
	decodeMyID(d, &m.MyID)
}

// Append encodes m.
func (m *MonID) Append(b []byte) []byte {
	return appendMyID(xdr.AppendString(b, m.MonName), &m.MyID)
}

// Decode decodes m.
func (m *Mon) Decode(d *xdr.Decoder) {
	m.MonID.Decode(d)
	copy(m.Priv[:], d.FixedOpaque(PrivSize))
}

// Append encodes m.
func (m *Mon) Append(b []byte) []byte {
	return xdr.AppendFixedOpaque(m.MonID.Append(b), m.Priv[:])
}

// Decode decodes r.
func (r *StatRes) Decode(d *xdr.Decoder) {
	r.Res = Res(d.Uint32())
	r.State = d.Int32()
}

// Append encodes r.
func (r *StatRes) Append(b []byte) []byte {
	return xdr.AppendInt32(xdr.AppendUint32(b, uint32(r.Res)), r.State)
}

// Decode decodes c.
func (c *StatChge) Decode(d *xdr.Decoder) {
	c.MonName = d.String(MaxStrLen)
	c.State = d.Int32()
}

// Append encodes c.
func (c *StatChge) Append(b []byte) []byte {
	return xdr.AppendInt32(xdr.AppendString(b, c.MonName), c.State)
}

// Decode decodes s.
func (s *Status) Decode(d *xdr.Decoder) {
	s.MonName = d.String(MaxStrLen)
	s.State = d.Int32()
	copy(s.Priv[:], d.FixedOpaque(PrivSize))
}

// Append encodes s.
func (s *Status) Append(b []byte) []byte {
	b = xdr.AppendInt32(xdr.AppendString(b, s.MonName), s.State)
	return xdr.AppendFixedOpaque(b, s.Priv[:])
}

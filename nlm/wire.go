package nlm

import (
	"fmt"

	"github.com/nlmha/nlmha/sunrpc/xdr"
)

// Program numbers and versions (X/Open XNFS; RFC 1813 for version 4).
const (
	Prog  = 100021
	Vers1 = 1
	Vers3 = 3
	Vers4 = 4
)

// Procedures (the same numbers in every version; 16 is the private
// callback Linux's statd uses, 20-23 exist from version 3 on).
const (
	ProcNull       = 0
	ProcTest       = 1
	ProcLock       = 2
	ProcCancel     = 3
	ProcUnlock     = 4
	ProcGranted    = 5
	ProcTestMsg    = 6
	ProcLockMsg    = 7
	ProcCancelMsg  = 8
	ProcUnlockMsg  = 9
	ProcGrantedMsg = 10
	ProcTestRes    = 11
	ProcLockRes    = 12
	ProcCancelRes  = 13
	ProcUnlockRes  = 14
	ProcGrantedRes = 15
	ProcSMNotify   = 16
	ProcShare      = 20
	ProcUnshare    = 21
	ProcNMLock     = 22
	ProcFreeAll    = 23
)

// Protocol limits.
const (
	MaxNetobj   = 1024 // MAXNETOBJ_SZ: cookies, file and owner handles
	MaxStrLen   = 1024 // LM_MAXSTRLEN: caller_name
	MaxNameLen  = 1025 // LM_MAXNAMELEN: nlm_notify name
	Offset32Max = 1<<32 - 1
	// Offset64Max is the largest byte offset of NLM4 (and Linux's
	// NLM4_OFFSET_MAX): offsets and ends beyond it are NLM4_FBIG.
	Offset64Max = 1<<63 - 1
)

// Stat is nlm_stats (versions 1 and 3) or nlm4_stats (version 4).
type Stat uint32

// Statuses; 5 and up exist in version 4 only.
const (
	Granted           Stat = 0
	Denied            Stat = 1
	DeniedNoLocks     Stat = 2
	Blocked           Stat = 3
	DeniedGracePeriod Stat = 4
	Deadlck           Stat = 5
	ROFS              Stat = 6
	StaleFH           Stat = 7
	FBig              Stat = 8
	Failed            Stat = 9
)

var statNames = [...]string{"GRANTED", "DENIED", "DENIED_NOLOCKS", "BLOCKED", "DENIED_GRACE_PERIOD", "DEADLCK", "ROFS", "STALE_FH", "FBIG", "FAILED"}

func (s Stat) String() string {
	if int(s) < len(statNames) {
		return statNames[s]
	}
	return fmt.Sprintf("nlm_stat(%d)", uint32(s))
}

// ForVersion maps a status to what a version can say. Versions 1 and 3
// know only 0-4: like Linux lockd, a deadlock is reported as DENIED and
// every other newer failure as DENIED_NOLOCKS.
func (s Stat) ForVersion(vers uint32) Stat {
	if vers == Vers4 || s <= DeniedGracePeriod || s == fenced {
		return s
	}
	if s == Deadlck {
		return Denied
	}
	return DeniedNoLocks
}

// Lock is nlm_lock / nlm4_lock. Versions 1 and 3 carry 32-bit offsets.
// Byte slices alias the decoded message.
type Lock struct {
	CallerName []byte
	FH         []byte
	OH         []byte
	SVID       int32
	Offset     uint64
	Len        uint64
}

// LockArgs is nlm_lockargs (LOCK, LOCK_MSG, NM_LOCK).
type LockArgs struct {
	Cookie    []byte
	Block     bool
	Exclusive bool
	Lock      Lock
	Reclaim   bool
	State     int32
}

// CancelArgs is nlm_cancargs.
type CancelArgs struct {
	Cookie    []byte
	Block     bool
	Exclusive bool
	Lock      Lock
}

// TestArgs is nlm_testargs (TEST, TEST_MSG, GRANTED, GRANTED_MSG).
type TestArgs struct {
	Cookie    []byte
	Exclusive bool
	Lock      Lock
}

// UnlockArgs is nlm_unlockargs.
type UnlockArgs struct {
	Cookie []byte
	Lock   Lock
}

// Holder is nlm_holder / nlm4_holder.
type Holder struct {
	Exclusive bool
	SVID      int32
	OH        []byte
	Offset    uint64
	Len       uint64
}

// TestRes is nlm_testres: Holder is present when Stat is Denied.
type TestRes struct {
	Cookie []byte
	Stat   Stat
	Holder Holder
}

// Res is nlm_res (LOCK, CANCEL, UNLOCK, GRANTED results and the *_RES
// callbacks other than TEST_RES).
type Res struct {
	Cookie []byte
	Stat   Stat
}

// Share is nlm_share.
type Share struct {
	CallerName []byte
	FH         []byte
	OH         []byte
	Mode       uint32
	Access     uint32
}

// ShareArgs is nlm_shareargs.
type ShareArgs struct {
	Cookie  []byte
	Share   Share
	Reclaim bool
}

// ShareRes is nlm_shareres.
type ShareRes struct {
	Cookie   []byte
	Stat     Stat
	Sequence int32
}

// Notify is nlm_notify (FREE_ALL).
type Notify struct {
	Name  []byte
	State int32
}

func offsetWidth(vers uint32) bool { return vers == Vers4 }

func decodeOffsets(d *xdr.Decoder, vers uint32) (off, n uint64) {
	if offsetWidth(vers) {
		return d.Uint64(), d.Uint64()
	}
	return uint64(d.Uint32()), uint64(d.Uint32())
}

func appendOffsets(b []byte, vers uint32, off, n uint64) []byte {
	if offsetWidth(vers) {
		return xdr.AppendUint64(xdr.AppendUint64(b, off), n)
	}
	return xdr.AppendUint32(xdr.AppendUint32(b, uint32(off)), uint32(n))
}

func decodeLock(d *xdr.Decoder, vers uint32, l *Lock) {
	l.CallerName = d.Opaque(MaxStrLen)
	l.FH = d.Opaque(MaxNetobj)
	l.OH = d.Opaque(MaxNetobj)
	l.SVID = d.Int32()
	l.Offset, l.Len = decodeOffsets(d, vers)
}

func appendLock(b []byte, vers uint32, l *Lock) []byte {
	b = xdr.AppendOpaque(b, l.CallerName)
	b = xdr.AppendOpaque(b, l.FH)
	b = xdr.AppendOpaque(b, l.OH)
	b = xdr.AppendInt32(b, l.SVID)
	return appendOffsets(b, vers, l.Offset, l.Len)
}

// Decode decodes a from d. Errors are left in d.
func (a *LockArgs) Decode(d *xdr.Decoder, vers uint32) {
	a.Cookie = d.Opaque(MaxNetobj)
	a.Block = d.Bool()
	a.Exclusive = d.Bool()
	decodeLock(d, vers, &a.Lock)
	a.Reclaim = d.Bool()
	a.State = d.Int32()
}

// Append encodes a.
func (a *LockArgs) Append(b []byte, vers uint32) []byte {
	b = xdr.AppendOpaque(b, a.Cookie)
	b = xdr.AppendBool(b, a.Block)
	b = xdr.AppendBool(b, a.Exclusive)
	b = appendLock(b, vers, &a.Lock)
	b = xdr.AppendBool(b, a.Reclaim)
	return xdr.AppendInt32(b, a.State)
}

// Decode decodes a from d.
func (a *CancelArgs) Decode(d *xdr.Decoder, vers uint32) {
	a.Cookie = d.Opaque(MaxNetobj)
	a.Block = d.Bool()
	a.Exclusive = d.Bool()
	decodeLock(d, vers, &a.Lock)
}

// Append encodes a.
func (a *CancelArgs) Append(b []byte, vers uint32) []byte {
	b = xdr.AppendOpaque(b, a.Cookie)
	b = xdr.AppendBool(b, a.Block)
	b = xdr.AppendBool(b, a.Exclusive)
	return appendLock(b, vers, &a.Lock)
}

// Decode decodes a from d.
func (a *TestArgs) Decode(d *xdr.Decoder, vers uint32) {
	a.Cookie = d.Opaque(MaxNetobj)
	a.Exclusive = d.Bool()
	decodeLock(d, vers, &a.Lock)
}

// Append encodes a.
func (a *TestArgs) Append(b []byte, vers uint32) []byte {
	b = xdr.AppendOpaque(b, a.Cookie)
	b = xdr.AppendBool(b, a.Exclusive)
	return appendLock(b, vers, &a.Lock)
}

// Decode decodes a from d.
func (a *UnlockArgs) Decode(d *xdr.Decoder, vers uint32) {
	a.Cookie = d.Opaque(MaxNetobj)
	decodeLock(d, vers, &a.Lock)
}

// Append encodes a.
func (a *UnlockArgs) Append(b []byte, vers uint32) []byte {
	b = xdr.AppendOpaque(b, a.Cookie)
	return appendLock(b, vers, &a.Lock)
}

// Decode decodes r from d.
func (r *TestRes) Decode(d *xdr.Decoder, vers uint32) {
	r.Cookie = d.Opaque(MaxNetobj)
	r.Stat = Stat(d.Uint32())
	if r.Stat == Denied {
		r.Holder.Exclusive = d.Bool()
		r.Holder.SVID = d.Int32()
		r.Holder.OH = d.Opaque(MaxNetobj)
		r.Holder.Offset, r.Holder.Len = decodeOffsets(d, vers)
	}
}

// Append encodes r; the holder goes out only for Denied.
func (r *TestRes) Append(b []byte, vers uint32) []byte {
	b = xdr.AppendOpaque(b, r.Cookie)
	b = xdr.AppendUint32(b, uint32(r.Stat))
	if r.Stat == Denied {
		b = xdr.AppendBool(b, r.Holder.Exclusive)
		b = xdr.AppendInt32(b, r.Holder.SVID)
		b = xdr.AppendOpaque(b, r.Holder.OH)
		b = appendOffsets(b, vers, r.Holder.Offset, r.Holder.Len)
	}
	return b
}

// Decode decodes r from d.
func (r *Res) Decode(d *xdr.Decoder) {
	r.Cookie = d.Opaque(MaxNetobj)
	r.Stat = Stat(d.Uint32())
}

// Append encodes r.
func (r *Res) Append(b []byte) []byte {
	b = xdr.AppendOpaque(b, r.Cookie)
	return xdr.AppendUint32(b, uint32(r.Stat))
}

// Decode decodes a from d.
func (a *ShareArgs) Decode(d *xdr.Decoder) {
	a.Cookie = d.Opaque(MaxNetobj)
	a.Share.CallerName = d.Opaque(MaxStrLen)
	a.Share.FH = d.Opaque(MaxNetobj)
	a.Share.OH = d.Opaque(MaxNetobj)
	a.Share.Mode = d.Uint32()
	a.Share.Access = d.Uint32()
	a.Reclaim = d.Bool()
}

// Append encodes a.
func (a *ShareArgs) Append(b []byte) []byte {
	b = xdr.AppendOpaque(b, a.Cookie)
	b = xdr.AppendOpaque(b, a.Share.CallerName)
	b = xdr.AppendOpaque(b, a.Share.FH)
	b = xdr.AppendOpaque(b, a.Share.OH)
	b = xdr.AppendUint32(b, a.Share.Mode)
	b = xdr.AppendUint32(b, a.Share.Access)
	return xdr.AppendBool(b, a.Reclaim)
}

// Decode decodes r from d.
func (r *ShareRes) Decode(d *xdr.Decoder) {
	r.Cookie = d.Opaque(MaxNetobj)
	r.Stat = Stat(d.Uint32())
	r.Sequence = d.Int32()
}

// Append encodes r.
func (r *ShareRes) Append(b []byte) []byte {
	b = xdr.AppendOpaque(b, r.Cookie)
	b = xdr.AppendUint32(b, uint32(r.Stat))
	return xdr.AppendInt32(b, r.Sequence)
}

// Decode decodes n from d.
func (n *Notify) Decode(d *xdr.Decoder) {
	n.Name = d.Opaque(MaxNameLen)
	n.State = d.Int32()
}

// Append encodes n.
func (n *Notify) Append(b []byte) []byte {
	return xdr.AppendInt32(xdr.AppendOpaque(b, n.Name), n.State)
}

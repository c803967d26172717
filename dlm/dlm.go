// Package dlm is the lock backend: where the lock state of every file lives.
//
// The NLM lock manager (package nlm/lockmgr) is pure: it decides, for one
// file at a time, what a request does to that file's locks, blocked
// requests and shares. A Backend stores that state and hands it to the
// manager one file at a time through Update, which may run the manager's
// function more than once: an optimistic backend (etcd) loads the file,
// lets the function edit it, and commits only if neither the file nor the
// virtual server's epoch changed meanwhile, retrying otherwise. The
// in-process backend (dlm/memdlm) runs it once under a lock.
//
// Every lock and share carries the epoch of its virtual server at the time
// it was granted or reclaimed. After a takeover the new owner of a virtual
// server runs with a higher epoch: reclaims re-stamp the locks they find,
// and the manager's purge removes what nobody reclaimed.
//
// Every write names the Claim it acts under — the virtual server the
// request came through, at the epoch this node holds it in — and the
// backend refuses it (ErrFenced, nothing changed) unless that claim is
// still this node's: a node that lost a virtual server, or is releasing
// it, cannot change its state any more. The stamps of the records an edit
// touches play no part in fencing: an unlock that leaves pieces of a lock
// stamped in an earlier epoch is never refused for them.
package dlm

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"net/netip"
	"sync/atomic"
)

// Inf is the End of a range that runs to the end of the file (NLM l_len 0).
const Inf = ^uint64(0)

// Range is a half-open byte range [Start, End); End == Inf means "to the end
// of the file, whatever its size".
type Range struct{ Start, End uint64 }

// Overlaps reports whether r and o share at least one byte.
func (r Range) Overlaps(o Range) bool { return r.Start < o.End && o.Start < r.End }

// Touches reports whether r and o overlap or are adjacent.
func (r Range) Touches(o Range) bool { return r.Start <= o.End && o.Start <= r.End }

// Contains reports whether r covers all of o.
func (r Range) Contains(o Range) bool { return r.Start <= o.Start && o.End <= r.End }

func (r Range) String() string {
	if r.End == Inf {
		return fmt.Sprintf("[%d,EOF)", r.Start)
	}
	return fmt.Sprintf("[%d,%d)", r.Start, r.End)
}

// HostKey identifies a client host as seen through one virtual server: the
// virtual server's address, the caller_name the client gives, and the
// address its requests come from. Two machines that both call themselves
// "localhost" stay apart, and so does one client using two virtual servers.
type HostKey struct {
	VIP  netip.Addr
	Name string
	Addr netip.Addr
}

func (k HostKey) String() string { return fmt.Sprintf("%s@%s via %s", k.Name, k.Addr, k.VIP) }

// OwnerKey identifies a POSIX lock owner: a host and the client's process
// id (svid). The owner handle (oh) is not part of it, as in Linux lockd.
type OwnerKey struct {
	HostKey
	SVID int32
}

// Host is an interned client host: backends hand out one *Host per
// HostKey, so owners compare by pointer. Its counters cover every file of
// the backend and are the backend's to keep: they move when an Update or
// UpdateAll commits, whichever node made it (a shared backend derives
// them from the shared state), and the lock manager's limits and NSM
// pruning trust them (contract case Counters).
type Host struct {
	HostKey
	id      uint32
	locks   atomic.Int64
	blocked atomic.Int64
	shares  atomic.Int64
	used    atomic.Uint32 // sweep generation of the last lookup
	owners  atomic.Int32  // interned owners that point here
}

// Locks is the number of held lock ranges of the host.
func (h *Host) Locks() int64 { return h.locks.Load() }

// Blocked is the number of blocked lock requests of the host.
func (h *Host) Blocked() int64 { return h.blocked.Load() }

// Shares is the number of DOS share reservations of the host.
func (h *Host) Shares() int64 { return h.shares.Load() }

// Idle reports whether the host holds, waits for and shares nothing.
func (h *Host) Idle() bool { return h.Locks() == 0 && h.Blocked() == 0 && h.Shares() == 0 }

// ID is a number unique among the backend's live hosts.
func (h *Host) ID() uint32 { return h.id }

// Owner is an interned lock owner.
type Owner struct {
	Host *Host
	SVID int32
	oh   atomic.Pointer[[]byte]
	held atomic.Int64 // lock ranges plus blocked requests
	used atomic.Uint32
}

// OH is the owner handle the owner last locked with; NLM TEST replies
// report it for a conflicting holder.
func (o *Owner) OH() []byte {
	if p := o.oh.Load(); p != nil {
		return *p
	}
	return nil
}

// SetOH records the owner handle of a lock request (copied if it changed).
func (o *Owner) SetOH(oh []byte) {
	if p := o.oh.Load(); p != nil && bytes.Equal(*p, oh) {
		return
	}
	c := bytes.Clone(oh)
	o.oh.Store(&c)
}

// Key returns the owner's identity.
func (o *Owner) Key() OwnerKey { return OwnerKey{HostKey: o.Host.HostKey, SVID: o.SVID} }

func (o *Owner) String() string { return fmt.Sprintf("%s/%d", o.Host.HostKey, o.SVID) }

// Lock is one held lock range, by value.
type Lock struct {
	Owner     *Owner
	Range     Range
	Exclusive bool
	// Since is when the owner asked for the lock (unix seconds; 0 unknown),
	// for the admin's view of lock ages.
	Since uint32
	Epoch uint64
}

// Waiter is a blocked lock request, queued FIFO per file. It carries what a
// GRANTED callback needs to reach the client.
//
// Once granted, it becomes a pending grant until its GRANTED callback is
// answered: state of the file (File.Pending), not only a return value.
// With a shared backend the node serving the waiter's virtual server may
// not be the one whose unlock granted it, and a node that takes the
// virtual server over sends the callbacks still pending. A pending grant
// goes when the callback is answered or given up (the lock manager's
// Settle), when the client turns the grant down (Ungrant, which needs
// Prev), and with its host.
type Waiter struct {
	// Seq orders the file's queue, across the nodes that share it: it
	// grows with every waiter queued (an etcd backend uses the waiter
	// key's revision). It identifies the waiter among the file's waiters
	// and pending grants.
	Seq       uint64
	Owner     *Owner
	Range     Range
	Exclusive bool
	Epoch     uint64
	OH        []byte // owner handle, echoed in GRANTED
	Vers      uint32 // NLM version of the request
	Transport uint8  // sunrpc.Transport the request came over
	Async     bool   // the request was LOCK_MSG: answer with GRANTED_MSG
	Since     uint32 // when it was queued (unix seconds)
	// Prev, once the waiter is granted (pending), are the owner's own
	// locks in the range that the grant replaced, put back if the client
	// turns the grant down.
	Prev []Lock
}

// Share is a DOS share reservation (NLM SHARE), owned by (host, oh).
type Share struct {
	Host   *Host
	OH     []byte
	Mode   uint32 // fsh_mode: what others may not do
	Access uint32 // fsh_access: what this owner does
	Epoch  uint64
}

// Errors.
var (
	// ErrConflict is returned by an optimistic backend when a file changed
	// under an Update too many times in a row.
	ErrConflict = errors.New("dlm: too much contention on the file")
	// ErrFenced: this node no longer owns the virtual server whose state an
	// Update changed (its epoch moved on); the change was not made.
	ErrFenced = errors.New("dlm: virtual server epoch has moved on")
	// ErrClosed: the backend is closed.
	ErrClosed = errors.New("dlm: backend closed")
	// ErrUnavailable: a shared backend's store cannot be reached or has no
	// quorum now; nothing was changed (or, if the outcome is unknown, the
	// change is the virtual server's records' to reclaim). Services answer
	// so that clients try again later.
	ErrUnavailable = errors.New("dlm: lock store unavailable")
)

// Backend stores lock state. Implementations are safe for concurrent use.
//
// Hosts and owners are interned: Host and Owner return the one record for a
// key, creating it if needed. A record that holds nothing is forgotten by
// the second Sweep after its last lookup, so a caller may use a record it
// looked up until then (callers sweep every minute or so; a request takes
// milliseconds).
type Backend interface {
	// Host returns the interned host for key.
	Host(key HostKey) *Host
	// HostLimited is Host for a request: nil when the host would be new
	// and its client address already has as many hosts as allowed.
	HostLimited(key HostKey) *Host
	// Owner returns the interned owner for key.
	Owner(key OwnerKey) *Owner
	// OwnerOf is Owner for a request's decoded caller_name (nil, as with
	// HostLimited, when its host would be one too many), without the
	// allocation of a key.
	OwnerOf(vip, addr netip.Addr, name []byte, svid int32) *Owner
	// Hosts calls fn for every known host until fn returns false.
	Hosts(fn func(*Host) bool)
	// Sweep forgets idle hosts and owners not looked up since the previous
	// Sweep.
	Sweep()

	// SetClaim records that this node acts for c.VIP at c.Epoch in state
	// st (see ClaimState). A claim of an epoch below the latest one the
	// backend knows of that virtual server, or one moved backwards, fails
	// with ErrFenced.
	SetClaim(ctx context.Context, c Claim, st ClaimState) error

	// Update runs fn on the state of the file with handle fh and stores
	// what fn changed, if c is this node's active claim (or the zero
	// Claim); otherwise it fails with ErrFenced and changes nothing. fn
	// may be called more than once, so it must do nothing but read and
	// edit f (and set its own result variables), and it must not edit f
	// before deciding to return an error.
	Update(ctx context.Context, fh []byte, c Claim, fn func(f *File) error) error

	// UpdateAll runs fn, as Update does, on every file in which a host
	// that sel selects holds a lock, waits for one or has a share; c may
	// be active or releasing (a release captures and drops under it).
	UpdateAll(ctx context.Context, sel Selector, c Claim, fn func(f *File) error) error

	// Read runs fn on the state of one file without changing it; a file
	// with no state reads as empty.
	Read(ctx context.Context, fh []byte, fn func(f *File)) error

	// View calls fn on every file that has any state until fn returns
	// false. fn must not change f.
	View(ctx context.Context, fn func(f *File) bool) error

	Close() error
}

// RemoteGrants is implemented by a backend that nodes share. A blocked
// request queued through one node may be granted by another node's
// unlock; the node that serves the waiter's virtual server must send the
// GRANTED callback, from that virtual server's address. The channel
// delivers the pending grants that appeared in a file through another
// node's edit, for the virtual servers this node holds an active claim
// of. It is bounded: a grant left out when it is full is found again by
// the client's next request (the lock is its already).
type RemoteGrants interface {
	RemoteGrants() <-chan RemoteGrant
}

// RemoteGrant is a pending grant made by another node: a copy of it.
type RemoteGrant struct {
	FH     string
	Waiter Waiter
}

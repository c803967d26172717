// Package lockmgr is the NLM lock manager as a pure state machine: each
// operation takes one file's state (a *dlm.File, handed over by a backend's
// Update), applies NLM and POSIX semantics to it, and returns the reply
// status and the effects — blocked requests that became grantable and need
// a GRANTED callback. It reads no clock, opens no socket, starts no
// goroutine and keeps no state of its own; grace and the virtual server's
// epoch are inputs.
//
// Semantics (Linux lockd and X/Open XNFS, except where noted):
//   - A lock owner is (virtual server, client host, svid). Only other
//     owners conflict; two locks conflict when they overlap and either is
//     exclusive.
//   - An owner's ranges never overlap: a new lock absorbs the owner's
//     overlapping or adjacent ranges of the same mode and splits those of
//     the other mode, so upgrades and downgrades are atomic.
//   - Blocked requests wait FIFO per file (by their sequence number).
//     Whenever locks are released or downgraded the queue is re-evaluated
//     in order, and each request that no longer conflicts is granted: its
//     lock is held at once, and a pending grant stays in the file (and is
//     reported as a Grant) until its GRANTED callback is answered (Settle)
//     or turned down (Ungrant).
//   - Grace has two rules, chosen by the epoch floor, an input. With no
//     floor (the backend lost the virtual server's records: the in-memory
//     backend after its node died), only reclaims may lock or share during
//     the virtual server's grace period, and TEST is refused. With a floor
//     (a durable backend kept them), the records of the virtual server
//     stamped below it are reclaimable: a request that conflicts with one
//     is DENIED_GRACE_PERIOD, one that conflicts with nothing reclaimable
//     is served at once (TEST alike), and a reclaim re-stamps its record.
//     UNLOCK, CANCEL, UNSHARE and FREE_ALL are always served (as Ganesha
//     does; Linux refuses them). Outside grace a reclaim is refused unless
//     the owner still holds exactly that lock — the case of a planned move,
//     where the locks travelled with the virtual server.
package lockmgr

import (
	"bytes"
	"slices"

	"github.com/nlmha/nlmha/dlm"
)

// Status is a version-independent NLM outcome.
type Status uint8

// Outcomes.
const (
	Granted Status = iota
	Denied
	DeniedNoLocks
	Blocked
	DeniedGrace
	Deadlock
)

var statusNames = [...]string{"GRANTED", "DENIED", "DENIED_NOLOCKS", "BLOCKED", "DENIED_GRACE_PERIOD", "DEADLCK"}

func (s Status) String() string { return statusNames[s] }

// Limits bound what one client host may hold; 0 means no limit. A request
// beyond a limit is answered DENIED_NOLOCKS, so a runaway or hostile client
// costs bounded memory.
type Limits struct {
	LocksPerHost   int64
	BlockedPerHost int64
	SharesPerHost  int64
}

// Manager applies lock requests to file state.
type Manager struct {
	Limits Limits
}

// LockArgs is a LOCK (or NM_LOCK) request.
type LockArgs struct {
	Owner     *dlm.Owner
	Range     dlm.Range
	Exclusive bool
	Block     bool
	Reclaim   bool
	// InGrace says whether the virtual server is in its grace period;
	// Epoch is its current epoch, stamped on what is granted. Floor, in
	// grace, is the epoch below which the virtual server's records are
	// reclaimable; zero when the backend kept none (see the package doc).
	InGrace bool
	Epoch   uint64
	Floor   uint64
	// Now is the time of the request (unix seconds), kept as the lock's
	// age; time is an input here like everything else.
	Now uint32
	// Kept with a blocked request for the GRANTED callback.
	OH        []byte
	Vers      uint32
	Transport uint8
	Async     bool
}

// Result is the outcome of an operation.
type Result struct {
	Status Status
	// Holder is a conflicting lock (TEST replies), valid if HasHolder.
	Holder    dlm.Lock
	HasHolder bool
	// Grants are blocked requests that got their lock: each needs a
	// GRANTED callback.
	Grants []Grant
}

// Grant is a blocked request that has just been granted: the pending
// grant recorded in the file, and the file's handle.
type Grant struct {
	FH     string
	Waiter *dlm.Waiter
}

// Lock handles LOCK and NM_LOCK.
func (m *Manager) Lock(f *dlm.File, a *LockArgs) Result {
	if a.InGrace && !a.Reclaim && a.Floor == 0 {
		return Result{Status: DeniedGrace}
	}
	// One walk over the locks that overlap or touch the range answers every
	// question below: conflict, retransmission, and the owner's own ranges.
	var buf [8]*dlm.Held
	near := touching(f, a.Range, buf[:0])
	exact, conflicts := scan(near, a.Owner, a.Range, a.Exclusive)
	if a.Reclaim && (!a.InGrace || exact != nil && a.Floor != 0) {
		// Out of grace, or a kept record in grace: the owner's record of
		// exactly this lock is what it reclaims.
		if exact != nil {
			f.Restamp(exact, a.Epoch)
			settleHeld(f, a.Owner, a.Range, a.Exclusive)
			return Result{Status: Granted}
		}
		return Result{Status: DeniedGrace}
	}
	if a.InGrace && a.Floor != 0 && conflicts && reclaimable(near, a.Owner, a.Range, a.Exclusive, a.Floor) {
		return Result{Status: DeniedGrace} // it may be the holder's, once reclaimed
	}
	if conflicts {
		if !a.Block {
			return Result{Status: Denied}
		}
		if w := findWaiter(f, a.Owner, a.Range, a.Exclusive); w != nil {
			return Result{Status: Blocked} // a retransmission finds its queued request
		}
		if lim := m.Limits.BlockedPerHost; lim > 0 && a.Owner.Host.Blocked() >= lim {
			return Result{Status: DeniedNoLocks}
		}
		f.AddWaiter(&dlm.Waiter{
			Owner: a.Owner, Range: a.Range, Exclusive: a.Exclusive, Epoch: a.Epoch, Since: a.Now,
			OH: bytes.Clone(a.OH), Vers: a.Vers, Transport: a.Transport, Async: a.Async,
		})
		return Result{Status: Blocked}
	}
	downgrade := false
	if exact != nil {
		f.Restamp(exact, a.Epoch) // a retransmission, or a reclaim in grace
		settleHeld(f, a.Owner, a.Range, a.Exclusive)
	} else {
		if lim := m.Limits.LocksPerHost; lim > 0 {
			if d := growth(near, a.Owner, a.Range, a.Exclusive); d > 0 && a.Owner.Host.Locks()+d > lim {
				return Result{Status: DeniedNoLocks}
			}
		}
		downgrade = applyNear(f, a.Owner, a.Range, a.Exclusive, a.Epoch, a.Now, near)
	}
	if len(f.Waiters()) == 0 {
		return Result{Status: Granted}
	}
	// A request of this very lock may still be queued (the client resent
	// it non-blocking); it is satisfied now, so it must not be granted
	// again later.
	if w := findWaiter(f, a.Owner, a.Range, a.Exclusive); w != nil {
		f.RemoveWaiter(w)
	}
	if !downgrade {
		return Result{Status: Granted}
	}
	// A downgrade (exclusive to shared) may let shared waiters in.
	return Result{Status: Granted, Grants: wake(f)}
}

// settleHeld forgets a pending grant of exactly the lock the owner has
// just been told it holds: its callback is moot (the client asked again
// and has it), and a callback sent later — by a node adopting the
// virtual server — could only be refused.
func settleHeld(f *dlm.File, owner *dlm.Owner, r dlm.Range, exclusive bool) {
	for _, p := range f.Pending() {
		if p.Owner == owner && p.Range == r && p.Exclusive == exclusive {
			f.RemovePending(p)
			return
		}
	}
}

// scan finds, among the locks near a request, the owner's lock of exactly
// the range and mode, and whether another owner's lock conflicts.
func scan(near []*dlm.Held, owner *dlm.Owner, r dlm.Range, exclusive bool) (exact *dlm.Held, conflicts bool) {
	for _, h := range near {
		if h.Owner() == owner {
			if h.Range() == r && h.Exclusive() == exclusive {
				exact = h
			}
		} else if !conflicts && (exclusive || h.Exclusive()) && h.Range().Overlaps(r) {
			conflicts = true
		}
	}
	return exact, conflicts
}

// reclaimable reports whether a lock of another owner of the same virtual
// server, stamped below floor, conflicts with owner locking r.
func reclaimable(near []*dlm.Held, owner *dlm.Owner, r dlm.Range, exclusive bool, floor uint64) bool {
	for _, h := range near {
		if h.Owner() != owner && h.Owner().Host.VIP == owner.Host.VIP && h.Epoch() < floor &&
			(exclusive || h.Exclusive()) && h.Range().Overlaps(r) {
			return true
		}
	}
	return false
}

// Test handles TEST: the first conflicting lock, if any. In grace, floor
// chooses the rule as for Lock.
func (m *Manager) Test(f *dlm.File, owner *dlm.Owner, r dlm.Range, exclusive, inGrace bool, floor uint64) Result {
	if inGrace && floor == 0 {
		return Result{Status: DeniedGrace}
	}
	c := conflict(f, owner, r, exclusive)
	if c == nil {
		return Result{Status: Granted}
	}
	if inGrace {
		var buf [8]*dlm.Held
		if reclaimable(touching(f, r, buf[:0]), owner, r, exclusive, floor) {
			return Result{Status: DeniedGrace}
		}
	}
	return Result{Status: Denied, Holder: c.Lock(), HasHolder: true}
}

// Unlock handles UNLOCK: it releases the owner's locks within r (splitting
// ranges that stick out) and grants what became grantable. Unlocking what
// is not held is GRANTED.
func (m *Manager) Unlock(f *dlm.File, owner *dlm.Owner, r dlm.Range) Result {
	if unlockRange(f, owner, r) && len(f.Waiters()) > 0 {
		return Result{Status: Granted, Grants: wake(f)}
	}
	return Result{Status: Granted}
}

// Cancel handles CANCEL: it removes the owner's queued request for exactly
// this range and mode. Like Linux lockd it answers DENIED when there is
// none — usually because the lock was granted in the meantime, which the
// client needs to know — and it never unlocks anything.
func (m *Manager) Cancel(f *dlm.File, owner *dlm.Owner, r dlm.Range, exclusive bool) Result {
	if w := findWaiter(f, owner, r, exclusive); w != nil {
		f.RemoveWaiter(w)
		return Result{Status: Granted}
	}
	return Result{Status: Denied}
}

// Settle ends the pending grant of waiter w: its GRANTED callback was
// answered, or given up (the lock stays granted either way; a client that
// missed the callback finds its lock on its next request).
func (m *Manager) Settle(f *dlm.File, w *dlm.Waiter) Result {
	if p := pendingOf(f, w); p != nil {
		f.RemovePending(p)
	}
	return Result{Status: Granted}
}

// Ungrant undoes a grant the client turned down (a GRANTED callback
// answered other than GRANTED): the granted range is released and the
// owner's earlier locks in it are restored. A grant no longer pending
// (settled, or dropped with its host) is left alone.
func (m *Manager) Ungrant(f *dlm.File, w *dlm.Waiter) Result {
	p := pendingOf(f, w)
	if p == nil {
		return Result{Status: Granted}
	}
	f.RemovePending(p)
	if !covered(f, w.Owner, w.Range, w.Exclusive) {
		return Result{Status: Granted} // already released or changed by the client
	}
	unlockRange(f, w.Owner, w.Range)
	for _, l := range p.Prev {
		if !l.Exclusive || conflict(f, l.Owner, l.Range, true) == nil {
			apply(f, l.Owner, l.Range, l.Exclusive, l.Epoch, l.Since)
			continue
		}
		// Others took shared locks over what the grant made shared: the
		// owner's exclusive lock cannot come back there (never two
		// conflicting holders). The part the grant covered stays shared;
		// the rest of it was never taken away.
		r := dlm.Range{Start: max(l.Range.Start, w.Range.Start), End: min(l.Range.End, w.Range.End)}
		if r.Start < r.End {
			apply(f, l.Owner, r, false, l.Epoch, l.Since)
		}
	}
	return Result{Status: Granted, Grants: wake(f)}
}

// Restore records a pending grant carried over from a snapshot (a
// planned move), if its owner holds the granted lock here; it reports
// whether it did. The callback is then due from here.
func (m *Manager) Restore(f *dlm.File, w *dlm.Waiter) bool {
	if !holds(f, w.Owner, w.Range, w.Exclusive) || f.FindPending(w.Seq) != nil {
		return false
	}
	f.AddPending(w)
	return true
}

// pendingOf finds the pending grant of waiter w: by its number, checked
// against its owner and lock, since a backend may hand over copies.
func pendingOf(f *dlm.File, w *dlm.Waiter) *dlm.Waiter {
	p := f.FindPending(w.Seq)
	if p == nil || p.Owner != w.Owner || p.Range != w.Range || p.Exclusive != w.Exclusive {
		return nil
	}
	return p
}

// ShareArgs is a SHARE request. A share owner is (host, oh). Grace,
// epoch and floor are as for LockArgs.
type ShareArgs struct {
	Host    *dlm.Host
	OH      []byte
	Mode    uint32
	Access  uint32
	Reclaim bool
	InGrace bool
	Epoch   uint64
	Floor   uint64
}

// Share handles SHARE (DOS share reservations). Two shares of different
// owners conflict when one's access meets the other's deny mode.
func (m *Manager) Share(f *dlm.File, a *ShareArgs) Result {
	mine := findShare(f, a.Host, a.OH)
	same := mine != nil && mine.Mode == a.Mode && mine.Access == a.Access
	if a.Reclaim && (!a.InGrace || same && a.Floor != 0) {
		if same {
			f.RestampShare(mine, a.Epoch)
			return Result{Status: Granted}
		}
		return Result{Status: DeniedGrace}
	}
	if a.InGrace && !a.Reclaim && a.Floor == 0 {
		return Result{Status: DeniedGrace}
	}
	for _, s := range f.Shares() {
		if s == mine {
			continue
		}
		if s.Access&a.Mode != 0 || s.Mode&a.Access != 0 {
			if a.InGrace && a.Floor != 0 && s.Host.VIP == a.Host.VIP && s.Epoch < a.Floor {
				return Result{Status: DeniedGrace} // it may be the holder's, once reclaimed
			}
			return Result{Status: Denied}
		}
	}
	if mine == nil {
		if lim := m.Limits.SharesPerHost; lim > 0 && a.Host.Shares() >= lim {
			return Result{Status: DeniedNoLocks}
		}
	} else {
		f.RemoveShare(mine) // the same owner changes its reservation
	}
	f.AddShare(&dlm.Share{Host: a.Host, OH: bytes.Clone(a.OH), Mode: a.Mode, Access: a.Access, Epoch: a.Epoch})
	return Result{Status: Granted}
}

// Unshare handles UNSHARE; removing a share that does not exist is
// GRANTED, as X/Open asks.
func (m *Manager) Unshare(f *dlm.File, host *dlm.Host, oh []byte) Result {
	if s := findShare(f, host, oh); s != nil {
		f.RemoveShare(s)
	}
	return Result{Status: Granted}
}

// Drop removes every lock, blocked request and share that sel selects —
// FREE_ALL, a client's reboot notification, the release of a virtual
// server, or (with sel.Below) what its clients did not reclaim in grace —
// and grants what became grantable to the others.
// DropWaiters removes the blocked requests sel selects (and nothing
// else): after an unplanned takeover the dead node's waiters die with it,
// as Linux's do with lockd; their clients ask again, reclaiming first.
// Held locks are untouched, so nothing becomes grantable.
func (m *Manager) DropWaiters(f *dlm.File, sel *dlm.Selector) int {
	var gone []*dlm.Waiter
	for _, w := range f.Waiters() {
		if sel.MatchRecord(w.Owner.Host, w.Epoch) {
			gone = append(gone, w)
		}
	}
	f.RemoveWaiters(gone)
	return len(gone)
}

func (m *Manager) Drop(f *dlm.File, sel *dlm.Selector) Result {
	gone := sel.MatchRecord
	var victims []*dlm.Held
	f.All(func(h *dlm.Held) bool {
		if gone(h.Owner().Host, h.Epoch()) {
			victims = append(victims, h)
		}
		return true
	})
	for _, h := range victims {
		f.Remove(h)
	}
	var waiters []*dlm.Waiter
	for _, w := range f.Waiters() {
		if gone(w.Owner.Host, w.Epoch) {
			waiters = append(waiters, w)
		}
	}
	f.RemoveWaiters(waiters)
	for _, p := range slices.Clone(f.Pending()) {
		if gone(p.Owner.Host, p.Epoch) {
			f.RemovePending(p)
		}
	}
	for _, s := range slices.Clone(f.Shares()) {
		if gone(s.Host, s.Epoch) {
			f.RemoveShare(s)
		}
	}
	if len(victims) == 0 {
		return Result{Status: Granted}
	}
	return Result{Status: Granted, Grants: wake(f)}
}

// conflict returns the first (lowest-starting) lock of another owner that
// conflicts with owner locking r.
func conflict(f *dlm.File, owner *dlm.Owner, r dlm.Range, exclusive bool) *dlm.Held {
	var c *dlm.Held
	f.Overlapping(r, func(h *dlm.Held) bool {
		if h.Owner() != owner && (exclusive || h.Exclusive()) {
			c = h
			return false
		}
		return true
	})
	return c
}

// covered reports whether the owner holds all of r in that mode (in one
// lock: an owner's adjacent ranges of one mode are merged).
func covered(f *dlm.File, owner *dlm.Owner, r dlm.Range, exclusive bool) bool {
	found := false
	f.Overlapping(r, func(h *dlm.Held) bool {
		found = h.Owner() == owner && h.Exclusive() == exclusive && h.Range().Contains(r)
		return !found
	})
	return found
}

// holds reports whether the owner's locks cover all of r, each at least
// in the mode asked for (a later grant of the same owner may have turned
// part of a shared grant exclusive: the callback still tells the truth).
func holds(f *dlm.File, owner *dlm.Owner, r dlm.Range, exclusive bool) bool {
	next := r.Start
	f.Overlapping(r, func(h *dlm.Held) bool {
		if h.Owner() != owner || exclusive && !h.Exclusive() {
			return true
		}
		if hr := h.Range(); hr.Start <= next && hr.End > next {
			next = hr.End
		}
		return next < r.End
	})
	return next >= r.End
}

func findWaiter(f *dlm.File, owner *dlm.Owner, r dlm.Range, exclusive bool) *dlm.Waiter {
	for _, w := range f.Waiters() {
		if w.Owner == owner && w.Range == r && w.Exclusive == exclusive {
			return w
		}
	}
	return nil
}

func findShare(f *dlm.File, host *dlm.Host, oh []byte) *dlm.Share {
	for _, s := range f.Shares() {
		if s.Host == host && bytes.Equal(s.OH, oh) {
			return s
		}
	}
	return nil
}

// touching collects the locks, of any owner, that overlap r or are adjacent
// to it, in ascending order of start.
func touching(f *dlm.File, r dlm.Range, buf []*dlm.Held) []*dlm.Held {
	if r.Start > 0 {
		r.Start--
	}
	if r.End != dlm.Inf {
		r.End++
	}
	f.Overlapping(r, func(h *dlm.Held) bool {
		buf = append(buf, h)
		return true
	})
	return buf
}

// apply gives owner the lock r in the given mode (see applyNear).
func apply(f *dlm.File, owner *dlm.Owner, r dlm.Range, exclusive bool, epoch uint64, since uint32) {
	var buf [8]*dlm.Held
	applyNear(f, owner, r, exclusive, epoch, since, touching(f, r, buf[:0]))
}

// applyNear gives owner the lock r in the given mode, near being the locks
// that touch r: same-mode ranges of the owner that overlap or touch it are
// merged in, other-mode ranges it overlaps are cut back to what lies
// outside it. It reports whether an exclusive range became shared (which
// may let others in). A merged range is as old as its oldest part. Values
// are read before a node is removed: removed nodes are recycled.
func applyNear(f *dlm.File, owner *dlm.Owner, r dlm.Range, exclusive bool, epoch uint64, since uint32, near []*dlm.Held) (downgrade bool) {
	merged := r
	for _, h := range near {
		if h.Owner() != owner {
			continue
		}
		l := h.Lock()
		if l.Exclusive == exclusive {
			merged.Start = min(merged.Start, l.Range.Start)
			merged.End = max(merged.End, l.Range.End)
			if l.Since != 0 && (since == 0 || l.Since < since) {
				since = l.Since
			}
			f.Remove(h)
			continue
		}
		if !l.Range.Overlaps(r) {
			continue // adjacent, other mode: stays as it is
		}
		downgrade = downgrade || l.Exclusive
		f.Remove(h)
		if l.Range.Start < r.Start {
			f.Insert(dlm.Lock{Owner: owner, Range: dlm.Range{Start: l.Range.Start, End: r.Start}, Exclusive: l.Exclusive, Since: l.Since, Epoch: l.Epoch})
		}
		if l.Range.End > r.End {
			f.Insert(dlm.Lock{Owner: owner, Range: dlm.Range{Start: r.End, End: l.Range.End}, Exclusive: l.Exclusive, Since: l.Since, Epoch: l.Epoch})
		}
	}
	f.Insert(dlm.Lock{Owner: owner, Range: merged, Exclusive: exclusive, Since: since, Epoch: epoch})
	return downgrade
}

// growth is how many held ranges applyNear would add (negative: remove).
func growth(near []*dlm.Held, owner *dlm.Owner, r dlm.Range, exclusive bool) int64 {
	d := int64(1)
	for _, h := range near {
		if h.Owner() != owner {
			continue
		}
		hr := h.Range()
		switch {
		case h.Exclusive() == exclusive:
			d--
		case hr.Overlaps(r):
			d--
			if hr.Start < r.Start {
				d++
			}
			if hr.End > r.End {
				d++
			}
		}
	}
	return d
}

// unlockRange releases the owner's locks within r and reports whether
// anything was held there.
func unlockRange(f *dlm.File, owner *dlm.Owner, r dlm.Range) bool {
	var buf [8]*dlm.Held
	var held []*dlm.Held = buf[:0]
	f.Overlapping(r, func(h *dlm.Held) bool {
		if h.Owner() == owner {
			held = append(held, h)
		}
		return true
	})
	for _, h := range held {
		l := h.Lock()
		f.Remove(h)
		if l.Range.Start < r.Start {
			f.Insert(dlm.Lock{Owner: owner, Range: dlm.Range{Start: l.Range.Start, End: r.Start}, Exclusive: l.Exclusive, Since: l.Since, Epoch: l.Epoch})
		}
		if l.Range.End > r.End {
			f.Insert(dlm.Lock{Owner: owner, Range: dlm.Range{Start: r.End, End: l.Range.End}, Exclusive: l.Exclusive, Since: l.Since, Epoch: l.Epoch})
		}
	}
	return len(held) > 0
}

// wake grants, in arrival order, every queued request that no longer
// conflicts with what is held. A grant that turns its owner's exclusive
// range shared (a shared request over its own write lock) may let in a
// request queued before it, so the queue is walked again after one; any
// other grant only adds to what conflicts.
func wake(f *dlm.File) []Grant {
	var grants []Grant
	for again := true; again && len(f.Waiters()) > 0; {
		again = false
		var granted []*dlm.Waiter
		for _, w := range f.Waiters() {
			if conflict(f, w.Owner, w.Range, w.Exclusive) != nil {
				continue
			}
			var prev []dlm.Lock
			f.Overlapping(w.Range, func(h *dlm.Held) bool {
				if h.Owner() == w.Owner {
					prev = append(prev, h.Lock())
				}
				return true
			})
			var buf [8]*dlm.Held
			if applyNear(f, w.Owner, w.Range, w.Exclusive, w.Epoch, w.Since, touching(f, w.Range, buf[:0])) {
				again = true
			}
			granted = append(granted, w)
			w.Prev = prev
			f.AddPending(w)
			grants = append(grants, Grant{FH: f.FH(), Waiter: w})
		}
		// Out of the queue in one pass, after it (what is granted is held
		// already, which is what later waiters are checked against).
		f.RemoveWaiters(granted)
	}
	return grants
}

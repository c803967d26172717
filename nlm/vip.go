package nlm

import (
	"context"
	"encoding/hex"
	"maps"
	"net/netip"
	"slices"
	"time"

	"github.com/nlmha/nlmha/dlm"
	"github.com/nlmha/nlmha/nlm/lockmgr"
	"github.com/nlmha/nlmha/virtualserver"
)

// ---- what moving a virtual server needs of the lock service --------------

// ReleaseVIP takes a virtual server's state out of the backend: callbacks
// to its clients stop, and every lock, blocked request and share of its
// hosts is captured into a snapshot and dropped — per file in one update,
// so nothing slips between the two. What that makes grantable to others
// is granted. The virtual server's claim c must already be releasing
// (virtualserver.Server.BeginRelease), so that no request in flight adds
// state behind the capture; the capture runs under it.
func (s *Service) ReleaseVIP(ctx context.Context, c dlm.Claim) (*dlm.Snapshot, error) {
	vip := c.VIP.Unmap()
	sel := dlm.Selector{VIP: vip}
	s.cb.cancelHosts(sel.Match)
	files := map[string]dlm.SnapshotFile{}
	err := s.dropAll(ctx, sel, c, func(f *dlm.File) { files[f.FH()] = dlm.CaptureFile(f, sel) })
	snap := &dlm.Snapshot{VIP: vip, Epoch: c.Epoch, Taken: time.Now()}
	for _, fh := range slices.Sorted(maps.Keys(files)) {
		snap.Files = append(snap.Files, files[fh])
	}
	return snap, err
}

// DetachVIP stops the callbacks to a virtual server's clients and leaves
// its state in the backend: the release of a virtual server whose records
// a shared backend keeps for the next owner, who adopts them (ResumeVIP).
// The claim must be releasing already, as for ReleaseVIP.
func (s *Service) DetachVIP(vip netip.Addr) {
	sel := dlm.Selector{VIP: vip.Unmap()}
	s.cb.cancelHosts(sel.Match)
}

// ResumeVIP sends the GRANTED callbacks still due to a virtual server's
// clients — pending grants in the backend that the previous owner left or
// that another node made meanwhile — once this node adopted the virtual
// server's records (a planned move over a shared backend). It returns
// how many it sent.
func (s *Service) ResumeVIP(ctx context.Context, vs *virtualserver.Server) (int, error) {
	vip := vs.Addr()
	var grants []lockmgr.Grant
	err := s.cfg.Backend.View(ctx, func(f *dlm.File) bool {
		for _, p := range f.Pending() {
			if p.Owner.Host.VIP == vip {
				w := *p
				w.Prev = slices.Clone(p.Prev)
				grants = append(grants, lockmgr.Grant{FH: f.FH(), Waiter: &w})
			}
		}
		return true
	})
	s.cb.resend(grants)
	return len(grants), err
}

// CountVIP counts the locks, blocked requests and shares of a virtual
// server's clients: the sum of its hosts' counters, which the backend
// keeps (with a shared one, for every node's records).
func (s *Service) CountVIP(vip netip.Addr) (locks, waiters, shares int) {
	vip = vip.Unmap()
	s.cfg.Backend.Hosts(func(h *dlm.Host) bool {
		if h.VIP == vip {
			locks += int(h.Locks())
			waiters += int(h.Blocked())
			shares += int(h.Shares())
		}
		return true
	})
	return locks, waiters, shares
}

// Reclaimable reports whether any held lock or share of a virtual
// server stamped below floor is left, as the store has it now (a bulk
// read: a shared backend syncs first). Blocked requests and pending
// grants do not count: clients reclaim what they hold.
func (s *Service) Reclaimable(ctx context.Context, vs *virtualserver.Server, floor uint64) (bool, error) {
	vip := vs.Addr()
	sel := dlm.Selector{VIP: vip, Below: floor}
	found := false
	err := s.cfg.Backend.UpdateAll(ctx, sel, vs.Claim(), func(f *dlm.File) error {
		f.All(func(h *dlm.Held) bool {
			if h.Owner().Host.VIP == vip && h.Epoch() < floor {
				found = true
			}
			return !found
		})
		for _, sh := range f.Shares() {
			if sh.Host.VIP == vip && sh.Epoch < floor {
				found = true
			}
		}
		return nil
	})
	return found, err
}

// DropStaleWaiters removes a virtual server's blocked requests stamped
// below floor: after an unplanned takeover over a shared backend, the
// dead node's waiters die with it (their clients, notified, ask again).
// It returns how many it removed.
func (s *Service) DropStaleWaiters(ctx context.Context, vs *virtualserver.Server, floor uint64) (int, error) {
	sel := dlm.Selector{VIP: vs.Addr(), Below: floor}
	counts := map[string]int{}
	err := s.cfg.Backend.UpdateAll(ctx, sel, vs.Claim(), func(f *dlm.File) error {
		counts[f.FH()] = s.mgr.DropWaiters(f, &sel)
		return nil
	})
	n := 0
	for _, c := range counts {
		n += c
	}
	return n, err
}

// dropAll drops what sel selects, under claim c, file by file; each file
// goes through before first (while it still has the records), and what
// the drops make grantable is granted. A backend may run the per-file
// function more than once: before must assign, not append.
func (s *Service) dropAll(ctx context.Context, sel dlm.Selector, c dlm.Claim, before func(f *dlm.File)) error {
	grants := map[string][]lockmgr.Grant{}
	err := s.cfg.Backend.UpdateAll(ctx, sel, c, func(f *dlm.File) error {
		before(f)
		grants[f.FH()] = s.mgr.Drop(f, &sel).Grants
		return nil
	})
	for _, fh := range slices.Sorted(maps.Keys(grants)) {
		gs := grants[fh]
		if err != nil && len(gs) > 0 {
			// The bulk edit stopped partway: call back only the grants
			// that were stored (a file whose edit was not committed
			// granted nothing).
			gs = s.stillPending(ctx, fh, gs)
		}
		s.cb.grant(gs)
	}
	return err
}

// stillPending keeps the grants that the file's stored state has as
// pending grants.
func (s *Service) stillPending(ctx context.Context, fh string, gs []lockmgr.Grant) []lockmgr.Grant {
	var out []lockmgr.Grant
	rerr := s.cfg.Backend.Read(ctx, []byte(fh), func(f *dlm.File) {
		for _, g := range gs {
			if p := f.FindPending(g.Waiter.Seq); p != nil && p.Owner == g.Waiter.Owner && p.Range == g.Waiter.Range {
				out = append(out, g)
			}
		}
	})
	if rerr != nil {
		return nil // unknown: the clients find their locks on their next request
	}
	return out
}

// InstallResult counts what InstallSnapshot restored.
type InstallResult struct {
	Locks, Pending, Waiters, Shares int
	// Stale are pending grants whose lock its owner no longer holds in
	// that mode (its own later request changed it): no callback is due.
	Stale int
	// Refused are entries that conflict with state this node holds for
	// another virtual server (the in-memory backend does not share state
	// between nodes): they are logged and left out.
	Refused int
}

// InstallSnapshot puts a released virtual server's state back, stamped
// with vs's epoch, through the lock manager (so nothing conflicting can
// get in): locks first, then the grants whose callback was still due
// (sent from here now), then blocked requests in their queue order (one
// that has become grantable is granted, with its callback), then shares.
func (s *Service) InstallSnapshot(ctx context.Context, snap *dlm.Snapshot, vs *virtualserver.Server) (InstallResult, error) {
	var out InstallResult
	b := s.cfg.Backend
	owner := func(l *dlm.SnapshotLock) *dlm.Owner {
		o := b.Owner(dlm.OwnerKey{HostKey: dlm.HostKey{VIP: vs.Addr(), Name: l.Name, Addr: l.Addr.Unmap()}, SVID: l.SVID})
		if len(l.OH) > 0 {
			o.SetOH(l.OH)
		}
		return o
	}
	waiter := func(l *dlm.SnapshotLock) *dlm.Waiter {
		return &dlm.Waiter{Owner: owner(l), Range: dlm.Range{Start: l.Start, End: l.End}, Exclusive: l.Exclusive,
			Epoch: vs.Epoch(), OH: l.OH, Vers: l.Vers, Transport: l.Transport, Async: l.Async, Since: l.Since}
	}
	for i := range snap.Files {
		sf := &snap.Files[i]
		var res InstallResult
		var grants []lockmgr.Grant
		err := b.Update(ctx, sf.FH, vs.Claim(), func(f *dlm.File) error {
			res, grants = InstallResult{}, nil
			for j := range sf.Locks {
				l := &sf.Locks[j]
				r := s.mgr.Lock(f, &lockmgr.LockArgs{Owner: owner(l), Range: dlm.Range{Start: l.Start, End: l.End},
					Exclusive: l.Exclusive, Reclaim: true, InGrace: true, Epoch: vs.Epoch(), Now: l.Since})
				if r.Status == lockmgr.Granted {
					res.Locks++
				} else {
					res.Refused++
				}
			}
			// A restored grant gets a fresh number from the file (its own
			// may be taken here).
			restore := func(p *dlm.Waiter) bool {
				p.Seq = 0
				if !s.mgr.Restore(f, p) {
					return false
				}
				grants = append(grants, lockmgr.Grant{FH: string(sf.FH), Waiter: p})
				return true
			}
			for j := range sf.Pending {
				l := &sf.Pending[j]
				p := waiter(l)
				for k := range l.Prev {
					pl := &l.Prev[k]
					p.Prev = append(p.Prev, dlm.Lock{Owner: owner(pl), Range: dlm.Range{Start: pl.Start, End: pl.End},
						Exclusive: pl.Exclusive, Since: pl.Since, Epoch: vs.Epoch()})
				}
				if restore(p) {
					res.Pending++
				} else {
					res.Stale++
				}
			}
			for j := range sf.Waiters {
				w := waiter(&sf.Waiters[j])
				a := lockmgr.LockArgs{Owner: w.Owner, Range: w.Range, Exclusive: w.Exclusive,
					Block: true, Reclaim: true, InGrace: true, Epoch: w.Epoch, Now: w.Since,
					OH: w.OH, Vers: w.Vers, Transport: w.Transport, Async: w.Async}
				switch r := s.mgr.Lock(f, &a); r.Status {
				case lockmgr.Blocked:
					res.Waiters++
				case lockmgr.Granted:
					// What blocked it stayed behind: it is granted now,
					// pending its callback like any grant.
					res.Waiters++
					restore(w)
				default:
					res.Refused++
				}
			}
			for j := range sf.Shares {
				sh := &sf.Shares[j]
				host := b.Host(dlm.HostKey{VIP: vs.Addr(), Name: sh.Name, Addr: sh.Addr.Unmap()})
				r := s.mgr.Share(f, &lockmgr.ShareArgs{Host: host, OH: sh.OH, Mode: sh.Mode, Access: sh.Access,
					Reclaim: true, InGrace: true, Epoch: vs.Epoch()})
				if r.Status == lockmgr.Granted {
					res.Shares++
				} else {
					res.Refused++
				}
			}
			return nil
		})
		if err != nil {
			return out, err
		}
		if res.Refused > 0 {
			s.log.Warn("nlm: snapshot entries conflict with this node's state; left out", "vip", vs.Addr(),
				"fh", hex.EncodeToString(sf.FH), "refused", res.Refused)
		}
		out.Locks += res.Locks
		out.Pending += res.Pending
		out.Stale += res.Stale
		out.Waiters += res.Waiters
		out.Shares += res.Shares
		out.Refused += res.Refused
		s.cb.grant(grants)
	}
	return out, nil
}

// PurgeVIP drops what the clients of a virtual server did not reclaim in
// its grace period: its state stamped with an epoch older than the
// current one.
//
// What is purged is what was reclaimable: the records stamped below the
// virtual server's reclaim floor when a shared backend kept them, else
// below its epoch (a snapshot's records were re-stamped as installed).
func (s *Service) PurgeVIP(ctx context.Context, vs *virtualserver.Server) error {
	below := vs.ReclaimFloor()
	if below == 0 {
		below = vs.Epoch()
	}
	_, err := s.DropHosts(ctx, dlm.Selector{VIP: vs.Addr(), Below: below}, vs.Claim())
	return err
}

// ---- what the admin sees ---------------------------------------------------

// LockInfo is one held lock or blocked request, for the admin.
type LockInfo struct {
	VIP       netip.Addr `json:"vip"`
	Client    netip.Addr `json:"client"`
	Caller    string     `json:"caller"`
	SVID      int32      `json:"svid"`
	OH        string     `json:"oh,omitempty"` // hex
	FH        string     `json:"fh"`           // hex
	Start     uint64     `json:"start"`
	End       uint64     `json:"end"` // 0: to the end of the file
	Exclusive bool       `json:"exclusive"`
	Blocked   bool       `json:"blocked,omitempty"`
	Since     time.Time  `json:"since,omitzero"`
	Epoch     uint64     `json:"epoch,omitempty"`
}

// LockFilter selects locks; zero fields select everything.
type LockFilter struct {
	VIP    netip.Addr
	Client netip.Addr
	FH     []byte
	Limit  int // 0: no limit
}

// Locks lists the held locks and blocked requests that match f, and
// whether the list was cut at f.Limit.
func (s *Service) Locks(ctx context.Context, f LockFilter) ([]LockInfo, bool, error) {
	var out []LockInfo
	full := false
	keep := func(h *dlm.Host) bool {
		return (!f.VIP.IsValid() || h.VIP == f.VIP.Unmap()) && (!f.Client.IsValid() || h.Addr == f.Client.Unmap())
	}
	add := func(fh string, o *dlm.Owner, oh []byte, r dlm.Range, excl, blocked bool, since uint32, epoch uint64) bool {
		if f.Limit > 0 && len(out) >= f.Limit {
			full = true
			return false
		}
		li := LockInfo{VIP: o.Host.VIP, Client: o.Host.Addr, Caller: o.Host.Name, SVID: o.SVID, OH: hex.EncodeToString(oh),
			FH: hex.EncodeToString([]byte(fh)), Start: r.Start, Exclusive: excl, Blocked: blocked, Epoch: epoch}
		if r.End != dlm.Inf {
			li.End = r.End
		}
		if since != 0 {
			li.Since = time.Unix(int64(since), 0).UTC()
		}
		out = append(out, li)
		return true
	}
	visit := func(file *dlm.File) bool {
		ok := true
		file.All(func(h *dlm.Held) bool {
			if o := h.Owner(); keep(o.Host) {
				ok = add(file.FH(), o, o.OH(), h.Range(), h.Exclusive(), false, h.Lock().Since, h.Epoch())
			}
			return ok
		})
		for _, w := range file.Waiters() {
			if ok && keep(w.Owner.Host) {
				ok = add(file.FH(), w.Owner, w.OH, w.Range, w.Exclusive, true, w.Since, w.Epoch)
			}
		}
		return ok
	}
	var err error
	if len(f.FH) > 0 {
		err = s.cfg.Backend.Read(ctx, f.FH, func(file *dlm.File) { visit(file) })
	} else {
		err = s.cfg.Backend.View(ctx, visit)
	}
	return out, full, err
}

// HostCounts is what one client host holds through one virtual server.
type HostCounts struct {
	Caller                 string
	Locks, Blocked, Shares int64
}

// Hosts returns, per virtual server and client address, what the client
// hosts hold.
func (s *Service) Hosts() map[netip.Addr]map[netip.Addr][]HostCounts {
	out := map[netip.Addr]map[netip.Addr][]HostCounts{}
	s.cfg.Backend.Hosts(func(h *dlm.Host) bool {
		if h.Idle() {
			return true
		}
		m := out[h.VIP]
		if m == nil {
			m = map[netip.Addr][]HostCounts{}
			out[h.VIP] = m
		}
		m[h.Addr] = append(m[h.Addr], HostCounts{Caller: h.Name, Locks: h.Locks(), Blocked: h.Blocked(), Shares: h.Shares()})
		return true
	})
	return out
}

package dlm

import (
	"cmp"
	"encoding/json"
	"errors"
	"fmt"
	"net/netip"
	"slices"
	"time"
)

// Snapshot is the lock state one virtual server held at the end of an
// epoch: what a planned release hands to the next owner, so that clients
// keep their locks without reclaiming. Owners are by value (caller_name,
// client address, svid), so the snapshot outlives the interned records.
type Snapshot struct {
	VIP   netip.Addr     `json:"vip"`
	Epoch uint64         `json:"epoch"`
	Taken time.Time      `json:"taken"`
	Files []SnapshotFile `json:"files"`
}

// SnapshotFile is the state of one file.
type SnapshotFile struct {
	FH      []byte         `json:"fh"`
	Locks   []SnapshotLock `json:"locks,omitempty"`
	Waiters []SnapshotLock `json:"waiters,omitempty"` // in queue order
	// Pending are granted requests whose GRANTED callback was still due:
	// the next owner sends it.
	Pending []SnapshotLock  `json:"pending,omitempty"`
	Shares  []SnapshotShare `json:"shares,omitempty"`
}

// SnapshotLock is a held lock or a blocked request.
type SnapshotLock struct {
	Name      string     `json:"caller"`
	Addr      netip.Addr `json:"addr"`
	SVID      int32      `json:"svid"`
	OH        []byte     `json:"oh,omitempty"`
	Start     uint64     `json:"start"`
	End       uint64     `json:"end"`
	Exclusive bool       `json:"exclusive,omitempty"`
	Since     uint32     `json:"since,omitempty"`
	// A blocked request's callback: the NLM version and transport it came
	// with, and whether it was LOCK_MSG.
	Vers      uint32 `json:"vers,omitempty"`
	Transport uint8  `json:"transport,omitempty"`
	Async     bool   `json:"async,omitempty"`
	// A pending grant's Prev: the owner's own locks the grant replaced.
	Prev []SnapshotLock `json:"prev,omitempty"`
}

// SnapshotShare is a share reservation.
type SnapshotShare struct {
	Name   string     `json:"caller"`
	Addr   netip.Addr `json:"addr"`
	OH     []byte     `json:"oh,omitempty"`
	Mode   uint32     `json:"mode"`
	Access uint32     `json:"access"`
}

// Counts returns the numbers of locks, blocked requests and shares.
func (s *Snapshot) Counts() (locks, waiters, shares int) {
	for _, f := range s.Files {
		locks += len(f.Locks)
		waiters += len(f.Waiters)
		shares += len(f.Shares)
	}
	return
}

// CaptureFile records what the hosts that sel selects hold, wait for and
// share in f, without changing it.
func CaptureFile(f *File, sel Selector) SnapshotFile {
	match := sel.Match
	sf := SnapshotFile{FH: []byte(f.FH())}
	f.All(func(h *Held) bool {
		if o := h.Owner(); match(o.Host) {
			sf.Locks = append(sf.Locks, SnapshotLock{Name: o.Host.Name, Addr: o.Host.Addr, SVID: o.SVID, OH: o.OH(),
				Start: h.start, End: h.end, Exclusive: h.Exclusive(), Since: h.since})
		}
		return true
	})
	for _, w := range f.Waiters() {
		if match(w.Owner.Host) {
			sf.Waiters = append(sf.Waiters, snapshotWaiter(w))
		}
	}
	pending := slices.Clone(f.Pending())
	slices.SortFunc(pending, func(a, b *Waiter) int { return cmp.Compare(a.Seq, b.Seq) })
	for _, p := range pending {
		if match(p.Owner.Host) {
			sl := snapshotWaiter(p)
			for _, l := range p.Prev {
				sl.Prev = append(sl.Prev, SnapshotLock{Name: l.Owner.Host.Name, Addr: l.Owner.Host.Addr, SVID: l.Owner.SVID,
					Start: l.Range.Start, End: l.Range.End, Exclusive: l.Exclusive, Since: l.Since})
			}
			sf.Pending = append(sf.Pending, sl)
		}
	}
	for _, s := range f.Shares() {
		if match(s.Host) {
			sf.Shares = append(sf.Shares, SnapshotShare{Name: s.Host.Name, Addr: s.Host.Addr, OH: s.OH, Mode: s.Mode, Access: s.Access})
		}
	}
	return sf
}

func snapshotWaiter(w *Waiter) SnapshotLock {
	return SnapshotLock{Name: w.Owner.Host.Name, Addr: w.Owner.Host.Addr, SVID: w.Owner.SVID,
		OH: w.OH, Start: w.Range.Start, End: w.Range.End, Exclusive: w.Exclusive, Since: w.Since,
		Vers: w.Vers, Transport: w.Transport, Async: w.Async}
}

// ErrBadSnapshot reports a snapshot that cannot be used.
var ErrBadSnapshot = errors.New("dlm: damaged snapshot")

// MarshalSnapshot encodes s.
func MarshalSnapshot(s *Snapshot) ([]byte, error) { return json.Marshal(s) }

// UnmarshalSnapshot decodes and checks a snapshot.
func UnmarshalSnapshot(b []byte) (*Snapshot, error) {
	var s Snapshot
	if err := json.Unmarshal(b, &s); err != nil {
		return nil, fmt.Errorf("%w: %w", ErrBadSnapshot, err)
	}
	if !s.VIP.IsValid() {
		return nil, fmt.Errorf("%w: no virtual server", ErrBadSnapshot)
	}
	for _, f := range s.Files {
		if len(f.FH) == 0 {
			return nil, fmt.Errorf("%w: a file without a handle", ErrBadSnapshot)
		}
		all := slices.Concat(f.Locks, f.Waiters, f.Pending)
		for _, p := range f.Pending {
			all = append(all, p.Prev...)
		}
		for _, l := range all {
			if !l.Addr.IsValid() || l.Start >= l.End {
				return nil, fmt.Errorf("%w: bad lock %+v", ErrBadSnapshot, l)
			}
		}
		for _, sh := range f.Shares {
			if !sh.Addr.IsValid() {
				return nil, fmt.Errorf("%w: bad share %+v", ErrBadSnapshot, sh)
			}
		}
	}
	return &s, nil
}

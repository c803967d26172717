package lockmgr

import (
	"context"
	"fmt"
	"math/rand/v2"
	"net/netip"
	"testing"

	"github.com/nlmha/nlmha/dlm"
	"github.com/nlmha/nlmha/dlm/memdlm"
)

// The manager is checked against a naive model: every owner's lock mode on
// each byte of a small file, with one last cell standing for [cells-1, EOF).

const cells = 41 // bytes 0..39 plus the tail [40, EOF)

type cellMode uint8

const (
	free cellMode = iota
	shared
	exclusive
)

type model struct {
	owners []*dlm.Owner
	held   map[*dlm.Owner]*[cells]cellMode
	queue  []modelWaiter // blocked requests, in arrival order
}

type modelWaiter struct {
	o    *dlm.Owner
	r    dlm.Range
	excl bool
}

func (m *model) queued(w modelWaiter) int {
	for i, q := range m.queue {
		if q == w {
			return i
		}
	}
	return -1
}

// settle grants queued requests the way POSIX waiters are woken: in
// arrival order, every one that no longer conflicts, again and again until
// none does. It returns them in the order granted.
func (m *model) settle() []modelWaiter {
	var granted []modelWaiter
	for again := true; again; {
		again = false
		for i := 0; i < len(m.queue); i++ {
			w := m.queue[i]
			if m.conflict(w.o, w.r, w.excl) {
				continue
			}
			c := shared
			if w.excl {
				c = exclusive
			}
			m.set(w.o, w.r, c)
			m.queue = append(m.queue[:i], m.queue[i+1:]...)
			i--
			granted = append(granted, w)
			again = true
		}
	}
	return granted
}

func (m *model) span(r dlm.Range) (int, int) {
	if r.End == dlm.Inf {
		return int(r.Start), cells
	}
	return int(r.Start), int(r.End)
}

func (m *model) conflict(o *dlm.Owner, r dlm.Range, excl bool) bool {
	a, b := m.span(r)
	for _, other := range m.owners {
		if other == o {
			continue
		}
		for i := a; i < b; i++ {
			if c := m.held[other][i]; c == exclusive || (c == shared && excl) {
				return true
			}
		}
	}
	return false
}

func (m *model) set(o *dlm.Owner, r dlm.Range, c cellMode) {
	a, b := m.span(r)
	for i := a; i < b; i++ {
		m.held[o][i] = c
	}
}

// modelOps drives both from a byte stream; it is shared by the seeded test
// and the fuzz target.
func modelOps(t *testing.T, ops []byte) {
	b := memdlm.New()
	var mgr Manager
	vip := netip.MustParseAddr("10.0.0.1")
	m := &model{held: map[*dlm.Owner]*[cells]cellMode{}}
	for i := range 4 {
		name := fmt.Sprintf("c%d", i%2)
		o := b.Owner(dlm.OwnerKey{HostKey: dlm.HostKey{VIP: vip, Name: name, Addr: hostAddr(name)}, SVID: int32(i)})
		m.owners = append(m.owners, o)
		m.held[o] = &[cells]cellMode{}
	}
	fh := []byte("f")
	ctx := context.Background()
	for len(ops) >= 4 {
		ops0 := ops[0]
		op, excl, oi, s, l := ops0%4, ops0&0x80 != 0, ops[1]%4, int(ops[2]%(cells-1)), int(ops[3]%12)
		ops = ops[4:]
		o := m.owners[oi]
		r := dlm.Range{Start: uint64(s), End: uint64(s + 1 + l)}
		if r.End > cells-1 || l == 11 {
			r.End = dlm.Inf
		}
		var res Result
		w := modelWaiter{o, r, excl}
		switch op {
		case 0, 1: // lock, blocking or not
			block := ops0&0x40 != 0
			want := m.conflict(o, r, excl)
			b.Update(ctx, fh, dlm.Claim{}, func(f *dlm.File) error {
				res = mgr.Lock(f, &LockArgs{Owner: o, Range: r, Exclusive: excl, Block: block, Epoch: 1})
				return nil
			})
			wantStat := Granted
			if want {
				wantStat = Denied
				if block {
					wantStat = Blocked
				}
			}
			if res.Status != wantStat {
				t.Fatalf("lock %v %v excl=%v block=%v: got %v, want %v", o, r, excl, block, res.Status, wantStat)
			}
			switch {
			case want && block && m.queued(w) < 0:
				m.queue = append(m.queue, w)
			case !want:
				c := shared
				if excl {
					c = exclusive
				}
				m.set(o, r, c)
				if i := m.queued(w); i >= 0 { // satisfied: never granted again
					m.queue = append(m.queue[:i], m.queue[i+1:]...)
				}
			}
		case 2: // unlock
			b.Update(ctx, fh, dlm.Claim{}, func(f *dlm.File) error { res = mgr.Unlock(f, o, r); return nil })
			m.set(o, r, free)
		case 3:
			if ops0&0x20 != 0 { // cancel
				b.Update(ctx, fh, dlm.Claim{}, func(f *dlm.File) error { res = mgr.Cancel(f, o, r, excl); return nil })
				wantStat := Denied
				if i := m.queued(w); i >= 0 {
					wantStat = Granted
					m.queue = append(m.queue[:i], m.queue[i+1:]...)
				}
				if res.Status != wantStat {
					t.Fatalf("cancel %v %v excl=%v: got %v, want %v", o, r, excl, res.Status, wantStat)
				}
				break
			}
			// test
			want := m.conflict(o, r, excl)
			b.Read(ctx, fh, func(f *dlm.File) { res = mgr.Test(f, o, r, excl, false, 0) })
			if want != (res.Status == Denied) {
				t.Fatalf("test %v %v excl=%v: got %v, model conflict=%v", o, r, excl, res.Status, want)
			}
			if res.HasHolder && (res.Holder.Owner == o || !res.Holder.Range.Overlaps(r)) {
				t.Fatalf("test %v %v: bad holder %+v", o, r, res.Holder)
			}
		}
		// What the operation woke must be what the model grants.
		wantGrants := m.settle()
		if len(res.Grants) != len(wantGrants) {
			t.Fatalf("op %d by %v on %v: granted %d waiters, model %d (%v)", op, o, r, len(res.Grants), len(wantGrants), wantGrants)
		}
		for i, g := range res.Grants {
			if got := (modelWaiter{g.Waiter.Owner, g.Waiter.Range, g.Waiter.Exclusive}); got != wantGrants[i] {
				t.Fatalf("grant %d: %v, model %v", i, got, wantGrants[i])
			}
		}
		checkAgainstModel(t, b, m, fh)
	}
}

func checkAgainstModel(t *testing.T, b *memdlm.Backend, m *model, fh []byte) {
	t.Helper()
	got := map[*dlm.Owner]*[cells]cellMode{}
	for _, o := range m.owners {
		got[o] = &[cells]cellMode{}
	}
	count := map[*dlm.Host]int64{}
	b.Read(context.Background(), fh, func(f *dlm.File) {
		n := 0
		var last = map[*dlm.Owner]dlm.Lock{}
		f.All(func(h *dlm.Held) bool {
			n++
			l := h.Lock()
			count[l.Owner.Host]++
			// An owner's ranges are disjoint, and same-mode ones never touch
			// (they would have been merged).
			if p, ok := last[l.Owner]; ok {
				if p.Range.End > l.Range.Start {
					t.Fatalf("owner %v has overlapping ranges %v and %v", l.Owner, p.Range, l.Range)
				}
				if p.Range.End == l.Range.Start && p.Exclusive == l.Exclusive {
					t.Fatalf("owner %v has unmerged ranges %v and %v", l.Owner, p.Range, l.Range)
				}
			}
			last[l.Owner] = l
			c := shared
			if l.Exclusive {
				c = exclusive
			}
			a, e := m.span(l.Range)
			for i := a; i < e; i++ {
				got[l.Owner][i] = c
			}
			return true
		})
		if n != f.Len() {
			t.Fatalf("tree has %d nodes, Len says %d", n, f.Len())
		}
		checkTreap(t, f)
	})
	b.Read(context.Background(), fh, func(f *dlm.File) {
		ws := f.Waiters()
		if len(ws) != len(m.queue) {
			t.Fatalf("%d requests queued, model %d", len(ws), len(m.queue))
		}
		for i, w := range ws {
			if got := (modelWaiter{w.Owner, w.Range, w.Exclusive}); got != m.queue[i] {
				t.Fatalf("queued %d: %v, model %v", i, got, m.queue[i])
			}
		}
	})
	for _, o := range m.owners {
		if *got[o] != *m.held[o] {
			t.Fatalf("owner %v holds\n%v\nmodel says\n%v", o, *got[o], *m.held[o])
		}
	}
	seen := map[*dlm.Host]bool{}
	for _, o := range m.owners {
		if seen[o.Host] {
			continue
		}
		seen[o.Host] = true
		if o.Host.Locks() != count[o.Host] {
			t.Fatalf("host %v counts %d locks, holds %d", o.Host.Name, o.Host.Locks(), count[o.Host])
		}
	}
}

// checkTreap verifies the tree's search order and max-end augmentation
// through the public walk: Overlapping must agree with a linear scan for
// every probe range.
func checkTreap(t *testing.T, f *dlm.File) {
	t.Helper()
	var all []dlm.Lock
	f.All(func(h *dlm.Held) bool { all = append(all, h.Lock()); return true })
	for i := 1; i < len(all); i++ {
		if all[i-1].Range.Start > all[i].Range.Start {
			t.Fatalf("walk out of order: %v before %v", all[i-1].Range, all[i].Range)
		}
	}
	for s := uint64(0); s < cells; s += 3 {
		for _, e := range []uint64{s + 1, s + 5, dlm.Inf} {
			q := dlm.Range{Start: s, End: e}
			var want, got int
			for _, l := range all {
				if l.Range.Overlaps(q) {
					want++
				}
			}
			f.Overlapping(q, func(*dlm.Held) bool { got++; return true })
			if got != want {
				t.Fatalf("Overlapping(%v) found %d locks, a scan finds %d", q, got, want)
			}
		}
	}
}

func TestModel(t *testing.T) {
	r := rand.New(rand.NewPCG(1, 2))
	for range 300 {
		ops := make([]byte, 4*200)
		for i := range ops {
			ops[i] = byte(r.Uint32())
		}
		modelOps(t, ops)
	}
}

func FuzzModel(f *testing.F) {
	f.Add([]byte{0, 0, 0, 5, 0x80, 1, 3, 2, 2, 0, 1, 4})
	f.Add([]byte{1, 2, 10, 11, 0x80, 3, 1, 12, 0, 2, 2, 0, 0})
	// A blocked reader queued before its owner's... : W1 waits on an
	// exclusive lock; W2, the holder asking shared over its own lock,
	// is granted by an unlock elsewhere and lets W1 in.
	f.Add([]byte{0x80, 1, 1, 15, 0x80, 2, 25, 1, 0x40, 0, 16, 0, 0x40, 1, 16, 10, 2, 2, 25, 1})
	f.Fuzz(func(t *testing.T, ops []byte) {
		if len(ops) > 4000 {
			return
		}
		modelOps(t, ops)
	})
}

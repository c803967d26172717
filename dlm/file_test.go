package dlm

import (
	"math/rand/v2"
	"net/netip"
	"slices"
	"testing"
	"unsafe"
)

func testOwners(n int) []*Owner {
	r := NewRegistry()
	var out []*Owner
	for i := range n {
		out = append(out, r.Owner(OwnerKey{HostKey: HostKey{VIP: netip.MustParseAddr("10.0.0.1"), Name: "h", Addr: netip.MustParseAddr("10.1.0.1")}, SVID: int32(i)}))
	}
	return out
}

// The treap against a plain slice: random inserts and removals of disjoint
// per-owner ranges, with every overlap query compared.
func TestTreapAgainstSlice(t *testing.T) {
	rng := rand.New(rand.NewPCG(7, 8))
	owners := testOwners(6)
	for round := range 50 {
		f := NewFile("f")
		e := &Edit{Seed: uint64(round)}
		f.Bind(f.State, e)
		var want []Lock
		for range 400 {
			o := owners[rng.IntN(len(owners))]
			if rng.IntN(3) > 0 {
				s := rng.Uint64N(1000)
				r := Range{Start: s, End: s + 1 + rng.Uint64N(50)}
				if rng.IntN(20) == 0 {
					r.End = Inf
				}
				clash := slices.ContainsFunc(want, func(l Lock) bool { return l.Owner == o && l.Range.Overlaps(r) })
				if clash {
					continue // an owner's ranges are disjoint (the manager's job)
				}
				l := Lock{Owner: o, Range: r, Exclusive: rng.IntN(2) == 0, Epoch: 1}
				f.Insert(l)
				want = append(want, l)
			} else if len(want) > 0 {
				i := rng.IntN(len(want))
				var victim *Held
				f.All(func(h *Held) bool {
					if h.Owner() == want[i].Owner && h.Range() == want[i].Range {
						victim = h
						return false
					}
					return true
				})
				if victim == nil {
					t.Fatalf("lock %v not in the tree", want[i])
				}
				f.Remove(victim)
				want = slices.Delete(want, i, i+1)
			}
			if f.Len() != len(want) {
				t.Fatalf("Len %d, want %d", f.Len(), len(want))
			}
			q := Range{Start: rng.Uint64N(1100)}
			q.End = q.Start + 1 + rng.Uint64N(100)
			var got, exp []Lock
			f.Overlapping(q, func(h *Held) bool { got = append(got, h.Lock()); return true })
			for _, l := range want {
				if l.Range.Overlaps(q) {
					exp = append(exp, l)
				}
			}
			if len(got) != len(exp) {
				t.Fatalf("Overlapping(%v): %d locks, want %d", q, len(got), len(exp))
			}
			for i := 1; i < len(got); i++ {
				if got[i-1].Range.Start > got[i].Range.Start {
					t.Fatal("Overlapping out of order")
				}
			}
		}
		var sum int64
		for _, d := range e.Deltas {
			sum += d.Locks
		}
		if sum != int64(len(want)) {
			t.Fatalf("edit deltas sum to %d locks, %d held", sum, len(want))
		}
	}
}

func TestOverlappingStopsEarly(t *testing.T) {
	o := testOwners(1)[0]
	f := NewFile("f")
	for i := range uint64(10) {
		f.Insert(Lock{Owner: o, Range: Range{Start: i * 10, End: i*10 + 5}})
	}
	n := 0
	f.Overlapping(Range{Start: 0, End: Inf}, func(*Held) bool { n++; return n < 3 })
	if n != 3 {
		t.Fatalf("visited %d after asking to stop at 3", n)
	}
	f.Overlapping(Range{Start: 5, End: 5}, func(*Held) bool { t.Fatal("empty range matched"); return true })
}

func TestEditRecordsDeltas(t *testing.T) {
	owners := testOwners(2)
	f := NewFile("f")
	e := &Edit{}
	f.Bind(f.State, e)
	f.Insert(Lock{Owner: owners[0], Range: Range{0, 10}, Epoch: 3})
	w := &Waiter{Owner: owners[1], Range: Range{0, 10}, Epoch: 3}
	f.AddWaiter(w)
	s := &Share{Host: owners[0].Host, OH: []byte("x"), Epoch: 4}
	f.AddShare(s)
	if !e.Changed || len(e.Deltas) != 3 {
		t.Fatalf("edit %+v", e)
	}
	e.Apply()
	h := owners[0].Host
	if h.Locks() != 1 || h.Blocked() != 1 || h.Shares() != 1 || owners[0].held.Load() != 1 || owners[1].held.Load() != 1 {
		t.Fatalf("counters: locks=%d blocked=%d shares=%d", h.Locks(), h.Blocked(), h.Shares())
	}
	e.Reset()
	f.RemoveWaiter(w)
	f.RemoveShare(s)
	f.RemoveWaiter(w) // twice: no effect
	e.Apply()
	if h.Blocked() != 0 || h.Shares() != 0 || f.more != nil {
		t.Fatal("removal not counted or storage kept")
	}
	var held *Held
	f.All(func(x *Held) bool { held = x; return false })
	e.Reset()
	f.Restamp(held, 9)
	if held.Epoch() != 9 || !e.Changed {
		t.Fatal("restamp not recorded")
	}
	f.Remove(held)
	f.Remove(held) // not in the tree any more: no effect
	if !f.Empty() || f.Len() != 0 {
		t.Fatal("file not empty")
	}
}

func TestRangeHelpers(t *testing.T) {
	a, b := Range{0, 10}, Range{10, 20}
	if a.Overlaps(b) || !a.Touches(b) || !(Range{0, Inf}).Contains(b) || b.Contains(a) {
		t.Fatal("range helpers")
	}
	if a.String() != "[0,10)" || (Range{5, Inf}).String() != "[5,EOF)" {
		t.Fatal("range strings")
	}
}

// A held lock is one 64-byte node: the lock age lives in the padding.
func TestHeldSize(t *testing.T) {
	if n := unsafe.Sizeof(Held{}); n != 64 {
		t.Fatalf("Held is %d bytes, want 64", n)
	}
}

// An edit that touches many owners (a release granting a whole queue)
// keeps one delta per owner, past the point where it indexes them, and
// across Reset.
func TestEditManyOwners(t *testing.T) {
	owners := testOwners(3 * indexFrom)
	f := NewFile("f")
	e := &Edit{}
	f.Bind(f.State, e)
	for round := range 2 {
		var held []*Held
		for i, o := range owners {
			f.Insert(Lock{Owner: o, Range: Range{uint64(i), uint64(i) + 1}, Epoch: 1})
			f.AddWaiter(&Waiter{Owner: o, Range: Range{100, 101}, Epoch: 1})
		}
		f.All(func(h *Held) bool { held = append(held, h); return true })
		for _, h := range held[:len(held)/2] {
			f.Remove(h)
		}
		if len(e.Deltas) != len(owners) {
			t.Fatalf("round %d: %d deltas for %d owners", round, len(e.Deltas), len(owners))
		}
		for i, d := range e.Deltas {
			want := int64(1)
			if i < len(owners)/2 {
				want = 0
			}
			if d.Owner != owners[i] || d.Locks != want || d.Blocked != 1 {
				t.Fatalf("round %d: delta %d = %+v", round, i, d)
			}
		}
		for _, h := range held[len(held)/2:] {
			f.Remove(h)
		}
		f.RemoveWaiters(slices.Clone(f.Waiters()))
		e.Reset()
	}
}

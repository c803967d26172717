package dlm

import (
	"errors"
	"fmt"
	"math/rand/v2"
	"net/netip"
	"slices"
	"strings"
	"testing"
)

// describe renders every record of a state, owners by value, in a fixed
// order: two states that describe alike hold the same records.
func describe(s *State) string {
	var b strings.Builder
	lock := func(l Lock) string {
		return fmt.Sprintf("%v/%d oh=%x %v x=%v since=%d e=%d", l.Owner.Host.HostKey, l.Owner.SVID, l.Owner.OH(), l.Range, l.Exclusive, l.Since, l.Epoch)
	}
	f := &File{State: s}
	// Locks that start alike are ordered by host numbers, which differ
	// between registries: sort.
	var locks []string
	f.All(func(h *Held) bool { locks = append(locks, "lock "+lock(h.Lock())+"\n"); return true })
	slices.Sort(locks)
	b.WriteString(strings.Join(locks, ""))
	waiter := func(kind string, w *Waiter) {
		fmt.Fprintf(&b, "%s %d %s oh=%x v=%d t=%d a=%v\n", kind, w.Seq,
			lock(Lock{Owner: w.Owner, Range: w.Range, Exclusive: w.Exclusive, Since: w.Since, Epoch: w.Epoch}), w.OH, w.Vers, w.Transport, w.Async)
		for _, p := range w.Prev {
			fmt.Fprintf(&b, "  prev %s\n", lock(p))
		}
	}
	for _, w := range f.Waiters() {
		waiter("waiter", w)
	}
	// Pending grants are unordered: sort by number.
	pend := append([]*Waiter(nil), f.Pending()...)
	for i := range pend {
		for j := i + 1; j < len(pend); j++ {
			if pend[j].Seq < pend[i].Seq {
				pend[i], pend[j] = pend[j], pend[i]
			}
		}
	}
	for _, w := range pend {
		waiter("pending", w)
	}
	for _, sh := range f.Shares() {
		fmt.Fprintf(&b, "share %v oh=%x m=%d a=%d e=%d\n", sh.Host.HostKey, sh.OH, sh.Mode, sh.Access, sh.Epoch)
	}
	if s.more != nil {
		fmt.Fprintf(&b, "seq %d\n", s.more.seq)
	}
	return b.String()
}

// randomState builds a state with every kind of record, as the lock
// manager could leave it (each owner's held ranges disjoint).
func randomState(rng *rand.Rand, r *Registry) *State {
	f := NewFile("fh")
	var owners []*Owner
	for i := range 1 + rng.IntN(5) {
		vip := netip.AddrFrom4([4]byte{10, 0, 0, byte(1 + rng.IntN(2))})
		addr := netip.AddrFrom16([16]byte{15: byte(i)})
		if rng.IntN(2) == 0 {
			addr = netip.AddrFrom4([4]byte{192, 0, 2, byte(i)})
		}
		o := r.Owner(OwnerKey{HostKey: HostKey{VIP: vip, Name: fmt.Sprintf("c%d", rng.IntN(3)), Addr: addr}, SVID: int32(rng.Uint32())})
		if rng.IntN(2) == 0 {
			o.SetOH([]byte{byte(i), 1, 2})
		}
		owners = append(owners, o)
	}
	rnd := func() Range {
		s := rng.Uint64N(1000)
		if rng.IntN(5) == 0 {
			return Range{s, Inf}
		}
		return Range{s, s + 1 + rng.Uint64N(100)}
	}
	for range rng.IntN(20) {
		o, rg := owners[rng.IntN(len(owners))], rnd()
		clash := false
		f.Overlapping(rg, func(h *Held) bool { clash = h.Owner() == o; return !clash })
		if !clash {
			f.Insert(Lock{Owner: o, Range: rg, Exclusive: rng.IntN(2) == 0, Since: rng.Uint32(), Epoch: rng.Uint64N(5)})
		}
	}
	mk := func() *Waiter {
		w := &Waiter{Owner: owners[rng.IntN(len(owners))], Range: rnd(), Exclusive: rng.IntN(2) == 0, Epoch: rng.Uint64(),
			Vers: uint32(rng.IntN(5)), Transport: uint8(rng.IntN(3)), Async: rng.IntN(2) == 0, Since: rng.Uint32()}
		if rng.IntN(2) == 0 {
			w.OH = []byte("oh")
		}
		return w
	}
	for range rng.IntN(4) {
		f.AddWaiter(mk())
	}
	for range rng.IntN(4) {
		p := mk()
		for range rng.IntN(3) {
			p.Prev = append(p.Prev, Lock{Owner: p.Owner, Range: rnd(), Epoch: 1})
		}
		f.AddPending(p)
	}
	for range rng.IntN(3) {
		f.AddShare(&Share{Host: owners[rng.IntN(len(owners))].Host, OH: []byte("s"), Mode: rng.Uint32N(4), Access: rng.Uint32N(4), Epoch: rng.Uint64()})
	}
	return f.State
}

func TestCodecRoundTrip(t *testing.T) {
	for seed := range uint64(500) {
		rng := rand.New(rand.NewPCG(seed, 1))
		src := NewRegistry()
		s := randomState(rng, src)
		data := AppendState(nil, s)
		// Decoded on another node: another registry.
		got, err := DecodeState("fh", data, NewRegistry())
		if err != nil {
			t.Fatalf("seed %d: %v", seed, err)
		}
		if want, have := describe(s), describe(got); want != have {
			t.Fatalf("seed %d: round trip differs\nwant:\n%s\ngot:\n%s", seed, want, have)
		}
		again, err := DecodeState("fh", AppendState(nil, got), src)
		if err != nil || describe(again) != describe(s) {
			t.Fatalf("seed %d: re-encoding differs (%v)", seed, err)
		}
	}
}

func TestCodecRefuses(t *testing.T) {
	r := NewRegistry()
	o := r.Owner(OwnerKey{HostKey: HostKey{VIP: netip.MustParseAddr("10.0.0.1"), Name: "c"}, SVID: 1})
	f := NewFile("fh")
	f.Insert(Lock{Owner: o, Range: Range{0, 10}, Exclusive: true})
	f.Insert(Lock{Owner: o, Range: Range{20, 30}})
	good := AppendState(nil, f.State)
	if _, err := DecodeState("fh", good, r); err != nil {
		t.Fatal(err)
	}
	cases := map[string][]byte{
		"empty":    nil,
		"version":  append([]byte{9}, good[1:]...),
		"trailing": append(append([]byte(nil), good...), 0),
		"short":    good[:len(good)-1],
	}
	// The same owner holding two overlapping ranges cannot be stored.
	g := NewFile("fh")
	g.Insert(Lock{Owner: o, Range: Range{0, 10}})
	g.Insert(Lock{Owner: o, Range: Range{5, 30}})
	cases["overlap"] = AppendState(nil, g.State)
	for name, data := range cases {
		if _, err := DecodeState("fh", data, r); !errors.Is(err, ErrCorrupt) {
			t.Errorf("%s: %v, want ErrCorrupt", name, err)
		}
	}
}

func FuzzDecodeState(f *testing.F) {
	for seed := range uint64(20) {
		rng := rand.New(rand.NewPCG(seed, 2))
		f.Add(AppendState(nil, randomState(rng, NewRegistry())))
	}
	f.Fuzz(func(t *testing.T, data []byte) {
		r := NewRegistry()
		s, err := DecodeState("fh", data, r)
		if err != nil {
			if !errors.Is(err, ErrCorrupt) {
				t.Fatalf("error not ErrCorrupt: %v", err)
			}
			return
		}
		// What decodes re-encodes to something that decodes alike.
		again, err := DecodeState("fh", AppendState(nil, s), r)
		if err != nil {
			t.Fatalf("re-encoded state refused: %v", err)
		}
		if describe(s) != describe(again) {
			t.Fatalf("re-encoding changed the state:\n%s\nvs\n%s", describe(s), describe(again))
		}
	})
}

package memdlm

import (
	"fmt"
	"math/rand/v2"
	"testing"

	"github.com/nlmha/nlmha/dlm"
)

// The table against a Go map: random inserts and deletes, with hashes drawn
// from a small space so that probe runs collide, wrap around and shift back.
func TestFileTable(t *testing.T) {
	rng := rand.New(rand.NewPCG(3, 4))
	for _, hashSpace := range []uint64{7, 64, 1 << 40} {
		var tab fileTable
		want := map[string]*dlm.State{}
		hashes := map[string]uint64{}
		for step := range 20000 {
			key := fmt.Sprintf("fh-%d", rng.IntN(500))
			h, ok := hashes[key]
			if !ok {
				h = rng.Uint64N(hashSpace)
				hashes[key] = h
			}
			got := tab.get(h, []byte(key))
			if got != want[key] {
				t.Fatalf("step %d: get(%s) = %v, want %v", step, key, got, want[key])
			}
			if got == nil {
				st := dlm.NewState(key)
				tab.put(h, st)
				want[key] = st
			} else if rng.IntN(2) == 0 {
				tab.del(h, got)
				delete(want, key)
			}
			if tab.n != len(want) {
				t.Fatalf("step %d: n = %d, want %d", step, tab.n, len(want))
			}
		}
		seen := 0
		tab.each(func(st *dlm.State) bool {
			if want[st.FH()] != st {
				t.Fatalf("each visited a stale entry %s", st.FH())
			}
			seen++
			return true
		})
		if seen != len(want) {
			t.Fatalf("each saw %d of %d", seen, len(want))
		}
	}
}

// Emptied files are parked (no map churn) and the oldest leaves the table
// when the ring is full; they never show in Files or View.
func TestIdleRing(t *testing.T) {
	b := New()
	o := b.Owner(dlm.OwnerKey{SVID: 1})
	for i := range 100 {
		fh := []byte(fmt.Sprintf("f%d", i))
		b.Update(t.Context(), fh, dlm.Claim{}, func(f *dlm.File) error {
			f.Insert(dlm.Lock{Owner: o, Range: dlm.Range{Start: 0, End: 1}})
			return nil
		})
		b.Update(t.Context(), fh, dlm.Claim{}, func(f *dlm.File) error {
			f.All(func(h *dlm.Held) bool { f.Remove(h); return false })
			return nil
		})
	}
	if n := b.Files(); n != 0 {
		t.Fatalf("Files = %d", n)
	}
	total := 0
	for i := range b.shards {
		total += b.shards[i].files.n
		if len(b.shards[i].idle) > maxIdle {
			t.Fatal("idle ring overflows")
		}
	}
	if total > nShards*maxIdle {
		t.Fatalf("%d empty files kept", total)
	}
	b.View(t.Context(), func(f *dlm.File) bool { t.Fatal("View shows an empty file"); return false })
}

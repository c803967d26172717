// Package dlmtest is the contract every dlm.Backend must meet, as tests a
// backend package runs against itself: dlmtest.Run(t, newBackend).
package dlmtest

import (
	"context"
	"errors"
	"fmt"
	"net/netip"
	"sync"
	"testing"

	"github.com/nlmha/nlmha/dlm"
)

var vipA, vipB = netip.MustParseAddr("10.0.0.1"), netip.MustParseAddr("10.0.0.2")

func owner(b dlm.Backend, vip netip.Addr, name string, svid int32) *dlm.Owner {
	return b.Owner(dlm.OwnerKey{HostKey: dlm.HostKey{VIP: vip, Name: name, Addr: netip.MustParseAddr("192.0.2.1")}, SVID: svid})
}

func insert(b dlm.Backend, fh string, o *dlm.Owner, start uint64) error {
	return b.Update(context.Background(), []byte(fh), func(f *dlm.File) error {
		f.Insert(dlm.Lock{Owner: o, Range: dlm.Range{Start: start, End: start + 1}, Exclusive: true, Epoch: 1})
		return nil
	})
}

func files(t *testing.T, b dlm.Backend) map[string]int {
	t.Helper()
	out := map[string]int{}
	err := b.View(context.Background(), func(f *dlm.File) bool {
		out[f.FH()] = f.Len()
		return true
	})
	if err != nil {
		t.Fatal(err)
	}
	return out
}

// Run runs the contract tests against backends made by newBackend.
func Run(t *testing.T, newBackend func(t *testing.T) dlm.Backend) {
	t.Run("UpdatePersists", func(t *testing.T) {
		b := newBackend(t)
		o := owner(b, vipA, "c", 1)
		if err := insert(b, "f1", o, 0); err != nil {
			t.Fatal(err)
		}
		n := -1
		b.Read(context.Background(), []byte("f1"), func(f *dlm.File) { n = f.Len() })
		if n != 1 || o.Host.Locks() != 1 {
			t.Fatalf("after insert: %d locks read, host counts %d", n, o.Host.Locks())
		}
		b.Read(context.Background(), []byte("nothing"), func(f *dlm.File) { n = f.Len() })
		if n != 0 {
			t.Fatal("a file never touched reads as non-empty")
		}
	})
	t.Run("EmptyFilesGo", func(t *testing.T) {
		b := newBackend(t)
		o := owner(b, vipA, "c", 1)
		insert(b, "f1", o, 0)
		b.Update(context.Background(), []byte("f1"), func(f *dlm.File) error {
			f.All(func(h *dlm.Held) bool { f.Remove(h); return false })
			return nil
		})
		// A read-only update of a file without state leaves none behind.
		b.Update(context.Background(), []byte("f2"), func(*dlm.File) error { return nil })
		if got := files(t, b); len(got) != 0 {
			t.Fatalf("files left: %v", got)
		}
		if o.Host.Locks() != 0 {
			t.Fatal("counter not back to zero")
		}
	})
	t.Run("ErrorStoresNothing", func(t *testing.T) {
		b := newBackend(t)
		boom := errors.New("boom")
		err := b.Update(context.Background(), []byte("f1"), func(*dlm.File) error { return boom })
		if !errors.Is(err, boom) || len(files(t, b)) != 0 {
			t.Fatalf("err %v, files %v", err, files(t, b))
		}
	})
	t.Run("UpdateAllMatchesHosts", func(t *testing.T) {
		b := newBackend(t)
		oa, ob := owner(b, vipA, "c", 1), owner(b, vipB, "c", 1)
		insert(b, "f1", oa, 0)
		insert(b, "f2", ob, 0)
		insert(b, "f3", oa, 0)
		insert(b, "f3", ob, 5)
		var seen []string
		err := b.UpdateAll(context.Background(), func(h *dlm.Host) bool { return h.VIP == vipA }, func(f *dlm.File) error {
			seen = append(seen, f.FH())
			var victims []*dlm.Held
			f.All(func(h *dlm.Held) bool {
				if h.Owner().Host.VIP == vipA {
					victims = append(victims, h)
				}
				return true
			})
			for _, h := range victims {
				f.Remove(h)
			}
			return nil
		})
		if err != nil || len(seen) != 2 {
			t.Fatalf("visited %v (%v)", seen, err)
		}
		got := files(t, b)
		if len(got) != 2 || got["f2"] != 1 || got["f3"] != 1 {
			t.Fatalf("after dropping vipA: %v", got)
		}
		if oa.Host.Locks() != 0 || ob.Host.Locks() != 2 {
			t.Fatalf("counters %d %d", oa.Host.Locks(), ob.Host.Locks())
		}
	})
	t.Run("Concurrent", func(t *testing.T) {
		b := newBackend(t)
		var wg sync.WaitGroup
		for g := range 8 {
			wg.Go(func() {
				o := owner(b, vipA, fmt.Sprintf("c%d", g), int32(g))
				for i := range 200 {
					fh := fmt.Sprintf("f%d", i%10)
					if err := insert(b, fh, o, uint64(i)); err != nil {
						t.Error(err)
					}
				}
			})
		}
		wg.Wait()
		total := 0
		for _, n := range files(t, b) {
			total += n
		}
		var counted int64
		b.Hosts(func(h *dlm.Host) bool { counted += h.Locks(); return true })
		if total != 1600 || counted != 1600 {
			t.Fatalf("%d locks stored, hosts count %d, want 1600", total, counted)
		}
	})
	t.Run("Interning", func(t *testing.T) {
		b := newBackend(t)
		first, again := owner(b, vipA, "c", 1), owner(b, vipA, "c", 1)
		if first != again || first == owner(b, vipA, "c", 2) {
			t.Fatal("owners not interned by identity")
		}
		b.Sweep()
	})
	t.Run("Closed", func(t *testing.T) {
		b := newBackend(t)
		b.Close()
		if err := insert(b, "f", owner(b, vipA, "c", 1), 0); !errors.Is(err, dlm.ErrClosed) {
			t.Fatalf("after Close: %v", err)
		}
	})
}

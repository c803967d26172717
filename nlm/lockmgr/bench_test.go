package lockmgr

import (
	"context"
	"fmt"
	"net/netip"
	"runtime"
	"testing"

	"github.com/nlmha/nlmha/dlm"
	"github.com/nlmha/nlmha/dlm/memdlm"
)

// The lock table under load: N locks held, then LOCK+UNLOCK pairs of a
// range nobody holds, through the manager and the in-memory backend (what a
// request costs minus RPC). Two shapes:
//
//	files   every held lock on its own file (per-file overhead dominates)
//	ranges  1000 files, N/1000 locks each (the interval tree works)
//
// It reports ops/s (LOCK and UNLOCK each count) and the heap bytes per held
// lock, everything included: tree nodes, file states, the file map, owners.

type table struct {
	b      *memdlm.Backend
	m      Manager
	owners []*dlm.Owner
}

func newTable(owners int) *table {
	t := &table{b: memdlm.New()}
	vip := netip.MustParseAddr("10.0.0.1")
	for i := range owners {
		name := fmt.Sprintf("client%03d", i%100)
		t.owners = append(t.owners, t.b.Owner(dlm.OwnerKey{
			HostKey: dlm.HostKey{VIP: vip, Name: name, Addr: netip.AddrFrom4([4]byte{10, 1, byte(i / 250), byte(i%250 + 1)})},
			SVID:    int32(i),
		}))
	}
	return t
}

func (t *table) lock(fh []byte, o *dlm.Owner, r dlm.Range) Status {
	var st Status
	t.b.Update(context.Background(), fh, dlm.Claim{}, func(f *dlm.File) error {
		res := t.m.Lock(f, &LockArgs{Owner: o, Range: r, Exclusive: true, Epoch: 1})
		st = res.Status
		return nil
	})
	return st
}

func (t *table) unlock(fh []byte, o *dlm.Owner, r dlm.Range) {
	t.b.Update(context.Background(), fh, dlm.Claim{}, func(f *dlm.File) error {
		t.m.Unlock(f, o, r)
		return nil
	})
}

// fill holds n locks in the given shape and returns the heap it took.
func (t *table) fill(n int, shape string) uint64 {
	before := heap()
	for i := range n {
		var fh []byte
		var r dlm.Range
		switch shape {
		case "files":
			fh = fmt.Appendf(nil, "file-handle-%08d-padding-to-32b", i)
			r = dlm.Range{Start: 0, End: 100}
		default:
			fh = fmt.Appendf(nil, "file-handle-%08d-padding-to-32b", i%1000)
			s := uint64(i/1000) * 200
			r = dlm.Range{Start: s, End: s + 100}
		}
		if t.lock(fh, t.owners[i%len(t.owners)], r) != Granted {
			panic("fill: not granted")
		}
	}
	return heap() - before
}

func heap() uint64 {
	runtime.GC()
	runtime.GC()
	var ms runtime.MemStats
	runtime.ReadMemStats(&ms)
	return ms.HeapAlloc
}

func BenchmarkLockTable(b *testing.B) {
	for _, shape := range []string{"files", "ranges"} {
		for _, n := range []int{1_000, 100_000, 1_000_000} {
			b.Run(fmt.Sprintf("%s/held=%d", shape, n), func(b *testing.B) {
				t := newTable(1000)
				bytes := t.fill(n, shape)
				// The measured pairs: fresh files (shape files) or free
				// ranges between the held ones (shape ranges).
				fhs := make([][]byte, 1024)
				for i := range fhs {
					if shape == "files" {
						fhs[i] = fmt.Appendf(nil, "bench-handle-%08d-padding-to-32b", i)
					} else {
						fhs[i] = fmt.Appendf(nil, "file-handle-%08d-padding-to-32b", i%1000)
					}
				}
				o := t.owners[7]
				b.ReportAllocs()
				b.ResetTimer()
				i := 0
				for b.Loop() {
					fh := fhs[i&1023]
					s := uint64(i%(n/1000+1))*200 + 120 // a gap between held ranges
					r := dlm.Range{Start: s, End: s + 50}
					if t.lock(fh, o, r) != Granted {
						b.Fatal("not granted")
					}
					t.unlock(fh, o, r)
					i++
				}
				b.ReportMetric(2*float64(b.N)/b.Elapsed().Seconds(), "ops/s")
				b.ReportMetric(float64(bytes)/float64(n), "B/lock")
			})
		}
	}
}

// BenchmarkTestConflict is a TEST that finds a conflict among many locks
// on one file: O(log n) through the interval tree.
func BenchmarkTestConflict(b *testing.B) {
	t := newTable(1000)
	t.fill(100_000, "ranges")
	fh := []byte(fmt.Sprintf("file-handle-%08d-padding-to-32b", 5))
	o := t.owners[999]
	b.ReportAllocs()
	i := 0
	for b.Loop() {
		s := uint64(i%100) * 200
		var res Result
		t.b.Read(context.Background(), fh, func(f *dlm.File) { res = t.m.Test(f, o, dlm.Range{Start: s + 50, End: s + 60}, true, false, 0) })
		if res.Status != Denied {
			b.Fatal(res.Status)
		}
		i++
	}
}

// BenchmarkWakeMany is the release that grants n blocked requests at once:
// a whole-file lock is unlocked while n other owners wait each for one
// byte of it (issue 10's fan-out). The reply waits for this, so the cost
// per grant must stay flat in n; it reports ns per grant.
func BenchmarkWakeMany(b *testing.B) {
	for _, n := range []int{100, 1000, 10000} {
		b.Run(fmt.Sprintf("waiters=%d", n), func(b *testing.B) {
			t := newTable(n + 1)
			fh := []byte("file-handle-wake-many-padded-32b")
			holder, whole := t.owners[n], dlm.Range{Start: 0, End: dlm.Inf}
			for b.Loop() {
				b.StopTimer()
				if t.lock(fh, holder, whole) != Granted {
					b.Fatal("the holder's lock was not granted")
				}
				for i := range n {
					var st Status
					t.b.Update(context.Background(), fh, dlm.Claim{}, func(f *dlm.File) error {
						st = t.m.Lock(f, &LockArgs{Owner: t.owners[i], Range: dlm.Range{Start: uint64(i), End: uint64(i) + 1},
							Exclusive: true, Block: true, Epoch: 1}).Status
						return nil
					})
					if st != Blocked {
						b.Fatalf("waiter %d: %v", i, st)
					}
				}
				b.StartTimer()
				var grants []Grant
				t.b.Update(context.Background(), fh, dlm.Claim{}, func(f *dlm.File) error {
					grants = t.m.Unlock(f, holder, whole).Grants
					return nil
				})
				b.StopTimer()
				if len(grants) != n {
					b.Fatalf("%d grants, want %d", len(grants), n)
				}
				// Their callbacks answered.
				t.b.Update(context.Background(), fh, dlm.Claim{}, func(f *dlm.File) error {
					for _, g := range grants {
						t.m.Settle(f, g.Waiter)
					}
					return nil
				})
				for i := range n {
					t.unlock(fh, t.owners[i], dlm.Range{Start: uint64(i), End: uint64(i) + 1})
				}
				b.StartTimer()
			}
			b.ReportMetric(float64(b.Elapsed().Nanoseconds())/float64(b.N)/float64(n), "ns/grant")
		})
	}
}

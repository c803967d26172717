// Package dlmtest is the contract every dlm.Backend must meet, as tests a
// backend package runs against itself: dlmtest.Run(t, newBackend).
package dlmtest

import (
	"context"
	"errors"
	"fmt"
	"math/rand/v2"
	"net/netip"
	"os"
	"strconv"
	"sync"
	"testing"
	"time"

	"github.com/nlmha/nlmha/dlm"
	"github.com/nlmha/nlmha/nlm/lockmgr"
)

var vipA, vipB = netip.MustParseAddr("10.0.0.1"), netip.MustParseAddr("10.0.0.2")

func owner(b dlm.Backend, vip netip.Addr, name string, svid int32) *dlm.Owner {
	return b.Owner(dlm.OwnerKey{HostKey: dlm.HostKey{VIP: vip, Name: name, Addr: netip.MustParseAddr("192.0.2.1")}, SVID: svid})
}

// claimed returns the claim of o's virtual server at epoch 1, which every
// case's backend starts with.
func claimed(o *dlm.Owner) dlm.Claim { return dlm.Claim{VIP: o.Host.VIP, Epoch: 1} }

func insert(b dlm.Backend, fh string, o *dlm.Owner, start uint64) error {
	return b.Update(context.Background(), []byte(fh), claimed(o), func(f *dlm.File) error {
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

// stamps reads the held locks of a file: start to epoch.
func stamps(t *testing.T, b dlm.Backend, fh string) map[uint64]uint64 {
	t.Helper()
	got := map[uint64]uint64{}
	err := b.Read(context.Background(), []byte(fh), func(f *dlm.File) {
		f.All(func(h *dlm.Held) bool { got[h.Range().Start] = h.Epoch(); return true })
	})
	if err != nil {
		t.Fatal(err)
	}
	return got
}

// Run runs the contract tests against backends made by newBackend.
func Run(t *testing.T, newBackend0 func(t *testing.T) dlm.Backend) {
	// Every case starts with vipA and vipB claimed active at epoch 1.
	newBackend := func(t *testing.T) dlm.Backend {
		t.Helper()
		b := newBackend0(t)
		for _, vip := range []netip.Addr{vipA, vipB} {
			if err := b.SetClaim(context.Background(), dlm.Claim{VIP: vip, Epoch: 1}, dlm.ClaimActive); err != nil {
				t.Fatal(err)
			}
		}
		return b
	}
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
		b.Update(context.Background(), []byte("f1"), claimed(o), func(f *dlm.File) error {
			f.All(func(h *dlm.Held) bool { f.Remove(h); return false })
			return nil
		})
		// A read-only update of a file without state leaves none behind.
		b.Update(context.Background(), []byte("f2"), claimed(o), func(*dlm.File) error { return nil })
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
		err := b.Update(context.Background(), []byte("f1"), dlm.Claim{VIP: vipA, Epoch: 1}, func(*dlm.File) error { return boom })
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
		seen := map[string]bool{} // assigned, not appended: fn may run more than once
		err := b.UpdateAll(context.Background(), dlm.Selector{VIP: vipA}, claimed(oa), func(f *dlm.File) error {
			seen[f.FH()] = true
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
	t.Run("ReclaimRestamps", func(t *testing.T) {
		// A durable backend keeps a virtual server's records across its
		// takeover: a reclaim in the next epoch re-stamps them in place,
		// locks and shares alike, and what a later read sees is the new
		// stamp, with the counters unmoved.
		b := newBackend(t)
		o := owner(b, vipA, "c", 1)
		var m lockmgr.Manager
		ctx := context.Background()
		fh := []byte("f1")
		r := dlm.Range{Start: 0, End: 10}
		c := dlm.Claim{VIP: vipA, Epoch: 1}
		apply := func(fn func(f *dlm.File) lockmgr.Result) lockmgr.Status {
			var st lockmgr.Status
			if err := b.Update(ctx, fh, c, func(f *dlm.File) error { st = fn(f).Status; return nil }); err != nil {
				t.Fatal(err)
			}
			return st
		}
		share := lockmgr.ShareArgs{Host: o.Host, OH: []byte("oh"), Mode: 2, Access: 3, Epoch: 1}
		if apply(func(f *dlm.File) lockmgr.Result {
			return m.Lock(f, &lockmgr.LockArgs{Owner: o, Range: r, Exclusive: true, Epoch: 1})
		}) != lockmgr.Granted || apply(func(f *dlm.File) lockmgr.Result { return m.Share(f, &share) }) != lockmgr.Granted {
			t.Fatal("epoch 1: not granted")
		}
		// The takeover: the records stay, the claim moves on.
		c.Epoch = 2
		if err := b.SetClaim(ctx, c, dlm.ClaimActive); err != nil {
			t.Fatal(err)
		}
		share.Reclaim, share.InGrace, share.Epoch, share.Floor = true, true, 2, 2
		if apply(func(f *dlm.File) lockmgr.Result {
			return m.Lock(f, &lockmgr.LockArgs{Owner: o, Range: r, Exclusive: true, Reclaim: true, InGrace: true, Epoch: 2, Floor: 2})
		}) != lockmgr.Granted || apply(func(f *dlm.File) lockmgr.Result { return m.Share(f, &share) }) != lockmgr.Granted {
			t.Fatal("epoch 2: reclaims not granted")
		}
		var lockEpoch, shareEpoch uint64
		n := 0
		b.Read(ctx, fh, func(f *dlm.File) {
			f.All(func(h *dlm.Held) bool { lockEpoch = h.Epoch(); n++; return true })
			for _, s := range f.Shares() {
				shareEpoch = s.Epoch
			}
		})
		if n != 1 || lockEpoch != 2 || shareEpoch != 2 {
			t.Fatalf("after the reclaims: %d locks, lock epoch %d, share epoch %d; want 1, 2, 2", n, lockEpoch, shareEpoch)
		}
		if o.Host.Locks() != 1 || o.Host.Shares() != 1 {
			t.Fatalf("counters: %d locks, %d shares; want 1, 1", o.Host.Locks(), o.Host.Shares())
		}
	})
	t.Run("GraceFloor", func(t *testing.T) {
		// In grace with a floor, a request that conflicts with a record
		// not reclaimed yet stores nothing; one that conflicts with
		// nothing is stored at once with the new epoch.
		b := newBackend(t)
		holder, other := owner(b, vipA, "c", 1), owner(b, vipA, "d", 1)
		var m lockmgr.Manager
		ctx := context.Background()
		lock := func(o *dlm.Owner, start uint64, epoch, floor uint64, grace bool) lockmgr.Status {
			var st lockmgr.Status
			if err := b.Update(ctx, []byte("f1"), dlm.Claim{VIP: vipA, Epoch: epoch}, func(f *dlm.File) error {
				st = m.Lock(f, &lockmgr.LockArgs{Owner: o, Range: dlm.Range{Start: start, End: start + 10}, Exclusive: true,
					InGrace: grace, Epoch: epoch, Floor: floor}).Status
				return nil
			}); err != nil {
				t.Fatal(err)
			}
			return st
		}
		if st := lock(holder, 0, 1, 0, false); st != lockmgr.Granted {
			t.Fatalf("epoch 1: %v", st)
		}
		if err := b.SetClaim(ctx, dlm.Claim{VIP: vipA, Epoch: 2}, dlm.ClaimActive); err != nil {
			t.Fatal(err)
		}
		if st := lock(other, 5, 2, 2, true); st != lockmgr.DeniedGrace {
			t.Fatalf("over a reclaimable record: %v, want DENIED_GRACE_PERIOD", st)
		}
		if st := lock(other, 100, 2, 2, true); st != lockmgr.Granted {
			t.Fatalf("over nothing: %v, want GRANTED", st)
		}
		got := map[uint64]uint64{}
		b.Read(ctx, []byte("f1"), func(f *dlm.File) {
			f.All(func(h *dlm.Held) bool { got[h.Range().Start] = h.Epoch(); return true })
		})
		if len(got) != 2 || got[0] != 1 || got[100] != 2 || other.Host.Locks() != 1 {
			t.Fatalf("stored %v (start: epoch), other host counts %d; want map[0:1 100:2], 1", got, other.Host.Locks())
		}
	})
	t.Run("Fencing", func(t *testing.T) {
		// A takeover moves vipA's claim to epoch 2. An edit under the old
		// claim fails with ErrFenced and changes nothing, and the old
		// claim cannot come back; under the new claim, an unlock that
		// leaves a piece of an epoch-1 lock succeeds, the piece keeping
		// its stamp.
		b := newBackend(t)
		o := owner(b, vipA, "c", 1)
		var m lockmgr.Manager
		ctx := context.Background()
		old, cur := dlm.Claim{VIP: vipA, Epoch: 1}, dlm.Claim{VIP: vipA, Epoch: 2}
		if err := b.Update(ctx, []byte("f1"), old, func(f *dlm.File) error {
			m.Lock(f, &lockmgr.LockArgs{Owner: o, Range: dlm.Range{Start: 0, End: 10}, Exclusive: true, Epoch: 1})
			return nil
		}); err != nil {
			t.Fatal(err)
		}
		if err := b.SetClaim(ctx, cur, dlm.ClaimActive); err != nil {
			t.Fatal(err)
		}
		err := b.Update(ctx, []byte("f1"), old, func(f *dlm.File) error {
			m.Lock(f, &lockmgr.LockArgs{Owner: o, Range: dlm.Range{Start: 20, End: 30}, Exclusive: true, Epoch: 1})
			return nil
		})
		if !errors.Is(err, dlm.ErrFenced) {
			t.Fatalf("edit under a claim taken over: %v, want ErrFenced", err)
		}
		if err := b.SetClaim(ctx, old, dlm.ClaimActive); !errors.Is(err, dlm.ErrFenced) {
			t.Fatalf("claiming an older epoch again: %v, want ErrFenced", err)
		}
		if got := stamps(t, b, "f1"); len(got) != 1 || got[0] != 1 || o.Host.Locks() != 1 {
			t.Fatalf("after the fenced edit: %v (start: epoch), host counts %d; want map[0:1], 1", got, o.Host.Locks())
		}
		var st lockmgr.Status
		if err := b.Update(ctx, []byte("f1"), cur, func(f *dlm.File) error {
			st = m.Unlock(f, o, dlm.Range{Start: 5, End: 10}).Status
			return nil
		}); err != nil || st != lockmgr.Granted {
			t.Fatalf("unlock under the new claim of part of an epoch-1 lock: %v %v", st, err)
		}
		if got := stamps(t, b, "f1"); len(got) != 1 || got[0] != 1 {
			t.Fatalf("after the unlock: %v, want map[0:1] (the piece left keeps its stamp)", got)
		}
	})
	t.Run("ReleaseFences", func(t *testing.T) {
		// Releasing: single-file edits under the claim fail, the release's
		// bulk edit runs; released: nothing runs. Other claims, and an
		// unfenced edit, are not affected; a claim never made fences.
		b := newBackend(t)
		oa, ob := owner(b, vipA, "c", 1), owner(b, vipB, "c", 1)
		ctx := context.Background()
		insert(b, "f1", oa, 0)
		insert(b, "f1", ob, 5)
		c := claimed(oa)
		if err := b.SetClaim(ctx, c, dlm.ClaimReleasing); err != nil {
			t.Fatal(err)
		}
		if err := insert(b, "f2", oa, 0); !errors.Is(err, dlm.ErrFenced) {
			t.Fatalf("update while releasing: %v, want ErrFenced", err)
		}
		if err := insert(b, "f2", ob, 0); err != nil {
			t.Fatalf("update of another virtual server: %v", err)
		}
		drop := func(f *dlm.File) error {
			var gone []*dlm.Held
			f.All(func(h *dlm.Held) bool {
				if h.Owner().Host.VIP == vipA {
					gone = append(gone, h)
				}
				return true
			})
			for _, h := range gone {
				f.Remove(h)
			}
			return nil
		}
		if err := b.UpdateAll(ctx, dlm.Selector{VIP: vipA}, c, drop); err != nil {
			t.Fatalf("the release's bulk edit: %v", err)
		}
		if oa.Host.Locks() != 0 || ob.Host.Locks() != 2 {
			t.Fatalf("after the release: counts %d %d, want 0 2", oa.Host.Locks(), ob.Host.Locks())
		}
		if err := b.SetClaim(ctx, c, dlm.ClaimReleased); err != nil {
			t.Fatal(err)
		}
		if err := b.UpdateAll(ctx, dlm.Selector{VIP: vipA}, c, drop); !errors.Is(err, dlm.ErrFenced) {
			t.Fatalf("bulk edit once released: %v, want ErrFenced", err)
		}
		if err := b.SetClaim(ctx, c, dlm.ClaimActive); !errors.Is(err, dlm.ErrFenced) {
			t.Fatalf("a released claim made active again: %v, want ErrFenced", err)
		}
		never := dlm.Claim{VIP: netip.MustParseAddr("10.0.0.3"), Epoch: 1}
		if err := b.Update(ctx, []byte("f3"), never, func(*dlm.File) error { return nil }); !errors.Is(err, dlm.ErrFenced) {
			t.Fatalf("update under a claim never made: %v, want ErrFenced", err)
		}
		if err := b.Update(ctx, []byte("f1"), dlm.Claim{}, func(f *dlm.File) error {
			f.All(func(h *dlm.Held) bool { f.Remove(h); return false })
			return nil
		}); err != nil || ob.Host.Locks() != 1 {
			t.Fatalf("unfenced edit: %v, counts %d", err, ob.Host.Locks())
		}
	})
	t.Run("WaiterOrder", func(t *testing.T) {
		// Blocked requests are numbered as they queue, read back in that
		// order, and granted first come, first served.
		b := newBackend(t)
		var m lockmgr.Manager
		ctx := context.Background()
		holder := owner(b, vipA, "h", 1)
		c := claimed(holder)
		lock := func(o *dlm.Owner, block bool) lockmgr.Result {
			var res lockmgr.Result
			if err := b.Update(ctx, []byte("f1"), c, func(f *dlm.File) error {
				res = m.Lock(f, &lockmgr.LockArgs{Owner: o, Range: dlm.Range{Start: 0, End: 10}, Exclusive: true, Block: block, Epoch: 1})
				return nil
			}); err != nil {
				t.Fatal(err)
			}
			return res
		}
		lock(holder, false)
		var queued []*dlm.Owner
		for i := range 5 {
			o := owner(b, vipA, fmt.Sprintf("w%d", i), 1)
			if st := lock(o, true).Status; st != lockmgr.Blocked {
				t.Fatalf("waiter %d: %v", i, st)
			}
			queued = append(queued, o)
		}
		var seqs []uint64
		var order []*dlm.Owner
		b.Read(ctx, []byte("f1"), func(f *dlm.File) {
			for _, w := range f.Waiters() {
				seqs = append(seqs, w.Seq)
				order = append(order, w.Owner)
			}
		})
		for i := range seqs {
			if order[i] != queued[i] || i > 0 && seqs[i] <= seqs[i-1] || seqs[i] == 0 {
				t.Fatalf("queue read back as %v (seq %v), want the arrival order, numbered ascending", order, seqs)
			}
		}
		next := holder
		for i, o := range queued {
			var res lockmgr.Result
			if err := b.Update(ctx, []byte("f1"), c, func(f *dlm.File) error {
				res = m.Unlock(f, next, dlm.Range{Start: 0, End: 10})
				return nil
			}); err != nil {
				t.Fatal(err)
			}
			if len(res.Grants) != 1 || res.Grants[0].Waiter.Owner != o {
				t.Fatalf("unlock %d granted %v, want the waiter queued %d", i, res.Grants, i)
			}
			next = o
		}
	})
	t.Run("PendingGrants", func(t *testing.T) {
		// A granted waiter stays in the file as a pending grant, readable
		// by anyone, until settled or turned down; turning it down gives
		// the owner's replaced lock back.
		b := newBackend(t)
		var m lockmgr.Manager
		ctx := context.Background()
		holder, w := owner(b, vipA, "h", 1), owner(b, vipB, "w", 1)
		r := dlm.Range{Start: 0, End: 10}
		apply := func(c dlm.Claim, fn func(f *dlm.File) lockmgr.Result) lockmgr.Result {
			var res lockmgr.Result
			if err := b.Update(ctx, []byte("f1"), c, func(f *dlm.File) error { res = fn(f); return nil }); err != nil {
				t.Fatal(err)
			}
			return res
		}
		pending := func() []dlm.Waiter {
			var out []dlm.Waiter
			b.Read(ctx, []byte("f1"), func(f *dlm.File) {
				for _, p := range f.Pending() {
					out = append(out, *p)
				}
			})
			return out
		}
		lockArgs := func(o *dlm.Owner, excl, block bool) *lockmgr.LockArgs {
			return &lockmgr.LockArgs{Owner: o, Range: r, Exclusive: excl, Block: block, Epoch: 1, Vers: 4}
		}
		apply(claimed(holder), func(f *dlm.File) lockmgr.Result { return m.Lock(f, lockArgs(holder, false, false)) })
		apply(claimed(w), func(f *dlm.File) lockmgr.Result { return m.Lock(f, lockArgs(w, false, false)) })
		if st := apply(claimed(w), func(f *dlm.File) lockmgr.Result { return m.Lock(f, lockArgs(w, true, true)) }).Status; st != lockmgr.Blocked {
			t.Fatalf("upgrade: %v", st)
		}
		// The holder, through another virtual server, unlocks: the grant
		// is state that the waiter's virtual server can read.
		res := apply(claimed(holder), func(f *dlm.File) lockmgr.Result { return m.Unlock(f, holder, r) })
		p := pending()
		if len(res.Grants) != 1 || len(p) != 1 || p[0].Owner != w || p[0].Range != r || len(p[0].Prev) != 1 {
			t.Fatalf("after the unlock: grants %v, pending %+v; want one pending grant to w with its replaced lock", res.Grants, p)
		}
		if w.Host.Locks() != 1 || w.Host.Blocked() != 0 {
			t.Fatalf("w's counters: %d locks, %d blocked; want 1, 0", w.Host.Locks(), w.Host.Blocked())
		}
		waiter := &p[0] // a copy, as a remote backend would hand over
		apply(claimed(w), func(f *dlm.File) lockmgr.Result { return m.Ungrant(f, waiter) })
		if got := pending(); len(got) != 0 {
			t.Fatalf("after the ungrant: %d pending", len(got))
		}
		var held []dlm.Lock
		b.Read(ctx, []byte("f1"), func(f *dlm.File) { f.All(func(h *dlm.Held) bool { held = append(held, h.Lock()); return true }) })
		if len(held) != 1 || held[0].Owner != w || held[0].Exclusive {
			t.Fatalf("after the ungrant: %+v, want w's shared lock back", held)
		}
		// Granted again, then settled: the lock stays, the record goes.
		apply(claimed(holder), func(f *dlm.File) lockmgr.Result { return m.Lock(f, lockArgs(holder, false, false)) })
		apply(claimed(w), func(f *dlm.File) lockmgr.Result { return m.Lock(f, lockArgs(w, true, true)) })
		apply(claimed(holder), func(f *dlm.File) lockmgr.Result { return m.Unlock(f, holder, r) })
		if p = pending(); len(p) != 1 {
			t.Fatalf("second grant: %d pending", len(p))
		}
		waiter = &p[0]
		apply(claimed(w), func(f *dlm.File) lockmgr.Result { return m.Settle(f, waiter) })
		if got := pending(); len(got) != 0 || w.Host.Locks() != 1 {
			t.Fatalf("after settling: %d pending, %d locks; want 0, 1", len(got), w.Host.Locks())
		}
	})
	t.Run("Counters", func(t *testing.T) {
		// The counters of every host follow every kind of edit, single and
		// bulk, whichever virtual server made it: random, seeded sequences
		// checked against a recount of the stored records.
		seed := uint64(time.Now().UnixNano())
		if s := os.Getenv("NLMHA_DLMTEST_SEED"); s != "" {
			seed, _ = strconv.ParseUint(s, 10, 64)
		}
		for i := range 20 {
			if err := counterSequence(newBackend(t), seed+uint64(i)); err != nil {
				t.Fatalf("seed %d (replay: NLMHA_DLMTEST_SEED=%d): %v", seed+uint64(i), seed+uint64(i), err)
			}
		}
	})
	t.Run("PendingOnlyFiles", func(t *testing.T) {
		// A file whose only record is a pending grant (its owner unlocked
		// before answering the callback) is still reached by a drop of
		// that owner's host, and goes.
		b := newBackend(t)
		ctx := context.Background()
		var m lockmgr.Manager
		holder, w := owner(b, vipA, "h", 1), owner(b, vipA, "w", 1)
		r := dlm.Range{Start: 0, End: 10}
		step := func(fn func(f *dlm.File)) {
			if err := b.Update(ctx, []byte("f1"), claimed(holder), func(f *dlm.File) error { fn(f); return nil }); err != nil {
				t.Fatal(err)
			}
		}
		step(func(f *dlm.File) { m.Lock(f, &lockmgr.LockArgs{Owner: holder, Range: r, Exclusive: true, Epoch: 1}) })
		step(func(f *dlm.File) {
			m.Lock(f, &lockmgr.LockArgs{Owner: w, Range: r, Exclusive: true, Block: true, Epoch: 1})
		})
		step(func(f *dlm.File) { m.Unlock(f, holder, r) })
		step(func(f *dlm.File) { m.Unlock(f, w, r) })
		if got := files(t, b); len(got) != 1 {
			t.Fatalf("files %v, want f1 with its pending grant", got)
		}
		sel := dlm.Selector{Keys: map[dlm.HostKey]bool{w.Host.HostKey: true}}
		if err := b.UpdateAll(ctx, sel, dlm.Claim{}, func(f *dlm.File) error { m.Drop(f, &sel); return nil }); err != nil {
			t.Fatal(err)
		}
		if got := files(t, b); len(got) != 0 {
			t.Fatalf("after dropping the host: files %v, want none", got)
		}
	})
	t.Run("BulkManyFiles", func(t *testing.T) {
		// A drop by host key and a purge below an epoch reach every file
		// concerned however many there are (a shared backend batches them
		// under its request limits), and touch nothing else.
		b := newBackend(t)
		ctx := context.Background()
		var m lockmgr.Manager
		gone, kept := owner(b, vipA, "gone", 1), owner(b, vipA, "kept", 1)
		stale := owner(b, vipB, "stale", 1)
		const n = 3000
		for i := range n {
			fh := []byte(fmt.Sprintf("file-%d", i))
			for j, o := range []*dlm.Owner{gone, kept, stale} {
				start := uint64(10 * j)
				if err := b.Update(ctx, fh, claimed(o), func(f *dlm.File) error {
					m.Lock(f, &lockmgr.LockArgs{Owner: o, Range: dlm.Range{Start: start, End: start + 5}, Exclusive: true, Epoch: 1})
					return nil
				}); err != nil {
					t.Fatal(err)
				}
			}
		}
		drop := dlm.Selector{Keys: map[dlm.HostKey]bool{gone.Host.HostKey: true}}
		if err := b.UpdateAll(ctx, drop, dlm.Claim{}, func(f *dlm.File) error { m.Drop(f, &drop); return nil }); err != nil {
			t.Fatal(err)
		}
		next := dlm.Claim{VIP: vipB, Epoch: 2}
		if err := b.SetClaim(ctx, next, dlm.ClaimActive); err != nil {
			t.Fatal(err)
		}
		purge := dlm.Selector{VIP: vipB, Below: 2}
		if err := b.UpdateAll(ctx, purge, next, func(f *dlm.File) error { m.Drop(f, &purge); return nil }); err != nil {
			t.Fatal(err)
		}
		if gone.Host.Locks() != 0 || stale.Host.Locks() != 0 || kept.Host.Locks() != n {
			t.Fatalf("after the drop and the purge: %d, %d, %d locks; want 0, 0, %d", gone.Host.Locks(), stale.Host.Locks(), kept.Host.Locks(), n)
		}
		if got := files(t, b); len(got) != n {
			t.Fatalf("%d files left, want %d", len(got), n)
		}
		if err := Recount(b); err != nil {
			t.Fatal(err)
		}
	})
	t.Run("Closed", func(t *testing.T) {
		b := newBackend(t)
		b.Close()
		if err := insert(b, "f", owner(b, vipA, "c", 1), 0); !errors.Is(err, dlm.ErrClosed) {
			t.Fatalf("after Close: %v", err)
		}
	})
}

// counterSequence runs random lock manager operations, single-file and
// bulk, on a few files and reports the first step after which a host's
// counters differ from a recount of the stored records.
func counterSequence(b dlm.Backend, seed uint64) error {
	rng := rand.New(rand.NewPCG(seed, seed^0x9e3779b97f4a7c15))
	ctx := context.Background()
	var m lockmgr.Manager
	vips := []netip.Addr{vipA, vipB}
	epochs := map[netip.Addr]uint64{vipA: 1, vipB: 1}
	var owners []*dlm.Owner
	for _, vip := range vips {
		for h := range 3 {
			for svid := range 2 {
				owners = append(owners, owner(b, vip, fmt.Sprintf("h%d", h), int32(svid)))
			}
		}
	}
	var grants []lockmgr.Grant
	for step := range 300 {
		o := owners[rng.IntN(len(owners))]
		vip := o.Host.VIP
		c := dlm.Claim{VIP: vip, Epoch: epochs[vip]}
		fh := []byte(fmt.Sprintf("f%d", rng.IntN(3)))
		start := uint64(rng.IntN(8)) * 10
		r := dlm.Range{Start: start, End: start + uint64(1+rng.IntN(3))*10}
		var what string
		var err error
		edit := func(fn func(f *dlm.File) lockmgr.Result) {
			var got []lockmgr.Grant // the last run's: fn may run more than once
			err = b.Update(ctx, fh, c, func(f *dlm.File) error {
				got = fn(f).Grants
				return nil
			})
			grants = append(grants, got...)
		}
		switch op := rng.IntN(10); {
		case op < 4:
			what = "lock"
			edit(func(f *dlm.File) lockmgr.Result {
				return m.Lock(f, &lockmgr.LockArgs{Owner: o, Range: r, Exclusive: rng.IntN(2) == 0, Block: rng.IntN(2) == 0, Epoch: c.Epoch})
			})
		case op < 6:
			what = "unlock"
			edit(func(f *dlm.File) lockmgr.Result { return m.Unlock(f, o, r) })
		case op < 7:
			what = "share"
			edit(func(f *dlm.File) lockmgr.Result {
				return m.Share(f, &lockmgr.ShareArgs{Host: o.Host, OH: []byte{byte(o.SVID)}, Mode: uint32(rng.IntN(4)), Access: uint32(1 + rng.IntN(3)), Epoch: c.Epoch})
			})
		case op < 8 && len(grants) > 0:
			g := grants[rng.IntN(len(grants))]
			gc := dlm.Claim{VIP: g.Waiter.Owner.Host.VIP, Epoch: epochs[g.Waiter.Owner.Host.VIP]}
			what = "settle or ungrant"
			var got []lockmgr.Grant
			settle := rng.IntN(2) == 0
			err = b.Update(ctx, []byte(g.FH), gc, func(f *dlm.File) error {
				if settle {
					m.Settle(f, g.Waiter)
				} else {
					got = m.Ungrant(f, g.Waiter).Grants
				}
				return nil
			})
			grants = append(grants, got...)
		case op < 9:
			what = "drop a host"
			sel := dlm.Selector{Keys: map[dlm.HostKey]bool{o.Host.HostKey: true}}
			err = b.UpdateAll(ctx, sel, dlm.Claim{}, func(f *dlm.File) error { m.Drop(f, &sel); return nil })
		default:
			// A takeover in place: the claim moves on, and what was not
			// re-stamped is purged under the new claim.
			what = "take over and purge"
			epochs[vip]++
			c = dlm.Claim{VIP: vip, Epoch: epochs[vip]}
			if err = b.SetClaim(ctx, c, dlm.ClaimActive); err == nil {
				sel := dlm.Selector{VIP: vip, Below: c.Epoch}
				err = b.UpdateAll(ctx, sel, c, func(f *dlm.File) error { m.Drop(f, &sel); return nil })
			}
		}
		if err != nil {
			return fmt.Errorf("step %d (%s): %w", step, what, err)
		}
		if err := Recount(b); err != nil {
			return fmt.Errorf("after step %d (%s by %v): %w", step, what, o, err)
		}
	}
	return nil
}

// Recount checks every host's counters against a recount of the records
// the backend stores.
func Recount(b dlm.Backend) error {
	type counts struct{ locks, blocked, shares int64 }
	want := map[*dlm.Host]counts{}
	err := b.View(context.Background(), func(f *dlm.File) bool {
		f.All(func(h *dlm.Held) bool {
			c := want[h.Owner().Host]
			c.locks++
			want[h.Owner().Host] = c
			return true
		})
		for _, w := range f.Waiters() {
			c := want[w.Owner.Host]
			c.blocked++
			want[w.Owner.Host] = c
		}
		for _, s := range f.Shares() {
			c := want[s.Host]
			c.shares++
			want[s.Host] = c
		}
		return true
	})
	if err != nil {
		return err
	}
	var bad error
	b.Hosts(func(h *dlm.Host) bool {
		w := want[h]
		if got := (counts{h.Locks(), h.Blocked(), h.Shares()}); got != w {
			bad = fmt.Errorf("host %v counts %+v, stored records %+v", h.HostKey, got, w)
			return false
		}
		return true
	})
	return bad
}

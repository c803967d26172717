package etcddlm

import (
	"context"
	"errors"
	"fmt"
	"math/rand/v2"
	"net/netip"
	"os"
	"slices"
	"strconv"
	"sync"
	"testing"
	"time"

	"github.com/nlmha/nlmha/dlm"
	"github.com/nlmha/nlmha/dlm/dlmtest"
	"github.com/nlmha/nlmha/nlm/lockmgr"
)

func vip(i int) netip.Addr { return netip.AddrFrom4([4]byte{10, 0, 0, byte(i + 1)}) }

// cluster starts n backends on one prefix, node i claiming vip(i) at
// epoch 1.
func cluster(t *testing.T, n int) []*Backend {
	t.Helper()
	pfx := freshPrefix()
	var bs []*Backend
	for i := range n {
		b := newBackendAt(t, pfx, fmt.Sprintf("n%d", i))
		if err := b.SetClaim(context.Background(), dlm.Claim{VIP: vip(i), Epoch: 1}, dlm.ClaimActive); err != nil {
			t.Fatal(err)
		}
		bs = append(bs, b)
	}
	return bs
}

func seed(t *testing.T) uint64 {
	s := uint64(time.Now().UnixNano())
	if e := os.Getenv("NLMHA_ETCDDLM_SEED"); e != "" {
		s, _ = strconv.ParseUint(e, 10, 64)
	}
	t.Logf("seed %d (replay: NLMHA_ETCDDLM_SEED=%d)", s, s)
	return s
}

// TestNodesShareFiles: three nodes lock and unlock the same few files
// at once, each through its own virtual server, with mirrors that lag
// behind one another. Every owner's idea of what it holds — built from
// the answers it got, the way a client's is — must match the stored
// state at the end, no two owners may hold conflicting ranges, and
// every node's counters and mirror must agree with etcd.
func TestNodesShareFiles(t *testing.T) {
	s0 := seed(t)
	bs := cluster(t, 3)
	const files, owners, steps = 3, 4, 150
	type key struct {
		file  int
		owner *dlm.Owner
	}
	var mu sync.Mutex
	held := map[key][64]int8{} // byte → 0 none, 1 shared, 2 exclusive
	var wg sync.WaitGroup
	errs := make(chan error, len(bs)*owners)
	for n, b := range bs {
		for o := range owners {
			wg.Add(1)
			go func() {
				defer wg.Done()
				rng := rand.New(rand.NewPCG(s0, uint64(n*owners+o)))
				own := b.Owner(dlm.OwnerKey{HostKey: dlm.HostKey{VIP: vip(n), Name: fmt.Sprintf("c%d", n), Addr: netip.MustParseAddr("192.0.2.1")}, SVID: int32(o)})
				c := dlm.Claim{VIP: vip(n), Epoch: 1}
				var m lockmgr.Manager
				for range steps {
					file := rng.IntN(files)
					start := rng.Uint64N(60)
					r := dlm.Range{Start: start, End: start + 1 + rng.Uint64N(64-start)}
					excl := rng.IntN(2) == 0
					unlock := rng.IntN(3) == 0
					var res lockmgr.Result
					err := b.Update(context.Background(), []byte(strconv.Itoa(file)), c, func(f *dlm.File) error {
						if unlock {
							res = m.Unlock(f, own, r)
						} else {
							res = m.Lock(f, &lockmgr.LockArgs{Owner: own, Range: r, Exclusive: excl, Epoch: 1})
						}
						return nil
					})
					if err != nil {
						errs <- err
						return
					}
					if res.Status != lockmgr.Granted {
						continue
					}
					mu.Lock()
					k := key{file, own}
					h := held[k]
					for i := r.Start; i < r.End; i++ {
						switch {
						case unlock:
							h[i] = 0
						case excl:
							h[i] = 2
						default:
							h[i] = 1
						}
					}
					held[k] = h
					mu.Unlock()
				}
			}()
		}
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Fatal(err)
	}
	ctx := context.Background()
	for _, b := range bs {
		if err := b.sync(ctx); err != nil {
			t.Fatal(err)
		}
	}
	// What etcd stores, decoded afresh.
	stored := map[int]*dlm.State{}
	for file := range files {
		resp, err := bs[0].cli.Get(ctx, bs[0].fileKey([]byte(strconv.Itoa(file))))
		if err != nil {
			t.Fatal(err)
		}
		if len(resp.Kvs) > 0 {
			st, err := dlm.DecodeState(strconv.Itoa(file), resp.Kvs[0].Value, bs[0].Registry)
			if err != nil {
				t.Fatal(err)
			}
			stored[file] = st
		}
	}
	for file := range files {
		byOwner := map[dlm.OwnerKey][64]int8{}
		if st := stored[file]; st != nil {
			var f dlm.File
			f.Bind(st, nil)
			var locks []dlm.Lock
			f.All(func(h *dlm.Held) bool { locks = append(locks, h.Lock()); return true })
			for i, a := range locks {
				for _, l := range locks[i+1:] {
					if a.Owner.Key() != l.Owner.Key() && a.Range.Overlaps(l.Range) && (a.Exclusive || l.Exclusive) {
						t.Fatalf("file %d: conflicting holders %v %v and %v %v", file, a.Owner, a.Range, l.Owner, l.Range)
					}
				}
				h := byOwner[a.Owner.Key()]
				for i := a.Range.Start; i < a.Range.End; i++ {
					h[i] = 1
					if a.Exclusive {
						h[i] = 2
					}
				}
				byOwner[a.Owner.Key()] = h
			}
		}
		for k, want := range held {
			if k.file == file && byOwner[k.owner.Key()] != want {
				t.Fatalf("file %d owner %v: stored %v, the owner was told %v", file, k.owner, byOwner[k.owner.Key()], want)
			}
		}
		// Every node's mirror holds what etcd holds.
		for n, b := range bs {
			var mine string
			b.Read(ctx, []byte(strconv.Itoa(file)), func(f *dlm.File) { mine = fmt.Sprint(describeLocks(f)) })
			var theirs string
			if st := stored[file]; st != nil {
				var f dlm.File
				f.Bind(st, nil)
				theirs = fmt.Sprint(describeLocks(&f))
			} else {
				theirs = fmt.Sprint(describeLocks(dlm.NewFile("")))
			}
			if mine != theirs {
				t.Fatalf("node %d's mirror of file %d: %s, etcd: %s", n, file, mine, theirs)
			}
		}
	}
	for n, b := range bs {
		if err := dlmtest.Recount(b); err != nil {
			t.Fatalf("node %d: %v", n, err)
		}
	}
	var st Stats
	for _, b := range bs {
		s := b.Stats()
		st.Txns += s.Txns
		st.Retries += s.Retries
	}
	t.Logf("%d transactions, %d edits run again after a lost race", st.Txns, st.Retries)
	if st.Retries == 0 {
		t.Log("no race was lost: the test did not exercise the Else branch this time")
	}
}

func describeLocks(f *dlm.File) []string {
	var out []string
	f.All(func(h *dlm.Held) bool {
		out = append(out, fmt.Sprintf("%v/%d%v%v", h.Owner().Host.HostKey, h.Owner().SVID, h.Range(), h.Exclusive()))
		return true
	})
	slices.Sort(out) // locks starting alike order by host numbers, which differ between nodes
	return out
}

// TestTakeoverFencesThePreviousNode: node 1 takes node 0's virtual
// server over at a later epoch. Node 0, which does not know yet (its
// local claim still says active), can change nothing any more: its
// transaction fails on the claim key.
func TestTakeoverFencesThePreviousNode(t *testing.T) {
	bs := cluster(t, 2)
	ctx := context.Background()
	var m lockmgr.Manager
	o := bs[0].Owner(dlm.OwnerKey{HostKey: dlm.HostKey{VIP: vip(0), Name: "c"}, SVID: 1})
	lock := func(b *Backend, c dlm.Claim, start uint64) error {
		return b.Update(ctx, []byte("f"), c, func(f *dlm.File) error {
			m.Lock(f, &lockmgr.LockArgs{Owner: o, Range: dlm.Range{Start: start, End: start + 1}, Exclusive: true, Epoch: c.Epoch})
			return nil
		})
	}
	if err := lock(bs[0], dlm.Claim{VIP: vip(0), Epoch: 1}, 0); err != nil {
		t.Fatal(err)
	}
	next := dlm.Claim{VIP: vip(0), Epoch: 2}
	if err := bs[1].SetClaim(ctx, next, dlm.ClaimActive); err != nil {
		t.Fatal(err)
	}
	if err := lock(bs[0], dlm.Claim{VIP: vip(0), Epoch: 1}, 10); !errors.Is(err, dlm.ErrFenced) {
		t.Fatalf("old owner's edit after the takeover: %v, want ErrFenced", err)
	}
	if bs[0].Stats().Fenced != 1 {
		t.Fatalf("fenced count %d, want 1", bs[0].Stats().Fenced)
	}
	// Nor can the old owner claim the virtual server back at its epoch,
	// or the new one's epoch.
	if err := bs[0].SetClaim(ctx, next, dlm.ClaimActive); !errors.Is(err, dlm.ErrFenced) {
		t.Fatalf("old owner claiming the new epoch: %v, want ErrFenced", err)
	}
	if err := lock(bs[1], next, 20); err != nil {
		t.Fatal(err)
	}
	var starts []uint64
	bs[1].Read(ctx, []byte("f"), func(f *dlm.File) {
		f.All(func(h *dlm.Held) bool { starts = append(starts, h.Range().Start); return true })
	})
	if fmt.Sprint(starts) != "[0 20]" {
		t.Fatalf("locks at %v, want [0 20]", starts)
	}
}

// TestSelfFenced: once a node expires itself, nothing fenced runs.
func TestSelfFenced(t *testing.T) {
	bs := cluster(t, 1)
	bs[0].Expire()
	err := bs[0].Update(context.Background(), []byte("f"), dlm.Claim{VIP: vip(0), Epoch: 1}, func(*dlm.File) error { return nil })
	if !errors.Is(err, dlm.ErrFenced) {
		t.Fatalf("after Expire: %v, want ErrFenced", err)
	}
}

// TestMirrorSurvivesCompaction: a watch that falls behind a compaction
// reloads the mirror, and the counters come out right.
func TestMirrorSurvivesCompaction(t *testing.T) {
	bs := cluster(t, 2)
	ctx := context.Background()
	var m lockmgr.Manager
	o := bs[0].Owner(dlm.OwnerKey{HostKey: dlm.HostKey{VIP: vip(0), Name: "c"}, SVID: 1})
	c := dlm.Claim{VIP: vip(0), Epoch: 1}
	// Stop node 1's watch from keeping up: cancel and restart it after a
	// compaction past what it saw.
	bs[1].cancel()
	<-bs[1].done
	for i := range 20 {
		if err := bs[0].Update(ctx, []byte(fmt.Sprint("f", i/2%4)), c, func(f *dlm.File) error {
			if i%2 == 0 {
				m.Lock(f, &lockmgr.LockArgs{Owner: o, Range: dlm.Range{Start: uint64(i), End: uint64(i) + 1}, Exclusive: true, Epoch: 1})
			} else {
				m.Unlock(f, o, dlm.Range{Start: uint64(i - 1), End: uint64(i)})
			}
			return nil
		}); err != nil {
			t.Fatal(err)
		}
	}
	if err := bs[0].Update(ctx, []byte("kept"), c, func(f *dlm.File) error {
		m.Lock(f, &lockmgr.LockArgs{Owner: o, Range: dlm.Range{Start: 0, End: 1}, Epoch: 1})
		return nil
	}); err != nil {
		t.Fatal(err)
	}
	resp, err := bs[0].cli.Get(ctx, "x")
	if err != nil {
		t.Fatal(err)
	}
	if _, err := bs[0].cli.Compact(ctx, resp.Header.Revision); err != nil {
		t.Fatal(err)
	}
	b := bs[1]
	b.ctx, b.cancel = context.WithCancel(context.Background())
	b.done = make(chan struct{})
	b.revMu.Lock()
	rev := b.watchRev
	b.revMu.Unlock()
	go b.watch(rev)
	if err := b.sync(ctx); err != nil {
		t.Fatal(err)
	}
	if b.Stats().Relists == 0 {
		t.Fatal("no reload after the compaction")
	}
	if b.Files() != 1 {
		t.Fatalf("node 1 mirrors %d files, want 1", b.Files())
	}
	if err := dlmtest.Recount(b); err != nil {
		t.Fatal(err)
	}
}

// TestStaleMirrorDecidesNothing: a node whose mirror lags behind (its
// watch stopped here) still answers from etcd's current state: a lock
// that another node released is granted, not denied on the stale view,
// and a TEST does not report it.
func TestStaleMirrorDecidesNothing(t *testing.T) {
	bs := cluster(t, 2)
	ctx := context.Background()
	var m lockmgr.Manager
	oa := bs[0].Owner(dlm.OwnerKey{HostKey: dlm.HostKey{VIP: vip(0), Name: "a"}, SVID: 1})
	ob := bs[1].Owner(dlm.OwnerKey{HostKey: dlm.HostKey{VIP: vip(1), Name: "b"}, SVID: 1})
	r := dlm.Range{Start: 0, End: 10}
	ca, cb := dlm.Claim{VIP: vip(0), Epoch: 1}, dlm.Claim{VIP: vip(1), Epoch: 1}
	if err := bs[0].Update(ctx, []byte("f"), ca, func(f *dlm.File) error {
		m.Lock(f, &lockmgr.LockArgs{Owner: oa, Range: r, Exclusive: true, Epoch: 1})
		return nil
	}); err != nil {
		t.Fatal(err)
	}
	if err := bs[1].sync(ctx); err != nil {
		t.Fatal(err)
	}
	// Node 1 stops hearing of changes; node 0 unlocks.
	bs[1].cancel()
	<-bs[1].done
	if err := bs[0].Update(ctx, []byte("f"), ca, func(f *dlm.File) error { m.Unlock(f, oa, r); return nil }); err != nil {
		t.Fatal(err)
	}
	var test lockmgr.Result
	if err := bs[1].Read(ctx, []byte("f"), func(f *dlm.File) { test = m.Test(f, ob, r, true, false, 0) }); err != nil {
		t.Fatal(err)
	}
	if test.Status != lockmgr.Granted {
		t.Fatalf("TEST through the lagging node: %v (holder %v), want no conflict", test.Status, test.Holder.Owner)
	}
	var st lockmgr.Status
	if err := bs[1].Update(ctx, []byte("f"), cb, func(f *dlm.File) error {
		st = m.Lock(f, &lockmgr.LockArgs{Owner: ob, Range: r, Exclusive: true, Epoch: 1}).Status
		return nil
	}); err != nil {
		t.Fatal(err)
	}
	if st != lockmgr.Granted {
		t.Fatalf("LOCK through the lagging node after the unlock: %v, want GRANTED", st)
	}
}

// Found by a reviewer (each failed before its fix).

// A pending grant this node made itself must not come back through
// RemoteGrants (the node calls it back already).
func TestOwnGrantsNotEchoed(t *testing.T) {
	b := newBackendAt(t, freshPrefix(), "n1")
	c := dlm.Claim{VIP: vip(0), Epoch: 1}
	if err := b.SetClaim(context.Background(), c, dlm.ClaimActive); err != nil {
		t.Fatal(err)
	}
	own := b.Owner(dlm.OwnerKey{HostKey: dlm.HostKey{VIP: vip(0), Name: "c", Addr: netip.MustParseAddr("192.0.2.1")}, SVID: 1})
	dup := 0
	const n = 200
	for i := range n {
		fh := []byte{byte(i), byte(i >> 8)}
		err := b.Update(context.Background(), fh, c, func(f *dlm.File) error {
			f.Insert(dlm.Lock{Owner: own, Range: dlm.Range{Start: 0, End: 1}, Exclusive: true, Epoch: 1})
			f.AddPending(&dlm.Waiter{Owner: own, Range: dlm.Range{Start: 0, End: 1}, Exclusive: true, Epoch: 1})
			return nil
		})
		if err != nil {
			t.Fatal(err)
		}
	}
	deadline := time.After(2 * time.Second)
	for {
		select {
		case <-b.RemoteGrants():
			dup++
			continue
		case <-deadline:
		}
		break
	}
	if dup > 0 {
		t.Errorf("%d of %d grants this node made came back through RemoteGrants (duplicate GRANTED callbacks)", dup, n)
	}
}

// After a rewatch that starts >1000 revisions behind, watchRev (what
// sync() and Sweep trust) runs ahead of the mirror.
func TestWatchRevNeverAheadOfMirror(t *testing.T) {
	pfx := freshPrefix()
	b := newBackendAt(t, pfx, "n1")
	b2 := newBackendAt(t, pfx, "n2")
	ctx := context.Background()
	// Stop b's watch, as a broken stream (leader loss, partition) does.
	b.cancel()
	<-b.done
	b.revMu.Lock()
	from := b.watchRev
	b.revMu.Unlock()
	own := b2.Owner(dlm.OwnerKey{HostKey: dlm.HostKey{VIP: vip(0), Name: "c", Addr: netip.MustParseAddr("192.0.2.1")}, SVID: 1})
	const n = 1500
	for i := range n {
		if err := b2.Update(ctx, []byte(fmt.Sprintf("file%04d", i)), dlm.Claim{}, func(f *dlm.File) error {
			f.Insert(dlm.Lock{Owner: own, Range: dlm.Range{Start: 0, End: 1}, Exclusive: true, Epoch: 1})
			return nil
		}); err != nil {
			t.Fatal(err)
		}
	}
	cur, _ := b.cli.Get(ctx, "x")
	target := cur.Header.Revision
	b.ctx, b.cancel = context.WithCancel(context.Background())
	b.done = make(chan struct{})
	go b.watch(from)
	for {
		b.revMu.Lock()
		have := b.watchRev
		b.revMu.Unlock()
		if have >= target {
			if got := b.Files(); got < n {
				t.Errorf("watchRev %d >= etcd's revision %d, so sync() returns, but the mirror has %d of %d files: UpdateAll (FREE_ALL, purge) and Sweep act on a mirror that misses files", have, target, got, n)
			} else {
				t.Logf("race not caught this time (mirror had all %d files)", got)
			}
			return
		}
	}
}

// A self-fenced node (lease deadline passed) still changes lock state
// through an unfenced bulk edit (Rebooted: a queued reboot notification).
func TestFencedNodeChangesNothing(t *testing.T) {
	pfx := freshPrefix()
	a := newBackendAt(t, pfx, "A")
	c := newBackendAt(t, pfx, "C")
	ctx := context.Background()
	// C took X over (epoch 10) after A's lease expired; c1 locks through C.
	cx := dlm.Claim{VIP: vip(0), Epoch: 10}
	if err := c.SetClaim(ctx, cx, dlm.ClaimActive); err != nil {
		t.Fatal(err)
	}
	key := dlm.HostKey{VIP: vip(0), Name: "c1", Addr: netip.MustParseAddr("192.0.2.1")}
	own := c.Owner(dlm.OwnerKey{HostKey: key, SVID: 1})
	if err := c.Update(ctx, []byte("F"), cx, func(f *dlm.File) error {
		f.Insert(dlm.Lock{Owner: own, Range: dlm.Range{Start: 0, End: 1}, Exclusive: true, Epoch: 10})
		return nil
	}); err != nil {
		t.Fatal(err)
	}
	// A resumes: self-fenced, deadline long past.
	a.SetDeadline(time.Now().Add(-time.Hour))
	a.Expire()
	err := a.UpdateAll(ctx, dlm.Selector{Keys: map[dlm.HostKey]bool{key: true}}, dlm.Claim{}, func(f *dlm.File) error {
		var victims []*dlm.Held
		f.All(func(h *dlm.Held) bool { victims = append(victims, h); return true })
		for _, h := range victims {
			f.Remove(h)
		}
		return nil
	})
	n := -1
	c.Read(ctx, []byte("F"), func(f *dlm.File) { n = f.Len() })
	if err == nil && n == 0 {
		t.Errorf("self-fenced node A removed c1's lock granted by the new owner C (UpdateAll err=%v)", err)
	}
}

package etcddlm

import (
	"context"
	"errors"
	"net/netip"
	"testing"
	"time"

	clientv3 "go.etcd.io/etcd/client/v3"
	"go.uber.org/zap"

	"github.com/nlmha/nlmha/dlm"
	"github.com/nlmha/nlmha/internal/etcdtest"
	"github.com/nlmha/nlmha/nlm/lockmgr"
)

func owners(t *testing.T, b *Backend, ttl time.Duration) *Owners {
	t.Helper()
	o, err := NewOwners(context.Background(), b, OwnersConfig{TTL: ttl})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { o.Close() })
	return o
}

func TestClaimAndHandoff(t *testing.T) {
	ctx := context.Background()
	pfx := freshPrefix()
	a, b := newBackendAt(t, pfx, "a"), newBackendAt(t, pfx, "b")
	oa, ob := owners(t, a, 10*time.Second), owners(t, b, 10*time.Second)
	v := netip.MustParseAddr("10.0.0.9")
	ca, err := oa.Claim(ctx, v)
	if err != nil || ca.Prev != 0 || ca.Handoff != nil {
		t.Fatalf("first claim: %+v %v", ca, err)
	}
	// The epoch is the owner key's creation revision.
	resp, err := a.cli.Get(ctx, oa.ownerKey(v))
	if err != nil || len(resp.Kvs) != 1 || uint64(resp.Kvs[0].CreateRevision) != ca.Epoch || resp.Kvs[0].Lease != int64(oa.Lease()) {
		t.Fatalf("owner key %+v (err %v), want created at %d under lease %x", resp.Kvs, err, ca.Epoch, oa.Lease())
	}
	if err := a.SetClaim(ctx, dlm.Claim{VIP: v, Epoch: ca.Epoch}, dlm.ClaimActive); err != nil {
		t.Fatal(err)
	}
	if _, err := ob.Claim(ctx, v); !errors.Is(err, ErrOwned) {
		t.Fatalf("claim of an owned virtual server: %v, want ErrOwned", err)
	}
	if err := ob.Release(ctx, v, ca.Epoch, nil); !errors.Is(err, ErrLost) {
		t.Fatalf("release by a node that does not own it: %v, want ErrLost", err)
	}
	if err := oa.Release(ctx, v, ca.Epoch, []byte("left")); err != nil {
		t.Fatal(err)
	}
	cb, err := ob.Claim(ctx, v)
	if err != nil || cb.Prev != ca.Epoch || string(cb.Handoff) != "left" || cb.Epoch <= ca.Epoch {
		t.Fatalf("claim after a planned release: %+v %v; want prev %d and the handoff", cb, err, ca.Epoch)
	}
	// The handoff is handed out once.
	if err := ob.Release(ctx, v, cb.Epoch, nil); err != nil {
		t.Fatal(err)
	}
	cc, err := oa.Claim(ctx, v)
	if err != nil || cc.Handoff != nil {
		t.Fatalf("claim after a release without handoff: %+v %v", cc, err)
	}
	_, vss, err := oa.ClusterStatus(ctx)
	if err != nil || len(vss) != 1 || vss[0].Owner != "a" || vss[0].Epoch != cc.Epoch {
		t.Fatalf("cluster status: %+v %v", vss, err)
	}
}

// TestTakeoverAfterExpiryFences: node a owns a virtual server and its
// lease ends (revoked here, as after a long pause). Node b takes over:
// a's next edit, which a still believes allowed, fails on the claim key.
func TestTakeoverAfterExpiryFences(t *testing.T) {
	ctx := context.Background()
	pfx := freshPrefix()
	a, b := newBackendAt(t, pfx, "a"), newBackendAt(t, pfx, "b")
	oa, ob := owners(t, a, 10*time.Second), owners(t, b, 10*time.Second)
	v := netip.MustParseAddr("10.0.0.9")
	ca, err := oa.Claim(ctx, v)
	if err != nil {
		t.Fatal(err)
	}
	claimA := dlm.Claim{VIP: v, Epoch: ca.Epoch}
	if err := a.SetClaim(ctx, claimA, dlm.ClaimActive); err != nil {
		t.Fatal(err)
	}
	var m lockmgr.Manager
	o := a.Owner(dlm.OwnerKey{HostKey: dlm.HostKey{VIP: v, Name: "c"}, SVID: 1})
	lock := func(be *Backend, c dlm.Claim, start uint64) error {
		return be.Update(ctx, []byte("f"), c, func(f *dlm.File) error {
			m.Lock(f, &lockmgr.LockArgs{Owner: o, Range: dlm.Range{Start: start, End: start + 1}, Exclusive: true, Epoch: c.Epoch})
			return nil
		})
	}
	if err := lock(a, claimA, 0); err != nil {
		t.Fatal(err)
	}
	if _, err := a.cli.Revoke(ctx, oa.Lease()); err != nil {
		t.Fatal(err)
	}
	cb, err := ob.Claim(ctx, v)
	if err != nil || cb.Prev != ca.Epoch || cb.Handoff != nil {
		t.Fatalf("takeover after the owner's lease ended: %+v %v", cb, err)
	}
	// Fenced from the claim on, even before b records its epoch.
	if err := lock(a, claimA, 10); !errors.Is(err, dlm.ErrFenced) {
		t.Fatalf("edit of the old owner after the takeover: %v, want ErrFenced", err)
	}
	claimB := dlm.Claim{VIP: v, Epoch: cb.Epoch}
	if err := b.SetClaim(ctx, claimB, dlm.ClaimActive); err != nil {
		t.Fatal(err)
	}
	if err := lock(a, claimA, 20); !errors.Is(err, dlm.ErrFenced) {
		t.Fatalf("edit of the old owner after SetClaim: %v, want ErrFenced", err)
	}
	if err := lock(b, claimB, 30); err != nil {
		t.Fatal(err)
	}
	// The old owner's lock is still there: records outlive leases.
	var starts []uint64
	b.Read(ctx, []byte("f"), func(f *dlm.File) {
		f.All(func(h *dlm.Held) bool { starts = append(starts, h.Range().Start); return true })
	})
	if len(starts) != 2 || starts[0] != 0 || starts[1] != 30 {
		t.Fatalf("locks at %v, want [0 30]", starts)
	}
}

// TestSelfFencing: a node whose keepalives stop getting through fences
// itself before its lease can expire: its virtual servers are reported
// lost, its edits refused, and it cannot claim.
func TestSelfFencing(t *testing.T) {
	ctx := context.Background()
	pfx := freshPrefix()
	// A client of its own, closed to cut the node off from etcd.
	cli, err := clientv3.New(clientv3.Config{Endpoints: endpoints(t), DialTimeout: 5 * time.Second, Logger: zap.NewNop()})
	if err != nil {
		t.Fatal(err)
	}
	a, err := New(ctx, Config{Client: cli, Prefix: pfx, Node: "a"})
	if err != nil {
		t.Fatal(err)
	}
	defer a.Close()
	oa, err := NewOwners(ctx, a, OwnersConfig{TTL: 2 * time.Second})
	if err != nil {
		t.Fatal(err)
	}
	v := netip.MustParseAddr("10.0.0.9")
	ca, err := oa.Claim(ctx, v)
	if err != nil {
		t.Fatal(err)
	}
	if err := a.SetClaim(ctx, dlm.Claim{VIP: v, Epoch: ca.Epoch}, dlm.ClaimActive); err != nil {
		t.Fatal(err)
	}
	deadline := oa.Deadline()
	cut := time.Now()
	cli.Close()
	select {
	case lost := <-oa.Lost():
		if lost != v {
			t.Fatalf("lost %v, want %v", lost, v)
		}
	case <-time.After(5 * time.Second):
		t.Fatal("no self-fencing 5 s after the node was cut off")
	}
	took := time.Since(cut)
	// Fenced by the deadline computed from the last acknowledged
	// keepalive's send time: before the lease (2 s) could run out.
	if took >= 2*time.Second {
		t.Fatalf("self-fenced %v after the cut, at or after the lease TTL", took)
	}
	if now := time.Now(); now.Before(deadline) {
		t.Fatalf("self-fenced before the deadline %v (now %v)", deadline, now)
	}
	if !a.Expired() || !oa.Fenced() || a.Stats().SelfFenced != 1 {
		t.Fatalf("expired %v fenced %v count %d", a.Expired(), oa.Fenced(), a.Stats().SelfFenced)
	}
	if err := a.Update(ctx, []byte("f"), dlm.Claim{VIP: v, Epoch: ca.Epoch}, func(*dlm.File) error { return nil }); !errors.Is(err, dlm.ErrFenced) {
		t.Fatalf("edit after self-fencing: %v", err)
	}
	if _, err := oa.Claim(ctx, netip.MustParseAddr("10.0.0.10")); !errors.Is(err, ErrSelfFenced) {
		t.Fatalf("claim after self-fencing: %v", err)
	}
}

// TestDeadlineChecksEachEdit: past the lease deadline no edit runs, even
// before the keepalive loop has fenced the node.
func TestDeadlineChecksEachEdit(t *testing.T) {
	bs := cluster(t, 1)
	c := dlm.Claim{VIP: vip(0), Epoch: 1}
	noop := func(*dlm.File) error { return nil }
	bs[0].SetDeadline(time.Now().Add(time.Hour))
	if err := bs[0].Update(context.Background(), []byte("f"), c, noop); err != nil {
		t.Fatal(err)
	}
	bs[0].SetDeadline(time.Now().Add(-time.Millisecond))
	if err := bs[0].Update(context.Background(), []byte("f"), c, noop); !errors.Is(err, dlm.ErrFenced) {
		t.Fatalf("edit past the deadline: %v, want ErrFenced", err)
	}
	// Nor an unfenced one: another node may own the virtual servers, and
	// a drop could undo what it granted since.
	if err := bs[0].Update(context.Background(), []byte("f"), dlm.Claim{}, noop); !errors.Is(err, dlm.ErrFenced) {
		t.Fatalf("unfenced edit past the deadline: %v, want ErrFenced", err)
	}
}

// TestFencedCommitReportsLoss: a node whose commit etcd refuses on the
// claim key learns that it lost the virtual server (Lost).
func TestFencedCommitReportsLoss(t *testing.T) {
	ctx := context.Background()
	pfx := freshPrefix()
	a, b := newBackendAt(t, pfx, "a"), newBackendAt(t, pfx, "b")
	oa, ob := owners(t, a, 10*time.Second), owners(t, b, 10*time.Second)
	v := netip.MustParseAddr("10.0.0.9")
	ca, err := oa.Claim(ctx, v)
	if err != nil {
		t.Fatal(err)
	}
	c := dlm.Claim{VIP: v, Epoch: ca.Epoch}
	if err := a.SetClaim(ctx, c, dlm.ClaimActive); err != nil {
		t.Fatal(err)
	}
	if _, err := a.cli.Delete(ctx, oa.ownerKey(v)); err != nil { // as if a's lease had run out
		t.Fatal(err)
	}
	if _, err := ob.Claim(ctx, v); err != nil {
		t.Fatal(err)
	}
	err = a.Update(ctx, []byte("f"), c, func(f *dlm.File) error {
		f.Insert(dlm.Lock{Owner: a.Owner(dlm.OwnerKey{HostKey: dlm.HostKey{VIP: v, Name: "c"}, SVID: 1}), Range: dlm.Range{Start: 0, End: 1}, Epoch: c.Epoch})
		return nil
	})
	if !errors.Is(err, dlm.ErrFenced) {
		t.Fatalf("a's edit after b's takeover: %v", err)
	}
	select {
	case lost := <-oa.Lost():
		if lost != v {
			t.Fatalf("lost %v", lost)
		}
	case <-time.After(5 * time.Second):
		t.Fatal("a was not told it lost the virtual server")
	}
}

// TestUnavailable: with etcd down, an edit fails with ErrUnavailable
// within the request timeout, changing nothing, and works again once
// etcd is back.
func TestUnavailable(t *testing.T) {
	c := etcdtest.StartCluster(t, 1, etcdtest.WithArgs("--unsafe-no-fsync"))
	cli, err := clientv3.New(c.ClientConfig())
	if err != nil {
		t.Fatal(err)
	}
	defer cli.Close()
	ctx := context.Background()
	b, err := New(ctx, Config{Client: cli, Prefix: freshPrefix(), Node: "a", RequestTimeout: 500 * time.Millisecond})
	if err != nil {
		t.Fatal(err)
	}
	defer b.Close()
	claim := dlm.Claim{VIP: vip(0), Epoch: 1}
	if err := b.SetClaim(ctx, claim, dlm.ClaimActive); err != nil {
		t.Fatal(err)
	}
	o := b.Owner(dlm.OwnerKey{HostKey: dlm.HostKey{VIP: vip(0), Name: "c"}, SVID: 1})
	lock := func() error {
		return b.Update(ctx, []byte("f"), claim, func(f *dlm.File) error {
			f.Insert(dlm.Lock{Owner: o, Range: dlm.Range{Start: 0, End: 1}, Epoch: 1})
			return nil
		})
	}
	if err := c.Stop(0); err != nil {
		t.Fatal(err)
	}
	t0 := time.Now()
	if err := lock(); !errors.Is(err, dlm.ErrUnavailable) {
		t.Fatalf("edit with etcd down: %v, want ErrUnavailable", err)
	}
	if took := time.Since(t0); took > 2*time.Second {
		t.Fatalf("the edit took %v to fail", took)
	}
	if o.Host.Locks() != 0 {
		t.Fatal("a failed edit moved the counters")
	}
	if err := c.Start(0); err != nil {
		t.Fatal(err)
	}
	wctx, cancel := context.WithTimeout(ctx, 20*time.Second)
	defer cancel()
	if err := c.WaitHealthy(wctx); err != nil {
		t.Fatal(err)
	}
	for {
		err := lock()
		if err == nil {
			break
		}
		if !errors.Is(err, dlm.ErrUnavailable) || wctx.Err() != nil {
			t.Fatalf("edit once etcd is back: %v", err)
		}
		time.Sleep(100 * time.Millisecond)
	}
	if o.Host.Locks() != 1 {
		t.Fatalf("host counts %d locks, want 1", o.Host.Locks())
	}
}

package nlm

import (
	"bytes"
	"context"
	"encoding/json"
	"net/netip"
	"slices"
	"testing"
	"time"

	"github.com/nlmha/nlmha/dlm"
	"github.com/nlmha/nlmha/dlm/dlmtest"
	"github.com/nlmha/nlmha/dlm/memdlm"
	"github.com/nlmha/nlmha/sunrpc"
	"github.com/nlmha/nlmha/virtualserver"
)

// snapshotFrom builds a snapshot of virtual server vip from fuzz bytes, 6
// bytes an entry: a lock, a blocked request or a share of one of four
// owners (loopback client addresses only: a grant's callback must not
// leave this host) on one of three files.
func snapshotFrom(vip netip.Addr, b []byte) *dlm.Snapshot {
	s := &dlm.Snapshot{VIP: vip, Epoch: 1, Taken: time.Unix(1_800_000_000, 0).UTC()}
	files := make([]dlm.SnapshotFile, 3)
	for i := range files {
		files[i].FH = []byte{'f', byte('0' + i)}
	}
	for ; len(b) >= 6; b = b[6:] {
		f := &files[int(b[0]%3)]
		o := int(b[1] % 4)
		name, addr := "c"+string(rune('0'+o/2)), netip.AddrFrom4([4]byte{127, 0, 9, byte(1 + o/2)})
		start := uint64(b[2] % 32)
		end := start + 1 + uint64(b[3]%16)
		if b[3] >= 0xf0 {
			end = dlm.Inf
		}
		excl := b[4]&1 == 1
		switch (b[4] >> 1) % 3 {
		case 0:
			f.Locks = append(f.Locks, dlm.SnapshotLock{Name: name, Addr: addr, SVID: int32(o % 2), OH: []byte{byte(o)},
				Start: start, End: end, Exclusive: excl, Since: uint32(b[5])})
		case 1:
			f.Waiters = append(f.Waiters, dlm.SnapshotLock{Name: name, Addr: addr, SVID: int32(o % 2), OH: []byte{byte(o)},
				Start: start, End: end, Exclusive: excl, Since: uint32(b[5]), Vers: Vers4, Transport: uint8(sunrpc.UDP)})
		default:
			f.Shares = append(f.Shares, dlm.SnapshotShare{Name: name, Addr: addr, OH: []byte{byte(o), b[5] % 2},
				Mode: uint32(b[5]>>1) % 4, Access: uint32(b[5]>>3)%3 + 1})
		}
	}
	for _, f := range files {
		if len(f.Locks)+len(f.Waiters)+len(f.Shares) > 0 {
			s.Files = append(s.Files, f)
		}
	}
	return s
}

// canonicalFiles encodes files with locks and shares in a fixed order:
// held locks and shares are sets (ties on a range come out in either
// order); blocked requests keep theirs, which is the queue's. Pending
// grants are left out: their callbacks settle them whenever they end.
func canonicalFiles(files []dlm.SnapshotFile) []byte {
	out := make([]dlm.SnapshotFile, len(files))
	for i, f := range files {
		f.Pending = nil
		f.Locks, f.Shares = slices.Clone(f.Locks), slices.Clone(f.Shares)
		slices.SortFunc(f.Locks, func(a, b dlm.SnapshotLock) int { return bytes.Compare(mustJSON(a), mustJSON(b)) })
		slices.SortFunc(f.Shares, func(a, b dlm.SnapshotShare) int { return bytes.Compare(mustJSON(a), mustJSON(b)) })
		out[i] = f
	}
	return mustJSON(out)
}

func mustJSON(v any) []byte {
	b, err := json.Marshal(v)
	if err != nil {
		panic(err)
	}
	return b
}

func fuzzService(t *testing.T, vip netip.Addr, epoch uint64) (*Service, *virtualserver.Server, *memdlm.Backend) {
	b := memdlm.New()
	reg := virtualserver.New(virtualserver.Config{Claims: b})
	// Every update runs twice, the first run thrown away: an install or a
	// capture that counts or grants from inside its function doubles.
	svc := New(Config{Backend: dlmtest.Retrying(b), VirtualServers: reg, RPC: &sunrpc.Server{},
		Callbacks: CallbackConfig{Retransmit: time.Millisecond, MaxRetransmit: time.Millisecond, Attempt: 5 * time.Millisecond,
			Retry: time.Millisecond, MaxRetry: time.Millisecond, Lifetime: time.Millisecond}})
	t.Cleanup(svc.Close)
	vs, _, err := reg.Begin(context.Background(), virtualserver.Spec{Addr: vip}, epoch)
	if err != nil {
		t.Fatal(err)
	}
	vs.Serve()
	return svc, vs, b
}

// FuzzInstallSnapshot: installing any snapshot never fails or panics; what
// a release then captures is a fixed point — installed on another node it
// is taken whole (nothing refused, blocked requests still blocked) and
// captured again unchanged — and the release leaves nothing behind.
func FuzzInstallSnapshot(f *testing.F) {
	f.Add([]byte{0, 0, 0, 9, 1, 0, 0, 1, 4, 2, 3, 0, 0, 2, 0, 9, 4, 7})
	f.Add([]byte{1, 0, 0, 0xff, 1, 0, 1, 1, 3, 2, 3, 1, 1, 2, 0, 0, 2, 0})
	f.Add([]byte{2, 0, 0, 0, 5, 0x0b, 2, 1, 0, 0, 4, 0x1a, 2, 2, 5, 5, 5, 5})
	ctx := context.Background()
	vip := netip.MustParseAddr("127.0.0.2")
	f.Fuzz(func(t *testing.T, b []byte) {
		if len(b) > 6*64 {
			return
		}
		snap := snapshotFrom(vip, b)
		a, vsA, ba := fuzzService(t, vip, 2)
		if _, err := a.InstallSnapshot(ctx, snap, vsA); err != nil {
			t.Fatal(err)
		}
		vsA.BeginRelease(ctx)
		s2, err := a.ReleaseVIP(ctx, vsA.Claim())
		if err != nil {
			t.Fatal(err)
		}
		if n := ba.Files(); n != 0 {
			t.Fatalf("%d files keep state after the release", n)
		}
		bnode, vsB, _ := fuzzService(t, vip, 3)
		r, err := bnode.InstallSnapshot(ctx, s2, vsB)
		if err != nil {
			t.Fatal(err)
		}
		pending := 0
		for _, f := range s2.Files {
			pending += len(f.Pending)
		}
		if l, w, sh := s2.Counts(); r.Refused != 0 || r.Locks != l || r.Waiters != w || r.Shares != sh || r.Pending+r.Stale != pending {
			t.Fatalf("installing a captured snapshot (%d locks, %d pending, %d waiters, %d shares): %+v", l, pending, w, sh, r)
		}
		vsB.BeginRelease(ctx)
		s3, err := bnode.ReleaseVIP(ctx, vsB.Claim())
		if err != nil {
			t.Fatal(err)
		}
		j2, j3 := canonicalFiles(s2.Files), canonicalFiles(s3.Files)
		if !bytes.Equal(j2, j3) {
			t.Fatalf("captured again, the state changed:\n%s\n%s", j2, j3)
		}
	})
}

// Grants restored or made by an install are numbered by the file, apart
// from the waiters it queues: each waiter's grant is found by its number.
func TestInstallNumbersGrantsApart(t *testing.T) {
	vip := netip.MustParseAddr("127.0.0.2")
	svc, vs, b := fuzzService(t, vip, 2)
	addr := netip.MustParseAddr("127.0.9.1")
	lock := func(name string, start, end uint64) dlm.SnapshotLock {
		return dlm.SnapshotLock{Name: name, Addr: addr, SVID: 1, Start: start, End: end, Exclusive: true, Vers: Vers4, Transport: uint8(sunrpc.UDP)}
	}
	snap := &dlm.Snapshot{VIP: vip, Epoch: 1, Files: []dlm.SnapshotFile{{FH: []byte("f"),
		Locks:   []dlm.SnapshotLock{lock("a", 0, 10)},
		Pending: []dlm.SnapshotLock{lock("p", 200, 210)},
		Waiters: []dlm.SnapshotLock{lock("w1", 0, 10), lock("w2", 100, 110)}}}}
	snap.Files[0].Locks = append(snap.Files[0].Locks, lock("p", 200, 210))
	if _, err := svc.InstallSnapshot(context.Background(), snap, vs); err != nil {
		t.Fatal(err)
	}
	seqs := map[uint64]string{}
	b.Read(context.Background(), []byte("f"), func(f *dlm.File) {
		for _, w := range append(slices.Clone(f.Waiters()), f.Pending()...) {
			if other, dup := seqs[w.Seq]; dup {
				t.Errorf("%s and %s both numbered %d", other, w.Owner.Host.Name, w.Seq)
			}
			seqs[w.Seq] = w.Owner.Host.Name
		}
	})
	if len(seqs) != 3 {
		t.Fatalf("numbers %v, want w1 waiting, p and w2 pending", seqs)
	}
}

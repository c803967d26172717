package nsm

import (
	"context"
	"errors"
	"fmt"
	"maps"
	"math/rand/v2"
	"net/netip"
	"os"
	"path/filepath"
	"slices"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/nlmha/nlmha/sunrpc/xdr"
)

// FuzzJournal: any journal reads without failing (lines that do not parse
// are skipped), and what it says survives a fold unchanged.
func FuzzJournal(f *testing.F) {
	for _, s := range []string{
		"client-127.0.0.1-0011223344556677.json 5\nclient-127.0.0.1-0011223344556677.json 7\n",
		"sm_mon-aabbccddeeff0011.json -3\n",
		"half-written-line", "a b c\n", "x 99999999999\n", "/etc/passwd 1\n", "", "\n\n",
	} {
		f.Add([]byte(s))
	}
	f.Fuzz(func(t *testing.T, b []byte) {
		dir := t.TempDir()
		st := &store{dir: dir}
		if err := os.WriteFile(filepath.Join(dir, journalFile), b, 0o600); err != nil {
			t.Fatal(err)
		}
		states, _, err := st.readStates()
		if err != nil {
			t.Fatal(err)
		}
		if err := st.writeStates(states); err != nil {
			t.Fatal(err)
		}
		again, lines, err := st.readStates()
		if err != nil || !maps.Equal(states, again) || lines != len(again) {
			t.Fatalf("folded journal reads %v (%d lines, %v), want %v", again, lines, err, states)
		}
	})
}

// Appends accumulate; the last state of a record wins.
func TestJournalAppend(t *testing.T) {
	st := &store{dir: t.TempDir()}
	if err := st.appendStates(map[string]int32{"a.json": 3, "b.json": 5}); err != nil {
		t.Fatal(err)
	}
	if err := st.appendStates(map[string]int32{"a.json": 9}); err != nil {
		t.Fatal(err)
	}
	got, lines, err := st.readStates()
	if err != nil || lines != 3 || !maps.Equal(got, map[string]int32{"a.json": 9, "b.json": 5}) {
		t.Fatalf("journal: %v, %d lines, %v", got, lines, err)
	}
}

// The index answers what Record.matches would, on random records and
// notifications.
func TestMatchingIndex(t *testing.T) {
	rng := rand.New(rand.NewPCG(1, 2))
	names := []string{"a", "b", "c", "127.0.9.1", "127.0.9.2", ""}
	addrs := []netip.Addr{netip.MustParseAddr("127.0.9.1"), netip.MustParseAddr("127.0.9.2"), netip.MustParseAddr("::ffff:127.0.9.3")}
	for range 200 {
		v := &vip{}
		v.setRecs(map[string]*entry{})
		for i := range rng.IntN(12) {
			r := &Record{Kind: KindClient, MonName: names[rng.IntN(len(names)-1)], Caller: names[rng.IntN(len(names))], Addrs: []netip.Addr{addrs[rng.IntN(len(addrs))].Unmap()}} // records keep addresses unmapped
			if rng.IntN(3) == 0 {
				r.Kind, r.Caller = KindSMMon, ""
			}
			v.putRec(fmt.Sprint(i), &entry{rec: r})
		}
		if rng.IntN(2) == 0 && len(v.recs) > 0 {
			v.delRec(fmt.Sprint(rng.IntN(len(v.recs))))
		}
		mon, sender := names[rng.IntN(len(names))], addrs[rng.IntN(len(addrs))]
		var want []*entry
		for _, e := range v.recs {
			if e.rec.matches(mon, sender) {
				want = append(want, e)
			}
		}
		got := v.matching(mon, sender)
		if len(got) != len(want) {
			t.Fatalf("notification %q from %v: index found %d records, matches %d", mon, sender, len(got), len(want))
		}
		for _, e := range want {
			if !slices.Contains(got, e) {
				t.Fatalf("notification %q from %v: the index misses %+v", mon, sender, *e.rec)
			}
		}
	}
}

// slowResolver answers after a while, counting lookups.
type slowResolver struct {
	delay time.Duration
	n     atomic.Int32
}

func (r *slowResolver) LookupNetIP(ctx context.Context, _, host string) ([]netip.Addr, error) {
	r.n.Add(1)
	select {
	case <-time.After(r.delay):
	case <-ctx.Done():
		return nil, ctx.Err()
	}
	if host == "peer.example" {
		return []netip.Addr{netip.MustParseAddr("127.0.2.1")}, nil
	}
	return nil, errors.New("no such host")
}

// Name lookups happen off the UDP workers (issue 10, item 10): with DNS
// slow, SM_STAT of a name gets no answer until the lookup is done (its
// retransmission gets it, from the cache), and SM_STAT of an address is
// answered at once meanwhile. A name is looked up once for many calls.
func TestNameLookupsOffTheWorkers(t *testing.T) {
	r := &slowResolver{delay: 700 * time.Millisecond}
	n := startNode(t, nodeOpts{resolver: r, quiet: true})
	var wg sync.WaitGroup
	stat := func(name string) (StatRes, time.Duration) {
		t0 := time.Now()
		var out StatRes
		out.Decode(xdr.NewDecoder(n.call(mustAddr("127.0.0.1"), vip2, ProcStat, xdr.AppendString(nil, name))))
		return out, time.Since(t0)
	}
	for range 20 {
		wg.Go(func() {
			if out, took := stat("peer.example"); out.Res != StatSucc || took < 500*time.Millisecond {
				t.Errorf("SM_STAT of a name: %+v after %v", out, took)
			}
		})
	}
	time.Sleep(100 * time.Millisecond)
	for range 20 {
		if out, took := stat("127.0.0.9"); out.Res != StatSucc || took > 300*time.Millisecond {
			t.Errorf("SM_STAT of an address while names are looked up: %+v after %v", out, took)
		}
	}
	wg.Wait()
	if got := r.n.Load(); got != 1 {
		t.Fatalf("%d lookups of one name", got)
	}
	if out, took := stat("peer.example"); out.Res != StatSucc || took > 100*time.Millisecond {
		t.Fatalf("cached SM_STAT: %+v after %v", out, took)
	}
}

// A client record's file name carries its address, which is what starts
// the notification before the records are read.
func TestClientOfFile(t *testing.T) {
	for _, a := range []string{"127.0.0.1", "192.0.2.77", "::1", "2001:db8::7", "fe80::1"} {
		addr := netip.MustParseAddr(a)
		r := clientRecord(Client{Caller: "some-name", Addr: addr}, "vip", time.Now())
		got, ok := clientOfFile(r.fileName())
		if !ok || got != addr {
			t.Fatalf("%s: %v %v from %q", a, got, ok, r.fileName())
		}
	}
	for _, n := range []string{"sm_mon-0011223344556677.json", "client-127.0.0.1.json", "client-nope-0011223344556677.json", "client-127.0.0.1-00112233.json"} {
		if a, ok := clientOfFile(n); ok {
			t.Fatalf("%q read as %v", n, a)
		}
	}
}

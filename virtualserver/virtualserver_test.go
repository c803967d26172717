package virtualserver

import (
	"context"
	"errors"
	"net/netip"
	"os"
	"strings"
	"sync"
	"testing"
	"testing/synctest"
	"time"

	"github.com/nlmha/nlmha/dlm"
	"github.com/nlmha/nlmha/dlm/memdlm"
)

func TestLifecycle(t *testing.T) {
	var taken []Spec
	var r *Registry
	ctx := context.Background()
	b := memdlm.New()
	r = New(Config{Servers: []Spec{{Addr: netip.MustParseAddr("10.0.0.1"), Name: "nfs-a"}}, Claims: b, Orchestrated: true})
	var mu sync.Mutex
	orchestrate(t, r, func(_ context.Context, ev Event) {
		if ev.Kind != Wanted {
			return
		}
		mu.Lock()
		defer mu.Unlock()
		taken = append(taken, ev.Spec)
		if v, ok := r.Get(ev.Spec.Addr); ok && (v.State() == Serving || v.State() == Starting) {
			v.Serve() // a takeover in progress elsewhere finishes
			return
		}
		v, _, err := r.Begin(ctx, ev.Spec, 7)
		if err != nil {
			t.Error(err)
			return
		}
		v.Serve()
	})
	// edit reports how the backend takes an edit under v's claim.
	edit := func(v *Server, bulk bool) error {
		if bulk {
			return b.UpdateAll(ctx, dlm.Selector{VIP: v.Addr()}, v.Claim(), func(*dlm.File) error { return nil })
		}
		return b.Update(ctx, []byte("f"), v.Claim(), func(*dlm.File) error { return nil })
	}
	// A configured address is taken over on first use, under its name.
	v, ok := r.Lookup(netip.MustParseAddr("::ffff:10.0.0.1"))
	if !ok || v.Name() != "nfs-a" || v.Addr() != netip.MustParseAddr("10.0.0.1") || v.Epoch() != 7 || v.State() != Serving {
		t.Fatalf("lookup: %+v %v", v, ok)
	}
	if v2, _ := r.Lookup(netip.MustParseAddr("10.0.0.1")); v2 != v || len(taken) != 1 {
		t.Fatal("a served address was taken over again")
	}
	// Without ServeUnknown, another address is not served.
	if _, ok := r.Lookup(netip.MustParseAddr("10.0.0.2")); ok {
		t.Fatal("an unknown address is served without ServeUnknown")
	}
	// Begin on a served address returns it; after a release a new one.
	if same, created, err := r.Begin(ctx, Spec{Addr: v.Addr()}, 8); same != v || created || err != nil {
		t.Fatal("Begin replaced a served virtual server")
	}
	// The claim in the backend follows the lifecycle.
	if err := edit(v, false); err != nil {
		t.Fatalf("edit while served: %v", err)
	}
	if h, ok, err := v.BeginRelease(ctx); !ok || h != nil || v.Serving() || err != nil {
		t.Fatal("BeginRelease")
	}
	if err := edit(v, false); !errors.Is(err, dlm.ErrFenced) || edit(v, true) != nil {
		t.Fatalf("releasing: edit %v, bulk edit %v; want fenced, allowed", err, edit(v, true))
	}
	if _, ok, _ := v.BeginRelease(ctx); ok {
		t.Fatal("BeginRelease twice")
	}
	if err := r.Finish(ctx, v); err != nil {
		t.Fatal(err)
	}
	if err := edit(v, true); !errors.Is(err, dlm.ErrFenced) {
		t.Fatalf("released: bulk edit %v, want fenced", err)
	}
	if _, ok := r.Lookup(v.Addr()); ok || len(taken) != 1 {
		t.Fatal("a released address was served or taken over again by a request")
	}
	// A claim the backend refuses (an epoch below the latest) makes nothing.
	if _, _, err := r.Begin(ctx, Spec{Addr: v.Addr()}, 6); !errors.Is(err, dlm.ErrFenced) {
		t.Fatalf("Begin at an old epoch: %v", err)
	}
	if cur, _ := r.Get(v.Addr()); cur != v {
		t.Fatal("a refused Begin replaced the virtual server")
	}
	nv, created, err := r.Begin(ctx, Spec{Addr: v.Addr(), Name: "nfs-a"}, 8)
	if err != nil || !created || nv == v || nv.State() != Starting || v.State() != Released {
		t.Fatal("a takeover after a release must make a new virtual server")
	}
	if _, ok := r.Lookup(v.Addr()); !ok || len(taken) != 2 {
		t.Fatal("a starting virtual server's requests wait for the takeover")
	}
}

// orchestrate runs fn on r's events until the test ends.
func orchestrate(t *testing.T, r *Registry, fn func(context.Context, Event)) {
	ctx, stop := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() { r.HandleEvents(ctx, fn); close(done) }()
	t.Cleanup(func() { stop(); <-done })
}

// Requests for an address to take over wait for the orchestrator: one
// event however many requests, all woken when it is handled; a request
// the orchestrator does not handle in time is not served, nor one made
// when no orchestrator runs.
func TestWantedEvents(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		r := New(Config{ServeUnknown: true, Orchestrated: true, TakeoverWait: 5 * time.Second})
		a := netip.MustParseAddr("127.0.0.9")
		release, hold := make(chan struct{}), make(chan struct{})
		var mu sync.Mutex
		var got []Event
		ctx, stop := context.WithCancel(context.Background())
		done := make(chan struct{})
		go func() {
			r.HandleEvents(ctx, func(_ context.Context, ev Event) {
				mu.Lock()
				got = append(got, ev)
				mu.Unlock()
				if ev.Spec.Addr != a {
					<-hold // too slow
					return
				}
				<-release
				v, _, _ := r.Begin(context.Background(), ev.Spec, 3)
				v.Serve()
			})
			close(done)
		}()
		results := make(chan *Server, 2)
		for range 2 {
			go func() {
				v, ok := r.Lookup(a)
				if !ok {
					v = nil
				}
				results <- v
			}()
		}
		synctest.Wait()
		if len(results) != 0 {
			t.Fatal("a request did not wait for the takeover")
		}
		close(release)
		v1, v2 := <-results, <-results
		if v1 == nil || v1 != v2 || v1.Epoch() != 3 {
			t.Fatalf("after the takeover: %v %v", v1, v2)
		}
		mu.Lock()
		if len(got) != 1 || got[0].Kind != Wanted || got[0].Spec.Addr != a {
			t.Fatalf("events %+v, want one Wanted for %v", got, a)
		}
		mu.Unlock()
		lookup := func(a netip.Addr) {
			t.Helper()
			start := time.Now()
			if _, ok := r.Lookup(a); ok || time.Since(start) != 5*time.Second {
				t.Fatalf("takeover of %v not done: served %v after %v, want not after 5s", a, ok, time.Since(start))
			}
		}
		lookup(netip.MustParseAddr("127.0.0.10"))
		close(hold)
		stop()
		<-done
		lookup(netip.MustParseAddr("127.0.0.11"))
	})
}

func TestServeUnknown(t *testing.T) {
	r := New(Config{ServeUnknown: true, Orchestrated: true})
	orchestrate(t, r, func(_ context.Context, ev Event) {
		v, _, _ := r.Begin(context.Background(), ev.Spec, 1)
		v.Serve()
	})
	a, ok := r.Lookup(netip.MustParseAddr("127.0.0.9"))
	b, _ := r.Lookup(netip.MustParseAddr("127.0.0.9"))
	if !ok || a != b || a.Name() != "127.0.0.9" || a.InGrace(time.Now()) {
		t.Fatalf("default virtual server: %v", a)
	}
	if _, ok := r.Lookup(netip.Addr{}); ok {
		t.Fatal("the zero address is not a virtual server")
	}
	if len(r.All()) != 1 {
		t.Fatal("All")
	}
}

// The grace period on the real clock: it ends early once its clients are
// done (the timer fires at the quiet time), and the hook hears of it.
func TestServerGrace(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		ended := make(chan GraceStatus, 1)
		r := New(Config{Grace: time.Minute, GraceQuiet: 2 * time.Second, Orchestrated: true})
		ctx, stop := context.WithCancel(context.Background())
		defer stop()
		go r.HandleEvents(ctx, func(_ context.Context, ev Event) {
			if ev.Kind == GraceEnded {
				ended <- ev.Grace
			}
		})
		v, _, _ := r.Begin(context.Background(), Spec{Addr: netip.MustParseAddr("10.0.0.1")}, 1)
		v.Serve()
		c := netip.MustParseAddr("10.1.0.1")
		v.BeginGrace(true, false, []netip.Addr{c})
		if !v.InGrace(time.Now()) {
			t.Fatal("not in grace")
		}
		time.Sleep(10 * time.Second)
		v.GraceNotified(c)
		time.Sleep(time.Second)
		v.GraceRequest(c, true)
		time.Sleep(1900 * time.Millisecond)
		if !v.InGrace(time.Now()) {
			t.Fatal("grace ended before the client was quiet for 2 s")
		}
		time.Sleep(200 * time.Millisecond)
		synctest.Wait()
		if v.InGrace(time.Now()) {
			t.Fatal("grace did not end once the client was done")
		}
		st := <-ended
		if st.Why != EndReclaimed || st.Reclaims != 1 || st.Ended.Sub(st.Started) != 13*time.Second {
			t.Fatalf("status %+v", st)
		}
		// Out of grace, events cost nothing and change nothing.
		v.GraceRequest(c, true)
		if v.Grace().Reclaims != 1 {
			t.Fatal("a request out of grace was counted")
		}
		// A period without early end runs to its deadline.
		v.BeginGrace(false, false, nil)
		time.Sleep(59 * time.Second)
		if !v.InGrace(time.Now()) {
			t.Fatal("grace ended early")
		}
		time.Sleep(time.Second)
		synctest.Wait()
		if st := <-ended; st.Why != EndDeadline || v.InGrace(time.Now()) {
			t.Fatalf("deadline: %+v", st)
		}
		v.BeginGrace(false, false, nil)
		v.EndGrace(EndAdmin)
		if st := <-ended; st.Why != EndAdmin {
			t.Fatalf("admin end: %+v", st)
		}
	})
}

func TestClaimEpoch(t *testing.T) {
	dir := t.TempDir() + "/vip"
	for want := uint64(1); want <= 3; want++ {
		prev, next, err := ClaimEpoch(dir)
		if err != nil || prev != want-1 || next != want {
			t.Fatalf("claim %d: %d %d %v", want, prev, next, err)
		}
	}
	os.WriteFile(dir+"/epoch", []byte("junk"), 0o600)
	// Damaged: reported, and the epoch jumps past anything the counter
	// reached rather than back to 1.
	if prev, next, err := ClaimEpoch(dir); err == nil || prev != 0 || next < uint64(time.Now().Unix())-5 {
		t.Fatalf("damaged: %d %d %v", prev, next, err)
	}
	if prev, next, err := ClaimEpoch(dir); err != nil || next != prev+1 {
		t.Fatalf("after the damage: %d %d %v", prev, next, err)
	}
}

func TestWriteFileAtomic(t *testing.T) {
	dir := t.TempDir()
	p := dir + "/f"
	if err := WriteFileAtomic(p, []byte("one"), 0o600); err != nil {
		t.Fatal(err)
	}
	if err := WriteFileAtomic(p, []byte("two"), 0o600); err != nil {
		t.Fatal(err)
	}
	if b, _ := os.ReadFile(p); string(b) != "two" {
		t.Fatalf("contents %q", b)
	}
	if err := WriteFilesAtomic(dir, map[string][]byte{"a": []byte("A"), "b": []byte("B")}, 0o644); err != nil {
		t.Fatal(err)
	}
	// A crashed write leaves a temporary file, which CleanTemp removes.
	os.WriteFile(dir+"/"+TempPrefix+"f-123", []byte("half"), 0o600)
	if err := CleanTemp(dir); err != nil {
		t.Fatal(err)
	}
	ents, _ := os.ReadDir(dir)
	var names []string
	for _, e := range ents {
		names = append(names, e.Name())
	}
	if strings.Join(names, ",") != "a,b,f" {
		t.Fatalf("directory holds %v", names)
	}
	if st, _ := os.Stat(dir + "/a"); st.Mode().Perm() != 0o644 {
		t.Fatalf("mode %v", st.Mode())
	}
	if err := RemoveFileSync(dir + "/a"); err != nil {
		t.Fatal(err)
	}
	if err := RemoveFileSync(dir + "/a"); err != nil {
		t.Fatal("removing a missing file:", err)
	}
}

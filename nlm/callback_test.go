package nlm

import (
	"context"
	"fmt"
	"runtime"
	"testing"
	"time"

	"github.com/nlmha/nlmha/dlm"
	"github.com/nlmha/nlmha/dlm/dlmtest"
	"github.com/nlmha/nlmha/sunrpc"
	"github.com/nlmha/nlmha/virtualserver"
)

func fastCallbacks(cfg *Config, _ *virtualserver.Config) {
	cfg.Callbacks = CallbackConfig{Retransmit: 50 * time.Millisecond, MaxRetransmit: 100 * time.Millisecond, Attempt: 200 * time.Millisecond,
		Retry: 50 * time.Millisecond, MaxRetry: 200 * time.Millisecond, Lifetime: 1500 * time.Millisecond, NoPortTTL: time.Second, Workers: 4}
}

// settle waits for the goroutine count to come down to at most limit.
func goroutinesWithin(t *testing.T, limit int, wait time.Duration) int {
	t.Helper()
	deadline := time.Now().Add(wait)
	for {
		n := runtime.NumGoroutine()
		if n <= limit || time.Now().After(deadline) {
			return n
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// Thousands of blocked requests of a host that vanished, granted at once
// (issue 10, item 2): the UNLOCK that grants them is answered at once, the
// callbacks run on a bounded pool, the host's missing lockd is looked for
// a handful of times (remembered as missing, longer each time), and the
// callbacks are given up after their lifetime — not 2 000 goroutines each
// asking the host's rpcbind, in waves.
func TestGrantedFanOutBounded(t *testing.T) {
	t.Run("memdlm", func(t *testing.T) { grantedFanOutBounded(t, false) })
	// Every update run twice, the first thrown away: each grant is still
	// called back once.
	t.Run("retrying", func(t *testing.T) { grantedFanOutBounded(t, true) })
}

func grantedFanOutBounded(t *testing.T, retrying bool) {
	e := newEnv(t, fastCallbacks, func(c *Config, _ *virtualserver.Config) {
		if retrying {
			c.Backend = dlmtest.Retrying(c.Backend)
		}
	})
	holder := e.client(t, "127.0.0.10", "127.0.0.2", sunrpc.TCP, Vers4)
	mustLock(t, holder, lk("holder", 1, 0, 10), true, false, Granted)
	gone := e.client(t, "127.0.0.66", "127.0.0.2", sunrpc.UDP, Vers4)
	const waiters = 2000
	for i := range waiters {
		mustLock(t, gone, lk(fmt.Sprint("gone-", i%3), int32(i), 0, 10), false, true, Blocked)
	}
	base := runtime.NumGoroutine()
	t0 := time.Now()
	r, err := holder.Unlock(ctx(t), &UnlockArgs{Cookie: []byte("u"), Lock: lk("holder", 1, 0, 10)})
	if err != nil || r.Stat != Granted {
		t.Fatalf("UNLOCK: %v %v", r.Stat, err)
	}
	unlocked := time.Since(t0)
	if unlocked > time.Second {
		t.Fatalf("the UNLOCK that grants %d waiters took %v", waiters, unlocked)
	}
	time.Sleep(500 * time.Millisecond)
	if n := runtime.NumGoroutine(); n > base+20 {
		t.Fatalf("%d goroutines with %d callbacks outstanding (%d before)", n, waiters, base)
	}
	// The host's queue holds 1 024 (the rest are dropped at once); their
	// lifetime over, they are given up. The locks stay granted.
	st := e.svc.Stats()
	deadline := time.Now().Add(5 * time.Second)
	for st.CallbacksGivenUp.Load()+st.CallbacksDropped.Load() < waiters && time.Now().Before(deadline) {
		time.Sleep(50 * time.Millisecond)
	}
	if st.CallbacksGivenUp.Load() != 1024 || st.CallbacksDropped.Load() != waiters-1024 {
		t.Fatalf("%d callbacks given up, %d dropped, of %d", st.CallbacksGivenUp.Load(), st.CallbacksDropped.Load(), waiters)
	}
	if n := st.PortLookups.Load(); n > 4 {
		t.Fatalf("%d lookups of the vanished host's lockd", n)
	}
	if st.CallbackFailures.Load() > 10 {
		t.Fatalf("%d failed attempts for one vanished host", st.CallbackFailures.Load())
	}
	if r := mustTest(t, holder, lk("holder", 2, 0, 10), true); r.Stat != Denied {
		t.Fatalf("the granted shared locks: TEST %v", r.Stat)
	}
	// Given up or left out, each grant is settled: none stays pending in
	// the lock state.
	var pending int
	e.b.Read(context.Background(), fh1, func(f *dlm.File) { pending = len(f.Pending()) })
	if pending != 0 {
		t.Fatalf("%d grants still pending after their callbacks ended", pending)
	}
	t.Logf("%d grants: UNLOCK answered in %v, %d lookups, %d failed attempts, %d given up, %d dropped", waiters, unlocked,
		st.PortLookups.Load(), st.CallbackFailures.Load(), st.CallbacksGivenUp.Load(), st.CallbacksDropped.Load())
}

// A flood of *_MSG from a host without rpcbind (issue 10, item 3): every
// call is answered, but no goroutine is made per call and the host is
// asked for its lockd once or twice, not once per datagram: nothing is
// sent toward the (spoofable) source beyond a reply's worth.
func TestMsgFloodBounded(t *testing.T) {
	e := newEnv(t, fastCallbacks)
	flood := e.client(t, "127.0.0.67", "127.0.0.2", sunrpc.UDP, Vers4)
	base := runtime.NumGoroutine()
	const msgs = 3000
	for i := range msgs {
		a := TestArgs{Cookie: []byte("t"), Exclusive: true, Lock: lk(fmt.Sprint("f", i%7), 1, 0, 10)}
		if err := flood.Msg(context.Background(), ProcTestMsg, a.Append(nil, Vers4)); err != nil {
			t.Fatal(err)
		}
	}
	if n := runtime.NumGoroutine(); n > base+20 {
		t.Fatalf("%d goroutines after %d TEST_MSG (%d before)", n, msgs, base)
	}
	deadline := time.Now().Add(5 * time.Second)
	for e.svc.Stats().ResDropped.Load() < msgs && time.Now().Before(deadline) {
		time.Sleep(50 * time.Millisecond)
	}
	st := e.svc.Stats()
	if st.PortLookups.Load() > 2 || st.ResDropped.Load() != msgs {
		t.Fatalf("%d lookups, %d _RES dropped of %d", st.PortLookups.Load(), st.ResDropped.Load(), msgs)
	}
	if n := goroutinesWithin(t, base+5, 2*time.Second); n > base+5 {
		t.Fatalf("%d goroutines left (%d before)", n, base)
	}
}

package nsm

import (
	"flag"
	"fmt"
	"math/rand/v2"
	"net/netip"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/cockroachdb/datadriven"
)

// The notification schedule as golden scripts (testdata/fanout):
//
//	new [window=N] [timeout=DUR] [max=DUR] [giveup=DUR|never] [requery=N] targets=a,b,...
//	                       (a letter is a peer on IPv4, "none" one with no
//	                       address, "six" one on IPv6; the virtual server is
//	                       on IPv4; defaults are NotifyConfig's)
//	start at=DUR
//	tick at=DUR
//	run until=DUR          (ticks at each deadline up to until)
//	port t=X port=N at=DUR [xid=N]    (the portmapper's answer; 0: none)
//	notified t=X at=DUR [xid=N]       (the statd's answer)
//	refused t=X at=DUR [xid=N]        (the statd's error reply)
//	stop
//
// A reply goes to the target's call in flight unless xid says otherwise
// (a late answer). Each command prints the actions, then the schedule:
// the next deadline, the peers counting against the window, the targets
// left. Times are offsets from an arbitrary origin.
func TestFanoutScripts(t *testing.T) {
	origin := time.Date(2026, 1, 1, 0, 0, 0, 0, time.UTC)
	datadriven.Walk(t, "testdata/fanout", func(t *testing.T, path string) {
		var f *fanout
		var names []string
		datadriven.RunTest(t, path, func(t *testing.T, td *datadriven.TestData) string {
			arg := func(k, def string) string {
				for _, a := range td.CmdArgs {
					if a.Key == k {
						if len(a.Vals) == 0 {
							return "true"
						}
						return a.Vals[0]
					}
				}
				return def
			}
			dur := func(k, def string) time.Duration {
				v := arg(k, def)
				if v == "never" {
					return -1
				}
				d, err := time.ParseDuration(v)
				if err != nil {
					t.Fatalf("%s: %v", k, err)
				}
				return d
			}
			num := func(k, def string) int {
				var n int
				if _, err := fmt.Sscan(arg(k, def), &n); err != nil {
					t.Fatalf("%s: %v", k, err)
				}
				return n
			}
			target := func() int {
				i := slices.Index(names, arg("t", "?"))
				if i < 0 {
					t.Fatalf("no target %q", arg("t", "?"))
				}
				return i
			}
			xid := func(i int) uint32 {
				if x := num("xid", "0"); x != 0 {
					return uint32(x)
				}
				return f.ts[i].xid
			}
			now := origin.Add(dur("at", "0s"))
			var b strings.Builder
			show := func() {
				for _, a := range f.Actions() {
					b.WriteString(fanActionString(a, names) + "\n")
				}
			}
			switch td.Cmd {
			case "new":
				cfg := NotifyConfig{Window: num("window", "0"), Timeout: dur("timeout", "0s"), MaxTimeout: dur("max", "0s"),
					GiveUp: dur("giveup", "0s"), Requery: num("requery", "0")}.withDefaults()
				names = nil
				if ts := arg("targets", ""); ts != "" {
					names = strings.Split(ts, ",")
				}
				addrs := make([]netip.Addr, len(names))
				for i, n := range names {
					switch {
					case n == "none":
					case n == "six":
						addrs[i] = netip.MustParseAddr(fmt.Sprintf("fd00::%d", i+1))
					default:
						addrs[i] = netip.AddrFrom4([4]byte{10, 0, 0, n[0]})
					}
				}
				f = newFanout(cfg, netip.MustParseAddr("10.0.0.1"), addrs, 0)
				giveUp := "never"
				if cfg.GiveUp > 0 {
					giveUp = "after " + cfg.GiveUp.String()
				}
				return fmt.Sprintf("%d targets; window %d, timeout %v..%v, give up %s, requery after %d\n",
					len(names), cfg.Window, cfg.Timeout, cfg.MaxTimeout, giveUp, cfg.Requery)
			case "start":
				f.Start(now)
				show()
			case "tick":
				f.Tick(now)
				show()
			case "run":
				until := origin.Add(dur("until", "0s"))
				for n := f.Next(); !n.IsZero() && !n.After(until); n = f.Next() {
					fmt.Fprintf(&b, "at %v:\n", n.Sub(origin))
					f.Tick(n)
					for _, a := range f.Actions() {
						b.WriteString("  " + fanActionString(a, names) + "\n")
					}
				}
			case "port":
				i := target()
				f.PortReply(now, i, xid(i), uint16(num("port", "0")))
				show()
			case "notified", "refused":
				i := target()
				f.NotifyReply(now, i, xid(i), td.Cmd == "notified")
				show()
			case "stop":
				f.Stop()
				show()
			default:
				t.Fatalf("unknown command %q", td.Cmd)
			}
			if f.Over() {
				b.WriteString("over\n")
			} else {
				fmt.Fprintf(&b, "next %v; fresh %d; left %d\n", f.Next().Sub(origin), f.fresh, f.left)
			}
			return b.String()
		})
	})
}

func fanActionString(a fanAction, names []string) string {
	name := "?"
	if a.target >= 0 && a.target < len(names) {
		name = names[a.target]
	}
	send := "resend"
	if a.newCall {
		send = "send"
	}
	switch a.kind {
	case actQuery:
		return fmt.Sprintf("%s query %s #%d", send, name, a.xid)
	case actNotify:
		return fmt.Sprintf("%s notify %s:%d #%d", send, name, a.peer.Port(), a.xid)
	case actEndCall:
		return fmt.Sprintf("end %s #%d", name, a.xid)
	case actDone:
		return "done " + name
	case actFailed:
		return fmt.Sprintf("failed %s: %s", name, a.why)
	case actFirstPass:
		return "first pass over"
	}
	return fmt.Sprintf("action %d?", a.kind)
}

var (
	fanoutSeed  = flag.Uint64("fanout.seed", 0, "replay this seed of the random notification schedule test")
	fanoutSeeds = flag.Int("fanout.seeds", 1000, "notifications the random notification schedule test runs")
)

// Random notifications against simulated peers — dead, lossy, slow,
// unregistered for a while, refusing for a while, restarting on another
// port, answering twice or late — checked against the schedule's rules:
//
//   - every target ends done or failed exactly once, by the give-up
//     deadline, and nothing is sent for it after;
//   - never more than Window targets count against the window (counted
//     from outside: from the first send until an answer or the first
//     timeout), and never fewer while some wait for their turn;
//   - deadlines: a send sets its retransmission between Timeout and
//     MaxTimeout ahead; after a tick the next deadline is ahead of it and
//     never past the give-up deadline; a target not over always waits
//     for one;
//   - calls: a new call has a new XID, a retransmission repeats the call
//     in flight, an ended call is one in flight;
//   - a target is done only on an answer of its statd to its call;
//   - with peers that all answer, every reachable one is done.
//
// A failing run prints its seed; -fanout.seed replays it, logging every
// step (-v shows them).
func TestFanoutRandom(t *testing.T) {
	seeds := *fanoutSeeds
	if testing.Short() {
		seeds = min(seeds, 50)
	}
	first := rand.Uint64()
	if *fanoutSeed != 0 {
		first, seeds = *fanoutSeed, 1
	}
	t.Logf("seeds %d..%d (replay one: go test ./nsm -run TestFanoutRandom -fanout.seed N)", first, first+uint64(seeds)-1)
	stats := map[string]int{}
	var trace func(string)
	if *fanoutSeed != 0 {
		trace = func(s string) { t.Log(s) }
	}
	for i := range seeds {
		seed := first + uint64(i)
		if err := runFanoutWorld(seed, stats, trace); err != nil {
			t.Fatalf("seed %d (replay: go test ./nsm -run TestFanoutRandom -fanout.seed %d): %v", seed, seed, err)
		}
	}
	t.Logf("%v", stats)
}

// simPeer is how a simulated peer behaves.
type simPeer struct {
	addr      netip.Addr
	dead      bool          // nothing answers
	loss      float64       // each packet lost with this probability
	delay     time.Duration // answers take up to this long
	unreg     int           // portmapper queries answered "no statd" first
	refuse    int           // notifications refused first
	port      uint16        // the statd's port
	moveAfter int           // the statd restarts on another port at this notification (0: never)
	dup       float64       // an answer comes twice with this probability
	queries   int
	notifies  int
}

type simReply struct {
	at     time.Time
	target int
	xid    uint32
	copy   int // of the call: 1 the first
	query  bool
	port   uint16
	ok     bool
}

func runFanoutWorld(seed uint64, stats map[string]int, trace func(string)) error {
	rng := rand.New(rand.NewPCG(seed, seed^0x9e3779b97f4a7c15))
	dur := func(lo, hi time.Duration) time.Duration { return lo + time.Duration(rng.Int64N(int64(hi-lo)+1)) }
	cfg := NotifyConfig{
		Window:  1 + rng.IntN(5),
		Timeout: dur(100*time.Millisecond, 3*time.Second),
		GiveUp:  dur(5*time.Second, 20*time.Minute),
		Requery: 1 + rng.IntN(5),
	}
	cfg.MaxTimeout = cfg.Timeout * time.Duration(1+rng.IntN(64))
	cfg = cfg.withDefaults()
	allAnswer := rng.IntN(4) == 0
	if allAnswer {
		cfg.GiveUp = 24 * time.Hour
	}
	n := rng.IntN(40)
	peers := make([]*simPeer, n)
	addrs := make([]netip.Addr, n)
	for i := range peers {
		p := &simPeer{addr: netip.AddrFrom4([4]byte{10, 1, byte(i >> 8), byte(i)}), port: uint16(1000 + rng.IntN(1000)),
			delay: dur(0, 2*cfg.Timeout)}
		switch r := rng.IntN(20); {
		case r == 0:
			p.addr = netip.Addr{}
		case r == 1:
			p.addr = netip.AddrFrom16([16]byte{0xfd, 15: byte(i)})
		case r < 5 && !allAnswer:
			p.dead = true
		}
		if allAnswer {
			p.delay = dur(0, cfg.Timeout/2)
		} else {
			p.loss = []float64{0, 0, 0.2, 0.6}[rng.IntN(4)]
			p.unreg = max(0, rng.IntN(6)-3)
			p.refuse = max(0, rng.IntN(6)-3)
			p.dup = []float64{0, 0.3}[rng.IntN(2)]
			if rng.IntN(5) == 0 {
				p.moveAfter = 1 + rng.IntN(3)
			}
		}
		peers[i], addrs[i] = p, p.addr
	}
	names := make([]string, n)
	for i := range names {
		names[i] = fmt.Sprint("t", i)
	}
	from := netip.MustParseAddr("10.0.0.1")
	f := newFanout(cfg, from, addrs, rng.Uint32())

	start := time.Date(2026, 1, 1, 0, 0, 0, 0, time.UTC)
	now := start
	giveUp := now.Add(cfg.GiveUp)
	var inbox []simReply
	type callInfo struct {
		xid   uint32
		query bool
		sends int
	}
	calls := make([]callInfo, n) // the call in flight, by target
	used := map[uint32]bool{}    // XIDs given out
	// okFor marks the targets whose statd said yes to the call in flight,
	// in the batch of replies just given: each must be done by it.
	okFor := make([]bool, n)
	lastNotify := make([]bool, n) // the last call sent was SM_NOTIFY
	over := make([]string, n)     // "done", "failed: why"
	// The window as seen from outside: a target counts from its first
	// send until it answers (done, no statd, refused), is given up, or is
	// sent anything but its SM_NOTIFY following the portmapper's answer
	// (that is: its timeout passed).
	begun := make([]bool, n)
	fresh := make([]bool, n)
	nFresh := 0
	unfresh := func(i int) {
		if fresh[i] {
			fresh[i] = false
			nFresh--
		}
	}
	var errs []string
	fail := func(format string, args ...any) {
		if len(errs) < 10 {
			errs = append(errs, fmt.Sprintf("at +%v: ", now.Sub(start))+fmt.Sprintf(format, args...))
		}
	}
	check := func(afterTick bool) {
		for _, a := range f.Actions() {
			i := a.target
			if trace != nil {
				trace(fmt.Sprintf("+%v %s", now.Sub(start), fanActionString(a, names)))
			}
			if a.kind != actFirstPass && over[i] != "" {
				fail("%s for target %d, %s already", fanActionString(a, names), i, over[i])
			}
			first := a.kind != actFirstPass && !begun[i]
			if a.kind != actFirstPass {
				begun[i] = true
			}
			switch a.kind {
			case actQuery, actNotify:
				query := a.kind == actQuery
				switch {
				case first:
					fresh[i] = true
					nFresh++
					if nFresh > cfg.Window {
						fail("%d targets count against a window of %d", nFresh, cfg.Window)
					}
				case !a.newCall || query:
					unfresh(i)
				}
				switch {
				case a.newCall && (a.xid == 0 || used[a.xid]):
					fail("new call of target %d with xid %d, used before", i, a.xid)
				case a.newCall && calls[i].xid != 0:
					fail("new call of target %d while call %d is in flight", i, calls[i].xid)
				case !a.newCall && (calls[i].xid != a.xid || calls[i].query != query):
					fail("retransmission %s of target %d: the call in flight is %+v", fanActionString(a, names), i, calls[i])
				case query && a.peer != netip.AddrPortFrom(peers[i].addr, cfg.PortmapPort):
					fail("query of target %d to %v", i, a.peer)
				case !query && a.peer.Addr() != peers[i].addr:
					fail("notify of target %d to %v", i, a.peer)
				}
				used[a.xid] = true
				if a.newCall {
					if query && lastNotify[i] {
						stats["portmapper asked again"]++
					}
					calls[i] = callInfo{xid: a.xid, query: query}
				} else {
					stats["retransmissions"]++
				}
				calls[i].sends++
				lastNotify[i] = !query
				stats[map[bool]string{true: "queries", false: "notifies"}[query]]++
				if p := f.ts[i]; !p.over {
					if ahead := p.due.Sub(now); ahead < cfg.Timeout || ahead > cfg.MaxTimeout {
						fail("target %d sent at %v, due %v later: outside %v..%v", i, now, ahead, cfg.Timeout, cfg.MaxTimeout)
					}
				}
				peers[i].receive(rng, now, a, calls[i].sends, &inbox)
			case actEndCall:
				if calls[i].xid != a.xid {
					fail("end of call %d of target %d: the call in flight is %+v", a.xid, i, calls[i])
				}
				calls[i] = callInfo{}
			case actDone:
				unfresh(i)
				if !okFor[i] {
					fail("target %d done, but its statd did not answer its call", i)
				}
				over[i] = "done"
				stats["done"]++
			case actFailed:
				unfresh(i)
				over[i] = "failed: " + a.why.String()
				stats["failed: "+a.why.String()]++
				switch a.why {
				case whyNoAddress:
					if peers[i].addr.IsValid() {
						fail("target %d with address %v failed: %s", i, peers[i].addr, a.why)
					}
				case whyFamily:
					if !peers[i].addr.IsValid() || peers[i].addr.Is4() {
						fail("target %d with address %v failed: %s", i, peers[i].addr, a.why)
					}
				case whyGaveUp:
					if now.Before(giveUp) {
						fail("target %d given up before the deadline", i)
					}
				}
			}
			if (a.kind == actDone || a.kind == actFailed) && now.After(giveUp) {
				fail("target %d settled at %v, after the give-up deadline", i, now)
			}
		}
		for i, ok := range okFor {
			if ok && over[i] != "done" {
				fail("target %d's statd answered its call, yet it is not done", i)
			}
			okFor[i] = false
		}
		for i := range f.ts {
			p := &f.ts[i]
			if i < f.begun && !p.over && p.idx < 0 {
				fail("target %d is neither over nor waiting for a deadline", i)
			}
			if i < f.begun && !p.over && (p.timeout < cfg.Timeout || p.timeout > cfg.MaxTimeout) {
				fail("target %d has timeout %v", i, p.timeout)
			}
		}
		if nFresh != f.fresh {
			fail("%d targets count against the window; the machine says %d", nFresh, f.fresh)
		}
		if afterTick && nFresh < cfg.Window && slices.Contains(begun, false) {
			fail("room in the window (%d of %d), yet target %d waits", nFresh, cfg.Window, slices.Index(begun, false))
		}
		if afterTick && !f.Over() && !f.Next().After(now) {
			fail("after a tick at %v the next deadline is %v", now, f.Next())
		}
		if !f.Over() && f.Next().After(giveUp) {
			fail("the next deadline %v is past the give-up deadline %v", f.Next(), giveUp)
		}
		if f.Over() && !f.Next().IsZero() {
			fail("over, with a deadline %v", f.Next())
		}
	}

	f.Start(now)
	check(true)
	for steps := 0; !f.Over(); steps++ {
		if steps > 1_000_000 || len(errs) > 0 {
			break
		}
		next := f.Next()
		slices.SortStableFunc(inbox, func(a, b simReply) int { return a.at.Compare(b.at) })
		if len(inbox) > 0 && !inbox[0].at.After(next) {
			// Replies first, a batch of those due, then a tick (as job does),
			// or now and then a reply alone.
			if inbox[0].at.After(now) {
				now = inbox[0].at
			}
			k := 1
			if rng.IntN(3) > 0 {
				for k < len(inbox) && !inbox[k].at.After(now) {
					k++
				}
			}
			for _, r := range inbox[:k] {
				if trace != nil {
					trace(fmt.Sprintf("+%v answer t%d #%d (to copy %d): query %v, port %d, ok %v", now.Sub(start), r.target, r.xid, r.copy, r.query, r.port, r.ok))
				}
				switch c := calls[r.target]; {
				case c.xid != r.xid || over[r.target] != "":
					stats["answers to ended calls"]++
				case c.sends > r.copy:
					stats["answers to an earlier copy"]++
				}
				current := calls[r.target].xid == r.xid && over[r.target] == ""
				switch {
				case r.query && r.port == 0:
					stats["no statd registered"]++
				case !r.query && !r.ok:
					stats["refused"]++
				default:
					current = false
				}
				if current {
					unfresh(r.target) // it answered, if not with its statd's yes
				}
				if r.query {
					f.PortReply(now, r.target, r.xid, r.port)
				} else {
					if c := calls[r.target]; r.ok && c.xid == r.xid && !c.query && over[r.target] == "" {
						okFor[r.target] = true
					}
					f.NotifyReply(now, r.target, r.xid, r.ok)
				}
				check(false)
			}
			inbox = inbox[k:]
			if rng.IntN(4) == 0 {
				continue // the tick comes later
			}
		} else if next.After(now) {
			now = next
		}
		f.Tick(now)
		check(true)
	}
	if !f.Over() && len(errs) == 0 {
		fail("not over at the end")
	}
	for i, o := range over {
		switch {
		case o == "":
			fail("target %d never settled", i)
		case allAnswer && o != "done" && peers[i].addr.Is4():
			fail("target %d answers all, yet %s", i, o)
		}
	}
	if len(errs) > 0 {
		return fmt.Errorf("window %d, timeout %v..%v, give up %v, requery %d, %d targets:\n  %s",
			cfg.Window, cfg.Timeout, cfg.MaxTimeout, cfg.GiveUp, cfg.Requery, n, strings.Join(errs, "\n  "))
	}
	return nil
}

// receive takes a call sent to the peer and queues its answer, if any.
func (p *simPeer) receive(rng *rand.Rand, now time.Time, a fanAction, copy int, inbox *[]simReply) {
	if p.dead || rng.Float64() < p.loss {
		return
	}
	r := simReply{at: now.Add(time.Duration(rng.Int64N(int64(p.delay) + 1))), target: a.target, xid: a.xid, copy: copy, query: a.kind == actQuery}
	if r.query {
		p.queries++
		if p.queries > p.unreg {
			r.port = p.port
		}
	} else {
		if a.peer.Port() != p.port {
			return // nobody there
		}
		p.notifies++
		if p.notifies == p.moveAfter {
			p.port++ // the statd restarts elsewhere; this call is lost
			return
		}
		r.ok = p.notifies > p.refuse
	}
	*inbox = append(*inbox, r)
	if rng.Float64() < p.dup {
		r.at = r.at.Add(time.Duration(rng.Int64N(int64(10*p.delay + time.Second))))
		*inbox = append(*inbox, r)
	}
}

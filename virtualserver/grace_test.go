package virtualserver

import (
	"fmt"
	"net/netip"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/cockroachdb/datadriven"
)

// The grace machine as golden scripts (testdata/grace):
//
//	start length=DUR [early] [clients=a,b,...] [quiet=DUR] [at=DUR]
//	notified|unreachable|rebooted|reclaim|request client=X at=DUR
//	end at=DUR
//	tick at=DUR
//	release at=DUR               (hands the rest over; prints the handover)
//	resume at=DUR [quiet=DUR] [cutoff=a,b]
//	                             (a new owner goes on with it; the release
//	                             cut off requests of the cutoff clients)
//
// Times are offsets from an arbitrary origin; each command prints the state.
func TestGraceScripts(t *testing.T) {
	origin := time.Date(2026, 1, 1, 0, 0, 0, 0, time.UTC)
	datadriven.Walk(t, "testdata/grace", func(t *testing.T, path string) {
		var g Grace
		var handed *GraceHandover
		addr := func(name string) netip.Addr { return netip.AddrFrom4([4]byte{10, 0, 0, name[0]}) }
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
				d, err := time.ParseDuration(arg(k, def))
				if err != nil {
					t.Fatalf("%s: %v", k, err)
				}
				return d
			}
			now := origin.Add(dur("at", "0s"))
			switch td.Cmd {
			case "start":
				g.Quiet = dur("quiet", "2s")
				var clients []netip.Addr
				if c := arg("clients", ""); c != "" {
					for _, n := range strings.Split(c, ",") {
						clients = append(clients, addr(n))
					}
				}
				g.Start(now, dur("length", "90s"), arg("early", "") == "true", clients)
			case "notified":
				g.Notified(now, addr(arg("client", "?")))
			case "unreachable":
				g.Unreachable(now, addr(arg("client", "?")))
			case "rebooted":
				g.Rebooted(now, addr(arg("client", "?")))
			case "release":
				h, ok := g.Handover(now)
				g.End(now, EndReleased)
				if !ok {
					handed = nil
					return "nothing to hand over\n"
				}
				handed = &h
				var b strings.Builder
				fmt.Fprintf(&b, "handover: remaining %v, early %v, total %d, reclaims %d\n", h.Remaining, h.Early, h.Total, h.Reclaims)
				for _, c := range h.Clients {
					fmt.Fprintf(&b, "  %c notified=%v reclaimed=%v\n", 'a'+c.Addr.As4()[3]-'a', c.Notified, c.Reclaimed)
				}
				return b.String()
			case "resume":
				if handed == nil {
					t.Fatal("resume without a handover")
				}
				h := *handed
				h.Clients = slices.Clone(h.Clients)
				for _, name := range strings.Split(arg("cutoff", ""), ",") {
					for i := range h.Clients {
						if name != "" && h.Clients[i].Addr == addr(name) {
							h.Clients[i].Resending = true
						}
					}
				}
				g = Grace{Quiet: dur("quiet", "2s")}
				g.Resume(now, h)
			case "reclaim":
				g.Reclaim(now, addr(arg("client", "?")))
			case "request":
				g.Request(now, addr(arg("client", "?")))
			case "end":
				g.End(now, EndAdmin)
			case "tick":
				g.Tick(now)
			default:
				t.Fatalf("unknown command %q", td.Cmd)
			}
			st := g.Status()
			if !st.Active {
				return fmt.Sprintf("off: ended at %v (%s), reclaims=%d\n", st.Ended.Sub(origin), st.Why, st.Reclaims)
			}
			return fmt.Sprintf("on until %v, pending %d/%d, next tick %v\n", st.Until.Sub(origin), st.Pending, st.Clients, g.Next().Sub(origin))
		})
	})
}

package lockmgr

import (
	"cmp"
	"context"
	"fmt"
	"hash/fnv"
	"maps"
	"net/netip"
	"slices"
	"sort"
	"strconv"
	"strings"
	"testing"

	"github.com/cockroachdb/datadriven"

	"github.com/nlmha/nlmha/dlm"
	"github.com/nlmha/nlmha/dlm/memdlm"
)

// The scripts in testdata/scripts/ drive the manager through the in-memory
// backend, and again over bare files. Commands (arguments in brackets are
// optional):
//
//	set [grace=true|false] [epoch=N] [floor=N] [vip=ADDR] [limit-locks=N] [limit-blocked=N] [limit-shares=N]
//	                                    (floor: the epoch floor of grace; 0, the default, is
//	                                    the rule for a backend that lost the records)
//	lock owner=HOST/SVID range=S-E [fh=F] [excl] [block] [reclaim] [async] [oh=X]
//	test owner=HOST/SVID range=S-E [fh=F] [excl]
//	unlock owner=HOST/SVID range=S-E [fh=F]
//	cancel owner=HOST/SVID range=S-E [fh=F] [excl]
//	ungrant owner=HOST/SVID [fh=F]      (the client refuses the last grant to it)
//	settle owner=HOST/SVID [fh=F]       (the client answered the last grant to it)
//	share host=HOST oh=X mode=N access=N [fh=F] [reclaim]
//	unshare host=HOST oh=X [fh=F]
//	free-all host=HOST                  (every file, every virtual server of that host key)
//	drop-vip vip=ADDR                   (every host of a virtual server)
//	purge vip=ADDR epoch=N
//	dump [fh=F]
//	hosts
//
// Ranges are S-E for [S,E) or S-EOF; a host name maps to a fixed address,
// and owners use the virtual server set with "set vip=" (default 10.0.0.1).
type harness struct {
	b *memdlm.Backend // interns hosts and owners; holds the files unless bare
	// bare holds the files as bare dlm.Files instead, with no backend
	// around the lock manager: the scripts run both ways.
	bare    map[string]*dlm.File
	m       Manager
	vip     netip.Addr
	grace   bool
	epoch   uint64
	floor   uint64
	granted map[*dlm.Owner]Grant
}

func newHarness() *harness {
	return &harness{b: memdlm.New(), vip: netip.MustParseAddr("10.0.0.1"), epoch: 1, granted: map[*dlm.Owner]Grant{}}
}

func hostAddr(name string) netip.Addr {
	h := fnv.New32a()
	h.Write([]byte(name))
	return netip.AddrFrom4([4]byte{192, 0, 2, byte(h.Sum32()%200) + 1})
}

func (h *harness) host(name string) *dlm.Host {
	return h.b.Host(dlm.HostKey{VIP: h.vip, Name: name, Addr: hostAddr(name)})
}

func (h *harness) owner(t *testing.T, spec string) *dlm.Owner {
	name, svid, ok := strings.Cut(spec, "/")
	n, err := strconv.Atoi(svid)
	if !ok || err != nil {
		t.Fatalf("owner %q: want HOST/SVID", spec)
	}
	return h.b.Owner(dlm.OwnerKey{HostKey: dlm.HostKey{VIP: h.vip, Name: name, Addr: hostAddr(name)}, SVID: int32(n)})
}

func parseRange(t *testing.T, s string) dlm.Range {
	a, b, ok := strings.Cut(s, "-")
	start, err := strconv.ParseUint(a, 10, 64)
	if !ok || err != nil {
		t.Fatalf("range %q", s)
	}
	if b == "EOF" {
		return dlm.Range{Start: start, End: dlm.Inf}
	}
	end, err := strconv.ParseUint(b, 10, 64)
	if err != nil || end <= start {
		t.Fatalf("range %q", s)
	}
	return dlm.Range{Start: start, End: end}
}

func arg(td *datadriven.TestData, key, def string) string {
	for _, a := range td.CmdArgs {
		if a.Key == key {
			if len(a.Vals) == 0 {
				return ""
			}
			return a.Vals[0]
		}
	}
	return def
}

func (h *harness) update(t *testing.T, td *datadriven.TestData, fn func(f *dlm.File) Result) Result {
	fh := arg(td, "fh", "f1")
	if h.bare != nil {
		f := h.bare[fh]
		if f == nil {
			f = dlm.NewFile(fh)
			h.bare[fh] = f
		}
		return h.bareUpdate(f, fn)
	}
	var res Result
	err := h.b.Update(context.Background(), []byte(fh), dlm.Claim{}, func(f *dlm.File) error {
		res = fn(f)
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	return res
}

// bareUpdate runs fn on a bare file and applies its counter deltas, as a
// backend's commit does.
func (h *harness) bareUpdate(f *dlm.File, fn func(f *dlm.File) Result) Result {
	var e dlm.Edit
	f.Bind(f.State, &e)
	res := fn(f)
	f.Bind(f.State, nil)
	e.Apply()
	return res
}

func (h *harness) read(td *datadriven.TestData, fn func(f *dlm.File)) {
	fh := arg(td, "fh", "f1")
	if h.bare != nil {
		f := h.bare[fh]
		if f == nil {
			f = dlm.NewFile(fh)
		}
		fn(f)
		return
	}
	h.b.Read(context.Background(), []byte(fh), fn)
}

// updateAll runs fn on every file with state that sel may concern.
func (h *harness) updateAll(t *testing.T, sel dlm.Selector, fn func(f *dlm.File) Result) {
	if h.bare != nil {
		for _, fh := range slices.Sorted(maps.Keys(h.bare)) {
			if f := h.bare[fh]; !f.Empty() {
				h.bareUpdate(f, fn)
			}
		}
		return
	}
	err := h.b.UpdateAll(context.Background(), sel, dlm.Claim{}, func(f *dlm.File) error {
		fn(f)
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
}

func mode(excl bool) string {
	if excl {
		return "excl"
	}
	return "shared"
}

func (h *harness) format(res Result) string {
	var sb strings.Builder
	sb.WriteString(res.Status.String())
	if res.HasHolder {
		l := res.Holder
		fmt.Fprintf(&sb, " holder %s/%d %v %s", l.Owner.Host.Name, l.Owner.SVID, l.Range, mode(l.Exclusive))
	}
	sb.WriteString("\n")
	for _, g := range res.Grants {
		w := g.Waiter
		h.granted[w.Owner] = g
		how := "GRANTED"
		if w.Async {
			how = "GRANTED_MSG"
		}
		fmt.Fprintf(&sb, "  %s to %s/%d %v %s on %s\n", how, w.Owner.Host.Name, w.Owner.SVID, w.Range, mode(w.Exclusive), g.FH)
	}
	return sb.String()
}

func (h *harness) run(t *testing.T, td *datadriven.TestData) string {
	switch td.Cmd {
	case "set":
		for _, a := range td.CmdArgs {
			v := a.Vals[0]
			n, _ := strconv.ParseInt(v, 10, 64)
			switch a.Key {
			case "grace":
				h.grace = v == "true"
			case "epoch":
				h.epoch = uint64(n)
			case "floor":
				h.floor = uint64(n)
			case "vip":
				h.vip = netip.MustParseAddr(v)
			case "limit-locks":
				h.m.Limits.LocksPerHost = n
			case "limit-blocked":
				h.m.Limits.BlockedPerHost = n
			case "limit-shares":
				h.m.Limits.SharesPerHost = n
			default:
				t.Fatalf("set %s?", a.Key)
			}
		}
		return "ok\n"
	case "lock":
		a := &LockArgs{
			Owner: h.owner(t, arg(td, "owner", "")), Range: parseRange(t, arg(td, "range", "")),
			Exclusive: td.HasArg("excl"), Block: td.HasArg("block"), Reclaim: td.HasArg("reclaim"),
			InGrace: h.grace, Epoch: h.epoch, Floor: h.floor, OH: []byte(arg(td, "oh", "")), Vers: 4, Async: td.HasArg("async"),
		}
		return h.format(h.update(t, td, func(f *dlm.File) Result { return h.m.Lock(f, a) }))
	case "test":
		o, r := h.owner(t, arg(td, "owner", "")), parseRange(t, arg(td, "range", ""))
		var res Result
		h.read(td, func(f *dlm.File) { res = h.m.Test(f, o, r, td.HasArg("excl"), h.grace, h.floor) })
		return h.format(res)
	case "unlock":
		o, r := h.owner(t, arg(td, "owner", "")), parseRange(t, arg(td, "range", ""))
		return h.format(h.update(t, td, func(f *dlm.File) Result { return h.m.Unlock(f, o, r) }))
	case "cancel":
		o, r := h.owner(t, arg(td, "owner", "")), parseRange(t, arg(td, "range", ""))
		return h.format(h.update(t, td, func(f *dlm.File) Result { return h.m.Cancel(f, o, r, td.HasArg("excl")) }))
	case "ungrant", "settle":
		o := h.owner(t, arg(td, "owner", ""))
		g, ok := h.granted[o]
		if !ok {
			t.Fatalf("no grant to %v", o)
		}
		if td.Cmd == "settle" {
			return h.format(h.update(t, td, func(f *dlm.File) Result { return h.m.Settle(f, g.Waiter) }))
		}
		return h.format(h.update(t, td, func(f *dlm.File) Result { return h.m.Ungrant(f, g.Waiter) }))
	case "share":
		mode, _ := strconv.Atoi(arg(td, "mode", "0"))
		access, _ := strconv.Atoi(arg(td, "access", "0"))
		a := &ShareArgs{Host: h.host(arg(td, "host", "")), OH: []byte(arg(td, "oh", "")), Mode: uint32(mode), Access: uint32(access),
			Reclaim: td.HasArg("reclaim"), InGrace: h.grace, Epoch: h.epoch, Floor: h.floor}
		return h.format(h.update(t, td, func(f *dlm.File) Result { return h.m.Share(f, a) }))
	case "unshare":
		host, oh := h.host(arg(td, "host", "")), []byte(arg(td, "oh", ""))
		return h.format(h.update(t, td, func(f *dlm.File) Result { return h.m.Unshare(f, host, oh) }))
	case "free-all", "drop-vip", "purge":
		var sel dlm.Selector
		if td.Cmd == "free-all" {
			sel.Name = arg(td, "host", "")
		} else {
			sel.VIP = netip.MustParseAddr(arg(td, "vip", ""))
		}
		if td.Cmd == "purge" {
			sel.Below, _ = strconv.ParseUint(arg(td, "epoch", "0"), 10, 64)
		}
		var out strings.Builder
		var all Result
		h.updateAll(t, sel, func(f *dlm.File) Result {
			all.Grants = append(all.Grants, h.m.Drop(f, &sel).Grants...)
			return Result{}
		})
		sort.Slice(all.Grants, func(i, j int) bool { return all.Grants[i].FH < all.Grants[j].FH })
		out.WriteString(h.format(all))
		return out.String()
	case "dump":
		var sb strings.Builder
		h.read(td, func(f *dlm.File) {
			f.All(func(x *dlm.Held) bool {
				o := x.Owner()
				fmt.Fprintf(&sb, "lock %s/%d %v %s epoch=%d\n", o.Host.Name, o.SVID, x.Range(), mode(x.Exclusive()), x.Epoch())
				return true
			})
			for _, w := range f.Waiters() {
				fmt.Fprintf(&sb, "wait %s/%d %v %s seq=%d\n", w.Owner.Host.Name, w.Owner.SVID, w.Range, mode(w.Exclusive), w.Seq)
			}
			pending := slices.SortedFunc(slices.Values(f.Pending()), func(a, b *dlm.Waiter) int { return cmp.Compare(a.Seq, b.Seq) })
			for _, w := range pending {
				fmt.Fprintf(&sb, "pending %s/%d %v %s seq=%d prev=%d\n", w.Owner.Host.Name, w.Owner.SVID, w.Range, mode(w.Exclusive), w.Seq, len(w.Prev))
			}
			for _, s := range f.Shares() {
				fmt.Fprintf(&sb, "share %s oh=%s mode=%d access=%d epoch=%d\n", s.Host.Name, s.OH, s.Mode, s.Access, s.Epoch)
			}
		})
		if sb.Len() == 0 {
			return "empty\n"
		}
		return sb.String()
	case "hosts":
		var lines []string
		h.b.Hosts(func(x *dlm.Host) bool {
			if !x.Idle() {
				lines = append(lines, fmt.Sprintf("%s via %s: locks=%d blocked=%d shares=%d", x.Name, x.VIP, x.Locks(), x.Blocked(), x.Shares()))
			}
			return true
		})
		sort.Strings(lines)
		if len(lines) == 0 {
			return "none\n"
		}
		return strings.Join(lines, "\n") + "\n"
	}
	t.Fatalf("unknown command %q", td.Cmd)
	return ""
}

// TestScripts runs each script through a backend and over bare files:
// the lock manager must not depend on what a backend adds.
func TestScripts(t *testing.T) {
	for _, bare := range []bool{false, true} {
		t.Run(map[bool]string{false: "backend", true: "bare"}[bare], func(t *testing.T) {
			datadriven.Walk(t, "testdata/scripts", func(t *testing.T, path string) {
				h := newHarness()
				if bare {
					h.bare = map[string]*dlm.File{}
				}
				datadriven.RunTest(t, path, h.run)
			})
		})
	}
}

// A lock's age is when its owner asked for it: a merge keeps the oldest
// part's, a split keeps the piece's, a blocked request granted later keeps
// its queueing time.
func TestLockAges(t *testing.T) {
	h := newHarness()
	a, b := h.owner(t, "a/1"), h.owner(t, "b/1")
	var m Manager
	ctx := context.Background()
	lock := func(o *dlm.Owner, r dlm.Range, now uint32, block bool) Result {
		var res Result
		if err := h.b.Update(ctx, []byte("f"), dlm.Claim{}, func(f *dlm.File) error {
			res = m.Lock(f, &LockArgs{Owner: o, Range: r, Exclusive: true, Block: block, Epoch: 1, Now: now})
			return nil
		}); err != nil {
			t.Fatal(err)
		}
		return res
	}
	ages := func() map[string]uint32 {
		out := map[string]uint32{}
		h.b.Read(ctx, []byte("f"), func(f *dlm.File) {
			f.All(func(x *dlm.Held) bool {
				l := x.Lock()
				out[fmt.Sprintf("%d/%d-%d", l.Owner.SVID, l.Range.Start, l.Range.End)+l.Owner.Host.Name] = l.Since
				return true
			})
		})
		return out
	}
	lock(a, dlm.Range{Start: 0, End: 10}, 100, false)
	lock(a, dlm.Range{Start: 10, End: 20}, 200, false)
	if got := ages(); got["1/0-20a"] != 100 || len(got) != 1 {
		t.Fatalf("after a merge: %v", got)
	}
	h.b.Update(ctx, []byte("f"), dlm.Claim{}, func(f *dlm.File) error {
		m.Unlock(f, a, dlm.Range{Start: 5, End: 15})
		return nil
	})
	if got := ages(); got["1/0-5a"] != 100 || got["1/15-20a"] != 100 {
		t.Fatalf("after a split: %v", got)
	}
	if r := lock(b, dlm.Range{Start: 0, End: 20}, 300, true); r.Status != Blocked {
		t.Fatalf("b: %v", r.Status)
	}
	h.b.Update(ctx, []byte("f"), dlm.Claim{}, func(f *dlm.File) error {
		m.Unlock(f, a, dlm.Range{Start: 0, End: dlm.Inf})
		return nil
	})
	if got := ages(); got["1/0-20b"] != 300 {
		t.Fatalf("granted waiter: %v", got)
	}
}

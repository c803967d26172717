package lockmgr

import (
	"cmp"
	"context"
	"errors"
	"fmt"
	"net/netip"
	"slices"
	"strconv"
	"strings"
	"testing"

	"github.com/cockroachdb/datadriven"

	"github.com/nlmha/nlmha/dlm"
	"github.com/nlmha/nlmha/dlm/memdlm"
)

// The scripts in testdata/cluster/ drive several nodes over one shared
// backend, in the style of etcd raft's interaction tests: each node acts
// for the virtual servers it believes it holds, under their claims, and
// the backend decides. They cover what a shared backend gives: locks
// through virtual servers on different nodes conflict, a grant made by
// one node's unlock is pending state the waiter's node settles, a node
// that lost a virtual server is fenced, and a takeover keeps the records
// as reclaimable (the finer grace rule), re-stamps reclaims and purges
// the rest. Commands:
//
//	claim node=N vip=V epoch=E          (node N takes V over at epoch E)
//	release node=N vip=V                (releasing, then released)
//	grace vip=V on|off                  (V's grace period; its floor is its epoch)
//	lock node=N vip=V owner=HOST/SVID range=S-E [fh=F] [excl] [block] [reclaim]
//	test node=N vip=V owner=HOST/SVID range=S-E [fh=F] [excl]
//	unlock node=N vip=V owner=HOST/SVID range=S-E [fh=F]
//	settle node=N vip=V owner=HOST/SVID [fh=F]   (the grant's callback, answered)
//	purge node=N vip=V                  (the end of grace: records below the epoch)
//	drop host=HOST                      (a client rebooted: unfenced, every node)
//	dump [fh=F]
//
// VIPs are written as short names (a, b, ...) mapped to 10.0.0.x.
type cluster struct {
	b     *memdlm.Backend
	m     Manager
	nodes map[string]map[netip.Addr]uint64 // what each node believes it holds
	grace map[netip.Addr]bool
}

func vipOf(name string) netip.Addr {
	return netip.AddrFrom4([4]byte{10, 0, 0, name[0] - 'a' + 1})
}

func vipName(a netip.Addr) string { return string(rune('a' + a.As4()[3] - 1)) }

func (c *cluster) node(t *testing.T, td *datadriven.TestData) (string, netip.Addr, dlm.Claim) {
	n, v := arg(td, "node", ""), arg(td, "vip", "")
	if n == "" || v == "" {
		t.Fatalf("%s: node= and vip= are required", td.Cmd)
	}
	vip := vipOf(v)
	return n, vip, dlm.Claim{VIP: vip, Epoch: c.nodes[n][vip]}
}

func (c *cluster) owner(t *testing.T, vip netip.Addr, spec string) *dlm.Owner {
	name, svid, ok := strings.Cut(spec, "/")
	n, err := strconv.Atoi(svid)
	if !ok || err != nil {
		t.Fatalf("owner %q: want HOST/SVID", spec)
	}
	return c.b.Owner(dlm.OwnerKey{HostKey: dlm.HostKey{VIP: vip, Name: name, Addr: hostAddr(name)}, SVID: int32(n)})
}

func (c *cluster) edit(td *datadriven.TestData, claim dlm.Claim, fn func(f *dlm.File) Result) string {
	var res Result
	err := c.b.Update(context.Background(), []byte(arg(td, "fh", "f1")), claim, func(f *dlm.File) error {
		res = fn(f)
		return nil
	})
	return c.outcome(res, err)
}

func (c *cluster) outcome(res Result, err error) string {
	if errors.Is(err, dlm.ErrFenced) {
		return "fenced\n"
	}
	if err != nil {
		return fmt.Sprintf("error: %v\n", err)
	}
	var sb strings.Builder
	sb.WriteString(res.Status.String())
	if res.HasHolder {
		l := res.Holder
		fmt.Fprintf(&sb, " holder %s/%d via %s %v %s", l.Owner.Host.Name, l.Owner.SVID, vipName(l.Owner.Host.VIP), l.Range, mode(l.Exclusive))
	}
	sb.WriteString("\n")
	for _, g := range res.Grants {
		w := g.Waiter
		fmt.Fprintf(&sb, "  pending grant to %s/%d via %s %v %s seq=%d\n", w.Owner.Host.Name, w.Owner.SVID, vipName(w.Owner.Host.VIP), w.Range, mode(w.Exclusive), w.Seq)
	}
	return sb.String()
}

func (c *cluster) run(t *testing.T, td *datadriven.TestData) string {
	ctx := context.Background()
	switch td.Cmd {
	case "claim":
		n, vip := arg(td, "node", ""), vipOf(arg(td, "vip", ""))
		epoch, err := strconv.ParseUint(arg(td, "epoch", ""), 10, 64)
		if err != nil {
			t.Fatalf("claim: epoch=%q", arg(td, "epoch", ""))
		}
		if err := c.b.SetClaim(ctx, dlm.Claim{VIP: vip, Epoch: epoch}, dlm.ClaimActive); err != nil {
			return c.outcome(Result{}, err)
		}
		if c.nodes[n] == nil {
			c.nodes[n] = map[netip.Addr]uint64{}
		}
		c.nodes[n][vip] = epoch
		return "ok\n"
	case "release":
		n, vip, claim := c.node(t, td)
		for _, st := range []dlm.ClaimState{dlm.ClaimReleasing, dlm.ClaimReleased} {
			if err := c.b.SetClaim(ctx, claim, st); err != nil {
				return c.outcome(Result{}, err)
			}
		}
		delete(c.nodes[n], vip)
		return "ok\n"
	case "grace":
		c.grace[vipOf(arg(td, "vip", ""))] = td.HasArg("on")
		return "ok\n"
	case "lock":
		_, vip, claim := c.node(t, td)
		a := &LockArgs{Owner: c.owner(t, vip, arg(td, "owner", "")), Range: parseRange(t, arg(td, "range", "")),
			Exclusive: td.HasArg("excl"), Block: td.HasArg("block"), Reclaim: td.HasArg("reclaim"),
			InGrace: c.grace[vip], Epoch: claim.Epoch, Floor: claim.Epoch, Vers: 4}
		return c.edit(td, claim, func(f *dlm.File) Result { return c.m.Lock(f, a) })
	case "test":
		_, vip, claim := c.node(t, td)
		o, r := c.owner(t, vip, arg(td, "owner", "")), parseRange(t, arg(td, "range", ""))
		var res Result
		err := c.b.Read(ctx, []byte(arg(td, "fh", "f1")), func(f *dlm.File) {
			res = c.m.Test(f, o, r, td.HasArg("excl"), c.grace[vip], claim.Epoch)
		})
		return c.outcome(res, err)
	case "unlock":
		_, vip, claim := c.node(t, td)
		o, r := c.owner(t, vip, arg(td, "owner", "")), parseRange(t, arg(td, "range", ""))
		return c.edit(td, claim, func(f *dlm.File) Result { return c.m.Unlock(f, o, r) })
	case "settle":
		_, vip, claim := c.node(t, td)
		o := c.owner(t, vip, arg(td, "owner", ""))
		return c.edit(td, claim, func(f *dlm.File) Result {
			// The waiter's node learns of its grant from the file.
			for _, p := range f.Pending() {
				if p.Owner == o {
					return c.m.Settle(f, p)
				}
			}
			return Result{Status: Denied}
		})
	case "purge":
		_, vip, claim := c.node(t, td)
		sel := dlm.Selector{VIP: vip, Below: claim.Epoch}
		var all Result
		err := c.b.UpdateAll(ctx, sel, claim, func(f *dlm.File) error {
			all.Grants = append(all.Grants, c.m.Drop(f, &sel).Grants...)
			return nil
		})
		return c.outcome(all, err)
	case "drop":
		sel := dlm.Selector{Name: arg(td, "host", "")}
		var all Result
		err := c.b.UpdateAll(ctx, sel, dlm.Claim{}, func(f *dlm.File) error {
			all.Grants = append(all.Grants, c.m.Drop(f, &sel).Grants...)
			return nil
		})
		return c.outcome(all, err)
	case "dump":
		var sb strings.Builder
		c.b.Read(ctx, []byte(arg(td, "fh", "f1")), func(f *dlm.File) {
			f.All(func(x *dlm.Held) bool {
				o := x.Owner()
				fmt.Fprintf(&sb, "lock %s/%d via %s %v %s epoch=%d\n", o.Host.Name, o.SVID, vipName(o.Host.VIP), x.Range(), mode(x.Exclusive()), x.Epoch())
				return true
			})
			for _, w := range f.Waiters() {
				fmt.Fprintf(&sb, "wait %s/%d via %s %v %s seq=%d\n", w.Owner.Host.Name, w.Owner.SVID, vipName(w.Owner.Host.VIP), w.Range, mode(w.Exclusive), w.Seq)
			}
			for _, w := range slices.SortedFunc(slices.Values(f.Pending()), func(a, b *dlm.Waiter) int { return cmp.Compare(a.Seq, b.Seq) }) {
				fmt.Fprintf(&sb, "pending %s/%d via %s %v %s seq=%d\n", w.Owner.Host.Name, w.Owner.SVID, vipName(w.Owner.Host.VIP), w.Range, mode(w.Exclusive), w.Seq)
			}
		})
		if sb.Len() == 0 {
			return "empty\n"
		}
		return sb.String()
	}
	t.Fatalf("unknown command %q", td.Cmd)
	return ""
}

func TestClusterScripts(t *testing.T) {
	datadriven.Walk(t, "testdata/cluster", func(t *testing.T, path string) {
		c := &cluster{b: memdlm.New(), nodes: map[string]map[netip.Addr]uint64{}, grace: map[netip.Addr]bool{}}
		datadriven.RunTest(t, path, c.run)
	})
}

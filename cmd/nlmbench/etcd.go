package main

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"os"
	"slices"
	"strings"
	"sync"
	"time"

	flag "github.com/spf13/pflag"
	clientv3 "go.etcd.io/etcd/client/v3"
	"go.uber.org/zap"

	"github.com/nlmha/nlmha/nlm"
	"github.com/nlmha/nlmha/sunrpc"
	"github.com/nlmha/nlmha/sunrpc/xdr"
)

// runEtcdCeiling measures what etcd itself allows nlmd with the etcd
// backend: C workers, each looping one guarded transaction on a key of
// its own (If ModRevision(key) == last; Then Put), the shape of every
// lock change nlmd makes. A LOCK+UNLOCK pair is two of them, so the
// ceiling of pairs per second is half the transaction rate.
func runEtcdCeiling(args []string) int {
	fs := flag.NewFlagSet("nlmbench etcd", flag.ContinueOnError)
	endpoints := fs.StringSlice("endpoints", []string{"http://127.0.0.1:2379"}, "etcd client URLs")
	clients := fs.IntSlice("clients", []int{16, 64}, "concurrent workers (one transaction in flight each)")
	duration := fs.Duration("duration", 10*time.Second, "measured time per concurrency")
	label := fs.String("label", "etcd", "name of the cluster in the RESULT lines")
	value := fs.Int("value-size", 120, "bytes per value (nlmd's record of a file with one lock is about this)")
	if err := fs.Parse(args); err != nil {
		if errors.Is(err, flag.ErrHelp) {
			return 0
		}
		return 2
	}
	cli, err := clientv3.New(clientv3.Config{Endpoints: *endpoints, DialTimeout: 5 * time.Second, Logger: zap.NewNop()})
	if err != nil {
		fmt.Fprintln(os.Stderr, "nlmbench etcd:", err)
		return 1
	}
	defer cli.Close()
	val := strings.Repeat("x", *value)
	pfx := fmt.Sprintf("/nlmbench-ceiling-%d/", os.Getpid())
	for _, n := range *clients {
		var mu sync.Mutex
		var lat []time.Duration
		var wg sync.WaitGroup
		errs := 0
		start := time.Now()
		deadline := start.Add(*duration)
		for i := range n {
			wg.Go(func() {
				key := fmt.Sprintf("%s%d", pfx, i)
				var rev int64
				var mine []time.Duration
				bad := 0
				for time.Now().Before(deadline) {
					t := time.Now()
					ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
					resp, err := cli.Txn(ctx).If(clientv3.Compare(clientv3.ModRevision(key), "=", rev)).
						Then(clientv3.OpPut(key, val)).Else(clientv3.OpGet(key)).Commit()
					cancel()
					if err != nil {
						bad++
						continue
					}
					if resp.Succeeded {
						rev = resp.Header.Revision
					} else if kvs := resp.Responses[0].GetResponseRange().GetKvs(); len(kvs) > 0 {
						rev = kvs[0].ModRevision
					}
					mine = append(mine, time.Since(t))
				}
				mu.Lock()
				lat = append(lat, mine...)
				errs += bad
				mu.Unlock()
			})
		}
		wg.Wait()
		el := time.Since(start)
		slices.Sort(lat)
		if len(lat) == 0 {
			fmt.Fprintln(os.Stderr, "nlmbench etcd: no transaction completed")
			return 1
		}
		rate := float64(len(lat)) / el.Seconds()
		fmt.Printf("RESULT etcd=%s clients=%d txn_per_s=%.0f ceiling_pairs_per_s=%.0f p50_us=%.0f p99_us=%.0f errors=%d\n",
			*label, n, rate, rate/2, us(lat[len(lat)/2]), us(lat[len(lat)*99/100]), errs)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	cli.Delete(ctx, pfx, clientv3.WithPrefix())
	return 0
}

// runHandoff measures a blocked lock handed across nodes: client A holds
// a lock through virtual server --a (node 1), client B waits for it
// through --b (node 2); A unlocks, and the time until B's lock daemon
// receives GRANTED (from --b) is measured, --rounds times.
func runHandoff(args []string) int {
	fs := flag.NewFlagSet("nlmbench handoff", flag.ContinueOnError)
	va := fs.String("a", "127.0.0.11", "virtual server of the holder (node 1)")
	vb := fs.String("b", "127.0.0.12", "virtual server of the waiter (node 2)")
	port := fs.Uint16("port", 4045, "NLM port of the nodes")
	rounds := fs.Int("rounds", 200, "handoffs measured")
	if err := fs.Parse(args); err != nil {
		if errors.Is(err, flag.ErrHelp) {
			return 0
		}
		return 2
	}
	if err := handoff(netip.MustParseAddr(*va), netip.MustParseAddr(*vb), *port, *rounds); err != nil {
		fmt.Fprintln(os.Stderr, "nlmbench handoff:", err)
		return 1
	}
	return 0
}

func handoff(va, vb netip.Addr, port uint16, rounds int) error {
	hostA, hostB := netip.MustParseAddr("127.3.2.1"), netip.MustParseAddr("127.3.2.2")
	granted := make(chan time.Time, 16)
	// B's lock daemon: GRANTED answered at once, and its portmapper.
	procs := make([]sunrpc.Proc, nlm.ProcGranted+1)
	procs[nlm.ProcGranted] = sunrpc.Proc{Name: "GRANTED", Handler: func(_ context.Context, req *sunrpc.Request, res []byte) ([]byte, error) {
		var a nlm.TestArgs
		d := xdr.NewDecoder(req.Args)
		a.Decode(d, req.Vers)
		if d.Err() != nil {
			return nil, sunrpc.ErrGarbageArgs
		}
		if req.Remote.Addr() == vb {
			select {
			case granted <- time.Now():
			default:
			}
		}
		return (&nlm.Res{Cookie: a.Cookie, Stat: nlm.Granted}).Append(res), nil
	}}
	lockd := &sunrpc.Server{}
	lockd.Register(sunrpc.Program{Name: "lockd", Prog: nlm.Prog, Vers: nlm.Vers4, Procs: procs})
	lport, closeLockd, err := serveBoth(lockd, hostB, 0)
	if err != nil {
		return err
	}
	defer closeLockd()
	pm := &sunrpc.Portmapper{}
	pms := &sunrpc.Server{}
	for _, p := range pm.Programs() {
		pms.Register(p)
	}
	_, closePM, err := serveBoth(pms, hostB, sunrpc.PmapPort)
	if err != nil {
		return fmt.Errorf("the waiter's portmapper on %v:111 (root, in a private namespace): %w", hostB, err)
	}
	defer closePM()
	for _, tr := range []sunrpc.Transport{sunrpc.TCP, sunrpc.UDP} {
		pm.Set(sunrpc.RPCB{Prog: nlm.Prog, Vers: nlm.Vers4, NetID: tr.String(), Addr: sunrpc.FormatUaddr(netip.AddrPortFrom(netip.IPv4Unspecified(), lport))})
	}
	dial := func(from, to netip.Addr) (*nlm.Client, func(), error) {
		c, err := sunrpc.Dial(context.Background(), sunrpc.TCP, netip.AddrPortFrom(to, port), sunrpc.ClientOptions{Local: from})
		if err != nil {
			return nil, nil, err
		}
		return nlm.NewClient(c, nlm.Vers4), func() { c.Close() }, nil
	}
	a, closeA, err := dial(hostA, va)
	if err != nil {
		return err
	}
	defer closeA()
	b, closeB, err := dial(hostB, vb)
	if err != nil {
		return err
	}
	defer closeB()
	lk := func(caller string) nlm.Lock {
		return nlm.Lock{CallerName: []byte(caller), FH: []byte("handoff"), OH: []byte(caller), SVID: 1, Len: 1}
	}
	la, lb := lk("holder"), lk("waiter")
	ctx := context.Background()
	do := func(what string, fn func(ctx context.Context) (nlm.Res, error), want nlm.Stat) error {
		cctx, cancel := context.WithTimeout(ctx, 5*time.Second)
		defer cancel()
		r, err := fn(cctx)
		if err == nil && r.Stat != want {
			err = fmt.Errorf("%v, want %v", r.Stat, want)
		}
		if err != nil {
			return fmt.Errorf("%s: %w", what, err)
		}
		return nil
	}
	var lat []time.Duration
	for i := range rounds {
		if err := do("A's lock", func(c context.Context) (nlm.Res, error) {
			return a.Lock(c, &nlm.LockArgs{Cookie: []byte("a"), Exclusive: true, Lock: la, State: 1})
		}, nlm.Granted); err != nil {
			return err
		}
		if err := do("B's blocking lock", func(c context.Context) (nlm.Res, error) {
			return b.Lock(c, &nlm.LockArgs{Cookie: []byte("b"), Block: true, Exclusive: true, Lock: lb, State: 1})
		}, nlm.Blocked); err != nil {
			return err
		}
		t0 := time.Now()
		if err := do("A's unlock", func(c context.Context) (nlm.Res, error) {
			return a.Unlock(c, &nlm.UnlockArgs{Cookie: []byte("u"), Lock: la})
		}, nlm.Granted); err != nil {
			return err
		}
		select {
		case t := <-granted:
			lat = append(lat, t.Sub(t0))
		case <-time.After(5 * time.Second):
			return fmt.Errorf("round %d: no GRANTED from %v within 5 s", i, vb)
		}
		if err := do("B's unlock", func(c context.Context) (nlm.Res, error) {
			return b.Unlock(c, &nlm.UnlockArgs{Cookie: []byte("v"), Lock: lb})
		}, nlm.Granted); err != nil {
			return err
		}
	}
	slices.Sort(lat)
	fmt.Printf("RESULT handoff rounds=%d p50_ms=%.2f p99_ms=%.2f max_ms=%.2f\n", len(lat),
		ms(lat[len(lat)/2]), ms(lat[len(lat)*99/100]), ms(lat[len(lat)-1]))
	return nil
}

// serveBoth serves s on TCP and UDP at host:port (0: any port, the same
// for both) and returns the port.
func serveBoth(s *sunrpc.Server, host netip.Addr, port uint16) (uint16, func(), error) {
	l, err := net.Listen("tcp4", netip.AddrPortFrom(host, port).String())
	if err != nil {
		return 0, nil, err
	}
	port = uint16(l.Addr().(*net.TCPAddr).Port)
	pc, err := net.ListenPacket("udp4", netip.AddrPortFrom(host, port).String())
	if err != nil {
		l.Close()
		return 0, nil, err
	}
	go s.Serve(l)
	serve, err := s.AttachPacket(pc)
	if err != nil {
		l.Close()
		pc.Close()
		return 0, nil, err
	}
	go serve()
	return port, func() { s.Close() }, nil
}

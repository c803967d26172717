package main

import (
	"context"
	"errors"
	"fmt"
	"net/netip"
	"slices"
	"sync"
	"time"

	"github.com/nlmha/nlmha/nlm"
	"github.com/nlmha/nlmha/sunrpc"
	"github.com/nlmha/nlmha/sunrpc/xdr"
)

// series is the timing of one kind of call. A failed call counts with the
// time it took: a client waits that long too.
type series struct {
	Calls    int      `json:"calls"`
	Failures int      `json:"failures"`
	P50      float64  `json:"p50_ms"`
	P99      float64  `json:"p99_ms"`
	Max      float64  `json:"max_ms"`
	Errors   []string `json:"errors,omitempty"`

	mu   sync.Mutex
	lat  []time.Duration
	errs errList
}

func (s *series) add(d time.Duration, err error) {
	s.mu.Lock()
	s.lat = append(s.lat, d)
	s.mu.Unlock()
	if err != nil {
		s.errs.add(err)
	}
}

func (s *series) finish() *series {
	s.mu.Lock()
	defer s.mu.Unlock()
	slices.Sort(s.lat)
	ms := func(d time.Duration) float64 { return float64(d.Microseconds()) / 1000 }
	s.Calls, s.Failures, s.Errors = len(s.lat), s.errs.count(), s.errs.list()
	if n := len(s.lat); n > 0 {
		s.P50, s.P99, s.Max = ms(s.lat[(n-1)/2]), ms(s.lat[(99*n+99)/100-1]), ms(s.lat[n-1])
	}
	return s
}

type probeResult struct {
	NLM  *series `json:"nlm"`
	Stat *series `json:"stat,omitempty"`
}

// runProbe is the well-behaved client: over one TCP connection (redialled
// if it breaks), NULL then LOCK then UNLOCK of its own range, again and
// again; with --stat-server, SM_STAT over UDP as well, on its own pace.
// Every call must succeed (LOCK and UNLOCK GRANTED) within --timeout.
func runProbe(args []string) (any, error) {
	fs := newFlags("probe")
	server := fs.String("server", "", "NLM server address (the virtual server)")
	from := fs.String("from", "127.0.0.1", "source address")
	nlmPort := fs.Uint("nlm-port", 4045, "NLM port")
	nsmPort := fs.Uint("nsm-port", 32765, "NSM port")
	caller := fs.String("caller", "adv-good", "caller_name")
	fh := fs.String("fh", "adv-probe", "file handle it locks")
	interval := fs.Duration("interval", 10*time.Millisecond, "pause between NULL+LOCK+UNLOCK rounds")
	timeout := fs.Duration("timeout", 5*time.Second, "a call not answered by then fails")
	statServer := fs.String("stat-server", "", "also SM_STAT over UDP to this address")
	statName := fs.String("stat-name", "127.0.0.1", "the name SM_STAT asks about")
	statInterval := fs.Duration("stat-interval", 100*time.Millisecond, "pause between SM_STATs")
	max := fs.Duration("max", 2*time.Minute, "stop after this long even if stdin stays open")
	fs.Parse(args)
	srv, err := netip.ParseAddr(*server)
	if err != nil {
		return nil, fmt.Errorf("--server: %w", err)
	}
	src, err := netip.ParseAddr(*from)
	if err != nil {
		return nil, fmt.Errorf("--from: %w", err)
	}
	c, err := sunrpc.Dial(context.Background(), sunrpc.TCP, netip.AddrPortFrom(srv, uint16(*nlmPort)), sunrpc.ClientOptions{Local: src})
	if err != nil {
		return nil, err
	}
	defer c.Close()
	cl := nlm.NewClient(c, nlm.Vers4)
	lk := nlm.Lock{CallerName: []byte(*caller), FH: []byte(*fh), OH: []byte("probe@" + *caller), SVID: 7, Len: 1}
	round := func(s *series) {
		for _, op := range []func(ctx context.Context) error{
			func(ctx context.Context) error { return cl.Null(ctx) },
			func(ctx context.Context) error {
				r, err := cl.Lock(ctx, &nlm.LockArgs{Cookie: []byte("p"), Exclusive: true, Lock: lk, State: 1})
				return statErr("LOCK", r.Stat, err)
			},
			func(ctx context.Context) error {
				r, err := cl.Unlock(ctx, &nlm.UnlockArgs{Cookie: []byte("p"), Lock: lk})
				return statErr("UNLOCK", r.Stat, err)
			},
		} {
			ctx, cancel := context.WithTimeout(context.Background(), *timeout)
			t0 := time.Now()
			err := op(ctx)
			cancel()
			if s != nil {
				s.add(time.Since(t0), err)
			}
		}
	}
	// The first lock monitors the client (a durable record): not what is
	// measured here.
	round(nil)
	emit(map[string]bool{"ready": true})
	stop := untilStdinCloses(*max)
	res := probeResult{NLM: &series{}}
	var wg sync.WaitGroup
	if *statServer != "" {
		res.Stat = &series{}
		ss, err := netip.ParseAddr(*statServer)
		if err != nil {
			return nil, fmt.Errorf("--stat-server: %w", err)
		}
		sc, err := sunrpc.Dial(context.Background(), sunrpc.UDP, netip.AddrPortFrom(ss, uint16(*nsmPort)),
			sunrpc.ClientOptions{Local: src, Retransmit: 250 * time.Millisecond, MaxRetransmit: time.Second})
		if err != nil {
			return nil, err
		}
		defer sc.Close()
		// One SM_STAT every --stat-interval whether the last one was
		// answered or not, as independent callers would: a stalled
		// service then shows as many failures, not as a few slow calls.
		wg.Go(func() {
			tick := time.NewTicker(*statInterval)
			defer tick.Stop()
			for {
				select {
				case <-stop:
					return
				case <-tick.C:
				}
				wg.Go(func() {
					ctx, cancel := context.WithTimeout(context.Background(), *timeout)
					defer cancel()
					t0 := time.Now()
					r, err := sc.Call(ctx, 100024, 1, 1, xdr.AppendString(nil, *statName))
					if err == nil {
						d := xdr.NewDecoder(r)
						if st := d.Uint32(); d.Err() != nil || st != 0 {
							err = fmt.Errorf("SM_STAT %s: res %d %v", *statName, st, d.Err())
						}
					}
					res.Stat.add(time.Since(t0), err)
				})
			}
		})
	}
	for {
		select {
		case <-stop:
			wg.Wait()
			res.NLM.finish()
			if res.Stat != nil {
				res.Stat.finish()
			}
			return res, nil
		case <-time.After(*interval):
		}
		round(res.NLM)
	}
}

func statErr(what string, st nlm.Stat, err error) error {
	if err != nil {
		return err
	}
	if st != nlm.Granted {
		return errors.New(what + ": " + st.String())
	}
	return nil
}

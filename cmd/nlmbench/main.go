// Command nlmbench is an NLM v4 load generator: C concurrent clients, each
// on its own connection (or UDP socket), loop LOCK then UNLOCK for D
// seconds, and nlmbench reports operations per second and latency
// percentiles.
//
// Modes:
//
//	uncontended  every client locks its own file
//	contended    one file, every client its own range
//	conflicting  one file, one range, non-blocking: most LOCKs are DENIED
//	             (counted and retried at once)
//
// `nlmbench notify` measures the SM_NOTIFY fan-out instead (notify.go);
// `nlmbench failover` the moves of a virtual server between two nlmd
// (failover.go); `nlmbench etcd` the ceiling etcd sets on the etcd
// backend, and `nlmbench handoff` a blocked lock handed across nodes
// (etcd.go).
package main

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net/http"
	"net/netip"
	"os"
	"slices"
	"strconv"
	"strings"
	"sync"
	"time"

	flag "github.com/spf13/pflag"

	"github.com/nlmha/nlmha/nlm"
	"github.com/nlmha/nlmha/sunrpc"
)

type options struct {
	server    string
	port      uint16
	transport string
	clients   int
	duration  time.Duration
	warmup    time.Duration
	mode      string
	caller    string
	local     string
	// metrics, if set, is nlmd's metrics URL: the etcd transactions it
	// sent during the measured time are counted per operation.
	metrics string
}

func main() {
	if len(os.Args) > 1 {
		switch os.Args[1] {
		case "notify":
			os.Exit(runNotify(os.Args[2:]))
		case "failover":
			os.Exit(runFailover(os.Args[2:]))
		case "etcd":
			os.Exit(runEtcdCeiling(os.Args[2:]))
		case "handoff":
			os.Exit(runHandoff(os.Args[2:]))
		}
	}
	var o options
	fs := flag.NewFlagSet("nlmbench", flag.ContinueOnError)
	fs.SortFlags = false
	fs.StringVar(&o.server, "server", "127.0.0.1", "NLM server (virtual server) address")
	fs.Uint16Var(&o.port, "port", 0, "NLM port; 0 asks the server's portmapper")
	fs.StringVar(&o.transport, "transport", "tcp", "tcp or udp")
	fs.IntVar(&o.clients, "clients", 1, "concurrent clients, each with its own connection and one call in flight")
	fs.DurationVar(&o.duration, "duration", 10*time.Second, "measured run time")
	fs.DurationVar(&o.warmup, "warmup", time.Second, "run time before measuring")
	fs.StringVar(&o.mode, "mode", "uncontended", "uncontended, contended or conflicting")
	fs.StringVar(&o.caller, "caller", "nlmbench", "caller_name of the clients")
	fs.StringVar(&o.local, "local", "", "source address of the clients (default: chosen by the kernel)")
	fs.StringVar(&o.metrics, "metrics", "", "nlmd's metrics URL (http://HOST:PORT/metrics): report etcd transactions per operation (--backend etcd)")
	fs.Usage = func() {
		fmt.Fprintf(fs.Output(), "Usage: nlmbench [flags]\n\nNLM v4 LOCK+UNLOCK load generator.\n\nFlags:\n%s", fs.FlagUsages())
	}
	if err := fs.Parse(os.Args[1:]); err != nil {
		if errors.Is(err, flag.ErrHelp) {
			os.Exit(0)
		}
		os.Exit(2)
	}
	res, err := run(context.Background(), o)
	if err != nil {
		fmt.Fprintln(os.Stderr, "nlmbench:", err)
		os.Exit(1)
	}
	res.print(os.Stdout, o)
}

// result is what a run measured.
type result struct {
	elapsed        time.Duration
	ops, pairs     int
	denied, errors int
	lock, unlock   []time.Duration
	txnPerOp       float64 // etcd transactions per operation (--metrics)
}

type worker struct {
	c      *nlm.Client
	lock   nlm.Lock
	r      result
	cookie [8]byte
}

func run(ctx context.Context, o options) (*result, error) {
	var tr sunrpc.Transport
	switch o.transport {
	case "tcp":
		tr = sunrpc.TCP
	case "udp":
		tr = sunrpc.UDP
	default:
		return nil, fmt.Errorf("--transport %q: want tcp or udp", o.transport)
	}
	switch o.mode {
	case "uncontended", "contended", "conflicting":
	default:
		return nil, fmt.Errorf("--mode %q: want uncontended, contended or conflicting", o.mode)
	}
	server, err := netip.ParseAddr(o.server)
	if err != nil {
		return nil, fmt.Errorf("--server: %w", err)
	}
	var local netip.Addr
	if o.local != "" {
		if local, err = netip.ParseAddr(o.local); err != nil {
			return nil, fmt.Errorf("--local: %w", err)
		}
	}
	port := o.port
	if port == 0 {
		if port, err = sunrpc.LookupPort(ctx, server, local, nlm.Prog, nlm.Vers4, tr, sunrpc.ClientOptions{}); err != nil {
			return nil, fmt.Errorf("finding NLM v4: %w", err)
		}
	}
	ws := make([]*worker, o.clients)
	for i := range ws {
		rc, err := sunrpc.Dial(ctx, tr, netip.AddrPortFrom(server, port), sunrpc.ClientOptions{Local: local, Retransmit: 500 * time.Millisecond})
		if err != nil {
			return nil, err
		}
		defer rc.Close()
		w := &worker{c: nlm.NewClient(rc, nlm.Vers4)}
		w.lock = nlm.Lock{CallerName: []byte(o.caller), OH: fmt.Appendf(nil, "%d@%s", i+1, o.caller), SVID: int32(i + 1), Len: 100}
		switch o.mode {
		case "uncontended":
			w.lock.FH = fmt.Appendf(nil, "nlmbench-file-%06d", i)
		case "contended":
			w.lock.FH = []byte("nlmbench-shared-file")
			w.lock.Offset = uint64(i) * 100
		case "conflicting":
			w.lock.FH = []byte("nlmbench-shared-file")
		}
		ws[i] = w
	}
	var measuring sync.WaitGroup
	start := make(chan struct{})
	var t0, t1 time.Time
	deadline := time.Now().Add(o.warmup + o.duration)
	measureFrom := time.Now().Add(o.warmup)
	for _, w := range ws {
		measuring.Go(func() {
			<-start
			w.loop(ctx, measureFrom, deadline)
		})
	}
	var txn0 float64
	var scrapeErr error
	var scraped sync.WaitGroup
	if o.metrics != "" {
		scraped.Go(func() {
			time.Sleep(time.Until(measureFrom))
			txn0, scrapeErr = scrapeCounter(o.metrics, "nlm_etcd_transactions_total")
		})
	}
	close(start)
	measuring.Wait()
	t0, t1 = measureFrom, deadline
	total := &result{elapsed: t1.Sub(t0)}
	for _, w := range ws {
		total.ops += w.r.ops
		total.pairs += w.r.pairs
		total.denied += w.r.denied
		total.errors += w.r.errors
		total.lock = append(total.lock, w.r.lock...)
		total.unlock = append(total.unlock, w.r.unlock...)
	}
	if o.metrics != "" {
		scraped.Wait()
		txn1, err := scrapeCounter(o.metrics, "nlm_etcd_transactions_total")
		if err == nil {
			err = scrapeErr
		}
		if err != nil {
			return total, fmt.Errorf("--metrics: %w", err)
		}
		if total.ops > 0 {
			total.txnPerOp = (txn1 - txn0) / float64(total.ops)
		}
	}
	if total.errors > 0 {
		return total, fmt.Errorf("%d RPC errors", total.errors)
	}
	return total, nil
}

// scrapeCounter reads one unlabelled counter from a Prometheus text page.
func scrapeCounter(url, name string) (float64, error) {
	resp, err := http.Get(url)
	if err != nil {
		return 0, err
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(io.LimitReader(resp.Body, 4<<20))
	if err != nil {
		return 0, err
	}
	for line := range strings.Lines(string(b)) {
		if rest, ok := strings.CutPrefix(line, name+" "); ok {
			return strconv.ParseFloat(strings.TrimSpace(rest), 64)
		}
	}
	return 0, fmt.Errorf("%s: no %s", url, name)
}

// loop locks and unlocks until deadline, measuring what completes after from.
func (w *worker) loop(ctx context.Context, from, deadline time.Time) {
	var seq uint64
	for {
		now := time.Now()
		if !now.Before(deadline) {
			return
		}
		counted := !now.Before(from)
		seq++
		w.cookie[0], w.cookie[1], w.cookie[2], w.cookie[3] = byte(seq), byte(seq>>8), byte(seq>>16), byte(seq>>24)
		cctx, cancel := context.WithTimeout(ctx, 10*time.Second)
		r, err := w.c.Lock(cctx, &nlm.LockArgs{Cookie: w.cookie[:], Exclusive: true, Lock: w.lock, State: 1})
		lockDone := time.Now()
		if err != nil {
			cancel()
			w.r.errors++
			return
		}
		if counted {
			w.r.ops++
			w.r.lock = append(w.r.lock, lockDone.Sub(now))
		}
		if r.Stat == nlm.Denied {
			cancel()
			if counted {
				w.r.denied++
			}
			continue
		}
		if r.Stat != nlm.Granted {
			cancel()
			w.r.errors++
			return
		}
		u, err := w.c.Unlock(cctx, &nlm.UnlockArgs{Cookie: w.cookie[:], Lock: w.lock})
		end := time.Now()
		cancel()
		if err != nil || u.Stat != nlm.Granted {
			w.r.errors++
			return
		}
		if counted && end.Before(deadline) {
			w.r.ops++
			w.r.pairs++
			w.r.unlock = append(w.r.unlock, end.Sub(lockDone))
		}
	}
}

func pct(d []time.Duration, p float64) time.Duration {
	if len(d) == 0 {
		return 0
	}
	return d[min(len(d)-1, int(float64(len(d))*p))]
}

func (r *result) print(out *os.File, o options) {
	slices.Sort(r.lock)
	slices.Sort(r.unlock)
	secs := r.elapsed.Seconds()
	us := func(d time.Duration) float64 { return float64(d.Nanoseconds()) / 1000 }
	fmt.Fprintf(out, "nlmbench: %s, %d %s clients, %.1fs\n", o.mode, o.clients, o.transport, secs)
	fmt.Fprintf(out, "  ops/s      %10.0f   (LOCK+UNLOCK pairs/s %.0f, denied/s %.0f)\n", float64(r.ops)/secs, float64(r.pairs)/secs, float64(r.denied)/secs)
	fmt.Fprintf(out, "  LOCK   µs  p50 %7.1f  p99 %7.1f  p99.9 %7.1f\n", us(pct(r.lock, .5)), us(pct(r.lock, .99)), us(pct(r.lock, .999)))
	fmt.Fprintf(out, "  UNLOCK µs  p50 %7.1f  p99 %7.1f  p99.9 %7.1f\n", us(pct(r.unlock, .5)), us(pct(r.unlock, .99)), us(pct(r.unlock, .999)))
	fmt.Fprintf(out, "RESULT mode=%s transport=%s clients=%d ops_per_s=%.0f pairs_per_s=%.0f denied_per_s=%.0f lock_p50_us=%.1f lock_p99_us=%.1f lock_p999_us=%.1f unlock_p50_us=%.1f unlock_p99_us=%.1f\n",
		o.mode, o.transport, o.clients, float64(r.ops)/secs, float64(r.pairs)/secs, float64(r.denied)/secs,
		us(pct(r.lock, .5)), us(pct(r.lock, .99)), us(pct(r.lock, .999)), us(pct(r.unlock, .5)), us(pct(r.unlock, .99)))
	if o.metrics != "" {
		fmt.Fprintf(out, "RESULT etcd_writes mode=%s clients=%d txn_per_op=%.3f\n", o.mode, o.clients, r.txnPerOp)
	}
}

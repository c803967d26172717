package nsm

import (
	"fmt"
	"net/netip"
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/nlmha/nlmha/nsm/nsmtest"
	"github.com/nlmha/nlmha/virtualserver"
)

// seed writes n client records of vip2 straight into sm/ (no fsync: the
// benchmark measures the notifier, not the disk).
func seed(b testing.TB, dir string, n int) {
	b.Helper()
	sm := filepath.Join(VIPDir(dir, vip2.String()), smDir)
	if err := os.MkdirAll(sm, dirPerm); err != nil {
		b.Fatal(err)
	}
	for i := range n {
		r := clientRecord(Client{Caller: fmt.Sprint("c", i), Addr: benchAddr(i)}, "vip-two", fixedTime)
		data, err := marshalRecord(r)
		if err != nil {
			b.Fatal(err)
		}
		if err := os.WriteFile(filepath.Join(sm, r.fileName()), data, filePerm); err != nil {
			b.Fatal(err)
		}
	}
}

func benchAddr(i int) netip.Addr {
	return netip.AddrFrom4([4]byte{127, 1 + byte(i/60000), byte(i % 60000 / 240), 1 + byte(i%240)})
}

// BenchmarkNotifyFanout is the time from a virtual server's start to the
// last of n simulated client statds (each behind its own loopback address,
// reached through its portmapper) having SM_NOTIFY, with the default window.
func BenchmarkNotifyFanout(b *testing.B) {
	peers, err := nsmtest.Start(0)
	if err != nil {
		b.Fatal(err)
	}
	defer peers.Close()
	for _, n := range []int{1000, 10000} {
		b.Run(fmt.Sprintf("clients=%d", n), func(b *testing.B) {
			b.ReportAllocs()
			var total time.Duration
			for range b.N {
				b.StopTimer()
				dir := b.TempDir()
				seed(b, dir, n)
				peers.Reset()
				b.StartTimer()
				start := time.Now()
				nd := startNode(b, nodeOpts{dir: dir, peers: peers, quiet: true, vips: []virtualserver.Spec{{Addr: vip2, Name: "vip-two"}},
					notify: NotifyConfig{Timeout: 2 * time.Second, MaxTimeout: 120 * time.Second}})
				for peers.Notified() < n {
					if time.Since(start) > time.Minute {
						b.Fatalf("notified %d of %d", peers.Notified(), n)
					}
					time.Sleep(100 * time.Microsecond)
				}
				total += time.Since(start)
				b.StopTimer()
				nd.stop()
				b.StartTimer()
			}
			b.ReportMetric(float64(n)*float64(b.N)/total.Seconds(), "clients/s")
		})
	}
}

// BenchmarkMonitorNewClient is the cost a client's first lock through a
// virtual server pays: its monitor record written durably (temporary file,
// fsync, rename, fsync of the directory) on the test's file system.
func BenchmarkMonitorNewClient(b *testing.B) {
	n := startNode(b, nodeOpts{quiet: true, vips: []virtualserver.Spec{{Addr: vip2}}})
	ctx := b.Context()
	i := 0
	for b.Loop() {
		if err := n.svc.Monitor(ctx, vip2, "c", benchAddr(i)); err != nil {
			b.Fatal(err)
		}
		i++
	}
}

// BenchmarkFanoutSchedule is the schedule's own share of a fan-out: n
// peers with the default window, each portmapper and statd answering at
// once, no I/O. Per peer it is a small fraction of BenchmarkNotifyFanout's.
func BenchmarkFanoutSchedule(b *testing.B) {
	const n = 10000
	addrs := make([]netip.Addr, n)
	for i := range addrs {
		addrs[i] = benchAddr(i)
	}
	cfg := NotifyConfig{}.withDefaults()
	from := netip.MustParseAddr("127.0.0.2")
	b.ReportAllocs()
	for b.Loop() {
		now := fixedTime
		f := newFanout(cfg, from, addrs, 1)
		f.Start(now)
		var calls []fanAction
		for !f.Over() {
			calls = calls[:0]
			for _, a := range f.Actions() {
				if a.kind == actQuery || a.kind == actNotify {
					calls = append(calls, a)
				}
			}
			now = now.Add(time.Millisecond)
			for _, a := range calls {
				if a.kind == actQuery {
					f.PortReply(now, a.target, a.xid, 2049)
				} else {
					f.NotifyReply(now, a.target, a.xid, true)
				}
			}
			f.Tick(now)
		}
	}
	b.ReportMetric(float64(b.Elapsed().Nanoseconds())/float64(b.N)/n, "ns/peer")
}

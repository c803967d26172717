package main

import (
	"sync"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"

	"github.com/nlmha/nlmha/nlm"
	"github.com/nlmha/nlmha/nsm"
	"github.com/nlmha/nlmha/sunrpc"
)

// metrics are nlmd's Prometheus metrics. Labels name programs, procedures
// and virtual servers only: never a client or a file handle, whose number
// has no bound.
type metrics struct {
	reg   *prometheus.Registry
	calls *prometheus.CounterVec
	dur   *prometheus.HistogramVec
	// per procedure: its counters and histogram, resolved once
	handles sync.Map // callKey → *callHandles
}

type callKey struct {
	proc *sunrpc.Proc
	vers uint32
}

type callHandles struct {
	outcomes [6]prometheus.Counter
	dur      prometheus.Observer
}

var programNames = map[uint32]string{nlm.Prog: "nlm", nsm.Prog: "nsm", sunrpc.PmapProg: "portmap"}

func newMetrics() *metrics {
	m := &metrics{reg: prometheus.NewRegistry()}
	m.calls = prometheus.NewCounterVec(prometheus.CounterOpts{
		Name: "nlm_rpc_requests_total", Help: "RPC calls that reached a procedure, by program, version, procedure and outcome.",
	}, []string{"program", "version", "procedure", "outcome"})
	m.dur = prometheus.NewHistogramVec(prometheus.HistogramOpts{
		Name: "nlm_rpc_duration_seconds", Help: "Time from a call's dispatch to its reply, by program and procedure.",
		Buckets: []float64{10e-6, 25e-6, 50e-6, 100e-6, 250e-6, 500e-6, 1e-3, 2.5e-3, 5e-3, 10e-3, 25e-3, 100e-3, 1},
	}, []string{"program", "procedure"})
	m.reg.MustRegister(m.calls, m.dur, collectors.NewGoCollector(), collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}))
	return m
}

// ObserveCall is the RPC servers' CallObserver.
func (m *metrics) ObserveCall(req *sunrpc.Request, proc *sunrpc.Proc, o sunrpc.CallOutcome, d time.Duration) {
	k := callKey{proc, req.Vers}
	h, ok := m.handles.Load(k)
	if !ok {
		prog := programNames[req.Prog]
		vers := itoa(req.Vers)
		ch := &callHandles{dur: m.dur.WithLabelValues(prog, proc.Name)}
		for i := range ch.outcomes {
			ch.outcomes[i] = m.calls.WithLabelValues(prog, vers, proc.Name, sunrpc.CallOutcome(i).String())
		}
		h, _ = m.handles.LoadOrStore(k, ch)
	}
	ch := h.(*callHandles)
	ch.outcomes[o].Inc()
	ch.dur.Observe(d.Seconds())
}

func itoa(v uint32) string {
	const digits = "0123456789"
	if v < 10 {
		return digits[v : v+1]
	}
	var b [10]byte
	i := len(b)
	for v > 0 {
		i--
		b[i] = digits[v%10]
		v /= 10
	}
	return string(b[i:])
}

// stateCollector reads the daemon's state at each scrape.
type stateCollector struct {
	d *daemon

	vipInfo, epoch, graceActive, graceLeft, locks, blocked, shares, clients, nsmState, notify *prometheus.Desc
	callbacks, nsmNotify, nsmRefused, nsmCallbackFail, rpcDrops, refusedNames                 *prometheus.Desc
}

func newStateCollector(d *daemon) *stateCollector {
	vip := []string{"vip"}
	return &stateCollector{d: d,
		vipInfo:         prometheus.NewDesc("nlm_virtual_server_info", "A virtual server known on this node, with its name and state.", []string{"vip", "name", "state"}, nil),
		epoch:           prometheus.NewDesc("nlm_virtual_server_epoch", "The virtual server's epoch (grows with each takeover).", vip, nil),
		graceActive:     prometheus.NewDesc("nlm_grace_active", "1 while the virtual server is in its grace period.", vip, nil),
		graceLeft:       prometheus.NewDesc("nlm_grace_remaining_seconds", "Time left in the virtual server's grace period at the latest.", vip, nil),
		locks:           prometheus.NewDesc("nlm_locks_held", "Lock ranges held through the virtual server.", vip, nil),
		blocked:         prometheus.NewDesc("nlm_locks_blocked", "Blocked lock requests queued through the virtual server.", vip, nil),
		shares:          prometheus.NewDesc("nlm_shares", "Share reservations held through the virtual server.", vip, nil),
		clients:         prometheus.NewDesc("nlm_clients_monitored", "Client hosts the virtual server monitors (NSM).", vip, nil),
		nsmState:        prometheus.NewDesc("nlm_nsm_state", "The virtual server's NSM state number.", vip, nil),
		notify:          prometheus.NewDesc("nlm_notify_clients", "Clients of the virtual server's last SM_NOTIFY round, by result (done, failed, pending).", []string{"vip", "result"}, nil),
		callbacks:       prometheus.NewDesc("nlm_granted_callbacks_total", "GRANTED callbacks, by result (accepted, refused, failed attempt).", []string{"result"}, nil),
		nsmNotify:       prometheus.NewDesc("nlm_nsm_notifications_received_total", "SM_NOTIFY received from clients, by result (accepted, duplicate, unknown, queue_full).", []string{"result"}, nil),
		nsmRefused:      prometheus.NewDesc("nlm_nsm_refused_total", "SM_MON, SM_UNMON, SM_UNMON_ALL and SM_SIMU_CRASH refused.", nil, nil),
		nsmCallbackFail: prometheus.NewDesc("nlm_nsm_callback_failures_total", "Reboot callbacks to local lock managers (SM_MON) that failed.", nil, nil),
		rpcDrops:        prometheus.NewDesc("nlm_rpc_dropped_total", "Datagrams, messages and connections dropped by the RPC servers, by reason.", []string{"server", "reason"}, nil),
		refusedNames:    prometheus.NewDesc("nlm_refused_caller_names_total", "Requests refused because their address has as many caller_names as allowed (--max-clients-per-address).", nil, nil),
	}
}

func (c *stateCollector) Describe(ch chan<- *prometheus.Desc) {
	for _, d := range []*prometheus.Desc{c.vipInfo, c.epoch, c.graceActive, c.graceLeft, c.locks, c.blocked, c.shares, c.clients,
		c.nsmState, c.notify, c.callbacks, c.nsmNotify, c.nsmRefused, c.nsmCallbackFail, c.rpcDrops, c.refusedNames} {
		ch <- d
	}
}

func (c *stateCollector) Collect(ch chan<- prometheus.Metric) {
	gauge := func(d *prometheus.Desc, v float64, labels ...string) {
		ch <- prometheus.MustNewConstMetric(d, prometheus.GaugeValue, v, labels...)
	}
	counter := func(d *prometheus.Desc, v uint64, labels ...string) {
		ch <- prometheus.MustNewConstMetric(d, prometheus.CounterValue, float64(v), labels...)
	}
	for _, v := range c.d.mgr.VIPs() {
		a := v.VIP.String()
		gauge(c.vipInfo, 1, a, v.Name, v.State)
		gauge(c.epoch, float64(v.Epoch), a)
		active, left := 0.0, 0.0
		if v.Grace.Active {
			active, left = 1, max(0, time.Until(v.Grace.Until).Seconds())
		}
		gauge(c.graceActive, active, a)
		gauge(c.graceLeft, left, a)
		gauge(c.locks, float64(v.Locks), a)
		gauge(c.blocked, float64(v.Blocked), a)
		gauge(c.shares, float64(v.Shares), a)
		gauge(c.clients, float64(v.Clients), a)
		gauge(c.nsmState, float64(v.NSMState), a)
		if n := v.Notify; n != nil {
			gauge(c.notify, float64(n.Done), a, "done")
			gauge(c.notify, float64(n.Failed), a, "failed")
			gauge(c.notify, float64(n.Pending), a, "pending")
		}
	}
	ns := c.d.svc.Stats()
	counter(c.callbacks, ns.GrantedCallbacks.Load(), "accepted")
	counter(c.callbacks, ns.RefusedCallbacks.Load(), "refused")
	counter(c.callbacks, ns.CallbackFailures.Load(), "failed")
	ms := c.d.nsm.Stats()
	counter(c.nsmNotify, ms.NotifyAccepted.Load(), "accepted")
	counter(c.nsmNotify, ms.NotifyDuplicate.Load(), "duplicate")
	counter(c.nsmNotify, ms.NotifyUnknown.Load(), "unknown")
	counter(c.nsmNotify, ms.NotifyDropped.Load(), "queue_full")
	counter(c.nsmRefused, ms.Rejected.Load())
	counter(c.nsmCallbackFail, ms.CallbackFailed.Load())
	for name, srv := range map[string]*sunrpc.Server{"nlm": c.d.rpc, "nsm": c.d.nsmRPC} {
		st := srv.Stats()
		counter(c.rpcDrops, st.UDPQueueDrops, name, "udp_queue_full")
		counter(c.rpcDrops, st.UDPOversize, name, "udp_oversize")
		counter(c.rpcDrops, st.StoppedDrops, name, "address_stopped")
		counter(c.rpcDrops, st.MalformedHeaders, name, "malformed")
		counter(c.rpcDrops, st.RecordErrors, name, "bad_record")
		counter(c.rpcDrops, st.ConnsEvicted, name, "connection_evicted")
	}
	counter(c.refusedNames, ns.TooManyNames.Load())
}

// etcdCollector exports the etcd backend's counters and the node's lease.
type etcdCollector struct {
	p                                                 *backendParts
	txns, retries, fencedEdits, selfFenced, conflicts *prometheus.Desc
	relists, deadline, fenced, reads                  *prometheus.Desc
}

func newEtcdCollector(p *backendParts) *etcdCollector {
	return &etcdCollector{p: p,
		txns:        prometheus.NewDesc("nlm_etcd_transactions_total", "Writing transactions sent to etcd (each is one round trip).", nil, nil),
		reads:       prometheus.NewDesc("nlm_etcd_reads_total", "Reads from etcd that confirmed the mirror current for a decision that changed nothing (a denial, a TEST): one round trip each.", nil, nil),
		retries:     prometheus.NewDesc("nlm_etcd_txn_retries_total", "Lock edits run again because another node changed the file first.", nil, nil),
		fencedEdits: prometheus.NewDesc("nlm_etcd_fenced_edits_total", "Edits etcd refused because the virtual server's claim had moved to another node or epoch.", nil, nil),
		selfFenced:  prometheus.NewDesc("nlm_etcd_self_fencing_total", "Times this node fenced itself: its lease's deadline passed without an acknowledged keepalive.", nil, nil),
		conflicts:   prometheus.NewDesc("nlm_etcd_conflicts_total", "Lock edits given up after too many lost races on one file.", nil, nil),
		relists:     prometheus.NewDesc("nlm_etcd_relists_total", "Full reloads of the lock mirror (its watch fell behind a compaction).", nil, nil),
		deadline:    prometheus.NewDesc("nlm_etcd_lease_deadline_seconds", "Seconds until this node fences itself unless a keepalive is acknowledged.", nil, nil),
		fenced:      prometheus.NewDesc("nlm_etcd_self_fenced", "1 once this node has fenced itself (it serves nothing until restarted).", nil, nil),
	}
}

func (c *etcdCollector) Describe(ch chan<- *prometheus.Desc) {
	for _, d := range []*prometheus.Desc{c.txns, c.reads, c.retries, c.fencedEdits, c.selfFenced, c.conflicts, c.relists, c.deadline, c.fenced} {
		ch <- d
	}
}

func (c *etcdCollector) Collect(ch chan<- prometheus.Metric) {
	st := c.p.etcd.Stats()
	for d, v := range map[*prometheus.Desc]uint64{c.txns: st.Txns, c.reads: st.Reads, c.retries: st.Retries, c.fencedEdits: st.Fenced,
		c.selfFenced: st.SelfFenced, c.conflicts: st.Conflicts, c.relists: st.Relists} {
		ch <- prometheus.MustNewConstMetric(d, prometheus.CounterValue, float64(v))
	}
	fenced := 0.0
	if c.p.owners.Fenced() {
		fenced = 1
	}
	ch <- prometheus.MustNewConstMetric(c.fenced, prometheus.GaugeValue, fenced)
	ch <- prometheus.MustNewConstMetric(c.deadline, prometheus.GaugeValue, time.Until(c.p.owners.Deadline()).Seconds())
}

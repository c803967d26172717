package main

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/http"
	"net/netip"
	"os"
	"slices"
	"strings"
	"sync"
	"syscall"
	"time"

	"github.com/prometheus/client_golang/prometheus/promhttp"

	"github.com/nlmha/nlmha/dlm"
	"github.com/nlmha/nlmha/hacallout"
	"github.com/nlmha/nlmha/nlm"
	"github.com/nlmha/nlmha/nlm/lockmgr"
	"github.com/nlmha/nlmha/nsm"
	"github.com/nlmha/nlmha/sunrpc"
	"github.com/nlmha/nlmha/virtualserver"
)

// daemon is a running nlmd.
type daemon struct {
	o         *options
	log       *slog.Logger
	rpc       *sunrpc.Server // NLM
	nsmRPC    *sunrpc.Server // NSM
	pm        *sunrpc.Server // embedded portmapper, if running
	registrar *sunrpc.Registrar
	regs      []sunrpc.Registration
	backend   dlm.Backend
	parts     *backendParts
	registry  *virtualserver.Registry
	svc       *nlm.Service
	nsm       *nsm.Service
	mgr       *hacallout.Manager
	addrs     hacallout.Addresses
	validator *nlm.NFSValidator
	metrics   *metrics
	control   *http.Server
	metricSrv *http.Server
	serving   sync.WaitGroup
	stop      chan struct{}
	started   time.Time
}

// connLimits returns the caps of NLM and NSM TCP connections. Given one
// (--max-connections), it is NLM's; by default the process's descriptor
// limit less a reserve for state files, callbacks, listeners and the
// control and metrics sockets (an eighth, at least 256) is shared out, a
// quarter to NSM (local lock managers, reboot notifications over TCP).
func connLimits(nlm int) (int, int) {
	if nlm <= 0 {
		var rl syscall.Rlimit
		if err := syscall.Getrlimit(syscall.RLIMIT_NOFILE, &rl); err != nil || rl.Cur > 1<<24 {
			return 0, 0 // unknown or as good as none: no cap
		}
		n := int(rl.Cur)
		total := max(n-max(256, n/8), 64)
		return max(total*3/4, 32), max(total/4, 16)
	}
	return nlm, max(nlm/4, 16)
}

func parseVIPs(specs []string) ([]virtualserver.Spec, error) {
	var out []virtualserver.Spec
	for _, s := range specs {
		addr, name, _ := strings.Cut(s, "=")
		a, err := netip.ParseAddr(addr)
		if err != nil {
			return nil, fmt.Errorf("--vip %q: %w", s, err)
		}
		out = append(out, virtualserver.Spec{Addr: a.Unmap(), Name: name})
	}
	return out, nil
}

func start(ctx context.Context, o *options, log *slog.Logger) (*daemon, error) {
	vips, err := parseVIPs(o.vips)
	if err != nil {
		return nil, err
	}
	parts, err := newBackend(ctx, o, log)
	if err != nil {
		return nil, err
	}
	d := &daemon{o: o, log: log, backend: parts.backend, parts: parts, stop: make(chan struct{}), started: time.Now(), metrics: newMetrics()}
	// Roomy UDP buffers: the notifier's replies and UDP lock traffic come
	// in bursts of hundreds of datagrams, and a datagram dropped by the
	// kernel costs its sender a retransmission timeout.
	nlmConns, nsmConns := connLimits(o.maxConns)
	d.rpc = &sunrpc.Server{Logger: log, MaxRecordSize: o.maxRecord, UDPBuffer: 4 << 20, Observer: d.metrics, MaxConns: nlmConns}
	d.nsmRPC = &sunrpc.Server{Logger: log, MaxRecordSize: o.maxRecord, UDPBuffer: 4 << 20, Observer: d.metrics, MaxConns: nsmConns}
	d.registry = virtualserver.New(virtualserver.Config{Claims: d.backend, Servers: vips, ServeUnknown: o.serveUnknown, Grace: o.grace, GraceQuiet: o.graceQuiet,
		// The manager orchestrates it (Run): requests that come before it
		// runs wait for their takeover.
		Orchestrated: true,
	})
	d.nsm, err = nsm.New(nsm.Config{
		VirtualServers:    d.registry,
		StateDir:          o.stateDir,
		RPC:               d.nsmRPC,
		Port:              o.nsmPort,
		Notify:            nsm.NotifyConfig{Disabled: o.noNotify, GiveUp: o.notifyGiveUp, Window: o.notifyWindow},
		HACallout:         o.haCallout,
		CalloutTimeout:    o.calloutWait,
		OnReboot:          d.dropClients,
		UnprivilegedLocal: o.unprivLocal,
		Mirror:            parts.nsmMirror(),
		Logger:            log,
	})
	if err != nil {
		d.closeBackend()
		return nil, err
	}
	cfg := nlm.Config{
		Backend:           d.backend,
		VirtualServers:    d.registry,
		Limits:            lockmgr.Limits{LocksPerHost: o.locksPerHost, BlockedPerHost: o.blockedPerHst, SharesPerHost: o.sharesPerHost},
		RPC:               d.rpc,
		Port:              o.nlmPort,
		Monitor:           d.nsm,
		UnprivilegedLocal: o.unprivLocal,
		Logger:            log,
	}
	if o.nfsServer != "" {
		ap, err := parseHostPort(o.nfsServer)
		if err != nil {
			d.nsm.Close()
			return nil, fmt.Errorf("--nfs-server: %w", err)
		}
		d.validator = &nlm.NFSValidator{Addr: ap}
		cfg.FHValidator = d.validator
	}
	d.svc = nlm.New(cfg)
	for _, p := range d.svc.Programs() {
		if err := d.rpc.Register(p); err != nil {
			return nil, err
		}
	}
	for _, p := range d.nsm.Programs() {
		if err := d.nsmRPC.Register(p); err != nil {
			return nil, err
		}
	}
	var families []bool
	if o.listenMode == "vip" {
		d.addrs = &boundAddrs{d: d, socks: map[netip.Addr][]func() error{}}
		families = []bool{false}
		for _, v := range vips {
			if !v.Addr.Is4() && !slices.Contains(families, true) {
				families = append(families, true)
			}
		}
	} else {
		d.addrs = wildcardAddrs{d.rpc, d.nsmRPC}
		families, err = d.listen(d.rpc, o.nlmPort)
		if err == nil {
			_, err = d.listen(d.nsmRPC, o.nsmPort)
		}
		if err != nil {
			d.abort()
			return nil, err
		}
	}
	mcfg := hacallout.Config{Registry: d.registry, NLM: d.svc, NSM: d.nsm, Addrs: d.addrs, StateDir: o.stateDir,
		NoSnapshot: o.noSnapshot, Notified: o.noNotify, ServeUnknown: o.serveUnknown && o.listenMode == "wildcard", Logger: log}
	if parts.owners != nil {
		mcfg.Ownership, mcfg.Shared, mcfg.Cluster = etcdOwnership{parts.owners}, true, etcdCluster{parts}
	}
	d.mgr = hacallout.New(mcfg)
	octx, ocancel := context.WithCancel(context.Background())
	d.serving.Go(func() { d.mgr.Run(octx) })
	d.serving.Go(func() { <-d.stop; ocancel() })
	for _, fam := range families {
		for _, t := range []sunrpc.Transport{sunrpc.TCP, sunrpc.UDP} {
			for _, v := range []uint32{nlm.Vers1, nlm.Vers3, nlm.Vers4} {
				d.regs = append(d.regs, sunrpc.Registration{Prog: nlm.Prog, Vers: v, Transport: t, V6: fam, Port: o.nlmPort})
			}
			d.regs = append(d.regs, sunrpc.Registration{Prog: nsm.Prog, Vers: nsm.Vers, Transport: t, V6: fam, Port: o.nsmPort})
		}
	}
	if err := d.register(ctx, families); err != nil {
		d.abort()
		return nil, err
	}
	if o.controlSocket != "" {
		l, err := hacallout.ListenControl(o.controlSocket)
		if err != nil {
			d.abort()
			return nil, fmt.Errorf("control socket: %w", err)
		}
		d.control = &http.Server{Handler: d.mgr.Handler(hacallout.Info{Version: version, Listen: o.listenMode, Started: d.started}),
			ReadHeaderTimeout: 10 * time.Second}
		d.serving.Go(func() { logHTTPErr(log, d.control.Serve(l)) })
	}
	if o.metricsListen != "" {
		l, err := net.Listen("tcp", o.metricsListen)
		if err != nil {
			d.abort()
			return nil, fmt.Errorf("--metrics-listen: %w", err)
		}
		d.metrics.reg.MustRegister(newStateCollector(d))
		if parts.etcd != nil {
			d.metrics.reg.MustRegister(newEtcdCollector(parts))
		}
		mux := http.NewServeMux()
		mux.Handle("/metrics", promhttp.HandlerFor(d.metrics.reg, promhttp.HandlerOpts{}))
		d.metricSrv = &http.Server{Handler: mux, ReadHeaderTimeout: 10 * time.Second}
		d.serving.Go(func() { logHTTPErr(log, d.metricSrv.Serve(l)) })
	}
	// Now that the sockets are up (replies to SM_NOTIFY reach them): the
	// configured virtual servers and those served here before.
	if err := d.mgr.StartAll(ctx); err != nil {
		log.Error("nlmd: taking over some virtual servers failed", "err", err)
	}
	d.serving.Go(d.sweep)
	log.Info("nlmd: serving NLM v1, v3, v4 and NSM v1", "version", version, "nlm_port", o.nlmPort, "nsm_port", o.nsmPort,
		"listen_mode", o.listenMode, "listen", strings.Join(o.listen, ","), "rpcbind", d.rpcbindMode(), "grace", o.grace,
		"virtual_servers", len(vips), "serve_unknown", o.serveUnknown, "state_dir", o.stateDir, "notify", !o.noNotify,
		"control_socket", o.controlSocket, "metrics", o.metricsListen)
	return d, nil
}

func logHTTPErr(log *slog.Logger, err error) {
	if err != nil && !errors.Is(err, http.ErrServerClosed) {
		log.Error("nlmd: HTTP server stopped", "err", err)
	}
}

// dropClients drops the state of clients whose reboot the NSM service
// learnt of, on every virtual server they used.
func (d *daemon) dropClients(ctx context.Context, clients []nsm.Client) error {
	keys := make(map[dlm.HostKey]bool, len(clients))
	for _, c := range clients {
		keys[dlm.HostKey{VIP: c.VIP, Name: c.Caller, Addr: c.Addr}] = true
	}
	return d.svc.Rebooted(ctx, dlm.Selector{Keys: keys})
}

// reload applies a re-read configuration: virtual servers added to the
// list are taken over, those removed from it released (with a snapshot).
func (d *daemon) reload(ctx context.Context, n *options) {
	before, _ := parseVIPs(d.o.vips)
	after, _ := parseVIPs(n.vips)
	d.registry.SetConfigured(after)
	has := func(list []virtualserver.Spec, a netip.Addr) bool {
		return slices.ContainsFunc(list, func(s virtualserver.Spec) bool { return s.Addr == a })
	}
	for _, s := range after {
		if !has(before, s.Addr) {
			if _, err := d.mgr.Takeover(ctx, s); err != nil {
				d.log.Error("nlmd: SIGHUP: takeover failed", "vip", s.Addr, "err", err)
			}
		}
	}
	for _, s := range before {
		if !has(after, s.Addr) {
			if _, err := d.mgr.Release(ctx, s.Addr, true); err != nil {
				d.log.Error("nlmd: SIGHUP: release failed", "vip", s.Addr, "err", err)
			}
		}
	}
	d.o.vips = n.vips
	d.log.Info("nlmd: configuration reloaded", "virtual_servers", len(after))
}

func parseHostPort(s string) (netip.AddrPort, error) {
	if ap, err := netip.ParseAddrPort(s); err == nil {
		return ap, nil
	}
	a, err := netip.ParseAddr(s)
	if err != nil {
		return netip.AddrPort{}, fmt.Errorf("%q is neither ADDRESS nor ADDRESS:PORT", s)
	}
	return netip.AddrPortFrom(a, 0), nil
}

// listen opens TCP and UDP on port for every --listen address and serves
// them; it returns the address families served (false = IPv4, true = IPv6).
func (d *daemon) listen(srv *sunrpc.Server, port uint16) ([]bool, error) {
	var fams []bool
	for _, s := range d.o.listen {
		a, err := netip.ParseAddr(s)
		if err != nil {
			return nil, fmt.Errorf("--listen %q: %w", s, err)
		}
		v6 := !a.Is4()
		tcp, udp := "tcp4", "udp4"
		if v6 {
			tcp, udp = "tcp6", "udp6"
		}
		addr := netip.AddrPortFrom(a, port).String()
		l, err := net.Listen(tcp, addr)
		if err != nil && v6 && a.IsUnspecified() {
			d.log.Warn("nlmd: IPv6 unavailable; serving IPv4 only", "err", err)
			continue
		}
		if err != nil {
			return nil, fmt.Errorf("listening on %s/tcp: %w", addr, err)
		}
		pc, err := net.ListenPacket(udp, addr)
		if err != nil {
			l.Close()
			return nil, fmt.Errorf("listening on %s/udp: %w", addr, err)
		}
		// Attached here, not in the goroutine: the SM_NOTIFYs of the
		// virtual servers taken over at start leave from it at once.
		servePC, err := srv.AttachPacket(pc)
		if err != nil {
			l.Close()
			return nil, fmt.Errorf("serving %s/udp: %w", addr, err)
		}
		d.serving.Go(func() { logServeErr(d.log, srv.Serve(l)) })
		d.serving.Go(func() { logServeErr(d.log, servePC()) })
		if len(fams) == 0 || fams[len(fams)-1] != v6 {
			fams = append(fams, v6)
		}
	}
	if len(fams) == 0 {
		return nil, errors.New("nothing to listen on")
	}
	return fams, nil
}

func logServeErr(log *slog.Logger, err error) {
	if err != nil && !errors.Is(err, sunrpc.ErrServerClosed) && !errors.Is(err, net.ErrClosed) {
		log.Error("nlmd: serving stopped", "err", err)
	}
}

// register publishes the ports with the system rpcbind or the embedded
// portmapper.
func (d *daemon) register(ctx context.Context, families []bool) error {
	mode := d.o.rpcbind
	if mode == "auto" {
		mode = "embedded"
		if systemRpcbind(ctx) {
			mode = "system"
		}
	}
	ctx, cancel := context.WithTimeout(ctx, 10*time.Second)
	defer cancel()
	switch mode {
	case "system":
		d.registrar = &sunrpc.Registrar{Owner: "nlmd", Options: sunrpc.ClientOptions{Reserved: true}}
		if err := d.registrar.Register(ctx, d.regs...); err != nil {
			d.registrar = nil
			if errors.Is(err, sunrpc.ErrRegisteredElsewhere) {
				return fmt.Errorf("%w (nlmd serves NLM and NSM itself: are the kernel's lockd, rpc.statd or another nlmd on other ports running?)", err)
			}
			return fmt.Errorf("registering with rpcbind: %w", err)
		}
	case "embedded":
		pm := &sunrpc.Portmapper{}
		d.pm = &sunrpc.Server{Logger: d.log}
		for _, p := range pm.Programs() {
			d.pm.Register(p)
		}
		listen := d.o.listen
		if d.o.listenMode == "vip" {
			listen = []string{"0.0.0.0"}
		}
		saved := d.o.listen
		d.o.listen = listen
		_, err := d.listen(d.pm, d.o.portmapPort)
		d.o.listen = saved
		if err != nil {
			d.pm = nil
			if d.o.rpcbind == "auto" {
				d.log.Warn("nlmd: no rpcbind and no embedded portmapper: clients must be told the ports", "err", err)
				return nil
			}
			return fmt.Errorf("starting the embedded portmapper: %w", err)
		}
		pm.RegisterSelf(d.o.portmapPort, len(families) > 1 || families[0])
		for _, r := range d.regs {
			pm.Set(sunrpc.RPCB{Prog: r.Prog, Vers: r.Vers, NetID: r.NetID(), Addr: sunrpc.FormatUaddr(netip.AddrPortFrom(unspecified(r.V6), r.Port)), Owner: "nlmd"})
		}
	}
	return nil
}

func unspecified(v6 bool) netip.Addr {
	if v6 {
		return netip.IPv6Unspecified()
	}
	return netip.IPv4Unspecified()
}

func (d *daemon) rpcbindMode() string {
	switch {
	case d.registrar != nil:
		return "system"
	case d.pm != nil:
		return "embedded"
	}
	return "none"
}

// systemRpcbind reports whether a portmapper answers locally.
func systemRpcbind(ctx context.Context) bool {
	ctx, cancel := context.WithTimeout(ctx, 500*time.Millisecond)
	defer cancel()
	var c *sunrpc.Client
	var err error
	if _, serr := os.Stat(sunrpc.DefaultRpcbindSocket); serr == nil {
		c, err = sunrpc.DialUnix(ctx, sunrpc.DefaultRpcbindSocket, sunrpc.ClientOptions{})
	} else {
		c, err = sunrpc.Dial(ctx, sunrpc.UDP, netip.MustParseAddrPort("127.0.0.1:111"), sunrpc.ClientOptions{Retransmit: 100 * time.Millisecond})
	}
	if err != nil {
		return false
	}
	defer c.Close()
	_, err = c.Call(ctx, sunrpc.PmapProg, sunrpc.PmapVers2, sunrpc.PmapProcNull, nil)
	return err == nil
}

// sweep lets the backend forget idle hosts and owners once a minute, and
// the status monitor stop monitoring clients that hold nothing any more.
func (d *daemon) sweep() {
	t := time.NewTicker(time.Minute)
	defer t.Stop()
	for {
		select {
		case <-d.stop:
			return
		case <-t.C:
			d.backend.Sweep()
			d.svc.Sweep()
			busy := map[dlm.HostKey]bool{}
			d.backend.Hosts(func(h *dlm.Host) bool {
				if !h.Idle() {
					busy[h.HostKey] = true
				}
				return true
			})
			if n := d.nsm.Prune(func(c nsm.Client) bool { return busy[dlm.HostKey{VIP: c.VIP, Name: c.Caller, Addr: c.Addr}] }); n > 0 {
				d.log.Debug("nlmd: stopped monitoring idle clients", "count", n)
			}
		}
	}
}

// shutdown hands every virtual server over (released with a snapshot, so
// that the next start — here or elsewhere — keeps every lock without a
// grace period), stops serving (calls in progress finish), withdraws the
// rpcbind registrations and releases everything.
func (d *daemon) shutdown() error {
	ctx, cancel := context.WithTimeout(context.Background(), d.o.shutdownWait)
	defer cancel()
	if d.control != nil {
		d.control.Shutdown(ctx)
	}
	err := d.mgr.ReleaseAll(ctx)
	err = errors.Join(err, d.rpc.Shutdown(ctx), d.nsmRPC.Shutdown(ctx))
	if d.registrar != nil && d.o.listenMode == "wildcard" {
		// In listen mode vip, other nlmd on this host share the same
		// registrations: they stay.
		uctx, ucancel := context.WithTimeout(context.Background(), 5*time.Second)
		if uerr := d.registrar.Unregister(uctx, d.regs...); uerr != nil {
			err = errors.Join(err, fmt.Errorf("unregistering from rpcbind: %w", uerr))
		}
		ucancel()
	}
	d.abort()
	return err
}

// abort stops everything without waiting for calls in progress.
func (d *daemon) abort() {
	d.nsm.Close() // notifications first: they send through nsmRPC
	d.rpc.Close()
	d.nsmRPC.Close()
	if d.pm != nil {
		d.pm.Close()
	}
	if d.control != nil {
		d.control.Close()
		os.Remove(d.o.controlSocket)
	}
	if d.metricSrv != nil {
		d.metricSrv.Close()
	}
	select {
	case <-d.stop:
	default:
		close(d.stop)
	}
	if b, ok := d.addrs.(*boundAddrs); ok {
		b.closeAll()
	}
	d.serving.Wait()
	d.svc.Close()
	if d.validator != nil {
		d.validator.Close()
	}
	d.closeBackend()
}

// closeBackend closes the backend, then (etcd) gives the node's lease
// back — the virtual servers still owned go to whoever takes them, as
// after a crash — and closes the client and an embedded etcd.
func (d *daemon) closeBackend() {
	d.backend.Close()
	if d.parts.owners != nil {
		if err := d.parts.owners.Close(); err != nil {
			d.log.Warn("nlmd: etcd", "err", err)
		}
	}
	d.parts.close()
}

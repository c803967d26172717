// Command nlmd is the nlmha lock daemon: NLM and NSM (statd) for NFSv3
// clients, keyed by virtual server — the address each request was sent to
// — so that one floating IP can move between nodes without disturbing the
// others. See README.md.
package main

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"os/signal"
	"runtime"
	"runtime/pprof"
	"strings"
	"syscall"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/sirupsen/logrus"
	logrusslog "github.com/sirupsen/logrus/hooks/slog"
	flag "github.com/spf13/pflag"

	"github.com/nlmha/nlmha/hacallout"
)

// version is set at build time (-ldflags -X main.version=...).
var version = "dev"

// options are nlmd's settings: the defaults, overridden by the config
// file, overridden by flags.
type options struct {
	config        string
	listen        []string
	listenMode    string
	nlmPort       uint16
	nsmPort       uint16
	rpcbind       string
	portmapPort   uint16
	stateDir      string
	controlSocket string
	metricsListen string
	vips          []string
	serveUnknown  bool
	grace         time.Duration
	graceQuiet    time.Duration
	noSnapshot    bool
	noNotify      bool
	unprivLocal   bool
	notifyGiveUp  time.Duration
	notifyWindow  int
	haCallout     string
	calloutWait   time.Duration
	nfsServer     string
	locksPerHost  int64
	namesPerAddr  int
	maxConns      int
	blockedPerHst int64
	sharesPerHost int64
	maxRecord     int
	shutdownWait  time.Duration
	procs         int
	cpuProfile    string
	logFormat     string
	logLevel      string
	version       bool
	// The lock backend: memory, or etcd shared by the nodes.
	backend       string
	etcdEndpoints []string
	etcdPrefix    string
	etcdCACert    string
	etcdCert      string
	etcdKey       string
	etcdEmbedded  string
	etcdEmbedURL  string
	nodeName      string
	leaseTTL      time.Duration
}

func defaults() *options {
	return &options{
		listen: []string{"0.0.0.0", "::"}, listenMode: "wildcard", nlmPort: 4045, nsmPort: 32765, rpcbind: "auto", portmapPort: 111,
		stateDir: "/var/lib/nlmha", controlSocket: hacallout.DefaultSocket, serveUnknown: true,
		grace: 90 * time.Second, graceQuiet: 5 * time.Second, notifyGiveUp: 15 * time.Minute, notifyWindow: 256,
		calloutWait: 10 * time.Second, locksPerHost: 1_000_000, blockedPerHst: 10_000, sharesPerHost: 100_000, namesPerAddr: 256,
		maxRecord: 16 << 10, shutdownWait: 5 * time.Second, procs: 1, logFormat: "text", logLevel: "info",
		backend: "memory", etcdEndpoints: []string{"http://127.0.0.1:2379"}, etcdPrefix: "/nlmha/", leaseTTL: 10 * time.Second,
		etcdEmbedURL: "http://127.0.0.1:0",
	}
}

// configPath finds --config in args before the flags are parsed: the file's
// values are the flags' defaults.
func configPath(args []string) string {
	for i, a := range args {
		switch {
		case a == "--":
			return ""
		case a == "--config" && i+1 < len(args):
			return args[i+1]
		case strings.HasPrefix(a, "--config="):
			return strings.TrimPrefix(a, "--config=")
		}
	}
	return ""
}

func parseFlags(args []string) (*options, *flag.FlagSet, error) {
	o := defaults()
	fs := flag.NewFlagSet("nlmd", flag.ContinueOnError)
	if path := configPath(args); path != "" {
		if err := loadConfig(path, o); err != nil {
			return nil, fs, err
		}
	}
	fs.SortFlags = false
	fs.StringVar(&o.config, "config", o.config, "YAML configuration file; flags override it. SIGHUP reads it again and takes over or releases the virtual servers added to or removed from its vips")
	fs.StringSliceVar(&o.listen, "listen", o.listen,
		"addresses to listen on (TCP and UDP) in listen mode wildcard. A wildcard address serves every local address and tells virtual servers apart by each request's destination")
	fs.StringVar(&o.listenMode, "listen-mode", o.listenMode,
		"wildcard: one socket per family and port, keyed by destination; vip: sockets bound to each virtual server's address, opened at takeover and closed at release (IP_FREEBIND), so that several nlmd can share a host")
	fs.Uint16Var(&o.nlmPort, "nlm-port", o.nlmPort, "NLM port; use the same on every node so that clients' cached ports survive a failover")
	fs.Uint16Var(&o.nsmPort, "nsm-port", o.nsmPort,
		"NSM (statd) port; SM_NOTIFY to clients leaves from it. Use the same on every node, and keep it out of 600-1023 (root RPC clients take source ports there, and their TIME_WAIT would keep a restarting nlmd from binding) and out of the ephemeral range")
	fs.StringVar(&o.rpcbind, "rpcbind", o.rpcbind,
		"portmapper to register with: auto (the system rpcbind if one answers, else an embedded portmapper), system, embedded, none")
	fs.Uint16Var(&o.portmapPort, "portmap-port", o.portmapPort, "port of the embedded portmapper")
	fs.StringVar(&o.stateDir, "state-dir", o.stateDir,
		"directory of the persistent state: one directory per virtual server (epoch, NSM state number, monitor records, release snapshot). Put it on storage shared by the nodes a virtual server moves between")
	fs.StringVar(&o.controlSocket, "control-socket", o.controlSocket, "Unix socket of the control API (mode 0600) that nlmadmin and the cluster hooks use; empty: none")
	fs.StringVar(&o.metricsListen, "metrics-listen", o.metricsListen, "HOST:PORT to serve Prometheus metrics on (/metrics); empty: none")
	fs.StringSliceVar(&o.vips, "vip", o.vips, "a virtual server this node serves from its start, as ADDRESS or ADDRESS=NAME (repeatable); NAME is used in callbacks")
	fs.BoolVar(&o.serveUnknown, "serve-unknown", o.serveUnknown,
		"serve requests to addresses not given with --vip, each address as a virtual server of its own, taken over on first use; false refuses them")
	fs.DurationVar(&o.grace, "grace-period", o.grace,
		"grace period after an unplanned start or takeover (only reclaims are served); it ends early once every client that held locks has reclaimed")
	fs.DurationVar(&o.graceQuiet, "grace-quiet", o.graceQuiet, "how long a notified client may stay silent before it counts as done reclaiming")
	fs.BoolVar(&o.noSnapshot, "no-snapshot", o.noSnapshot, "release virtual servers without handing their locks over in a snapshot: every takeover then goes through grace and reclaim")
	fs.BoolVar(&o.unprivLocal, "unprivileged-local", o.unprivLocal,
		"accept SM_MON, SM_UNMON, SM_UNMON_ALL, SM_SIMU_CRASH and the lock manager's SM_NOTIFY callback from unprivileged local ports too (test rigs only: any local user could then make clients' locks go)")
	fs.BoolVar(&o.noNotify, "no-notify", o.noNotify, "do not send SM_NOTIFY to clients when a virtual server restarts (for setups that notify otherwise, e.g. sm-notify on an exported list)")
	fs.DurationVar(&o.notifyGiveUp, "notify-timeout", o.notifyGiveUp, "how long to keep notifying a client that does not answer (negative: forever)")
	fs.IntVar(&o.notifyWindow, "notify-window", o.notifyWindow, "clients notified at once (those awaiting a first answer; ones that do not answer within 2 s stop counting)")
	fs.StringVar(&o.haCallout, "ha-callout", o.haCallout, "program run like rpc.statd's --ha-callout: add-client MON_NAME MY_NAME, del-client MON_NAME MY_NAME, sm-notify MON_NAME SENDER STATE")
	fs.DurationVar(&o.calloutWait, "ha-callout-timeout", o.calloutWait, "how long one HA callout may run before it is killed")
	fs.StringVar(&o.nfsServer, "nfs-server", o.nfsServer, "NFS server to check NLMv4 file handles with (HOST or HOST:PORT); unknown handles get NLM4_STALE_FH. Empty: handles are not checked")
	fs.IntVar(&o.maxConns, "max-connections", o.maxConns,
		"TCP connections NLM serves at once; a new one past it closes the longest idle (0: the descriptor limit less a reserve for state files and callbacks)")
	fs.IntVar(&o.namesPerAddr, "max-clients-per-address", o.namesPerAddr,
		"client hosts (caller_names) one address may have through one virtual server, with their owners and monitor records (0: no limit); a request under one more name is DENIED_NOLOCKS. Raise it for many clients behind one NAT address")
	fs.Int64Var(&o.locksPerHost, "max-locks-per-host", o.locksPerHost, "lock ranges one client host may hold (0: no limit); beyond it LOCK is DENIED_NOLOCKS")
	fs.Int64Var(&o.blockedPerHst, "max-blocked-per-host", o.blockedPerHst, "blocked lock requests one client host may have queued (0: no limit)")
	fs.Int64Var(&o.sharesPerHost, "max-shares-per-host", o.sharesPerHost, "share reservations one client host may hold (0: no limit)")
	fs.IntVar(&o.maxRecord, "max-request-size", o.maxRecord, "largest RPC request accepted, in bytes (a TCP record or a UDP datagram)")
	fs.DurationVar(&o.shutdownWait, "shutdown-timeout", o.shutdownWait, "how long SIGTERM waits for calls in progress (nlmd exits at most a second after it)")
	fs.IntVar(&o.procs, "procs", o.procs,
		"CPUs nlmd may run Go code on at once (GOMAXPROCS; 0: all). NLM is light work: one CPU serves about 100k calls/s, and on a node shared with the NFS server more only add scheduling overhead")
	fs.StringVar(&o.backend, "backend", o.backend,
		"lock backend: memory (this node alone) or etcd (shared by the nodes: the same files served through virtual servers on several nodes, failover without a global grace period)")
	fs.StringSliceVar(&o.etcdEndpoints, "etcd-endpoints", o.etcdEndpoints, "etcd client URLs (--backend etcd)")
	fs.StringVar(&o.etcdPrefix, "etcd-prefix", o.etcdPrefix, "prefix of every etcd key: nlmha clusters sharing one etcd need one each")
	fs.StringVar(&o.etcdCACert, "etcd-cacert", o.etcdCACert, "CA certificate (PEM) to verify etcd's server certificates with")
	fs.StringVar(&o.etcdCert, "etcd-cert", o.etcdCert, "client certificate (PEM) for etcd's TLS client authentication")
	fs.StringVar(&o.etcdKey, "etcd-key", o.etcdKey, "client certificate's key (PEM)")
	fs.StringVar(&o.etcdEmbedded, "etcd-embedded", o.etcdEmbedded,
		"run a one-member etcd inside nlmd with its data in this directory (a single machine, durable across restarts) instead of connecting to --etcd-endpoints")
	fs.StringVar(&o.etcdEmbedURL, "etcd-embedded-listen", o.etcdEmbedURL,
		"client URL the embedded etcd also listens on, for etcdctl or a benchmark (default: a loopback port of the kernel's choosing)")
	fs.StringVar(&o.nodeName, "node-name", o.nodeName, "this node's name in etcd (default: the host name); unique in the cluster")
	fs.DurationVar(&o.leaseTTL, "lease-ttl", o.leaseTTL,
		"TTL of the node's etcd lease: a node that dies loses its virtual servers this long after its last keepalive; a node cut off from etcd stops serving a fifth of it before")
	fs.StringVar(&o.cpuProfile, "cpu-profile", o.cpuProfile, "write a CPU profile (pprof) of the whole run to this file, for performance work")
	fs.StringVar(&o.logFormat, "log-format", o.logFormat, "log format: text or json")
	fs.StringVar(&o.logLevel, "log-level", o.logLevel, "log level: debug, info, warn or error")
	fs.BoolVar(&o.version, "version", false, "print the version and exit")
	fs.Usage = func() {
		fmt.Fprintf(fs.Output(), "Usage: nlmd [flags]\n\nnlmd serves NFS lock management (NLM v1, v3, v4) and status monitoring (NSM v1) keyed by virtual server.\n\nFlags:\n%s", fs.FlagUsages())
	}
	if err := fs.Parse(args); err != nil {
		return nil, fs, err
	}
	if fs.NArg() > 0 {
		return nil, fs, fmt.Errorf("unexpected arguments: %s", strings.Join(fs.Args(), " "))
	}
	return o, fs, o.check()
}

func (o *options) check() error {
	switch o.rpcbind {
	case "auto", "system", "embedded", "none":
	default:
		return fmt.Errorf("--rpcbind %q: want auto, system, embedded or none", o.rpcbind)
	}
	switch o.listenMode {
	case "wildcard", "vip":
	default:
		return fmt.Errorf("--listen-mode %q: want wildcard or vip", o.listenMode)
	}
	switch o.logFormat {
	case "text", "json":
	default:
		return fmt.Errorf("--log-format %q: want text or json", o.logFormat)
	}
	switch {
	case o.nsmPort == o.nlmPort:
		return fmt.Errorf("--nsm-port and --nlm-port are both %d: NLM and NSM need ports of their own", o.nlmPort)
	case o.stateDir == "":
		return errors.New("--state-dir is empty")
	case o.notifyWindow < 1:
		return fmt.Errorf("--notify-window %d: want at least 1", o.notifyWindow)
	case o.grace < 0 || o.graceQuiet <= 0:
		return errors.New("--grace-period must not be negative, --grace-quiet must be positive")
	}
	if _, err := parseVIPs(o.vips); err != nil {
		return err
	}
	switch o.backend {
	case "memory":
	case "etcd":
		if o.nodeName == "" {
			h, err := os.Hostname()
			if err != nil || h == "" {
				return errors.New("--node-name: none given and no host name")
			}
			o.nodeName = h
		}
		if strings.ContainsAny(o.nodeName, " /") {
			return fmt.Errorf("--node-name %q: no spaces or slashes", o.nodeName)
		}
		if o.etcdEmbedded == "" && len(o.etcdEndpoints) == 0 {
			return errors.New("--backend etcd needs --etcd-endpoints or --etcd-embedded")
		}
		if o.leaseTTL < 2*time.Second {
			return fmt.Errorf("--lease-ttl %v: want at least 2s", o.leaseTTL)
		}
	default:
		return fmt.Errorf("--backend %q: want memory or etcd", o.backend)
	}
	return nil
}

func newLogger(o *options) (*logrus.Logger, error) {
	l := logrus.New()
	l.SetOutput(os.Stderr)
	level, err := logrus.ParseLevel(o.logLevel)
	if err != nil {
		return nil, fmt.Errorf("--log-level: %w", err)
	}
	l.SetLevel(level)
	if o.logFormat == "json" {
		l.SetFormatter(&logrus.JSONFormatter{})
	} else {
		l.SetFormatter(&logrus.TextFormatter{FullTimestamp: true})
	}
	return l, nil
}

// Each log message gets this many lines per interval; a count of the rest
// follows (see throttle).
const (
	logThrottleInterval = 10 * time.Second
	logThrottleBurst    = 20
)

func main() {
	o, _, err := parseFlags(os.Args[1:])
	if errors.Is(err, flag.ErrHelp) {
		os.Exit(0)
	}
	if err != nil {
		fmt.Fprintln(os.Stderr, "nlmd:", err)
		os.Exit(2)
	}
	if o.version {
		fmt.Println("nlmd", version)
		return
	}
	lr, err := newLogger(o)
	if err != nil {
		fmt.Fprintln(os.Stderr, "nlmd:", err)
		os.Exit(2)
	}
	th := newThrottle(logrusslog.NewHandler(lr, nil), logThrottleInterval, logThrottleBurst)
	log := slog.New(th)
	go func() {
		for now := range time.Tick(logThrottleInterval) {
			th.flush(now)
		}
	}()
	if o.procs > 0 && os.Getenv("GOMAXPROCS") == "" {
		runtime.GOMAXPROCS(o.procs)
	}
	if o.cpuProfile != "" {
		f, err := os.Create(o.cpuProfile)
		if err == nil {
			err = pprof.StartCPUProfile(f)
		}
		if err != nil {
			log.Error("nlmd: --cpu-profile", "err", err)
			os.Exit(2)
		}
		defer pprof.StopCPUProfile()
	}
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGTERM, syscall.SIGINT)
	defer stop()
	d, err := start(ctx, o, log)
	if err != nil {
		log.Error("nlmd: cannot start", "err", err)
		os.Exit(1)
	}
	d.metrics.reg.MustRegister(prometheus.NewCounterFunc(prometheus.CounterOpts{
		Name: "nlm_log_lines_suppressed_total", Help: "Log lines held back because the same message came too often (their counts are logged).",
	}, func() float64 { return float64(th.st.suppressed.Load()) }))
	hup := make(chan os.Signal, 1)
	signal.Notify(hup, syscall.SIGHUP)
	for {
		select {
		case <-hup:
			n, _, err := parseFlags(os.Args[1:])
			if err != nil {
				log.Error("nlmd: SIGHUP: configuration not reloaded", "err", err)
				continue
			}
			d.reload(ctx, n)
			continue
		case <-ctx.Done():
		}
		break
	}
	log.Info("nlmd: shutting down")
	// The timeout is kept whatever hangs: the virtual servers are released
	// (with snapshots) first, so what an exit cuts short is only calls in
	// progress, which their clients send again.
	done := make(chan error, 1)
	go func() { done <- d.shutdown() }()
	select {
	case err := <-done:
		if err != nil {
			log.Error("nlmd: shutdown", "err", err)
		}
		log.Info("nlmd: stopped")
	case <-time.After(o.shutdownWait + time.Second):
		log.Error("nlmd: shutdown did not finish in time; exiting", "shutdown_timeout", o.shutdownWait)
		os.Exit(1)
	}
}

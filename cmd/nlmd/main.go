// Command nlmd is the nlmha lock daemon: NLM and NSM (statd) for NFSv3
// clients, keyed by virtual server — the address each request was
// sent to — so that one floating IP can move between nodes without
// disturbing the others.
package main

import (
	"context"
	"errors"
	"fmt"
	"os"
	"os/signal"
	"runtime"
	"runtime/pprof"
	"strings"
	"syscall"
	"time"

	"github.com/sirupsen/logrus"
	flag "github.com/spf13/pflag"
)

// options are nlmd's settings.
type options struct {
	listen        []string
	nlmPort       uint16
	rpcbind       string
	portmapPort   uint16
	logFormat     string
	logLevel      string
	grace         time.Duration
	vips          []string
	serveUnknown  bool
	nfsServer     string
	locksPerHost  int64
	blockedPerHst int64
	sharesPerHost int64
	maxRecord     int
	shutdownWait  time.Duration
	cpuProfile    string
	procs         int
	nsmPort       uint16
	stateDir      string
	noNotify      bool
	notifyGiveUp  time.Duration
	notifyWindow  int
	haCallout     string
	calloutWait   time.Duration
}

func parseFlags(args []string) (*options, *flag.FlagSet, error) {
	o := &options{}
	fs := flag.NewFlagSet("nlmd", flag.ContinueOnError)
	fs.SortFlags = false
	fs.StringSliceVar(&o.listen, "listen", []string{"0.0.0.0", "::"},
		"addresses to listen on (TCP and UDP). A wildcard address serves every local address and tells virtual servers apart by each request's destination")
	fs.Uint16Var(&o.nlmPort, "nlm-port", 4045, "NLM port; use the same on every node so that clients' cached ports survive a failover")
	fs.Uint16Var(&o.nsmPort, "nsm-port", 32765,
		"NSM (statd) port; SM_NOTIFY to clients leaves from it. Use the same on every node, and keep it out of 600-1023 (root RPC clients take source ports there, and their TIME_WAIT would keep a restarting nlmd from binding) and out of the ephemeral range")
	fs.StringVar(&o.stateDir, "state-dir", "/var/lib/nlmha", "directory of the persistent state: one directory per virtual server (NSM state number, monitor records)")
	fs.BoolVar(&o.noNotify, "no-notify", false, "do not send SM_NOTIFY to clients when a virtual server starts (for setups that notify otherwise, e.g. sm-notify on an exported list)")
	fs.DurationVar(&o.notifyGiveUp, "notify-timeout", 15*time.Minute, "how long to keep notifying a client that does not answer (negative: forever)")
	fs.IntVar(&o.notifyWindow, "notify-window", 256, "clients notified at once (those awaiting a first answer; ones that do not answer within 2 s stop counting)")
	fs.StringVar(&o.haCallout, "ha-callout", "", "program run like rpc.statd's --ha-callout: add-client MON_NAME MY_NAME, del-client MON_NAME MY_NAME, sm-notify MON_NAME SENDER STATE")
	fs.DurationVar(&o.calloutWait, "ha-callout-timeout", 10*time.Second, "how long one HA callout may run before it is killed")
	fs.StringVar(&o.rpcbind, "rpcbind", "auto",
		"portmapper to register with: auto (the system rpcbind if one answers, else an embedded portmapper), system, embedded, none")
	fs.Uint16Var(&o.portmapPort, "portmap-port", 111, "port of the embedded portmapper")
	fs.StringSliceVar(&o.vips, "vip", nil, "a virtual server this node serves, as ADDRESS or ADDRESS=NAME (repeatable); NAME is used in callbacks")
	fs.BoolVar(&o.serveUnknown, "serve-unknown", true, "serve requests to addresses not given with --vip, each address as a virtual server of its own; false refuses them")
	fs.DurationVar(&o.grace, "grace-period", 0, "grace period at start-up: only lock reclaims are served until it ends")
	fs.StringVar(&o.nfsServer, "nfs-server", "", "NFS server to check NLMv4 file handles with (HOST or HOST:PORT); unknown handles get NLM4_STALE_FH. Empty: handles are not checked")
	fs.Int64Var(&o.locksPerHost, "max-locks-per-host", 1_000_000, "lock ranges one client host may hold (0: no limit); beyond it LOCK is DENIED_NOLOCKS")
	fs.Int64Var(&o.blockedPerHst, "max-blocked-per-host", 10_000, "blocked lock requests one client host may have queued (0: no limit)")
	fs.Int64Var(&o.sharesPerHost, "max-shares-per-host", 100_000, "share reservations one client host may hold (0: no limit)")
	fs.IntVar(&o.maxRecord, "max-request-size", 16<<10, "largest RPC request accepted, in bytes (a TCP record or a UDP datagram)")
	fs.DurationVar(&o.shutdownWait, "shutdown-timeout", 5*time.Second, "how long SIGTERM waits for calls in progress")
	fs.IntVar(&o.procs, "procs", 1,
		"CPUs nlmd may run Go code on at once (GOMAXPROCS; 0: all). NLM is light work: one CPU serves about 100k calls/s, and on a node shared with the NFS server more only add scheduling overhead")
	fs.StringVar(&o.cpuProfile, "cpu-profile", "", "write a CPU profile (pprof) of the whole run to this file, for performance work")
	fs.StringVar(&o.logFormat, "log-format", "text", "log format: text or json")
	fs.StringVar(&o.logLevel, "log-level", "info", "log level: debug, info, warn or error")
	fs.Usage = func() {
		fmt.Fprintf(fs.Output(), "Usage: nlmd [flags]\n\nnlmd serves NFS lock management (NLM v1, v3, v4) and status monitoring (NSM v1) keyed by virtual server.\n\nFlags:\n%s", fs.FlagUsages())
	}
	if err := fs.Parse(args); err != nil {
		return nil, fs, err
	}
	if fs.NArg() > 0 {
		return nil, fs, fmt.Errorf("unexpected arguments: %s", strings.Join(fs.Args(), " "))
	}
	switch o.rpcbind {
	case "auto", "system", "embedded", "none":
	default:
		return nil, fs, fmt.Errorf("--rpcbind %q: want auto, system, embedded or none", o.rpcbind)
	}
	switch o.logFormat {
	case "text", "json":
	default:
		return nil, fs, fmt.Errorf("--log-format %q: want text or json", o.logFormat)
	}
	switch {
	case o.nsmPort == o.nlmPort:
		return nil, fs, fmt.Errorf("--nsm-port and --nlm-port are both %d: NLM and NSM need ports of their own", o.nlmPort)
	case o.stateDir == "":
		return nil, fs, errors.New("--state-dir is empty")
	case o.notifyWindow < 1:
		return nil, fs, fmt.Errorf("--notify-window %d: want at least 1", o.notifyWindow)
	}
	return o, fs, nil
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

func main() {
	o, _, err := parseFlags(os.Args[1:])
	if errors.Is(err, flag.ErrHelp) {
		os.Exit(0)
	}
	if err != nil {
		fmt.Fprintln(os.Stderr, "nlmd:", err)
		os.Exit(2)
	}
	lr, err := newLogger(o)
	if err != nil {
		fmt.Fprintln(os.Stderr, "nlmd:", err)
		os.Exit(2)
	}
	log := slogFor(lr)
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
	<-ctx.Done()
	log.Info("nlmd: shutting down")
	if err := d.shutdown(); err != nil {
		log.Error("nlmd: shutdown", "err", err)
	}
	log.Info("nlmd: stopped")
}

// Package etcdtest runs real etcd for tests: StartCluster starts members
// as separate processes on loopback (so a test can kill, stop, pause and
// restart them), and Embedded starts a single in-process member for tests
// that only need an etcd to talk to. The server binary is built from this
// module (internal/etcdtest/etcdserver) once per machine; nothing needs
// etcd installed, and nothing listens beyond the addresses given.
package etcdtest

import (
	"context"
	"crypto/rand"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/url"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	clientv3 "go.etcd.io/etcd/client/v3"
	"go.uber.org/zap"
	"google.golang.org/grpc"
	"google.golang.org/grpc/backoff"
)

// Defaults, chosen so elections are quick without making a loaded 2-core
// CI machine (go test runs packages in parallel) miss heartbeats.
const (
	defaultHeartbeat    = 50 * time.Millisecond
	defaultElection     = 500 * time.Millisecond
	defaultStartTimeout = 30 * time.Second
	stopGrace           = 10 * time.Second
	dialTimeout         = 5 * time.Second
	// bindAttempts bounds how often StartCluster picks new ports when a
	// port it chose was taken before etcd bound it.
	bindAttempts = 5
	// logDumpBytes is how much of each member's log a failed test shows.
	logDumpBytes = 64 << 10
)

// Option changes how StartCluster runs the members.
type Option func(*config)

type config struct {
	hosts        []string
	heartbeat    time.Duration
	election     time.Duration
	startTimeout time.Duration
	args         []string
	listenAll    bool
	pickPorts    func(hosts []string) ([]int, error) // tests replace it
}

// WithClientsOnAllAddresses makes members accept clients on every local
// address at their client port (still advertising their own): a test can
// then give each client an address of its own to reach them by, and cut
// one client off by address (see EndpointsVia).
func WithClientsOnAllAddresses() Option {
	return func(c *config) { c.listenAll = true }
}

// WithHosts sets the addresses members listen on, instead of 127.0.0.1:
// one address for every member, or one per member (for example addresses
// in a network namespace the test created, to cut members apart). The
// test process must be able to bind them.
func WithHosts(hosts ...string) Option {
	return func(c *config) { c.hosts = hosts }
}

// WithTimeouts sets the raft heartbeat interval and election timeout
// (defaults 50 ms and 500 ms).
func WithTimeouts(heartbeat, election time.Duration) Option {
	return func(c *config) { c.heartbeat, c.election = heartbeat, election }
}

// WithStartTimeout bounds how long StartCluster and RestartAll wait for a
// healthy cluster (default 30 s).
func WithStartTimeout(d time.Duration) Option {
	return func(c *config) { c.startTimeout = d }
}

// WithArgs appends etcd flags to every member's command line. They come
// last, so they override the harness's own (etcd's flag parsing keeps the
// last value), e.g. WithArgs("--log-level=info").
func WithArgs(args ...string) Option {
	return func(c *config) { c.args = append(c.args, args...) }
}

// Cluster is a set of etcd member processes started by StartCluster. Its
// methods may be called from any goroutine.
type Cluster struct {
	cfg   config
	bin   string
	token string
	dir   string

	mu      sync.Mutex // guards members and their proc and paused
	members []*member
}

type member struct {
	name      string
	clientURL string
	peerURL   string
	dataDir   string
	logPath   string

	// ops serializes lifecycle operations on this member, held while
	// waiting for the process, so the Cluster's mu is never held long.
	ops sync.Mutex

	proc   *process // nil when not running
	paused bool
}

type process struct {
	cmd  *exec.Cmd
	done chan struct{}
	err  error // Wait's result, once done is closed
}

func (p *process) exited() bool {
	select {
	case <-p.done:
		return true
	default:
		return false
	}
}

// signal signals the member's whole process group (it has its own, so
// nothing it might start outlives it).
func (p *process) signal(sig syscall.Signal) {
	_ = syscall.Kill(-p.cmd.Process.Pid, sig)
}

// StartCluster starts n etcd members as processes and waits until every
// one serves a linearizable read. The members are killed when the test
// ends, and their logs are shown if it failed.
func StartCluster(t testing.TB, n int, opts ...Option) *Cluster {
	t.Helper()
	if n < 1 {
		t.Fatalf("etcdtest: a cluster needs at least one member, not %d", n)
	}
	cfg := config{
		hosts:        []string{"127.0.0.1"},
		heartbeat:    defaultHeartbeat,
		election:     defaultElection,
		startTimeout: defaultStartTimeout,
		pickPorts:    freePorts,
	}
	for _, o := range opts {
		o(&cfg)
	}
	if len(cfg.hosts) != 1 && len(cfg.hosts) != n {
		t.Fatalf("etcdtest: %d hosts for %d members; give one, or one per member", len(cfg.hosts), n)
	}

	ctx, cancel := buildContext(t)
	t0 := time.Now()
	bin, err := Binary(ctx)
	cancel()
	if err != nil {
		t.Fatal(err)
	}
	if d := time.Since(t0); d > time.Second {
		t.Logf("etcdtest: built (or waited for) %s in %v", bin, d.Round(time.Millisecond))
	}

	// TempDir before Cleanup: cleanups run last-registered first, so the
	// processes are gone before their directories are removed.
	dir := t.TempDir()
	c := &Cluster{cfg: cfg, bin: bin, dir: dir}
	t.Cleanup(func() {
		c.killAll()
		if t.Failed() {
			c.dumpLogs(t)
		}
	})

	start := time.Now()
	for attempt := 1; ; attempt++ {
		err := c.bootstrap(n)
		if err == nil {
			break
		}
		c.killAll()
		if !errors.Is(err, errPortTaken) || attempt == bindAttempts {
			t.Fatalf("etcdtest: starting %d members: %v", n, err)
		}
		t.Logf("etcdtest: %v; retrying on other ports", err)
	}
	t.Logf("etcdtest: %d-member cluster healthy in %v at %s", n, time.Since(start).Round(time.Millisecond), strings.Join(c.Endpoints(), " "))
	return c
}

// buildContext bounds the build by the test's deadline, if it has one.
func buildContext(t testing.TB) (context.Context, context.CancelFunc) {
	if d, ok := t.(interface{ Deadline() (time.Time, bool) }); ok {
		if dl, ok := d.Deadline(); ok {
			return context.WithDeadline(context.Background(), dl)
		}
	}
	return context.WithTimeout(context.Background(), 10*time.Minute)
}

// errPortTaken marks a start that failed only because another process
// bound a chosen port between our probe and etcd's bind.
var errPortTaken = errors.New("a chosen port was taken")

// bootstrap lays out n fresh members on newly chosen ports and starts them
// as a new cluster.
func (c *Cluster) bootstrap(n int) error {
	c.token = "nlmha-" + rand.Text()
	hosts := make([]string, n)
	for i := range hosts {
		hosts[i] = c.cfg.hosts[i%len(c.cfg.hosts)]
	}
	ports, err := c.cfg.pickPorts(hosts)
	if err != nil {
		return err
	}
	members := make([]*member, n)
	for i := range members {
		name := "m" + strconv.Itoa(i)
		hp := func(port int) string { return "http://" + net.JoinHostPort(hosts[i], strconv.Itoa(port)) }
		m := &member{
			name:      name,
			clientURL: hp(ports[2*i]),
			peerURL:   hp(ports[2*i+1]),
			dataDir:   filepath.Join(c.dir, name),
			logPath:   filepath.Join(c.dir, name+".log"),
		}
		// A retry must not find the previous attempt's cluster ID, nor
		// take its bind error for its own.
		for _, p := range []string{m.dataDir, m.logPath} {
			if err := os.RemoveAll(p); err != nil {
				return fmt.Errorf("clearing %s: %w", p, err)
			}
		}
		members[i] = m
	}
	c.mu.Lock()
	c.members = members
	c.mu.Unlock()

	ctx, cancel := context.WithTimeout(context.Background(), c.cfg.startTimeout)
	defer cancel()
	for i, m := range members {
		p, err := c.launch(i, "new")
		if err != nil {
			return err
		}
		// A new member first asks its peers whether the cluster already
		// exists, waiting up to 1 s on each that has bound its port but
		// is not serving yet. Started together, members keep each other
		// waiting that long; started in turn, each finds the others
		// either serving or refusing, and the cluster forms at once.
		if i < len(members)-1 {
			waitPeerServing(ctx, m, p)
		}
	}
	err = c.WaitHealthy(ctx)
	if err != nil && c.anyPortTaken() {
		return fmt.Errorf("%w: %v", errPortTaken, err)
	}
	return err
}

// waitPeerServing waits until m answers HTTP on its peer URL, or has
// exited, or ctx ends: only a hint for start-up ordering, so no error.
func waitPeerServing(ctx context.Context, m *member, p *process) {
	// No proxy, whatever the environment says: members may listen on a
	// test network's addresses, which must not be sent anywhere else.
	hc := &http.Client{Timeout: 100 * time.Millisecond, Transport: &http.Transport{Proxy: nil}}
	defer hc.CloseIdleConnections()
	for {
		req, err := http.NewRequestWithContext(ctx, http.MethodGet, m.peerURL+"/version", nil)
		if err != nil {
			return
		}
		if resp, err := hc.Do(req); err == nil {
			resp.Body.Close()
			return
		}
		if p.exited() {
			return
		}
		select {
		case <-ctx.Done():
			return
		case <-time.After(10 * time.Millisecond):
		}
	}
}

// freePorts picks two free ports (client, peer) per host. All listeners
// stay open until every port is chosen, so no two members get the same.
func freePorts(hosts []string) ([]int, error) {
	var ports []int
	var ls []net.Listener
	defer func() {
		for _, l := range ls {
			l.Close()
		}
	}()
	for _, h := range hosts {
		for range 2 {
			l, err := net.Listen("tcp", net.JoinHostPort(h, "0"))
			if err != nil {
				return nil, fmt.Errorf("choosing a port on %s: %w", h, err)
			}
			ls = append(ls, l)
			ports = append(ports, l.Addr().(*net.TCPAddr).Port)
		}
	}
	return ports, nil
}

func (c *Cluster) anyPortTaken() bool {
	for _, m := range c.snapshot() {
		b, _ := os.ReadFile(m.logPath)
		if strings.Contains(string(b), "address already in use") {
			return true
		}
	}
	return false
}

// args is member i's command line. A restarted member keeps its name, data
// directory and URLs; state is "new" or "existing".
func (c *Cluster) args(i int, state string) []string {
	m := c.members[i]
	var initial []string
	for _, o := range c.members {
		initial = append(initial, o.name+"="+o.peerURL)
	}
	listen := m.clientURL
	if c.cfg.listenAll {
		if u, err := url.Parse(m.clientURL); err == nil {
			listen = "http://" + net.JoinHostPort("0.0.0.0", u.Port())
		}
	}
	args := []string{
		"--name=" + m.name,
		"--data-dir=" + m.dataDir,
		"--listen-client-urls=" + listen,
		"--advertise-client-urls=" + m.clientURL,
		"--listen-peer-urls=" + m.peerURL,
		"--initial-advertise-peer-urls=" + m.peerURL,
		"--initial-cluster=" + strings.Join(initial, ","),
		"--initial-cluster-state=" + state,
		"--initial-cluster-token=" + c.token,
		"--heartbeat-interval=" + strconv.FormatInt(c.cfg.heartbeat.Milliseconds(), 10),
		"--election-timeout=" + strconv.FormatInt(c.cfg.election.Milliseconds(), 10),
		// Lock churn would otherwise grow the history without bound.
		"--auto-compaction-mode=revision",
		"--auto-compaction-retention=1000",
		// Lets Client's keepalives notice a paused member in seconds
		// without the server answering them with too_many_pings.
		"--grpc-keepalive-min-time=500ms",
		"--logger=zap",
		"--log-level=error",
		"--log-outputs=stderr",
	}
	return append(args, c.cfg.args...)
}

// launch starts member i's process; its output is appended to its log.
func (c *Cluster) launch(i int, state string) (*process, error) {
	c.mu.Lock()
	m := c.members[i]
	args := c.args(i, state)
	c.mu.Unlock()

	logf, err := os.OpenFile(m.logPath, os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o644)
	if err != nil {
		return nil, fmt.Errorf("opening %s's log: %w", m.name, err)
	}
	defer logf.Close() // the child has its own descriptor
	fmt.Fprintf(logf, "=== etcdtest: %s starting (%s) at %s\n", m.name, state, time.Now().Format(time.RFC3339Nano))

	cmd := exec.Command(c.bin, args...)
	cmd.Stdout, cmd.Stderr = logf, logf
	cmd.Env = childEnv()
	// Pdeathsig: a test binary that dies without running its cleanups
	// (a -timeout panic) takes its members with it. It fires when the
	// starting OS thread ends, which Go does only to a thread whose
	// goroutine exits while locked to it: don't start members from such
	// a goroutine (e.g. one that entered a namespace with setns).
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true, Pdeathsig: syscall.SIGKILL}
	if err := cmd.Start(); err != nil {
		return nil, fmt.Errorf("starting %s: %w", m.name, err)
	}
	p := &process{cmd: cmd, done: make(chan struct{})}
	go func() { p.err = cmd.Wait(); close(p.done) }()

	c.mu.Lock()
	m.proc, m.paused = p, false
	c.mu.Unlock()
	return p, nil
}

// childEnv is our environment without ETCD_* variables, which etcd reads
// as flags (a developer's shell must not change the test cluster), and
// without proxy settings, which etcd's peer transport would follow.
func childEnv() []string {
	var env []string
	for _, kv := range os.Environ() {
		name, _, _ := strings.Cut(kv, "=")
		if strings.HasPrefix(name, "ETCD_") || strings.HasSuffix(strings.ToLower(name), "_proxy") {
			continue
		}
		env = append(env, kv)
	}
	return env
}

// snapshot copies the member list, for reading without holding mu.
func (c *Cluster) snapshot() []*member {
	c.mu.Lock()
	defer c.mu.Unlock()
	return append([]*member(nil), c.members...)
}

func (c *Cluster) member(i int) (*member, error) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if i < 0 || i >= len(c.members) {
		return nil, fmt.Errorf("etcdtest: no member %d in a cluster of %d", i, len(c.members))
	}
	return c.members[i], nil
}

// Size is the number of members, running or not.
func (c *Cluster) Size() int {
	c.mu.Lock()
	defer c.mu.Unlock()
	return len(c.members)
}

// EndpointsVia are the members' client URLs with host in place of their
// address (see WithClientsOnAllAddresses).
func (c *Cluster) EndpointsVia(host string) []string {
	var eps []string
	for _, m := range c.snapshot() {
		u, err := url.Parse(m.clientURL)
		if err != nil {
			continue
		}
		u.Host = net.JoinHostPort(host, u.Port())
		eps = append(eps, u.String())
	}
	return eps
}

// Endpoints are the members' client URLs, in member order.
func (c *Cluster) Endpoints() []string {
	var eps []string
	for _, m := range c.snapshot() {
		eps = append(eps, m.clientURL)
	}
	return eps
}

// Endpoint is member i's client URL.
func (c *Cluster) Endpoint(i int) string {
	return c.Endpoints()[i]
}

// ClientConfig is a client configuration for the given members' endpoints
// (all members if none are given), for tests that need their own options.
func (c *Cluster) ClientConfig(members ...int) clientv3.Config {
	eps := c.Endpoints()
	if len(members) > 0 {
		var sel []string
		for _, i := range members {
			sel = append(sel, eps[i])
		}
		eps = sel
	}
	return clientConfig(eps)
}

func clientConfig(endpoints []string) clientv3.Config {
	return clientv3.Config{
		Endpoints:   endpoints,
		DialTimeout: dialTimeout,
		// Keepalives let the client leave a paused or cut-off member.
		DialKeepAliveTime:    2 * time.Second,
		DialKeepAliveTimeout: 2 * time.Second,
		// gRPC's default reconnect backoff starts at 1 s; members come and
		// go here within that, so reconnect sooner.
		DialOptions: []grpc.DialOption{
			grpc.WithConnectParams(grpc.ConnectParams{
				Backoff:           backoff.Config{BaseDelay: 50 * time.Millisecond, Multiplier: 1.6, Jitter: 0.2, MaxDelay: time.Second},
				MinConnectTimeout: time.Second,
			}),
			// Test addresses are never to go through a proxy.
			grpc.WithNoProxy(),
		},
		// Its warnings during failover would swamp test output; failed
		// calls return their errors anyway.
		Logger: zap.NewNop(),
	}
}

// Client is a client of the given members (all if none are given),
// closed when the test ends.
func (c *Cluster) Client(t testing.TB, members ...int) *clientv3.Client {
	t.Helper()
	cli, err := clientv3.New(c.ClientConfig(members...))
	if err != nil {
		t.Fatalf("etcdtest: client: %v", err)
	}
	t.Cleanup(func() { cli.Close() })
	return cli
}

// Kill kills member i with SIGKILL (a crash) and waits for it to exit.
func (c *Cluster) Kill(i int) error {
	return c.halt(i, syscall.SIGKILL)
}

// Stop stops member i with SIGTERM, as an administrator would: a leader
// hands leadership over first. It is killed if not gone within 10 s.
func (c *Cluster) Stop(i int) error {
	return c.halt(i, syscall.SIGTERM)
}

func (c *Cluster) halt(i int, sig syscall.Signal) error {
	m, err := c.member(i)
	if err != nil {
		return err
	}
	m.ops.Lock()
	defer m.ops.Unlock()
	c.mu.Lock()
	p, paused := m.proc, m.paused
	c.mu.Unlock()
	if p == nil {
		return fmt.Errorf("etcdtest: %s is not running", m.name)
	}
	p.signal(sig)
	if paused {
		p.signal(syscall.SIGCONT) // a stopped process can't act on SIGTERM
	}
	select {
	case <-p.done:
	case <-time.After(stopGrace):
		p.signal(syscall.SIGKILL)
		<-p.done
		err = fmt.Errorf("etcdtest: %s still running %v after %v; killed", m.name, stopGrace, sig)
	}
	c.mu.Lock()
	m.proc, m.paused = nil, false
	c.mu.Unlock()
	return err
}

// Start restarts a stopped or killed member i with its data directory and
// URLs (--initial-cluster-state existing). It does not wait for the member
// to serve: that needs a quorum, which may only come with later Starts;
// call WaitHealthy.
func (c *Cluster) Start(i int) error {
	m, err := c.member(i)
	if err != nil {
		return err
	}
	m.ops.Lock()
	defer m.ops.Unlock()
	c.mu.Lock()
	running := m.proc != nil && !m.proc.exited()
	c.mu.Unlock()
	if running {
		return fmt.Errorf("etcdtest: %s is already running", m.name)
	}
	if _, err := c.launch(i, "existing"); err != nil {
		return fmt.Errorf("etcdtest: %w", err)
	}
	return nil
}

// Pause freezes member i with SIGSTOP: its connections stay open but
// nothing answers, like a hung node. A client's calls already sent to it
// hang until their context ends or the client's keepalive (4 s with
// ClientConfig) drops the connection; WaitHealthy and Leader skip it.
func (c *Cluster) Pause(i int) error {
	return c.setPaused(i, true)
}

// Resume continues a paused member i with SIGCONT.
func (c *Cluster) Resume(i int) error {
	return c.setPaused(i, false)
}

func (c *Cluster) setPaused(i int, paused bool) error {
	m, err := c.member(i)
	if err != nil {
		return err
	}
	m.ops.Lock()
	defer m.ops.Unlock()
	c.mu.Lock()
	defer c.mu.Unlock()
	if m.proc == nil {
		return fmt.Errorf("etcdtest: %s is not running", m.name)
	}
	switch {
	case paused && m.paused:
		return fmt.Errorf("etcdtest: %s is already paused", m.name)
	case !paused && !m.paused:
		return fmt.Errorf("etcdtest: %s is not paused", m.name)
	case paused:
		m.proc.signal(syscall.SIGSTOP)
	default:
		m.proc.signal(syscall.SIGCONT)
	}
	m.paused = paused
	return nil
}

// RestartAll stops every running member in turn (SIGTERM), starts all
// members again on their data, and waits until the cluster is healthy.
func (c *Cluster) RestartAll() error {
	// One at a time: a stopping leader hands over to a live follower at
	// once, whereas stopping all together leaves it waiting (~6 s) on a
	// transfer to a follower that is going down too.
	var errs []error
	for i := range c.Size() {
		c.mu.Lock()
		running := c.members[i].proc != nil
		c.mu.Unlock()
		if running {
			errs = append(errs, c.Stop(i))
		}
	}
	for i := range c.Size() {
		errs = append(errs, c.Start(i))
	}
	if err := errors.Join(errs...); err != nil {
		return err
	}
	ctx, cancel := context.WithTimeout(context.Background(), c.cfg.startTimeout)
	defer cancel()
	return c.WaitHealthy(ctx)
}

// killAll kills every member, for cleanup.
func (c *Cluster) killAll() {
	for i, m := range c.snapshot() {
		c.mu.Lock()
		running := m.proc != nil
		c.mu.Unlock()
		if running {
			_ = c.Kill(i)
		}
	}
}

// WaitHealthy waits until every running, unpaused member has a leader and
// serves a linearizable read (so it is connected to a quorum and caught
// up). A member that has exited unexpectedly is an error at once.
func (c *Cluster) WaitHealthy(ctx context.Context) error {
	clients := map[*member]*clientv3.Client{}
	defer func() {
		for _, cli := range clients {
			cli.Close()
		}
	}()
	for {
		// Every exit first: one member failing to start must not wait
		// out the timeout behind another waiting for it.
		var up []*member
		for _, m := range c.snapshot() {
			c.mu.Lock()
			p, paused := m.proc, m.paused
			c.mu.Unlock()
			if p == nil || paused {
				continue
			}
			if p.exited() {
				return fmt.Errorf("etcdtest: %s exited: %v\n%s", m.name, p.err, tail(m.logPath, 2048))
			}
			up = append(up, m)
		}
		var last error
		for _, m := range up {
			cli := clients[m]
			if cli == nil {
				var err error
				cli, err = clientv3.New(clientConfig([]string{m.clientURL}))
				if err != nil {
					return fmt.Errorf("etcdtest: client of %s: %w", m.name, err)
				}
				clients[m] = cli
			}
			if err := checkMember(ctx, cli, m); err != nil {
				last = fmt.Errorf("%s: %w", m.name, err)
				break
			}
		}
		if last == nil {
			return nil
		}
		select {
		case <-ctx.Done():
			return fmt.Errorf("etcdtest: cluster not healthy: %w (last: %v)", ctx.Err(), last)
		case <-time.After(50 * time.Millisecond):
		}
	}
}

func checkMember(ctx context.Context, cli *clientv3.Client, m *member) error {
	ctx, cancel := context.WithTimeout(ctx, time.Second)
	defer cancel()
	st, err := cli.Status(ctx, m.clientURL)
	if err != nil {
		return err
	}
	if st.Leader == 0 {
		return errors.New("no leader")
	}
	if _, err := cli.Get(ctx, "etcdtest-health"); err != nil {
		return err
	}
	return nil
}

// ErrNoLeader is returned by Leader when no member is followed by a quorum.
var ErrNoLeader = errors.New("etcdtest: no leader")

// Leader waits until a quorum of the cluster reports the same leader, and
// that member is running and reports itself leader; it returns the
// leader's index. Reports of a killed or paused leader don't count, so
// after Kill(Leader) it returns only once a new leader is elected.
func (c *Cluster) Leader(ctx context.Context) (int, error) {
	for {
		i, err := c.leaderOnce(ctx)
		if err == nil {
			return i, nil
		}
		select {
		case <-ctx.Done():
			return -1, fmt.Errorf("%w: %w (%v)", ErrNoLeader, ctx.Err(), err)
		case <-time.After(20 * time.Millisecond):
		}
	}
}

func (c *Cluster) leaderOnce(ctx context.Context) (int, error) {
	members := c.snapshot()
	type report struct {
		self, leader uint64
	}
	reports := make([]*report, len(members))
	var wg sync.WaitGroup
	for i, m := range members {
		c.mu.Lock()
		up := m.proc != nil && !m.paused
		c.mu.Unlock()
		if !up {
			continue
		}
		wg.Go(func() {
			cli, err := clientv3.New(clientConfig([]string{m.clientURL}))
			if err != nil {
				return
			}
			defer cli.Close()
			ctx, cancel := context.WithTimeout(ctx, 500*time.Millisecond)
			defer cancel()
			st, err := cli.Status(ctx, m.clientURL)
			if err != nil {
				return
			}
			reports[i] = &report{self: st.Header.MemberId, leader: st.Leader}
		})
	}
	wg.Wait()
	votes := map[uint64]int{}
	for _, r := range reports {
		if r != nil && r.leader != 0 {
			votes[r.leader]++
		}
	}
	for i, r := range reports {
		if r != nil && r.leader == r.self && votes[r.self] > len(members)/2 {
			return i, nil
		}
	}
	return -1, fmt.Errorf("no quorum behind a live leader (votes %v)", votes)
}

// LogPath is the file member i's output goes to.
func (c *Cluster) LogPath(i int) string {
	m, err := c.member(i)
	if err != nil {
		return ""
	}
	return m.logPath
}

func (c *Cluster) dumpLogs(t testing.TB) {
	for _, m := range c.snapshot() {
		t.Logf("etcdtest: %s log (%s):\n%s", m.name, m.logPath, tail(m.logPath, logDumpBytes))
	}
}

// tail is the last n bytes of a file, for error messages and log dumps.
func tail(path string, n int64) string {
	f, err := os.Open(path)
	if err != nil {
		return err.Error()
	}
	defer f.Close()
	if fi, err := f.Stat(); err == nil && fi.Size() > n {
		f.Seek(fi.Size()-n, io.SeekStart)
	}
	b, _ := io.ReadAll(f)
	return string(b)
}

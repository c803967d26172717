package main

import (
	"bufio"
	"errors"
	"fmt"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"syscall"
	"time"

	flag "github.com/spf13/pflag"

	"github.com/nlmha/nlmha/nsm"
	"github.com/nlmha/nlmha/nsm/nsmtest"
)

// notifyOptions configure `nlmbench notify`.
type notifyOptions struct {
	clients  []int
	repeat   int
	nlmd     string
	smNotify bool
	smMax    int
	procs    int
	timeout  time.Duration
	extra    []string // more nlmd flags
	timeline bool
}

var benchVIP = netip.MustParseAddr("127.0.0.2")

// The virtual server's name has no dot: sm-notify sends a name with a
// dot a second time, "unqualified", which would double its work.
const benchVIPName = "vip2"

// runNotify measures the notification fan-out: the time from nlmd's start
// (its virtual server having n clients on record, as after a crash) to
// the last of n simulated client statds having its SM_NOTIFY; then the
// same list exported for nfs-utils' sm-notify, from its start to its exit.
// The simulated hosts are 127.x.y.z addresses with one portmapper and one
// statd answering for all of them, so it needs root in a private network
// namespace (port 111); scripts/bench.sh runs it so.
func runNotify(args []string) int {
	var o notifyOptions
	fs := flag.NewFlagSet("nlmbench notify", flag.ContinueOnError)
	fs.IntSliceVar(&o.clients, "clients", []int{1000, 10000}, "client counts to measure")
	fs.IntVar(&o.repeat, "repeat", 1, "runs per count")
	self, _ := os.Executable()
	fs.StringVar(&o.nlmd, "nlmd", filepath.Join(filepath.Dir(self), "nlmd"), "the nlmd binary")
	fs.BoolVar(&o.smNotify, "sm-notify", true, "also measure nfs-utils' sm-notify (if installed)")
	fs.IntVar(&o.smMax, "sm-notify-max", 1000, "largest client count to measure sm-notify with (it notifies about 70 clients/s here)")
	fs.IntVar(&o.procs, "procs", 1, "nlmd --procs")
	fs.DurationVar(&o.timeout, "timeout", 5*time.Minute, "longest a run may take")
	fs.BoolVar(&o.timeline, "timeline", false, "also print (to stderr) when each tenth of the clients was notified")
	fs.StringArrayVar(&o.extra, "nlmd-arg", nil, "one more nlmd flag (repeatable), e.g. --nlmd-arg=--cpu-profile=/var/tmp/notify.pprof")
	fs.Usage = func() {
		fmt.Fprintf(fs.Output(), "Usage: nlmbench notify [flags]\n\nSM_NOTIFY fan-out of nlmd (and sm-notify) to simulated client statds.\nRun as root in a private network namespace.\n\nFlags:\n%s", fs.FlagUsages())
	}
	if err := fs.Parse(args); err != nil {
		if errors.Is(err, flag.ErrHelp) {
			return 0
		}
		return 2
	}
	peers, err := nsmtest.Start(111)
	if err != nil {
		fmt.Fprintln(os.Stderr, "nlmbench notify: cannot serve the clients' portmapper on port 111 (run as root in a private network namespace):", err)
		return 1
	}
	defer peers.Close()
	if _, err := exec.LookPath("sm-notify"); err != nil && o.smNotify {
		fmt.Fprintln(os.Stderr, "nlmbench notify: sm-notify not installed; measuring nlmd only")
		o.smNotify = false
	}
	for _, n := range o.clients {
		for range o.repeat {
			r, err := notifyNlmd(o, peers, n)
			if err != nil {
				fmt.Fprintln(os.Stderr, "nlmbench notify:", err)
				return 1
			}
			fmt.Println(r)
			if !o.smNotify || n > o.smMax {
				continue
			}
			r, err = notifySmNotify(o, peers, n)
			if err != nil {
				fmt.Fprintln(os.Stderr, "nlmbench notify:", err)
				return 1
			}
			fmt.Println(r)
		}
	}
	return 0
}

func clientAddr(i int) netip.Addr {
	return netip.AddrFrom4([4]byte{127, 1 + byte(i/60000), byte(i % 60000 / 240), 1 + byte(i%240)})
}

// stateWith returns a fresh state directory holding n clients of the
// virtual server.
func stateWith(n int) (string, *nsm.Dir, error) {
	root, err := os.MkdirTemp("", "nlmbench-notify-")
	if err != nil {
		return "", nil, err
	}
	d, err := nsm.OpenDir(root, benchVIP)
	if err != nil {
		return root, nil, err
	}
	clients := make([]nsm.Client, n)
	for i := range clients {
		clients[i] = nsm.Client{Caller: fmt.Sprint("client", i), Addr: clientAddr(i)}
	}
	if err := d.SetState(1); err != nil {
		return root, nil, err
	}
	return root, d, d.AddClients(clients, benchVIPName)
}

func waitNotified(peers *nsmtest.Peers, n int, start time.Time, timeout time.Duration) (first time.Duration, err error) {
	for peers.Notified() < n {
		if time.Since(start) > timeout {
			return 0, fmt.Errorf("only %d of %d clients notified after %v", peers.Notified(), n, timeout)
		}
		time.Sleep(200 * time.Microsecond)
	}
	notes := peers.Notifications()
	first = notes[0].At.Sub(start)
	return first, nil
}

func notifyNlmd(o notifyOptions, peers *nsmtest.Peers, n int) (string, error) {
	root, _, err := stateWith(n)
	defer os.RemoveAll(root)
	if err != nil {
		return "", err
	}
	peers.Reset()
	rcvErr0 := udpRcvbufErrors()
	args := append([]string{"--vip", benchVIP.String() + "=" + benchVIPName, "--serve-unknown=false", "--rpcbind", "none",
		"--state-dir", root, "--nsm-port", "32765", "--nlm-port", "4045", "--log-level", "warn", "--procs", strconv.Itoa(o.procs)}, o.extra...)
	cmd := exec.Command(o.nlmd, args...)
	cmd.Stderr = os.Stderr
	self0, busy0 := procCPU(os.Getpid()), machineBusy()
	start := time.Now()
	if err := cmd.Start(); err != nil {
		return "", err
	}
	defer func() {
		cmd.Process.Signal(syscall.SIGTERM)
		cmd.Wait()
	}()
	first, err := waitNotified(peers, n, start, o.timeout)
	if err != nil {
		return "", err
	}
	took := time.Since(start)
	// CPU of both sides over the run: nlmd's, and this process's (the
	// simulated peers, nearly all of it), to tell whose the time is.
	cpu, peersCPU := procCPU(cmd.Process.Pid), procCPU(os.Getpid())-self0
	otherCPU := machineBusy() - busy0 - cpu - peersCPU
	// The peak resident set of the whole start: nlmd reads the records
	// once the clients are notified, so it is taken once nlmd has been
	// idle for a moment (10 s at most).
	settle(cmd.Process.Pid, 250*time.Millisecond, 10*time.Second)
	rss := maxRSS(cmd.Process.Pid)
	if o.timeline {
		// When each tenth of the clients had its notification: a notifier
		// held up (by the records loading beside it, say) shows as a slow
		// start.
		notes := peers.Notifications()
		slices.SortFunc(notes, func(a, b nsmtest.Notification) int { return a.At.Compare(b.At) })
		var b strings.Builder
		for q := 1; q <= 10; q++ {
			fmt.Fprintf(&b, " %d%%=%dms", q*10, notes[min(len(notes), len(notes)*q/10)-1].At.Sub(start).Milliseconds())
		}
		fmt.Fprintf(os.Stderr, "nlmd clients=%d notified by:%s\n", n, b.String())
	}
	return fmt.Sprintf("RESULT notifier=nlmd clients=%d seconds=%.3f clients_per_s=%.0f first_ms=%.1f max_rss_kb=%d nlmd_cpu_ms=%d peers_cpu_ms=%d other_cpu_ms=%d peer_drops=%d udp_rcvbuf_errors=%d",
		n, took.Seconds(), float64(n)/took.Seconds(), float64(first.Microseconds())/1000, rss, cpu.Milliseconds(), peersCPU.Milliseconds(), otherCPU.Milliseconds(), peers.Drops(), udpRcvbufErrors()-rcvErr0), nil
}

func notifySmNotify(o notifyOptions, peers *nsmtest.Peers, n int) (string, error) {
	root, d, err := stateWith(n)
	defer os.RemoveAll(root)
	if err != nil {
		return "", err
	}
	dir := filepath.Join(root, "sm-notify")
	if _, err := d.ExportSM(dir); err != nil {
		return "", err
	}
	peers.Reset()
	rcvErr0 := udpRcvbufErrors()
	// Without -d sm-notify logs nothing (-d turns on all its debug
	// messages, which slow it down) and goes to the background: its
	// parent exits at once, and the time that counts is until the last
	// client has its notification.
	start := time.Now()
	out, err := exec.Command("sm-notify", "-f", "-n", "-P", dir).CombinedOutput()
	if err != nil {
		return "", fmt.Errorf("sm-notify: %w\n%s", err, out)
	}
	first, err := waitNotified(peers, n, start, o.timeout)
	took := time.Since(start)
	// It exits once it has heard from everyone; make sure before the next run.
	killOurs("sm-notify")
	if err != nil {
		return fmt.Sprintf("RESULT notifier=sm-notify clients=%d finished=false notified=%d seconds=%.3f clients_per_s=%.0f",
			n, peers.Notified(), took.Seconds(), float64(peers.Notified())/took.Seconds()), nil
	}
	return fmt.Sprintf("RESULT notifier=sm-notify clients=%d seconds=%.3f clients_per_s=%.0f first_ms=%.1f peer_drops=%d udp_rcvbuf_errors=%d",
		n, took.Seconds(), float64(n)/took.Seconds(), float64(first.Microseconds())/1000, peers.Drops(), udpRcvbufErrors()-rcvErr0), nil
}

// machineBusy is the CPU time all CPUs spent busy so far (/proc/stat).
// Less nlmd's and the peers', it tells how much else ran during a run:
// on a shared machine, a figure to read with the time.
func machineBusy() time.Duration {
	b, err := os.ReadFile("/proc/stat")
	if err != nil {
		return 0
	}
	line, _, _ := strings.Cut(string(b), "\n")
	f := strings.Fields(line)
	var ticks int64
	for i, v := range f[1:] {
		if i == 3 || i == 4 { // idle, iowait
			continue
		}
		n, _ := strconv.ParseInt(v, 10, 64)
		ticks += n
	}
	return time.Duration(ticks) * time.Second / 100 // USER_HZ
}

// settle waits until the process pid used no CPU for quiet, or for at
// most limit.
func settle(pid int, quiet, limit time.Duration) {
	deadline := time.Now().Add(limit)
	last, since := procCPU(pid), time.Now()
	for time.Now().Before(deadline) && time.Since(since) < quiet {
		time.Sleep(quiet / 10)
		// A few milliseconds a second are timers and the like.
		if cpu := procCPU(pid); cpu-last > quiet/50 {
			last, since = cpu, time.Now()
		}
	}
}

// maxRSS is a process's peak resident set (VmHWM), in KiB.
func maxRSS(pid int) int {
	f, err := os.Open(fmt.Sprintf("/proc/%d/status", pid))
	if err != nil {
		return 0
	}
	defer f.Close()
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		if v, ok := strings.CutPrefix(sc.Text(), "VmHWM:"); ok {
			kb, _ := strconv.Atoi(strings.TrimSuffix(strings.TrimSpace(v), " kB"))
			return kb
		}
	}
	return 0
}

// udpRcvbufErrors is the network namespace's count of UDP datagrams the
// kernel dropped for a full socket buffer (/proc/net/snmp).
func udpRcvbufErrors() int {
	b, err := os.ReadFile("/proc/net/snmp")
	if err != nil {
		return 0
	}
	var head []string
	for _, line := range strings.Split(string(b), "\n") {
		f := strings.Fields(line)
		if len(f) == 0 || f[0] != "Udp:" {
			continue
		}
		if head == nil {
			head = f
			continue
		}
		for i, h := range head {
			if h == "RcvbufErrors" && i < len(f) {
				n, _ := strconv.Atoi(f[i])
				return n
			}
		}
	}
	return 0
}

// killOurs kills the processes named name that run in our network
// namespace (and no others on the machine).
func killOurs(name string) {
	self, err := os.Readlink("/proc/self/ns/net")
	if err != nil {
		return
	}
	ents, _ := os.ReadDir("/proc")
	for _, e := range ents {
		pid, err := strconv.Atoi(e.Name())
		if err != nil {
			continue
		}
		comm, _ := os.ReadFile(fmt.Sprintf("/proc/%d/comm", pid))
		ns, _ := os.Readlink(fmt.Sprintf("/proc/%d/ns/net", pid))
		if strings.TrimSpace(string(comm)) == name && ns == self {
			syscall.Kill(pid, syscall.SIGKILL)
		}
	}
}

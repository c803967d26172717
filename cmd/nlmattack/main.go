// Command nlmattack plays the hostile and the well-behaved peers of the
// adversarial suite (integration/adversarial_test.go, issue 10): each
// subcommand replays one attack on nlmd, bounded in count and time, or
// measures a well-behaved client, and prints what it did as JSON lines,
// the last one its summary. The suite runs it inside the network
// namespaces it creates (as the "remote" host, or as an unprivileged local
// user); it has no business on any other network.
//
//	nlmattack probe      a well-behaved client: NULL, LOCK, UNLOCK (and SM_STAT), timed
//	nlmattack locks      many LOCKs, under many caller_names, optionally blocking
//	nlmattack notify     SM_NOTIFYs with new states, over UDP or pipelined on TCP
//	nlmattack msgflood   a flood of UDP *_MSG calls
//	nlmattack garbage    malformed RPC on TCP and UDP
//	nlmattack conns      idle TCP connections, held until stdin closes
//	nlmattack nsmflood   SM_STAT or SM_MON with names that need DNS
//	nlmattack rpc        one call (privilege checks), from a chosen port
//	nlmattack unixconnect  keep trying to connect to a Unix socket
//
// Subcommands that hold something (probe, conns, notify --hold) run until
// their standard input closes, so that the suite decides how long.
package main

import (
	"encoding/json"
	"flag"
	"fmt"
	"io"
	"os"
	"sort"
	"sync"
	"time"
)

type command struct {
	run  func(args []string) (any, error)
	help string
}

var commands = map[string]command{
	"probe":       {runProbe, "a well-behaved client, timed"},
	"locks":       {runLocks, "many LOCKs under many caller_names"},
	"notify":      {runNotify, "SM_NOTIFYs with new states"},
	"msgflood":    {runMsgFlood, "a flood of UDP *_MSG calls"},
	"garbage":     {runGarbage, "malformed RPC on TCP and UDP"},
	"conns":       {runConns, "idle TCP connections held until stdin closes"},
	"nsmflood":    {runNSMFlood, "SM_STAT or SM_MON with names that need DNS"},
	"rpc":         {runRPC, "one call, from a chosen port"},
	"unixconnect": {runUnixConnect, "keep trying to connect to a Unix socket"},
}

func main() {
	if len(os.Args) < 2 || commands[os.Args[1]].run == nil {
		fmt.Fprintln(os.Stderr, "usage: nlmattack COMMAND [flags]; commands:")
		names := make([]string, 0, len(commands))
		for n := range commands {
			names = append(names, n)
		}
		sort.Strings(names)
		for _, n := range names {
			fmt.Fprintf(os.Stderr, "  %-12s %s\n", n, commands[n].help)
		}
		os.Exit(2)
	}
	res, err := commands[os.Args[1]].run(os.Args[2:])
	if err != nil {
		fmt.Fprintln(os.Stderr, "nlmattack:", err)
		os.Exit(1)
	}
	emit(res)
}

var emitMu sync.Mutex

// emit prints one JSON line; the suite reads progress lines and the final
// summary from the same stream.
func emit(v any) {
	b, err := json.Marshal(v)
	if err != nil {
		panic(err)
	}
	emitMu.Lock()
	os.Stdout.Write(append(b, '\n'))
	emitMu.Unlock()
}

// untilStdinCloses returns a channel closed when standard input reaches
// EOF, or after max.
func untilStdinCloses(max time.Duration) <-chan struct{} {
	done := make(chan struct{})
	var once sync.Once
	stop := func() { once.Do(func() { close(done) }) }
	go func() {
		io.Copy(io.Discard, os.Stdin)
		stop()
	}()
	time.AfterFunc(max, stop)
	return done
}

// newFlags is a flag set whose errors end the program, as flag.Parse does.
func newFlags(name string) *flag.FlagSet {
	return flag.NewFlagSet("nlmattack "+name, flag.ExitOnError)
}

// pacer spaces events at rate per second (0: as fast as possible).
type pacer struct {
	start time.Time
	every time.Duration
	n     int
}

func newPacer(rate float64) *pacer {
	p := &pacer{start: time.Now()}
	if rate > 0 {
		p.every = time.Duration(float64(time.Second) / rate)
	}
	return p
}

func (p *pacer) wait() {
	p.n++
	if p.every == 0 {
		return
	}
	if d := time.Until(p.start.Add(time.Duration(p.n) * p.every)); d > 0 {
		time.Sleep(d)
	}
}

// errList keeps the first few distinct errors, for the summary.
type errList struct {
	mu    sync.Mutex
	n     int
	first []string
}

func (e *errList) add(err error) {
	e.mu.Lock()
	defer e.mu.Unlock()
	e.n++
	s := err.Error()
	for _, f := range e.first {
		if f == s {
			return
		}
	}
	if len(e.first) < 5 {
		e.first = append(e.first, s)
	}
}

func (e *errList) count() int {
	e.mu.Lock()
	defer e.mu.Unlock()
	return e.n
}

func (e *errList) list() []string {
	e.mu.Lock()
	defer e.mu.Unlock()
	return append([]string(nil), e.first...)
}

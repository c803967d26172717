package nsm

import (
	"context"
	"errors"
	"log/slog"
	"os/exec"
	"sync"
	"syscall"
	"time"
)

// callout runs rpc.statd's --ha-callout program for monitor events, one
// at a time and in order, off the request path: a queue feeds one worker,
// every run is bounded in time (its whole process group is killed when the
// time is up), and failures are only logged. A full queue drops events
// with a warning rather than stall the service.
type callout struct {
	prog    string
	timeout time.Duration
	log     *slog.Logger
	queue   chan []string
	done    chan struct{}
	once    sync.Once
	ctx     context.Context
	cancel  context.CancelFunc
}

const calloutQueue = 4096

func newCallout(prog string, timeout time.Duration, log *slog.Logger) *callout {
	if timeout <= 0 {
		timeout = 10 * time.Second
	}
	c := &callout{prog: prog, timeout: timeout, log: log, queue: make(chan []string, calloutQueue), done: make(chan struct{})}
	c.ctx, c.cancel = context.WithCancel(context.Background())
	go c.work()
	return c
}

func (c *callout) run(args ...string) {
	select {
	case c.queue <- args:
	default:
		c.log.Warn("nsm: HA callout queue full; event dropped", "args", args)
	}
}

func (c *callout) work() {
	defer close(c.done)
	dropped := 0
	for args := range c.queue {
		if c.ctx.Err() != nil {
			dropped++
			continue
		}
		c.exec(args)
	}
	if dropped > 0 {
		c.log.Warn("nsm: HA callout events dropped at shutdown", "count", dropped)
	}
}

func (c *callout) exec(args []string) {
	ctx, cancel := context.WithTimeout(c.ctx, c.timeout)
	defer cancel()
	cmd := exec.CommandContext(ctx, c.prog, args...)
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
	cmd.Cancel = func() error { return syscall.Kill(-cmd.Process.Pid, syscall.SIGKILL) }
	cmd.WaitDelay = time.Second
	start := time.Now()
	out, err := cmd.CombinedOutput()
	switch {
	case errors.Is(ctx.Err(), context.DeadlineExceeded):
		c.log.Warn("nsm: HA callout timed out and was killed", "prog", c.prog, "args", args, "timeout", c.timeout)
	case err != nil:
		c.log.Warn("nsm: HA callout failed", "prog", c.prog, "args", args, "err", err, "output", string(out))
	default:
		c.log.Debug("nsm: HA callout", "prog", c.prog, "args", args, "took", time.Since(start))
	}
}

// close lets the queued events run for up to one timeout, then kills what
// still runs and drops the rest.
func (c *callout) close() {
	c.once.Do(func() {
		close(c.queue)
		select {
		case <-c.done:
		case <-time.After(c.timeout):
			c.cancel()
			// Drop the rest quickly: every run now fails at once.
			<-c.done
		}
		c.cancel()
	})
}

func (s *Service) runCallout(args ...string) {
	if s.callout != nil {
		s.callout.run(args...)
	}
}

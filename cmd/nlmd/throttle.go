package main

import (
	"context"
	"log/slog"
	"sync"
	"sync/atomic"
	"time"
)

// throttle keeps a flood from flooding the log: each message (per level)
// gets burst lines per interval; the rest are counted, and the count is
// logged once the interval is over, with the message it stands for.
// Messages are the code's own constant strings, so there are as many
// windows as log statements, whatever peers send. A malformed-input flood
// wrote 390 000 lines (65 MB) in 60 s, one WARN per bad record.
type throttle struct {
	next slog.Handler
	st   *throttleState
}

type throttleState struct {
	interval time.Duration
	burst    int

	mu   sync.Mutex
	wins map[throttleKey]*throttleWindow
	// suppressed counts every line held back (nlm_log_lines_suppressed_total).
	suppressed atomic.Uint64
}

type throttleKey struct {
	level slog.Level
	msg   string
}

type throttleWindow struct {
	start   time.Time
	n       int
	dropped int
}

func newThrottle(next slog.Handler, interval time.Duration, burst int) *throttle {
	return &throttle{next: next, st: &throttleState{interval: interval, burst: burst, wins: map[throttleKey]*throttleWindow{}}}
}

func (t *throttle) Enabled(ctx context.Context, l slog.Level) bool { return t.next.Enabled(ctx, l) }

func (t *throttle) WithAttrs(as []slog.Attr) slog.Handler {
	return &throttle{next: t.next.WithAttrs(as), st: t.st}
}

func (t *throttle) WithGroup(name string) slog.Handler {
	return &throttle{next: t.next.WithGroup(name), st: t.st}
}

func (t *throttle) Handle(ctx context.Context, r slog.Record) error {
	st := t.st
	k := throttleKey{r.Level, r.Message}
	st.mu.Lock()
	w := st.wins[k]
	if w == nil {
		w = &throttleWindow{start: r.Time}
		st.wins[k] = w
	}
	var held int
	if r.Time.Sub(w.start) >= st.interval {
		held, w.start, w.n, w.dropped = w.dropped, r.Time, 0, 0
	}
	w.n++
	if w.n > st.burst {
		w.dropped++
		st.mu.Unlock()
		st.suppressed.Add(1)
		return nil
	}
	st.mu.Unlock()
	if held > 0 {
		t.summary(ctx, k, held, r.Time)
	}
	return t.next.Handle(ctx, r)
}

// flush logs the counts of the windows that are over, for messages that
// did not come again to carry them.
func (t *throttle) flush(now time.Time) {
	type over struct {
		k throttleKey
		n int
	}
	var out []over
	t.st.mu.Lock()
	for k, w := range t.st.wins {
		if now.Sub(w.start) >= t.st.interval {
			if w.dropped > 0 {
				out = append(out, over{k, w.dropped})
			}
			delete(t.st.wins, k)
		}
	}
	t.st.mu.Unlock()
	for _, o := range out {
		t.summary(context.Background(), o.k, o.n, now)
	}
}

func (t *throttle) summary(ctx context.Context, k throttleKey, n int, at time.Time) {
	r := slog.NewRecord(at, k.level, "nlmd: similar log lines suppressed", 0)
	r.AddAttrs(slog.String("message", k.msg), slog.Int("count", n), slog.Duration("within", t.st.interval))
	t.next.Handle(ctx, r)
}

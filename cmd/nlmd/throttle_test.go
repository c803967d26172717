package main

import (
	"bytes"
	"context"
	"log/slog"
	"strings"
	"testing"
	"time"
)

// A flood of one message gives burst lines per interval and then one line
// with the count; other messages are not held back by it.
func TestThrottle(t *testing.T) {
	var b bytes.Buffer
	th := newThrottle(slog.NewTextHandler(&b, nil), 10*time.Second, 3)
	log := slog.New(th).With("component", "test")
	t0 := time.Date(2026, 1, 1, 0, 0, 0, 0, time.UTC)
	emit := func(at time.Duration, msg string) {
		r := slog.NewRecord(t0.Add(at), slog.LevelWarn, msg, 0)
		log.Handler().Handle(context.Background(), r)
	}
	for i := range 1000 {
		emit(time.Duration(i)*time.Millisecond, "sunrpc: bad record")
	}
	emit(time.Second, "nsm: something else")
	if n := strings.Count(b.String(), "bad record"); n != 3 {
		t.Fatalf("%d lines of the flood in its first interval:\n%s", n, b.String())
	}
	th.flush(t0.Add(11 * time.Second))
	out := b.String()
	if !strings.Contains(out, "similar log lines suppressed") || !strings.Contains(out, "count=997") || !strings.Contains(out, "something else") {
		t.Fatalf("log:\n%s", out)
	}
	if th.st.suppressed.Load() != 997 {
		t.Fatalf("suppressed %d", th.st.suppressed.Load())
	}
	// The next interval starts afresh.
	b.Reset()
	emit(20*time.Second, "sunrpc: bad record")
	if !strings.Contains(b.String(), "bad record") {
		t.Fatal("a new interval was held back")
	}
}

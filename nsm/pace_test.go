package nsm

import (
	"testing"
	"time"
)

// Work waits for a notification in its first pass while answers come in,
// not for one whose peers are silent, nor once the pass is over.
func TestNotifyingBusy(t *testing.T) {
	n := newNotifying()
	if n.busy() {
		t.Fatal("busy with no notification")
	}
	n.begin(time.Now())
	if !n.busy() {
		t.Fatal("not busy as a notification begins")
	}
	// Work that is waited for does not wait.
	hurry := make(chan struct{})
	close(hurry)
	start := time.Now()
	n.pacer(hurry).yield()
	if time.Since(start) > time.Second {
		t.Fatal("work in a hurry waited")
	}
	n.answered(time.Now().Add(-2 * answersFresh))
	if n.busy() {
		t.Fatal("busy without answers lately")
	}
	p := n.pacer(nil)
	start = time.Now()
	p.yield()
	if time.Since(start) > time.Second {
		t.Fatal("work waited for a silent notification")
	}
	n.answered(time.Now())
	n.passed()
	if n.busy() {
		t.Fatal("busy after the first pass")
	}
	var nilPacer *pacer
	nilPacer.yield()
}

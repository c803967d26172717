package nsm

import (
	"sync/atomic"
	"time"
)

// Work at a start (reading and indexing 100 000 records) waits for the
// notifications going on: they are what the clients wait for, and nlmd
// runs Go on one CPU, where the two shared it (the notification took as
// long again as alone), while what needs the records can mostly wait
// (a notified client's reclaim does not: see vip.pendingClient).
//
// On one CPU a goroutine that never blocks also keeps it for a whole time
// slice (10 ms), and the scheduler polls the sockets only when it has
// nothing else to run: the notifier, waiting for answers, got one window
// of calls through per slice while the records loaded (100 000 clients:
// a tenth notified in the first 1.4 s, the rest in the next 1.5 s). So
// the work waits in short sleeps, between small chunks, which leaves the
// CPU and the sockets to the notifier.
//
// notifying tells whether a notification is busy: in its first pass (see
// actFirstPass) with answers coming in. One whose peers are silent is not
// (work waits a few milliseconds for it), and work never waits more than
// maxDefer in all.
type notifying struct {
	epoch  time.Time
	passes atomic.Int32 // notifications in their first pass
	last   atomic.Int64 // when answers were last taken, since epoch
}

const (
	// answersFresh is how recent answers must be for a notification to
	// count as busy.
	answersFresh = 5 * time.Millisecond
	// deferPause is how long waiting work sleeps before it looks again.
	deferPause = time.Millisecond
	// maxDefer bounds the waits of one piece of work.
	maxDefer = 5 * time.Second
	// pacedChunk is how many records paced work handles between looks
	// (a fraction of a millisecond).
	pacedChunk = 256
	// launchWait bounds how long the records of a started virtual server
	// wait for its notification to be launched before they load.
	launchWait = 100 * time.Millisecond
)

func newNotifying() *notifying { return &notifying{epoch: time.Now()} }

// begin counts a notification starting its first pass at now.
func (n *notifying) begin(now time.Time) {
	n.passes.Add(1)
	n.answered(now)
}

// passed counts a notification's first pass over.
func (n *notifying) passed() { n.passes.Add(-1) }

// answered records that a notifier took answers at now.
func (n *notifying) answered(now time.Time) { n.last.Store(int64(now.Sub(n.epoch))) }

func (n *notifying) busy() bool {
	return n.passes.Load() > 0 && time.Since(n.epoch)-time.Duration(n.last.Load()) < answersFresh
}

// pacer paces one piece of work behind the notifications, until hurry
// is closed (the work is waited for: the virtual server is released).
type pacer struct {
	n      *notifying
	hurry  <-chan struct{}
	waited atomic.Int64 // in all, by the work's goroutines
}

func (n *notifying) pacer(hurry <-chan struct{}) *pacer { return &pacer{n: n, hurry: hurry} }

// yield waits while a notification is busy, within the work's maxDefer.
func (p *pacer) yield() {
	if p == nil {
		return
	}
	for p.n.busy() && time.Duration(p.waited.Load()) < maxDefer {
		select {
		case <-p.hurry:
			return
		default:
		}
		time.Sleep(deferPause)
		p.waited.Add(int64(deferPause))
	}
}

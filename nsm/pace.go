package nsm

import (
	"sync/atomic"
	"time"
)

// pacer lets long work at a start (reading and indexing 100 000 records)
// give way to the notifications going on beside it.
//
// With one CPU for Go (nlmd's default), a goroutine that never blocks
// keeps it for a whole time slice (10 ms), and the scheduler polls the
// sockets only when it has nothing else to run: the notifier, waiting for
// answers, got one window of calls through per slice while the records
// loaded (10 000 clients: a tenth notified in the first 80 ms, the rest in
// the next 150). yield, called between small pieces of the work, parks it
// for a moment while answers are coming in, so that they are read and
// acted on at once. Whether they are is known from the last batch the
// notifiers took: the scheduler lets them run at least once per slice, so
// a notification whose peers are silent (or none at all) stops the
// pauses within a slice or two.
type pacer struct {
	epoch time.Time
	last  atomic.Int64 // when answers were last taken, since epoch
}

const (
	// yieldPause is how long yield parks: long enough that the scheduler
	// looks at the sockets before the work is runnable again.
	yieldPause = 20 * time.Microsecond
	// answersFresh is how recent answers must be for yield to pause.
	answersFresh = 20 * time.Millisecond
	// pacedChunk is how many records paced work handles between yields
	// (a fraction of a millisecond).
	pacedChunk = 256
	// launchWait bounds how long the records of a started virtual server
	// wait for its notification to be launched before they load.
	launchWait = 100 * time.Millisecond
)

func newPacer() *pacer { return &pacer{epoch: time.Now()} }

// answered records that a notifier took answers at now.
func (p *pacer) answered(now time.Time) { p.last.Store(int64(now.Sub(p.epoch))) }

func (p *pacer) yield() {
	if p == nil {
		return
	}
	if last := p.last.Load(); last != 0 && time.Since(p.epoch)-time.Duration(last) < answersFresh {
		time.Sleep(yieldPause)
	}
}

package sunrpc

import (
	"container/list"
	"net/netip"
	"sync"
	"time"
)

// The duplicate request cache answers a retransmitted UDP call to a
// non-idempotent procedure with the reply the original got, instead of
// running it again (an UNLOCK repeated after a new LOCK would otherwise undo
// it). Entries are keyed by the whole call identity plus a checksum of the
// message, so a client that reboots and reuses an XID is not served a stale
// answer.

type drcKey struct {
	local, remote         netip.AddrPort
	xid, prog, vers, proc uint32
	sum                   uint32
}

type drcState uint8

const (
	drcMiss drcState = iota
	drcInProgress
	drcDone
)

type drcEntry struct {
	key   drcKey
	state drcState
	reply []byte
	at    time.Time
}

type replyCache struct {
	mu       sync.Mutex
	size     int
	lifetime time.Duration
	entries  map[drcKey]*list.Element
	lru      list.List // front = most recent
}

func newReplyCache(size int, lifetime time.Duration) *replyCache {
	return &replyCache{size: size, lifetime: lifetime, entries: make(map[drcKey]*list.Element, size)}
}

// begin looks the call up. On drcMiss the call is recorded as in progress
// and the caller must call finish; on drcDone the cached reply (nil when the
// original sent none) is returned.
func (c *replyCache) begin(k drcKey) ([]byte, drcState) {
	now := time.Now()
	c.mu.Lock()
	defer c.mu.Unlock()
	if el, ok := c.entries[k]; ok {
		e := el.Value.(*drcEntry)
		if e.state == drcInProgress || now.Sub(e.at) < c.lifetime {
			c.lru.MoveToFront(el)
			return e.reply, e.state
		}
		c.remove(el)
	}
	for c.lru.Len() >= c.size {
		back := c.lru.Back()
		if back.Value.(*drcEntry).state == drcInProgress && c.lru.Len() < 2*c.size {
			break // never evict a running call unless the cache is flooded
		}
		c.remove(back)
	}
	c.entries[k] = c.lru.PushFront(&drcEntry{key: k, state: drcInProgress, at: now})
	return nil, drcMiss
}

// finish stores the reply of a call begun with begin.
func (c *replyCache) finish(k drcKey, reply []byte) {
	c.mu.Lock()
	defer c.mu.Unlock()
	el, ok := c.entries[k]
	if !ok {
		return
	}
	e := el.Value.(*drcEntry)
	e.state = drcDone
	e.at = time.Now()
	if reply != nil {
		e.reply = append([]byte(nil), reply...)
	}
}

// forget drops a call begun with begin that was not answered on purpose
// (its handler said ErrNoReply: not now): its retransmission is a new
// call, not a repeat of one that had no answer.
func (c *replyCache) forget(k drcKey) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if el, ok := c.entries[k]; ok {
		c.remove(el)
	}
}

func (c *replyCache) remove(el *list.Element) {
	delete(c.entries, el.Value.(*drcEntry).key)
	c.lru.Remove(el)
}

func (c *replyCache) len() int {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.lru.Len()
}

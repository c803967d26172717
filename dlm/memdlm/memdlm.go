// Package memdlm is the in-process lock backend: every file's lock state in
// memory, sharded by file handle so that work on different files runs in
// parallel. It is the default for a single node; its state dies with the
// process, which NLM tolerates because clients reclaim after a restart.
//
// Updates run their function exactly once, under the file's shard lock,
// and edit the state in place. Claims are checked under that lock too:
// an Update that holds it either sees the release's SetClaim and is
// fenced, or finishes before the release's UpdateAll reaches the shard
// and is captured.
package memdlm

import (
	"context"
	"fmt"
	"hash/maphash"
	"math/rand/v2"
	"net/netip"
	"sync"
	"sync/atomic"

	"github.com/nlmha/nlmha/dlm"
)

const nShards = 256

// Backend is the in-memory lock backend.
type Backend struct {
	*dlm.Registry
	seed   maphash.Seed
	shards [nShards]shard
	empty  dlm.State // what Read shows for a file with no state
	closed atomic.Bool

	// claims is published copy-on-write: requests read it with one atomic
	// load, and it changes only when a virtual server moves.
	claimMu sync.Mutex
	claims  atomic.Pointer[claimSet]
}

// claimSet is a published claim table, with a list of its entries to scan
// instead of hashing when there are few (a node serves a handful of
// virtual servers, and every request checks one).
type claimSet struct {
	tab  dlm.ClaimTable
	list []claimEntry // nil when the table is large
}

type claimEntry struct {
	vip netip.Addr
	rec dlm.ClaimRecord
}

const maxClaimList = 32

func newClaimSet(tab dlm.ClaimTable) *claimSet {
	cs := &claimSet{tab: tab}
	if len(tab) <= maxClaimList {
		cs.list = make([]claimEntry, 0, len(tab))
		for vip, rec := range tab {
			cs.list = append(cs.list, claimEntry{vip, rec})
		}
	}
	return cs
}

// allows is dlm.ClaimTable.Allows, for a fenced claim.
func (cs *claimSet) allows(c dlm.Claim, bulk bool) bool {
	if cs.list == nil && len(cs.tab) > 0 {
		return cs.tab.Allows(c, bulk)
	}
	for i := range cs.list {
		if e := &cs.list[i]; e.vip == c.VIP {
			return e.rec.Allows(c.Epoch, bulk)
		}
	}
	return false
}

type shard struct {
	mu    sync.Mutex
	files fileTable
	edit  dlm.Edit
	view  dlm.File // the File handed to fn, reused (the shard lock is held)
	// idle holds recently emptied files, left in the map so that a file
	// locked and unlocked over and over costs no map insert and delete and
	// no allocation; the oldest is dropped when the ring is full.
	idle []idleFile
}

type idleFile struct {
	h  uint64
	st *dlm.State
}

const maxIdle = 8

var _ dlm.Backend = (*Backend)(nil)

// New returns an empty backend.
func New() *Backend {
	b := &Backend{Registry: dlm.NewRegistry(), seed: maphash.MakeSeed()}
	b.claims.Store(newClaimSet(nil))
	treapSeed := rand.Uint64()
	for i := range b.shards {
		b.shards[i].edit.Seed = treapSeed
	}
	return b
}

// shard hashes fh once: the top bits choose the shard, the low bits the
// slot in its table.
func (b *Backend) shard(fh []byte) (*shard, uint64) {
	h := maphash.Bytes(b.seed, fh)
	return &b.shards[h>>(64-8)], h
}

func (b *Backend) check(ctx context.Context) error {
	if b.closed.Load() {
		return dlm.ErrClosed
	}
	return ctx.Err()
}

// SetClaim records a claim of this node (see dlm.ClaimTable.Set).
func (b *Backend) SetClaim(ctx context.Context, c dlm.Claim, st dlm.ClaimState) error {
	if err := b.check(ctx); err != nil {
		return err
	}
	c.VIP = c.VIP.Unmap()
	b.claimMu.Lock()
	defer b.claimMu.Unlock()
	next, err := b.claims.Load().tab.Set(c, st)
	if err != nil {
		return err
	}
	b.claims.Store(newClaimSet(next))
	return nil
}

// allows checks an edit's claim; the caller holds the shard lock it edits
// under.
func (b *Backend) allows(c dlm.Claim, bulk bool) error {
	if c.Unfenced() {
		return nil
	}
	if c.VIP.Is4In6() {
		c.VIP = c.VIP.Unmap()
	}
	if b.claims.Load().allows(c, bulk) {
		return nil
	}
	return fmt.Errorf("%w: %v", dlm.ErrFenced, c)
}

// Update runs fn on the file with handle fh, once, under its shard lock.
func (b *Backend) Update(ctx context.Context, fh []byte, c dlm.Claim, fn func(f *dlm.File) error) error {
	if err := b.check(ctx); err != nil {
		return err
	}
	s, h := b.shard(fh)
	s.mu.Lock()
	defer s.mu.Unlock()
	if err := b.allows(c, false); err != nil {
		return err
	}
	st := s.files.get(h, fh)
	if st == nil {
		st = dlm.NewState(string(fh))
	}
	return s.run(h, st, fn)
}

// run applies fn to st and keeps the shard's map, idle ring and the
// counters in step. The shard lock is held.
func (s *shard) run(h uint64, st *dlm.State, fn func(f *dlm.File) error) error {
	wasEmpty := st.Empty()
	s.edit.Reset()
	s.view.Bind(st, &s.edit)
	err := fn(&s.view)
	s.view.Bind(nil, nil)
	// fn must not edit before failing; if it did anyway, the edit stands
	// (it was made in place) and the counters must follow it.
	if s.edit.Changed {
		s.edit.Apply()
	}
	switch empty := st.Empty(); {
	case wasEmpty && !empty:
		if !s.unidle(st) {
			s.files.put(h, st)
		}
	case !wasEmpty && empty:
		s.retire(h, st)
	}
	return err
}

// retire parks an emptied file in the idle ring, dropping the oldest.
func (s *shard) retire(h uint64, st *dlm.State) {
	if len(s.idle) == maxIdle {
		old := s.idle[0]
		copy(s.idle, s.idle[1:])
		s.idle = s.idle[:maxIdle-1]
		s.files.del(old.h, old.st)
	}
	s.idle = append(s.idle, idleFile{h: h, st: st})
}

// unidle takes st out of the idle ring, reporting whether it was there
// (and so still in the table).
func (s *shard) unidle(st *dlm.State) bool {
	for i, x := range s.idle {
		if x.st == st {
			s.idle = append(s.idle[:i], s.idle[i+1:]...)
			return true
		}
	}
	return false
}

// UpdateAll runs fn on every file where a host sel selects has state.
func (b *Backend) UpdateAll(ctx context.Context, sel dlm.Selector, c dlm.Claim, fn func(f *dlm.File) error) error {
	if sel.Empty() {
		return nil
	}
	for i := range b.shards {
		if err := b.check(ctx); err != nil {
			return err
		}
		s := &b.shards[i]
		s.mu.Lock()
		if err := b.allows(c, true); err != nil {
			s.mu.Unlock()
			return err
		}
		// Collect first: running fn may retire files, which moves entries
		// of the table.
		var todo []slot
		for _, e := range s.files.slots {
			if e.st != nil && !e.st.Empty() && e.st.Involves(&sel) {
				todo = append(todo, e)
			}
		}
		var err error
		for _, e := range todo {
			if err = s.run(e.h, e.st, fn); err != nil {
				break
			}
		}
		s.mu.Unlock()
		if err != nil {
			return err
		}
	}
	return nil
}

// Read runs fn on the file's state without changing it.
func (b *Backend) Read(ctx context.Context, fh []byte, fn func(f *dlm.File)) error {
	if err := b.check(ctx); err != nil {
		return err
	}
	s, h := b.shard(fh)
	s.mu.Lock()
	defer s.mu.Unlock()
	st := s.files.get(h, fh)
	if st == nil {
		st = &b.empty
	}
	s.view.Bind(st, nil)
	fn(&s.view)
	s.view.Bind(nil, nil)
	return nil
}

// View calls fn on every file with state, one shard locked at a time.
func (b *Backend) View(ctx context.Context, fn func(f *dlm.File) bool) error {
	for i := range b.shards {
		if err := b.check(ctx); err != nil {
			return err
		}
		s := &b.shards[i]
		s.mu.Lock()
		cont := true
		s.files.each(func(st *dlm.State) bool {
			if st.Empty() {
				return true
			}
			s.view.Bind(st, nil)
			cont = fn(&s.view)
			s.view.Bind(nil, nil)
			return cont
		})
		s.mu.Unlock()
		if !cont {
			return nil
		}
	}
	return nil
}

// Files is the number of files with state.
func (b *Backend) Files() int {
	n := 0
	for i := range b.shards {
		s := &b.shards[i]
		s.mu.Lock()
		n += s.files.n - len(s.idle)
		s.mu.Unlock()
	}
	return n
}

// Close makes every later call fail with dlm.ErrClosed.
func (b *Backend) Close() error {
	b.closed.Store(true)
	return nil
}

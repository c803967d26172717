// Package memdlm is the in-process lock backend: every file's lock state in
// memory, sharded by file handle so that work on different files runs in
// parallel. It is the default for a single node; its state dies with the
// process, which NLM tolerates because clients reclaim after a restart.
//
// Updates run their function exactly once, under the file's shard lock,
// and edit the state in place. Fencing a virtual server that is being
// released is the caller's job: check the virtual server inside the Update
// function, under the same lock the release's UpdateAll takes.
package memdlm

import (
	"context"
	"hash/maphash"
	"math/rand/v2"
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
	empty  dlm.File // what Read shows for a file with no state
	closed atomic.Bool
}

type shard struct {
	mu    sync.Mutex
	files map[string]*dlm.File
	edit  dlm.Edit
}

var _ dlm.Backend = (*Backend)(nil)

// New returns an empty backend.
func New() *Backend {
	b := &Backend{Registry: dlm.NewRegistry(), seed: maphash.MakeSeed()}
	treapSeed := rand.Uint64()
	for i := range b.shards {
		b.shards[i].files = map[string]*dlm.File{}
		b.shards[i].edit.Seed = treapSeed
	}
	return b
}

func (b *Backend) shard(fh []byte) *shard {
	return &b.shards[maphash.Bytes(b.seed, fh)%nShards]
}

func (b *Backend) check(ctx context.Context) error {
	if b.closed.Load() {
		return dlm.ErrClosed
	}
	return ctx.Err()
}

// Update runs fn on the file with handle fh, once, under its shard lock.
func (b *Backend) Update(ctx context.Context, fh []byte, fn func(f *dlm.File) error) error {
	if err := b.check(ctx); err != nil {
		return err
	}
	s := b.shard(fh)
	s.mu.Lock()
	defer s.mu.Unlock()
	f, stored := s.files[string(fh)]
	if !stored {
		f = dlm.NewFile(string(fh))
	}
	return s.run(f, stored, fn)
}

// run applies fn to f and keeps the shard's map and the counters in step.
// The shard lock is held.
func (s *shard) run(f *dlm.File, stored bool, fn func(f *dlm.File) error) error {
	s.edit.Reset()
	f.SetEdit(&s.edit)
	err := fn(f)
	f.SetEdit(nil)
	// fn must not edit before failing; if it did anyway, the edit stands
	// (it was made in place) and the counters must follow it.
	if s.edit.Changed {
		s.edit.Apply()
	}
	switch {
	case !stored && !f.Empty():
		s.files[f.FH()] = f
	case stored && f.Empty():
		delete(s.files, f.FH())
	}
	return err
}

// UpdateAll runs fn on every file where a matching host has state.
func (b *Backend) UpdateAll(ctx context.Context, match func(*dlm.Host) bool, fn func(f *dlm.File) error) error {
	for i := range b.shards {
		if err := b.check(ctx); err != nil {
			return err
		}
		s := &b.shards[i]
		s.mu.Lock()
		var err error
		for _, f := range s.files {
			if !involves(f, match) {
				continue
			}
			if err = s.run(f, true, fn); err != nil {
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

// involves reports whether a matching host holds, waits for or shares f.
func involves(f *dlm.File, match func(*dlm.Host) bool) bool {
	found := false
	f.All(func(h *dlm.Held) bool {
		found = match(h.Owner().Host)
		return !found
	})
	if found {
		return true
	}
	for _, w := range f.Waiters() {
		if match(w.Owner.Host) {
			return true
		}
	}
	for _, sh := range f.Shares() {
		if match(sh.Host) {
			return true
		}
	}
	return false
}

// Read runs fn on the file's state without changing it.
func (b *Backend) Read(ctx context.Context, fh []byte, fn func(f *dlm.File)) error {
	if err := b.check(ctx); err != nil {
		return err
	}
	s := b.shard(fh)
	s.mu.Lock()
	defer s.mu.Unlock()
	f := s.files[string(fh)]
	if f == nil {
		f = &b.empty
	}
	fn(f)
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
		for _, f := range s.files {
			if cont = fn(f); !cont {
				break
			}
		}
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
		n += len(s.files)
		s.mu.Unlock()
	}
	return n
}

// Close makes every later call fail with dlm.ErrClosed.
func (b *Backend) Close() error {
	b.closed.Store(true)
	return nil
}

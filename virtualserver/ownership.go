package virtualserver

import (
	"context"
	"errors"
	"fmt"
	"io/fs"
	"net/netip"
	"os"
	"path/filepath"
	"sync"
)

// Ownership is where nodes claim virtual servers: which node owns one, in
// which epoch, and what a planned release left for the next owner. The
// orchestrator (hacallout) claims through it on takeover and releases
// through it; the lock backend's claim (dlm.Claim) follows the epoch it
// gives. StateDir is the implementation for the in-memory backend; a
// shared backend's (etcd: an owner key bound to the node's lease, the
// epoch its revision) takes its place.
type Ownership interface {
	// Claim takes the virtual server at addr for this node, in a new
	// epoch above every earlier one. Prev is the epoch it follows (0: none
	// or unknown), Handoff what Prev's owner left at a planned release
	// (nil: nothing — that owner died, or released without one). A
	// handoff is handed out once.
	Claim(ctx context.Context, addr netip.Addr) (Claimed, error)
	// Release gives up the virtual server this node claimed in epoch,
	// leaving handoff (nil: nothing) for the next owner. It fails with
	// ErrLost, leaving nothing, if another node claimed it since.
	Release(ctx context.Context, addr netip.Addr, epoch uint64, handoff []byte) error
	// Lost delivers the virtual servers this node lost without releasing
	// them (its claim ended, as when a lease expires); nil if that cannot
	// happen.
	Lost() <-chan netip.Addr
}

// Claimed is what a claim got.
type Claimed struct {
	Epoch, Prev uint64
	Handoff     []byte
	// Damaged is why something stored could not be used (the claim
	// stands; the clients reclaim).
	Damaged error
}

// ErrLost: another node claimed the virtual server since this node did.
var ErrLost = errors.New("virtualserver: claimed by another node since")

// StateDir is Ownership by the virtual servers' state directories
// (<Root>/<address>/): the epoch file, written atomically, and the
// handoff file of a planned release. The directory is on storage the
// nodes share, or moves with the address; the cluster manager makes sure
// one node at a time holds the address. Claims on one node are serialised.
type StateDir struct {
	Root string
	mu   sync.Mutex
}

// handoffFile is what a planned release leaves in the directory.
const handoffFile = "snapshot.json"

var _ Ownership = (*StateDir)(nil)

// Claim implements Ownership.
func (s *StateDir) Claim(_ context.Context, addr netip.Addr) (Claimed, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	dir := Dir(s.Root, addr.Unmap().String())
	prev, next, err := ClaimEpoch(dir)
	if next == 0 {
		return Claimed{}, fmt.Errorf("virtualserver: claiming %v: %w", addr, err)
	}
	c := Claimed{Epoch: next, Prev: prev, Damaged: err}
	path := filepath.Join(dir, handoffFile)
	b, rerr := os.ReadFile(path)
	switch {
	case errors.Is(rerr, fs.ErrNotExist):
	case rerr != nil:
		c.Damaged = errors.Join(c.Damaged, rerr)
	case prev != 0:
		// Handed out once: a takeover that fails after this goes through
		// grace next time, as the epoch has moved on anyway.
		c.Handoff = b
	}
	if rerr == nil {
		os.Remove(path)
	}
	return c, nil
}

// Release implements Ownership.
func (s *StateDir) Release(_ context.Context, addr netip.Addr, epoch uint64, handoff []byte) error {
	s.mu.Lock()
	defer s.mu.Unlock()
	dir := Dir(s.Root, addr.Unmap().String())
	if cur, err := ReadEpoch(dir); err != nil || cur != epoch {
		return fmt.Errorf("%w: %v at epoch %d (stored: %d, %v)", ErrLost, addr, epoch, cur, err)
	}
	path := filepath.Join(dir, handoffFile)
	if handoff == nil {
		if err := os.Remove(path); err != nil && !errors.Is(err, fs.ErrNotExist) {
			return err
		}
		return nil
	}
	return WriteFileAtomic(path, handoff, 0o600)
}

// Lost implements Ownership: a state directory is never lost.
func (s *StateDir) Lost() <-chan netip.Addr { return nil }

package virtualserver

import (
	"context"
	"errors"
	"net/netip"
	"os"
	"path/filepath"
	"testing"
)

func TestStateDirOwnership(t *testing.T) {
	ctx := context.Background()
	root := t.TempDir()
	a := netip.MustParseAddr("10.0.0.1")
	o1, o2 := &StateDir{Root: root}, &StateDir{Root: root} // two nodes, one shared directory
	claim := func(o *StateDir, epoch, prev uint64, handoff string) {
		t.Helper()
		c, err := o.Claim(ctx, a)
		if err != nil || c.Epoch != epoch || c.Prev != prev || string(c.Handoff) != handoff || c.Damaged != nil {
			t.Fatalf("claim: %+v %v; want epoch %d after %d, handoff %q", c, err, epoch, prev, handoff)
		}
	}
	claim(o1, 1, 0, "")
	if err := o1.Release(ctx, a, 1, []byte("locks of 1")); err != nil {
		t.Fatal(err)
	}
	claim(o2, 2, 1, "locks of 1")
	// Handed out once: a takeover that failed leaves none for the next.
	claim(o1, 3, 2, "")
	// A node that lost the virtual server cannot release it: nothing of
	// its is left for the owner's successor.
	if err := o2.Release(ctx, a, 2, []byte("stale")); !errors.Is(err, ErrLost) {
		t.Fatalf("release of an epoch claimed over: %v, want ErrLost", err)
	}
	if _, err := os.Stat(filepath.Join(root, a.String(), handoffFile)); !errors.Is(err, os.ErrNotExist) {
		t.Fatal("a stale release left a handoff")
	}
	// A release without a handoff removes what an earlier one left.
	if err := o1.Release(ctx, a, 3, []byte("x")); err != nil {
		t.Fatal(err)
	}
	claim(o2, 4, 3, "x")
	o2.Release(ctx, a, 4, []byte("y"))
	if err := os.WriteFile(filepath.Join(root, a.String(), epochFile), []byte("garbage"), 0o600); err != nil {
		t.Fatal(err)
	}
	// A damaged epoch file: the claim goes on above every earlier epoch,
	// the handoff it cannot match is dropped.
	c, err := o1.Claim(ctx, a)
	if err != nil || c.Epoch <= 4 || c.Prev != 0 || c.Handoff != nil || !errors.Is(c.Damaged, ErrBadEpoch) {
		t.Fatalf("claim over a damaged epoch: %+v %v", c, err)
	}
	if o1.Lost() != nil {
		t.Fatal("a state directory is never lost")
	}
}

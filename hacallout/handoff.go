package hacallout

import (
	"encoding/json"
	"errors"
	"fmt"

	"github.com/nlmha/nlmha/dlm"
	"github.com/nlmha/nlmha/virtualserver"
)

// handoff is what a planned release leaves in the virtual server's state
// directory for its next owner (snapshot.json): its locks, blocked
// requests and shares, and — if it was released during its grace period —
// the rest of that period. One file, written atomically, so the next owner
// gets both or neither: a grace period is part of what a virtual server
// is, and locks handed over without it would let others take what its
// clients have not reclaimed yet.
//
// With a shared backend the records stay where they are and the snapshot
// has no files: Shared says that the next owner adopts them.
type handoff struct {
	Locks  *dlm.Snapshot
	Grace  *virtualserver.GraceHandover
	Shared bool
	// Floor is the reclaim floor of the grace period handed over (see
	// virtualserver.SetReclaimFloor), with a shared backend.
	Floor uint64
}

// ErrBadHandoff reports a snapshot file that cannot be used.
var ErrBadHandoff = errors.New("hacallout: damaged snapshot")

// The file is the lock snapshot's JSON with one more key, "grace", so that
// a file written before grace was handed over still reads (as no grace).
func marshalHandoff(h handoff) ([]byte, error) {
	return json.Marshal(struct {
		*dlm.Snapshot
		Grace  *virtualserver.GraceHandover `json:"grace,omitempty"`
		Shared bool                         `json:"shared,omitempty"`
		Floor  uint64                       `json:"floor,omitempty"`
	}{h.Locks, h.Grace, h.Shared, h.Floor})
}

func unmarshalHandoff(b []byte) (handoff, error) {
	snap, err := dlm.UnmarshalSnapshot(b)
	if err != nil {
		return handoff{}, fmt.Errorf("%w: %w", ErrBadHandoff, err)
	}
	var g struct {
		Grace  *virtualserver.GraceHandover `json:"grace"`
		Shared bool                         `json:"shared"`
		Floor  uint64                       `json:"floor"`
	}
	if err := json.Unmarshal(b, &g); err != nil {
		return handoff{}, fmt.Errorf("%w: %w", ErrBadHandoff, err)
	}
	if g.Grace != nil {
		if err := g.Grace.Check(); err != nil {
			return handoff{}, fmt.Errorf("%w: %w", ErrBadHandoff, err)
		}
	}
	if g.Shared && len(snap.Files) > 0 {
		return handoff{}, fmt.Errorf("%w: records both left in place and in the snapshot", ErrBadHandoff)
	}
	return handoff{Locks: snap, Grace: g.Grace, Shared: g.Shared, Floor: g.Floor}, nil
}

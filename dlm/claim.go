package dlm

import (
	"context"
	"fmt"
	"net/netip"
)

// Claim is who an edit acts for: a virtual server at the epoch this node
// holds it in. A backend fences every write on the acting claim, not on
// the stamps of the records written: a node that lost the virtual server
// (its epoch moved on, or it is being released) can change nothing of it,
// and an unlock of a record stamped in an earlier epoch is never refused
// for that stamp.
//
// The zero Claim acts for nobody: an unfenced edit, for what is right
// whoever serves the records (dropping the state of a client that
// rebooted, which may span virtual servers on several nodes).
type Claim struct {
	VIP   netip.Addr
	Epoch uint64
}

// Unfenced reports whether c is the zero Claim.
func (c Claim) Unfenced() bool { return !c.VIP.IsValid() }

func (c Claim) String() string {
	if c.Unfenced() {
		return "unfenced"
	}
	return fmt.Sprintf("%s@%d", c.VIP, c.Epoch)
}

// ClaimState is where a claim is in a virtual server's lifecycle on this
// node. A claim only moves forward: Active, Releasing, Released; a claim
// of a later epoch of the same virtual server supersedes it.
type ClaimState uint8

// Claim states.
const (
	// ClaimActive: this node serves the virtual server at the claim's
	// epoch; Update and UpdateAll under the claim are allowed.
	ClaimActive ClaimState = iota + 1
	// ClaimReleasing: a release is in progress. Update under the claim
	// fails with ErrFenced (a request in flight must not add state behind
	// the release's capture), UpdateAll still runs (the capture and drop
	// of the virtual server's records).
	ClaimReleasing
	// ClaimReleased: nothing runs under the claim any more.
	ClaimReleased
)

var claimStateNames = [...]string{"none", "active", "releasing", "released"}

func (s ClaimState) String() string {
	if int(s) < len(claimStateNames) {
		return claimStateNames[s]
	}
	return fmt.Sprintf("ClaimState(%d)", uint8(s))
}

// Claims is the part of a backend that records which virtual servers
// this node acts for (see Backend.SetClaim).
type Claims interface {
	SetClaim(ctx context.Context, c Claim, st ClaimState) error
}

// ClaimTable is the claim bookkeeping of a backend that keeps its state
// in one process: the latest claim of each virtual server and its state.
// It is pure (a value, no locking): the backend serialises changes and
// publishes copies.
type ClaimTable map[netip.Addr]ClaimRecord

// ClaimRecord is a virtual server's latest claim.
type ClaimRecord struct {
	Epoch uint64
	State ClaimState
}

// Set applies SetClaim's rules to t, returning the table to publish (a
// copy; t is not changed) or ErrFenced: a claim of an epoch below the
// latest fails, as does moving a claim backwards; a later epoch
// supersedes whatever state the earlier one was in.
func (t ClaimTable) Set(c Claim, st ClaimState) (ClaimTable, error) {
	if c.Unfenced() || st < ClaimActive || st > ClaimReleased {
		return nil, fmt.Errorf("dlm: invalid claim %v %v", c, st)
	}
	cur, ok := t[c.VIP]
	switch {
	case ok && c.Epoch < cur.Epoch:
		return nil, fmt.Errorf("%w: claim %v, latest epoch %d", ErrFenced, c, cur.Epoch)
	case ok && c.Epoch == cur.Epoch && st < cur.State:
		return nil, fmt.Errorf("%w: claim %v is %v, cannot become %v", ErrFenced, c, cur.State, st)
	case ok && c.Epoch == cur.Epoch && st == cur.State:
		return t, nil
	case (!ok || c.Epoch > cur.Epoch) && st != ClaimActive:
		return nil, fmt.Errorf("%w: claim %v was never active", ErrFenced, c)
	}
	out := make(ClaimTable, len(t)+1)
	for k, v := range t {
		out[k] = v
	}
	out[c.VIP] = ClaimRecord{Epoch: c.Epoch, State: st}
	return out, nil
}

// Allows reports whether an edit under c may run: a single-file Update
// (bulk false) needs c active, a bulk one (UpdateAll) active or
// releasing. The zero Claim is always allowed.
func (t ClaimTable) Allows(c Claim, bulk bool) bool {
	if c.Unfenced() {
		return true
	}
	cur, ok := t[c.VIP]
	return ok && cur.Allows(c.Epoch, bulk)
}

// Allows reports whether an edit under the record's virtual server at
// epoch may run (see ClaimTable.Allows).
func (r ClaimRecord) Allows(epoch uint64, bulk bool) bool {
	return r.Epoch == epoch && (r.State == ClaimActive || bulk && r.State == ClaimReleasing)
}

package memdlm

import (
	"context"
	"os"
	"os/exec"
	"slices"
	"strings"
	"testing"

	"github.com/nlmha/nlmha/dlm"
	"github.com/nlmha/nlmha/dlm/dlmtest"
)

// Deliberately broken backends, each wrong in one way a shared backend
// could be, and the contract case that must catch it: the suite can fail.
var brokenBackends = map[string]struct {
	catches string // the contract case that fails
	wrap    func(*Backend) dlm.Backend
}{
	// Re-stamps are not stored: a reclaim in a new epoch leaves the record
	// looking unreclaimed, and the purge at the end of grace drops it.
	"forgets-restamps": {"ReclaimRestamps", func(b *Backend) dlm.Backend { return forgetsRestamps{b} }},
	// Only the first record an Update inserts is stored.
	"keeps-first-insert-only": {"GraceFloor", func(b *Backend) dlm.Backend { return firstInsertOnly{b} }},
	// Claims are recorded but never checked: a node that lost a virtual
	// server goes on changing its state.
	"ignores-claims": {"Fencing", func(b *Backend) dlm.Backend { return ignoresClaims{b} }},
	// Fences on the records' stamps as well (the rule before claims): an
	// unlock that leaves a piece of a lock of an earlier epoch is refused.
	"fences-record-stamps": {"Fencing", func(b *Backend) dlm.Backend { return fencesStamps{b} }},
	// The release's bulk edit is fenced like a single-file one.
	"fences-releases": {"ReleaseFences", func(b *Backend) dlm.Backend { return fencesReleases{b} }},
	// Grants are return values only: the pending grant is not stored, so
	// no other node could send its callback, nor undo it.
	"forgets-pending": {"PendingGrants", func(b *Backend) dlm.Backend { return forgetsPending{b} }},
	// The queue is stored newest first.
	"lifo-queue": {"WaiterOrder", func(b *Backend) dlm.Backend { return lifoQueue{b} }},
	// Bulk edits change records but not the counters (a node that applies
	// only the deltas of its own single-file edits).
	"bulk-edits-uncounted": {"Counters", func(b *Backend) dlm.Backend { return bulkUncounted{b} }},
	// A bulk edit that does one batch and forgets to page on.
	"one-batch-only": {"BulkManyFiles", func(b *Backend) dlm.Backend { return oneBatch{b} }},
	// A retrying backend that commits the run it should have thrown away.
	"commits-every-run": {"UpdatePersists", func(b *Backend) dlm.Backend { return commitsEveryRun{b} }},
}

type commitsEveryRun struct{ *Backend }

func (b commitsEveryRun) Update(ctx context.Context, fh []byte, c dlm.Claim, fn func(f *dlm.File) error) error {
	if err := b.Backend.Update(ctx, fh, c, fn); err != nil {
		return err
	}
	return b.Backend.Update(ctx, fh, c, fn)
}

type oneBatch struct{ *Backend }

func (b oneBatch) UpdateAll(ctx context.Context, sel dlm.Selector, c dlm.Claim, fn func(f *dlm.File) error) error {
	seen := map[string]bool{}
	return b.Backend.UpdateAll(ctx, sel, c, func(f *dlm.File) error {
		if !seen[f.FH()] && len(seen) >= 1000 {
			return nil
		}
		seen[f.FH()] = true
		return fn(f)
	})
}

type forgetsPending struct{ *Backend }

func (b forgetsPending) Update(ctx context.Context, fh []byte, c dlm.Claim, fn func(f *dlm.File) error) error {
	return b.Backend.Update(ctx, fh, c, func(f *dlm.File) error {
		err := fn(f)
		for _, p := range slices.Clone(f.Pending()) {
			f.RemovePending(p)
		}
		return err
	})
}

type lifoQueue struct{ *Backend }

func (b lifoQueue) Update(ctx context.Context, fh []byte, c dlm.Claim, fn func(f *dlm.File) error) error {
	return b.Backend.Update(ctx, fh, c, func(f *dlm.File) error {
		err := fn(f)
		ws := slices.Clone(f.Waiters())
		f.RemoveWaiters(ws)
		for _, w := range slices.Backward(ws) {
			f.AddWaiter(w)
		}
		return err
	})
}

type bulkUncounted struct{ *Backend }

func (b bulkUncounted) UpdateAll(ctx context.Context, sel dlm.Selector, c dlm.Claim, fn func(f *dlm.File) error) error {
	var fhs [][]byte
	b.Backend.View(ctx, func(f *dlm.File) bool { fhs = append(fhs, []byte(f.FH())); return true })
	for _, fh := range fhs {
		// Read hands fn the stored state with no edit attached: changes
		// are made, deltas are not counted.
		var err error
		b.Backend.Read(ctx, fh, func(f *dlm.File) { err = fn(f) })
		if err != nil {
			return err
		}
	}
	return nil
}

type ignoresClaims struct{ *Backend }

func (b ignoresClaims) Update(ctx context.Context, fh []byte, _ dlm.Claim, fn func(f *dlm.File) error) error {
	return b.Backend.Update(ctx, fh, dlm.Claim{}, fn)
}

type fencesStamps struct{ *Backend }

func (b fencesStamps) Update(ctx context.Context, fh []byte, c dlm.Claim, fn func(f *dlm.File) error) error {
	var stale bool
	err := b.Backend.Update(ctx, fh, c, func(f *dlm.File) error {
		// What the edit wrote: records not there before (tree nodes are
		// recycled, so compare by value).
		before := map[dlm.Lock]bool{}
		f.All(func(h *dlm.Held) bool { before[h.Lock()] = true; return true })
		err := fn(f)
		f.All(func(h *dlm.Held) bool {
			stale = stale || !before[h.Lock()] && h.Owner().Host.VIP == c.VIP && h.Epoch() < c.Epoch
			return true
		})
		return err
	})
	if err == nil && stale {
		err = dlm.ErrFenced
	}
	return err
}

type fencesReleases struct{ *Backend }

func (b fencesReleases) UpdateAll(ctx context.Context, sel dlm.Selector, c dlm.Claim, fn func(f *dlm.File) error) error {
	if err := b.Backend.Update(ctx, []byte("\x00probe"), c, func(*dlm.File) error { return nil }); err != nil {
		return err
	}
	return b.Backend.UpdateAll(ctx, sel, c, fn)
}

type forgetsRestamps struct{ *Backend }

func (b forgetsRestamps) Update(ctx context.Context, fh []byte, c dlm.Claim, fn func(f *dlm.File) error) error {
	return b.Backend.Update(ctx, fh, c, func(f *dlm.File) error {
		before := map[*dlm.Held]uint64{}
		f.All(func(h *dlm.Held) bool { before[h] = h.Epoch(); return true })
		shares := map[*dlm.Share]uint64{}
		for _, s := range f.Shares() {
			shares[s] = s.Epoch
		}
		err := fn(f)
		f.All(func(h *dlm.Held) bool {
			if e, ok := before[h]; ok {
				f.Restamp(h, e)
			}
			return true
		})
		for _, s := range f.Shares() {
			if e, ok := shares[s]; ok {
				f.RestampShare(s, e)
			}
		}
		return err
	})
}

type firstInsertOnly struct{ *Backend }

func (b firstInsertOnly) Update(ctx context.Context, fh []byte, c dlm.Claim, fn func(f *dlm.File) error) error {
	return b.Backend.Update(ctx, fh, c, func(f *dlm.File) error {
		had := f.Len()
		err := fn(f)
		if had > 0 {
			// Undo what this update added to a file that had state.
			var added []*dlm.Held
			f.All(func(h *dlm.Held) bool {
				if h.Epoch() > 1 {
					added = append(added, h)
				}
				return true
			})
			for _, h := range added {
				f.Remove(h)
			}
		}
		return err
	})
}

// TestContractCatchesBrokenBackends runs the contract against each broken
// backend in a child process and expects its case to fail there.
func TestContractCatchesBrokenBackends(t *testing.T) {
	if name := os.Getenv("NLMHA_BROKEN_BACKEND"); name != "" {
		dlmtest.Run(t, func(*testing.T) dlm.Backend { return brokenBackends[name].wrap(New()) })
		return
	}
	for name, bb := range brokenBackends {
		cmd := exec.Command(os.Args[0], "-test.run=^TestContractCatchesBrokenBackends$", "-test.v")
		cmd.Env = append(os.Environ(), "NLMHA_BROKEN_BACKEND="+name)
		out, err := cmd.CombinedOutput()
		if err == nil {
			t.Errorf("the contract passes backend %q, which is broken", name)
			continue
		}
		if !strings.Contains(string(out), "--- FAIL: TestContractCatchesBrokenBackends/"+bb.catches) {
			t.Errorf("backend %q: case %s did not fail:\n%s", name, bb.catches, out)
		}
	}
}

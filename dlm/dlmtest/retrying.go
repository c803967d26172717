package dlmtest

import (
	"context"

	"github.com/nlmha/nlmha/dlm"
)

// Retrying wraps a backend so that every Update and UpdateAll runs its
// function twice: first on a copy of each file, thrown away (as an
// optimistic backend does when its commit loses a race), then for real.
// A caller whose functions are safe to run more than once — they only
// read and edit the file and assign their results — sees no difference;
// one that appends to its results, or acts from inside the function,
// doubles. The contract holds for it as for the backend it wraps.
func Retrying(b dlm.Backend) dlm.Backend { return retrying{b} }

type retrying struct{ dlm.Backend }

// dryRun runs fn on a copy of st with an edit nobody applies.
func dryRun(st *dlm.State, fn func(*dlm.File) error) {
	var f dlm.File
	f.Bind(st.Clone(), &dlm.Edit{})
	_ = fn(&f) // thrown away, like a run whose commit failed
}

func (r retrying) Update(ctx context.Context, fh []byte, c dlm.Claim, fn func(f *dlm.File) error) error {
	if err := r.Backend.Read(ctx, fh, func(f *dlm.File) { dryRun(f.State, fn) }); err != nil {
		return err
	}
	return r.Backend.Update(ctx, fh, c, fn)
}

func (r retrying) UpdateAll(ctx context.Context, sel dlm.Selector, c dlm.Claim, fn func(f *dlm.File) error) error {
	var copies []*dlm.State
	err := r.Backend.View(ctx, func(f *dlm.File) bool {
		if f.Involves(&sel) {
			copies = append(copies, f.State.Clone())
		}
		return true
	})
	if err != nil {
		return err
	}
	for _, st := range copies {
		dryRun(st, fn)
	}
	return r.Backend.UpdateAll(ctx, sel, c, fn)
}

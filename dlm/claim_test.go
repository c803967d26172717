package dlm

import (
	"errors"
	"net/netip"
	"testing"
)

func TestClaimTable(t *testing.T) {
	a := netip.MustParseAddr("10.0.0.1")
	c1, c2 := Claim{VIP: a, Epoch: 1}, Claim{VIP: a, Epoch: 2}
	var tab ClaimTable
	step := func(c Claim, st ClaimState, fenced bool) {
		t.Helper()
		next, err := tab.Set(c, st)
		if fenced != errors.Is(err, ErrFenced) || !fenced && err != nil {
			t.Fatalf("Set(%v, %v): %v, want fenced=%v", c, st, err, fenced)
		}
		if err == nil {
			tab = next
		}
	}
	allows := func(c Claim, bulk, want bool) {
		t.Helper()
		if got := tab.Allows(c, bulk); got != want {
			t.Fatalf("Allows(%v, bulk=%v) = %v in %v", c, bulk, got, tab)
		}
	}
	allows(c1, false, false) // never claimed
	allows(Claim{}, false, true)
	step(c1, ClaimReleasing, true) // never active
	step(c1, ClaimActive, false)
	step(c1, ClaimActive, false) // idempotent
	allows(c1, false, true)
	allows(c2, false, false)
	step(c1, ClaimReleasing, false)
	allows(c1, false, false)
	allows(c1, true, true)
	step(c1, ClaimActive, true) // no way back
	step(c2, ClaimActive, false)
	allows(c1, true, false)
	allows(c2, false, true)
	step(c1, ClaimReleased, true) // superseded
	step(c1, ClaimActive, true)
	step(c2, ClaimReleased, false)
	allows(c2, true, false)
	if _, err := tab.Set(Claim{}, ClaimActive); err == nil || errors.Is(err, ErrFenced) {
		t.Fatalf("zero claim: %v", err)
	}
}

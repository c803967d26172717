package nsm

import (
	"fmt"
	"maps"
	"math/rand/v2"
	"net/netip"
	"os"
	"path/filepath"
	"slices"
	"testing"
)

// FuzzJournal: any journal reads without failing (lines that do not parse
// are skipped), and what it says survives a fold unchanged.
func FuzzJournal(f *testing.F) {
	for _, s := range []string{
		"client-127.0.0.1-0011223344556677.json 5\nclient-127.0.0.1-0011223344556677.json 7\n",
		"sm_mon-aabbccddeeff0011.json -3\n",
		"half-written-line", "a b c\n", "x 99999999999\n", "/etc/passwd 1\n", "", "\n\n",
	} {
		f.Add([]byte(s))
	}
	f.Fuzz(func(t *testing.T, b []byte) {
		dir := t.TempDir()
		st := &store{dir: dir}
		if err := os.WriteFile(filepath.Join(dir, journalFile), b, 0o600); err != nil {
			t.Fatal(err)
		}
		states, _, err := st.readStates()
		if err != nil {
			t.Fatal(err)
		}
		if err := st.writeStates(states); err != nil {
			t.Fatal(err)
		}
		again, lines, err := st.readStates()
		if err != nil || !maps.Equal(states, again) || lines != len(again) {
			t.Fatalf("folded journal reads %v (%d lines, %v), want %v", again, lines, err, states)
		}
	})
}

// Appends accumulate; the last state of a record wins.
func TestJournalAppend(t *testing.T) {
	st := &store{dir: t.TempDir()}
	if err := st.appendStates(map[string]int32{"a.json": 3, "b.json": 5}); err != nil {
		t.Fatal(err)
	}
	if err := st.appendStates(map[string]int32{"a.json": 9}); err != nil {
		t.Fatal(err)
	}
	got, lines, err := st.readStates()
	if err != nil || lines != 3 || !maps.Equal(got, map[string]int32{"a.json": 9, "b.json": 5}) {
		t.Fatalf("journal: %v, %d lines, %v", got, lines, err)
	}
}

// The index answers what Record.matches would, on random records and
// notifications.
func TestMatchingIndex(t *testing.T) {
	rng := rand.New(rand.NewPCG(1, 2))
	names := []string{"a", "b", "c", "127.0.9.1", "127.0.9.2", ""}
	addrs := []netip.Addr{netip.MustParseAddr("127.0.9.1"), netip.MustParseAddr("127.0.9.2"), netip.MustParseAddr("::ffff:127.0.9.3")}
	for range 200 {
		v := &vip{}
		v.setRecs(map[string]*entry{})
		for i := range rng.IntN(12) {
			r := &Record{Kind: KindClient, MonName: names[rng.IntN(len(names)-1)], Caller: names[rng.IntN(len(names))], Addrs: []netip.Addr{addrs[rng.IntN(len(addrs))].Unmap()}} // records keep addresses unmapped
			if rng.IntN(3) == 0 {
				r.Kind, r.Caller = KindSMMon, ""
			}
			v.putRec(fmt.Sprint(i), &entry{rec: r})
		}
		if rng.IntN(2) == 0 && len(v.recs) > 0 {
			v.delRec(fmt.Sprint(rng.IntN(len(v.recs))))
		}
		mon, sender := names[rng.IntN(len(names))], addrs[rng.IntN(len(addrs))]
		var want []*entry
		for _, e := range v.recs {
			if e.rec.matches(mon, sender) {
				want = append(want, e)
			}
		}
		got := v.matching(mon, sender)
		if len(got) != len(want) {
			t.Fatalf("notification %q from %v: index found %d records, matches %d", mon, sender, len(got), len(want))
		}
		for _, e := range want {
			if !slices.Contains(got, e) {
				t.Fatalf("notification %q from %v: the index misses %+v", mon, sender, *e.rec)
			}
		}
	}
}

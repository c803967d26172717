package nsm

import (
	"maps"
	"os"
	"path/filepath"
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

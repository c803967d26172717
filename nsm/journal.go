package nsm

import (
	"bufio"
	"bytes"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"

	"github.com/nlmha/nlmha/virtualserver"
)

// The reboot journal of a virtual server ("reboots" in its directory)
// keeps the state each monitored peer said it rebooted with, so that a
// repeated notification is known for one after a restart too: a line
// "<record file> <state>" per record, the last line of a record winning
// over the state in its file. A batch of reboot notifications appends its
// lines with one write and one fsync, however many records it matched —
// rewriting each record would cost a durable write per record (20 000
// caller_names of one address: 25 s). Starts fold it (one atomic
// rewrite), and so does the service once it outgrows the records.
const journalFile = "reboots"

func (s *store) journal() string { return filepath.Join(s.dir, journalFile) }

// appendStates appends one line per record file and syncs.
func (s *store) appendStates(states map[string]int32) error {
	var b bytes.Buffer
	for _, name := range slices.Sorted(mapKeys(states)) {
		fmt.Fprintf(&b, "%s %d\n", name, states[name])
	}
	f, err := os.OpenFile(s.journal(), os.O_WRONLY|os.O_APPEND|os.O_CREATE, filePerm)
	if err != nil {
		return fmt.Errorf("nsm: reboot journal: %w", err)
	}
	st, _ := f.Stat()
	created := st != nil && st.Size() == 0
	_, err = f.Write(b.Bytes())
	if err == nil {
		err = f.Sync()
	}
	if cerr := f.Close(); err == nil {
		err = cerr
	}
	if err == nil && created {
		err = virtualserver.SyncDir(s.dir)
	}
	if err != nil {
		return fmt.Errorf("nsm: reboot journal: %w", err)
	}
	return nil
}

// readStates returns the journal's states by record file, and how many
// lines it has. Lines that do not read (a write cut short by a crash) are
// skipped.
func (s *store) readStates() (map[string]int32, int, error) {
	b, err := os.ReadFile(s.journal())
	if errors.Is(err, fs.ErrNotExist) {
		return map[string]int32{}, 0, nil
	}
	if err != nil {
		return nil, 0, fmt.Errorf("nsm: reboot journal: %w", err)
	}
	out := map[string]int32{}
	lines := 0
	sc := bufio.NewScanner(bytes.NewReader(b))
	for sc.Scan() {
		lines++
		name, state, ok := strings.Cut(sc.Text(), " ")
		n, err := strconv.ParseInt(state, 10, 32)
		if !ok || err != nil || name == "" || strings.ContainsAny(name, "/ ") {
			continue
		}
		out[name] = int32(n)
	}
	return out, lines, nil
}

// writeStates replaces the journal with these states, atomically.
func (s *store) writeStates(states map[string]int32) error {
	if len(states) == 0 {
		return virtualserver.RemoveFileSync(s.journal())
	}
	var b bytes.Buffer
	for _, name := range slices.Sorted(mapKeys(states)) {
		fmt.Fprintf(&b, "%s %d\n", name, states[name])
	}
	return virtualserver.WriteFileAtomic(s.journal(), b.Bytes(), filePerm)
}

// applyStates gives the loaded records the journal's states.
func applyStates(list []loaded, states map[string]int32) {
	for _, l := range list {
		if st, ok := states[l.file]; ok {
			l.rec.LastState = st
		}
	}
}

func mapKeys[K comparable, V any](m map[K]V) func(func(K) bool) {
	return func(yield func(K) bool) {
		for k := range m {
			if !yield(k) {
				return
			}
		}
	}
}

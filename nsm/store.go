package nsm

import (
	"errors"
	"fmt"
	"io/fs"
	"math"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"time"

	"github.com/nlmha/nlmha/virtualserver"
)

// A virtual server's NSM state lives in its own directory under the state
// directory, named after its address:
//
//	state      its NSM state number, decimal text
//	sm/        monitor records, one JSON file each
//	notify/    records retired at the last start, to be notified; a
//	           client's goes back to sm/ once it answered (it stays
//	           monitored), any other is removed
//
// Every write is atomic (write, fsync, rename, fsync the directory), so a
// crash leaves each file whole, old or new.
const (
	stateFile = "state"
	smDir     = "sm"
	notifyDir = "notify"
	dirPerm   = 0o700
	filePerm  = 0o600
)

// store is one virtual server's directory.
type store struct{ dir string }

// VIPDir is the directory of a virtual server's state under stateDir.
func VIPDir(stateDir string, vip string) string { return filepath.Join(stateDir, vip) }

func openStore(dir string) (*store, error) {
	for _, d := range []string{dir, filepath.Join(dir, smDir), filepath.Join(dir, notifyDir)} {
		if err := os.MkdirAll(d, dirPerm); err != nil {
			return nil, fmt.Errorf("nsm: state directory: %w", err)
		}
		if err := virtualserver.CleanTemp(d); err != nil {
			return nil, fmt.Errorf("nsm: state directory: %w", err)
		}
	}
	return &store{dir: dir}, nil
}

// ErrBadState reports a state file that cannot be read as a number.
var ErrBadState = errors.New("nsm: damaged state file")

// readState returns the stored state number; 0 when there is none yet.
func (s *store) readState() (int32, error) {
	b, err := os.ReadFile(filepath.Join(s.dir, stateFile))
	if errors.Is(err, fs.ErrNotExist) {
		return 0, nil
	}
	if err != nil {
		return 0, fmt.Errorf("nsm: reading the state number: %w", err)
	}
	n, err := strconv.ParseInt(strings.TrimSpace(string(b)), 10, 32)
	if err != nil || n < 0 {
		return 0, fmt.Errorf("%w: %q", ErrBadState, b)
	}
	return int32(n), nil
}

func (s *store) writeState(n int32) error {
	return virtualserver.WriteFileAtomic(filepath.Join(s.dir, stateFile), []byte(strconv.FormatInt(int64(n), 10)+"\n"), filePerm)
}

// nextState is the state number after a (re)start: odd, and above the
// previous one. A state that cannot be read restarts from the clock, so it
// still lands above any number a counter reached.
func nextState(prev int32, readErr error, now time.Time) int32 {
	if readErr != nil {
		const epoch = 946684800 // 2000-01-01: keeps the number in int32 for decades
		return int32(now.Unix()-epoch) | 1
	}
	if prev <= 0 {
		return 1
	}
	next := int64(prev) + 2
	if prev%2 == 0 {
		next = int64(prev) + 1
	}
	if next > math.MaxInt32 {
		return 1
	}
	return int32(next)
}

func (s *store) path(sub, name string) string { return filepath.Join(s.dir, sub, name) }

func (s *store) put(sub string, r *Record) error {
	b, err := marshalRecord(r)
	if err != nil {
		return err
	}
	return virtualserver.WriteFileAtomic(s.path(sub, r.fileName()), b, filePerm)
}

func (s *store) remove(sub, name string) error {
	return virtualserver.RemoveFileSync(s.path(sub, name))
}

// loaded is one record file read back.
type loaded struct {
	file string
	rec  *Record
}

// damaged is a record file that cannot be used.
type damaged struct {
	path string // empty when the directory itself could not be read
	err  error
}

// load reads the records of sub. Damaged files are reported, not fatal:
// they are returned apart and otherwise skipped.
func (s *store) load(sub string) ([]loaded, []damaged) {
	dir := filepath.Join(s.dir, sub)
	ents, err := os.ReadDir(dir)
	if err != nil {
		return nil, []damaged{{err: fmt.Errorf("nsm: reading %s: %w", dir, err)}}
	}
	var out []loaded
	var bad []damaged
	for _, e := range ents {
		name := e.Name()
		if !e.Type().IsRegular() || strings.HasPrefix(name, virtualserver.TempPrefix) || !strings.HasSuffix(name, ".json") {
			continue
		}
		path := filepath.Join(dir, name)
		b, err := os.ReadFile(path)
		if err != nil {
			bad = append(bad, damaged{path, fmt.Errorf("nsm: %s: %w", path, err)})
			continue
		}
		r, err := unmarshalRecord(b)
		if err != nil {
			bad = append(bad, damaged{path, fmt.Errorf("%s: %w", path, err)})
			continue
		}
		out = append(out, loaded{file: name, rec: r})
	}
	slices.SortFunc(out, func(a, b loaded) int { return strings.Compare(a.file, b.file) })
	return out, bad
}

// retire moves every monitor record to the notify list: the peers are told
// of the restart (clients stay monitored meanwhile, see keepPending).
// A record already waiting there (an earlier notification that never got
// through) is replaced by the same peer's newer record.
func (s *store) retire() error {
	dir := filepath.Join(s.dir, smDir)
	nd := filepath.Join(s.dir, notifyDir)
	if left, err := os.ReadDir(nd); err == nil && len(left) == 0 {
		// The common case, nothing left to notify: one rename moves the
		// whole list. A crash in between leaves sm/ or notify/ missing,
		// which the next openStore creates again; no record is lost.
		if err := os.Remove(nd); err != nil {
			return fmt.Errorf("nsm: retiring monitor records: %w", err)
		}
		if err := os.Rename(dir, nd); err != nil {
			return fmt.Errorf("nsm: retiring monitor records: %w", err)
		}
		if err := os.Mkdir(dir, dirPerm); err != nil {
			return fmt.Errorf("nsm: retiring monitor records: %w", err)
		}
		return virtualserver.SyncDir(s.dir)
	}
	ents, err := os.ReadDir(dir)
	if err != nil {
		return fmt.Errorf("nsm: retiring monitor records: %w", err)
	}
	moved := 0
	for _, e := range ents {
		if !e.Type().IsRegular() || strings.HasPrefix(e.Name(), virtualserver.TempPrefix) {
			continue
		}
		if err := os.Rename(filepath.Join(dir, e.Name()), s.path(notifyDir, e.Name())); err != nil {
			return fmt.Errorf("nsm: retiring monitor records: %w", err)
		}
		moved++
	}
	if moved == 0 {
		return nil
	}
	if err := virtualserver.SyncDir(filepath.Join(s.dir, notifyDir)); err != nil {
		return err
	}
	return virtualserver.SyncDir(dir)
}

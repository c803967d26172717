package nsm

import (
	"errors"
	"fmt"
	"io"
	"io/fs"
	"math"
	"net/netip"
	"os"
	"path/filepath"
	"runtime"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"golang.org/x/sys/unix"

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

// store is one virtual server's directory, and its mirror in a shared
// store if there is one (see Mirror).
type store struct {
	dir    string
	mirror *mirrored
}

// mirrorTimeout bounds a write to the mirror.
const mirrorTimeout = 10 * time.Second

// VIPDir is the directory of a virtual server's state under stateDir.
func VIPDir(stateDir string, vip string) string { return filepath.Join(stateDir, vip) }

// openStore opens a virtual server's directory, creating what is missing,
// and removes the temporary files that writes interrupted by a crash left
// at its top. Those of sm/ and notify/ go as the lists are read (see list):
// with 100 000 records, a pass over a list is a tenth of a second before
// the first notification.
func openStore(dir string) (*store, error) {
	for _, d := range []string{dir, filepath.Join(dir, smDir), filepath.Join(dir, notifyDir)} {
		if err := os.MkdirAll(d, dirPerm); err != nil {
			return nil, fmt.Errorf("nsm: state directory: %w", err)
		}
	}
	if err := virtualserver.CleanTemp(dir); err != nil {
		return nil, fmt.Errorf("nsm: state directory: %w", err)
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
	if m := s.mirror; m != nil {
		ctx, cancel := m.ctx()
		err := m.m.SetState(ctx, m.vs.Claim(), n)
		cancel()
		if err != nil {
			return fmt.Errorf("nsm: state number: %w", err)
		}
	}
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
	if m := s.mirror; m != nil {
		ctx, cancel := m.ctx()
		err := m.m.PutRecord(ctx, m.vs.Claim(), r.fileName(), b)
		cancel()
		if err != nil {
			return fmt.Errorf("nsm: monitor record: %w", err)
		}
	}
	return virtualserver.WriteFileAtomic(s.path(sub, r.fileName()), b, filePerm)
}

func (s *store) remove(sub, name string) error {
	if err := s.unmirror([]string{name}); err != nil {
		return err
	}
	return virtualserver.RemoveFileSync(s.path(sub, name))
}

// unmirror removes records from the mirror, if there is one.
func (s *store) unmirror(names []string) error {
	m := s.mirror
	if m == nil || len(names) == 0 {
		return nil
	}
	ctx, cancel := m.ctx()
	defer cancel()
	if err := m.m.DeleteRecords(ctx, m.vs.Claim(), names); err != nil {
		return fmt.Errorf("nsm: monitor records: %w", err)
	}
	return nil
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
//
// It is on the path of every unplanned takeover: no client is notified
// before the whole list is in. So it reads each file relative to the open
// directory with three system calls (openat, read, close) where
// os.ReadFile makes six, into a buffer reused, and spreads the files over
// the CPUs Go may use: 100 000 records on tmpfs took 1.3 s, now 0.85 s on
// one CPU (nlmd's default), 0.5 s on two.
func (s *store) load(sub string) ([]loaded, []damaged) {
	names, err := s.list(sub, false)
	if err != nil {
		return nil, []damaged{{err: err}}
	}
	return s.read(sub, names, nil)
}

// read reads the record files names of sub (as list gives them), as load,
// giving way to p between small chunks.
func (s *store) read(sub string, names []string, p *pacer) ([]loaded, []damaged) {
	dir := filepath.Join(s.dir, sub)
	d, err := os.Open(dir)
	if err != nil {
		return nil, []damaged{{err: fmt.Errorf("nsm: reading %s: %w", dir, err)}}
	}
	defer d.Close()
	dfd := int(d.Fd())
	recs := make([]*Record, len(names))
	errs := make([]error, len(names))
	// Workers take chunks of files in turn; small lists stay on one.
	const chunk = pacedChunk / 4 // files cost more than entries
	workers := min(runtime.GOMAXPROCS(0), 8, (len(names)+chunk-1)/chunk)
	var next atomic.Int64
	var wg sync.WaitGroup
	for range max(workers, 1) {
		wg.Go(func() {
			buf := make([]byte, 4096)
			for {
				lo := int(next.Add(chunk)) - chunk
				if lo >= len(names) {
					return
				}
				for i := lo; i < min(lo+chunk, len(names)); i++ {
					recs[i], buf, errs[i] = readRecord(dfd, names[i], buf)
				}
				p.yield()
			}
		})
	}
	wg.Wait()
	out := make([]loaded, 0, len(names))
	var bad []damaged
	for i, name := range names {
		if err := errs[i]; err != nil {
			path := filepath.Join(dir, name)
			if !errors.Is(err, ErrBadRecord) {
				err = fmt.Errorf("nsm: %w", err)
			}
			bad = append(bad, damaged{path, fmt.Errorf("%s: %w", path, err)})
			continue
		}
		out = append(out, loaded{file: name, rec: recs[i]})
	}
	return out, bad
}

// list returns the names of the record files of sub, sorted. With clean
// it also removes the temporary files of writes a crash interrupted: only
// when no write can be in progress (v.io held exclusively).
func (s *store) list(sub string, clean bool) ([]string, error) {
	dir := filepath.Join(s.dir, sub)
	d, err := os.Open(dir)
	if err != nil {
		return nil, fmt.Errorf("nsm: reading %s: %w", dir, err)
	}
	defer d.Close()
	// Unsorted (os.ReadDir would sort): one sort of what is kept does.
	ents, err := d.ReadDir(-1)
	if err != nil {
		return nil, fmt.Errorf("nsm: reading %s: %w", dir, err)
	}
	names := make([]string, 0, len(ents))
	var errs []error
	for _, e := range ents {
		name := e.Name()
		if strings.HasPrefix(name, virtualserver.TempPrefix) {
			if !clean {
				continue
			}
			if err := unix.Unlinkat(int(d.Fd()), name, 0); err != nil && !errors.Is(err, unix.ENOENT) {
				errs = append(errs, &fs.PathError{Op: "remove", Path: filepath.Join(dir, name), Err: err})
			}
			continue
		}
		if !e.Type().IsRegular() || !strings.HasSuffix(name, ".json") {
			continue
		}
		names = append(names, name)
	}
	slices.Sort(names)
	if len(errs) > 0 {
		return nil, fmt.Errorf("nsm: state directory: %w", errors.Join(errs...))
	}
	return names, nil
}

// readRecord reads and decodes the record in the file name of the
// directory open as dfd, using buf (grown as needed, and returned).
//
// A read that stops short of the buffer has reached the end of the file
// (but for a signal): what it got is decoded at once, saving the read that
// would see the end. A record cut short is not valid JSON (it ends with a
// brace), so if that fails the file is read on to its end.
//
// The file is opened with O_NOATIME where the file system allows it (we
// own the file, or have CAP_FOWNER): a first read after a write would
// otherwise dirty the inode to update its access time, a third of the
// read's cost on tmpfs and inode writes on a disk, 100 000 at a takeover.
func readRecord(dfd int, name string, buf []byte) (*Record, []byte, error) {
	const flags = unix.O_RDONLY | unix.O_CLOEXEC | unix.O_NOFOLLOW
	open := func() (int, error) { return unix.Openat(dfd, name, flags|unix.O_NOATIME, 0) }
	if noAtimeRefused.Load() {
		open = func() (int, error) { return unix.Openat(dfd, name, flags, 0) }
	}
	fd, err := ignoringEINTR(open)
	if errors.Is(err, unix.EPERM) && !noAtimeRefused.Load() {
		noAtimeRefused.Store(true)
		fd, err = ignoringEINTR(func() (int, error) { return unix.Openat(dfd, name, flags, 0) })
	}
	if err != nil {
		return nil, buf, &fs.PathError{Op: "open", Path: name, Err: err}
	}
	defer unix.Close(fd)
	n := 0
	for {
		if n == len(buf) {
			buf = slices.Grow(buf, len(buf))[:2*len(buf)]
		}
		m, err := ignoringEINTR(func() (int, error) { return unix.Read(fd, buf[n:]) })
		if err != nil {
			return nil, buf, &fs.PathError{Op: "read", Path: name, Err: err}
		}
		if m == 0 {
			break
		}
		n += m
		if n < len(buf) {
			if r, err := decodeRecord(buf[:n]); err == nil {
				return r, buf, nil
			}
		}
	}
	r, err := decodeRecord(buf[:n])
	return r, buf, err
}

// noAtimeRefused is set once O_NOATIME was refused (EPERM: a file we do
// not own, without CAP_FOWNER); records are then opened without it.
var noAtimeRefused atomic.Bool

func ignoringEINTR(fn func() (int, error)) (int, error) {
	for {
		n, err := fn()
		if !errors.Is(err, unix.EINTR) {
			return n, err
		}
	}
}

// retire moves every monitor record to the notify list: the peers are told
// of the restart (clients stay monitored meanwhile, see keepPending).
// A record already waiting there (an earlier notification that never got
// through) is replaced by the same peer's newer record. v.io is held
// exclusively: the temporary files of sm/ are left over from a crash, and
// go (those of the fast path go with notify/'s listing).
func (s *store) retire() error {
	dir := filepath.Join(s.dir, smDir)
	nd := filepath.Join(s.dir, notifyDir)
	if empty, err := dirEmpty(nd); err == nil && empty {
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
	from, err := os.Open(dir)
	if err != nil {
		return fmt.Errorf("nsm: retiring monitor records: %w", err)
	}
	defer from.Close()
	to, err := os.Open(nd)
	if err != nil {
		return fmt.Errorf("nsm: retiring monitor records: %w", err)
	}
	defer to.Close()
	ents, err := from.ReadDir(-1)
	if err != nil {
		return fmt.Errorf("nsm: retiring monitor records: %w", err)
	}
	moved := 0
	for _, e := range ents {
		name := e.Name()
		if strings.HasPrefix(name, virtualserver.TempPrefix) {
			unix.Unlinkat(int(from.Fd()), name, 0)
			continue
		}
		if !e.Type().IsRegular() {
			continue
		}
		if err := renameAt(from, to, name); err != nil {
			return fmt.Errorf("nsm: retiring monitor records: %w", err)
		}
		moved++
	}
	if moved == 0 {
		return nil
	}
	if err := to.Sync(); err != nil {
		return fmt.Errorf("nsm: retiring monitor records: %w", err)
	}
	if err := from.Sync(); err != nil {
		return fmt.Errorf("nsm: retiring monitor records: %w", err)
	}
	return nil
}

// dirEmpty reports whether the directory at path has no entry, reading no
// more than one.
func dirEmpty(path string) (bool, error) {
	d, err := os.Open(path)
	if err != nil {
		return false, err
	}
	defer d.Close()
	_, err = d.Readdirnames(1)
	if errors.Is(err, io.EOF) {
		return true, nil
	}
	return false, err
}

// renameAt moves the file name from the open directory from to the open
// directory to. Relative to the directories, it walks no path; and it
// makes one system call where os.Rename makes two (an lstat first): at a
// takeover, notified clients' records are moved by the hundred thousand.
func renameAt(from, to *os.File, name string) error {
	_, err := ignoringEINTR(func() (int, error) {
		return 0, unix.Renameat(int(from.Fd()), name, int(to.Fd()), name)
	})
	if err != nil {
		return &os.LinkError{Op: "rename", Old: filepath.Join(from.Name(), name), New: filepath.Join(to.Name(), name), Err: err}
	}
	return nil
}

// decodeRecord decodes a record file. What marshalRecord writes (known
// keys, strings of plain ASCII, integers) takes a path of its own at a
// fifth of encoding/json's cost: every record is decoded before the first
// client is notified, and json was a third of that wait (100 000 records:
// 0.3 s). Anything else goes through unmarshalRecord, so a record decodes
// the same either way.
func decodeRecord(b []byte) (*Record, error) {
	if r, ok := decodePlain(b); ok {
		if err := r.validate(); err != nil {
			return nil, err
		}
		return r, nil
	}
	return unmarshalRecord(b)
}

// Bits of decodePlain's keys seen.
const (
	keyKind = 1 << iota
	keyMonName
	keyCaller
	keyAddrs
	keyMyName
	keyProg
	keyVers
	keyProc
	keyPriv
	keyLastState
	keyCreated
)

// decodePlain decodes b as a record if it is the plain JSON object that
// marshalRecord writes; ok is false on anything else (an escape, a byte
// outside printable ASCII, a key it does not know or twice, a number that
// is not a plain integer, null, trailing data...).
func decodePlain(b []byte) (r *Record, ok bool) {
	s := plainScanner{b: b}
	if !s.punct('{') {
		return nil, false
	}
	r = &Record{}
	seen := 0
	for {
		k, ok := s.str()
		if !ok || !s.punct(':') {
			return nil, false
		}
		var bit int
		switch string(k) {
		case "kind":
			bit, ok = keyKind, s.text(&r.Kind)
		case "mon_name":
			bit, ok = keyMonName, s.text(&r.MonName)
		case "caller":
			bit, ok = keyCaller, s.text(&r.Caller)
		case "my_name":
			bit, ok = keyMyName, s.text(&r.MyName)
		case "addrs":
			bit, ok = keyAddrs, s.addrs(&r.Addrs)
		case "my_prog":
			bit, ok = keyProg, s.uint32(&r.Prog)
		case "my_vers":
			bit, ok = keyVers, s.uint32(&r.Vers)
		case "my_proc":
			bit, ok = keyProc, s.uint32(&r.Proc)
		case "last_state":
			bit = keyLastState
			var n []byte
			if n, ok = s.num(); ok {
				v, err := strconv.ParseInt(string(n), 10, 32)
				r.LastState, ok = int32(v), err == nil
			}
		case "priv":
			bit = keyPriv
			var v []byte
			if v, ok = s.str(); ok {
				ok = r.Priv.UnmarshalText(v) == nil
			}
		case "created":
			bit = keyCreated
			start := s.skip()
			if _, ok = s.str(); ok {
				ok = r.Created.UnmarshalJSON(b[start:s.i]) == nil
			}
		}
		if bit == 0 || !ok || seen&bit != 0 {
			return nil, false
		}
		seen |= bit
		if s.punct(',') {
			continue
		}
		if !s.punct('}') || s.skip() != len(b) {
			return nil, false
		}
		return r, true
	}
}

type plainScanner struct {
	b []byte
	i int
}

// skip passes white space and returns where the next token starts.
func (s *plainScanner) skip() int {
	for s.i < len(s.b) && (s.b[s.i] == ' ' || s.b[s.i] == '\n' || s.b[s.i] == '\t' || s.b[s.i] == '\r') {
		s.i++
	}
	return s.i
}

func (s *plainScanner) punct(c byte) bool {
	if s.skip() < len(s.b) && s.b[s.i] == c {
		s.i++
		return true
	}
	return false
}

// str reads a string of printable ASCII without escapes.
func (s *plainScanner) str() ([]byte, bool) {
	if !s.punct('"') {
		return nil, false
	}
	for j := s.i; j < len(s.b); j++ {
		switch c := s.b[j]; {
		case c == '"':
			v := s.b[s.i:j]
			s.i = j + 1
			return v, true
		case c < 0x20 || c == '\\' || c >= 0x80:
			return nil, false
		}
	}
	return nil, false
}

func (s *plainScanner) text(dst *string) bool {
	v, ok := s.str()
	*dst = string(v)
	return ok
}

// num reads an integer written as JSON writes it: an optional minus, then
// 0 or digits without a leading 0. What follows must end the value.
func (s *plainScanner) num() ([]byte, bool) {
	start := s.skip()
	if s.i < len(s.b) && s.b[s.i] == '-' {
		s.i++
	}
	d := s.i
	for s.i < len(s.b) && '0' <= s.b[s.i] && s.b[s.i] <= '9' {
		s.i++
	}
	if s.i == d || (s.b[d] == '0' && s.i-d > 1) {
		return nil, false
	}
	return s.b[start:s.i], true
}

func (s *plainScanner) uint32(dst *uint32) bool {
	n, ok := s.num()
	if !ok {
		return false
	}
	v, err := strconv.ParseUint(string(n), 10, 32)
	*dst = uint32(v)
	return err == nil
}

func (s *plainScanner) addrs(dst *[]netip.Addr) bool {
	if !s.punct('[') {
		return false
	}
	*dst = []netip.Addr{}
	if s.punct(']') {
		return true
	}
	for {
		v, ok := s.str()
		if !ok {
			return false
		}
		var a netip.Addr
		if a.UnmarshalText(v) != nil {
			return false
		}
		*dst = append(*dst, a)
		if s.punct(',') {
			continue
		}
		return s.punct(']')
	}
}

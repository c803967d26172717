package virtualserver

import (
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"time"
)

// A virtual server's state directory (<state-dir>/<address>/) holds its
// NSM state (see package nsm), its epoch and, after a planned release, the
// snapshot of its locks. On shared storage it moves with the address.
const (
	epochFile = "epoch"
	dirPerm   = 0o700
)

// Dir is the state directory of the virtual server at addr.
func Dir(stateDir string, addr string) string { return filepath.Join(stateDir, addr) }

// ErrBadEpoch reports an epoch file that does not hold a number.
var ErrBadEpoch = errors.New("virtualserver: damaged epoch file")

// ReadEpoch returns the epoch stored in dir (0: none yet).
func ReadEpoch(dir string) (uint64, error) {
	b, err := os.ReadFile(filepath.Join(dir, epochFile))
	if errors.Is(err, fs.ErrNotExist) {
		return 0, nil
	}
	if err != nil {
		return 0, err
	}
	n, err := strconv.ParseUint(strings.TrimSpace(string(b)), 10, 64)
	if err != nil {
		return 0, fmt.Errorf("%w: %q", ErrBadEpoch, b)
	}
	return n, nil
}

// ClaimEpoch starts a new epoch of the virtual server whose directory is
// dir: it returns the epoch stored there (the one this takeover follows)
// and stores, durably, the next. A damaged epoch file is reported and
// skipped over: prev is returned as 0, so no snapshot matches it, and the
// next epoch is the current Unix time in seconds — above any epoch the
// counter reached before, so epochs never go backwards (a lock backend
// that still knows a later claim would refuse an epoch that did).
func ClaimEpoch(dir string) (prev, next uint64, err error) {
	if err := os.MkdirAll(dir, dirPerm); err != nil {
		return 0, 0, err
	}
	prev, rerr := ReadEpoch(dir)
	next = prev + 1
	if rerr != nil {
		err, prev = rerr, 0
		next = uint64(time.Now().Unix())
	}
	if werr := WriteFileAtomic(filepath.Join(dir, epochFile), []byte(strconv.FormatUint(next, 10)+"\n"), 0o600); werr != nil {
		return 0, 0, werr
	}
	return prev, next, err
}

package nsm

import (
	"context"
	"errors"
	"fmt"
	"io/fs"
	"net/netip"
	"os"
	"path/filepath"
	"strconv"
	"strings"

	"github.com/nlmha/nlmha/dlm"
	"github.com/nlmha/nlmha/virtualserver"
)

// Mirror keeps each virtual server's NSM state — its state number and its
// monitor records — in a store the nodes share (etcd), so that a node
// whose state directory does not have it (local storage, not shared) can
// take the virtual server over and notify the right clients. The
// directory is then a cache: a start makes it what the store holds, and
// every change goes to the store before it is acknowledged. Writes act
// under the virtual server's claim: a node that lost it changes nothing.
type Mirror interface {
	// Load returns what the store holds of vip; ok is false when it holds
	// nothing yet (the directory is then uploaded with Save).
	Load(ctx context.Context, vip netip.Addr) (state int32, records map[string][]byte, ok bool, err error)
	// Save replaces what the store holds of the claim's virtual server.
	Save(ctx context.Context, c dlm.Claim, state int32, records map[string][]byte) error
	SetState(ctx context.Context, c dlm.Claim, state int32) error
	PutRecord(ctx context.Context, c dlm.Claim, file string, data []byte) error
	DeleteRecords(ctx context.Context, c dlm.Claim, files []string) error
}

// mirrored is a store's link to the mirror, for one virtual server.
type mirrored struct {
	m  Mirror
	vs *virtualserver.Server
}

func (m *mirrored) ctx() (context.Context, context.CancelFunc) {
	return context.WithTimeout(context.Background(), mirrorTimeout)
}

// sync makes the directory what the mirror holds (or, if the mirror has
// nothing yet, uploads the directory). The cache is written without a
// sync per file — the mirror is what is durable — and each list once
// synced at the end.
func (s *store) sync(ctx context.Context) error {
	m := s.mirror
	state, recs, ok, err := m.m.Load(ctx, m.vs.Addr())
	if err != nil {
		return fmt.Errorf("nsm: reading the shared NSM state: %w", err)
	}
	local := map[string]string{} // file -> list it is in
	for _, sub := range []string{smDir, notifyDir} {
		names, err := s.list(sub, true)
		if err != nil {
			return err
		}
		for _, n := range names {
			local[n] = sub
		}
	}
	if !ok {
		// First start with a shared store: the directory is the truth.
		st, rerr := s.readState()
		if rerr != nil {
			st = 0
		}
		up := make(map[string][]byte, len(local))
		for n, sub := range local {
			b, err := os.ReadFile(s.path(sub, n))
			if err != nil {
				continue
			}
			up[n] = b
		}
		return m.m.Save(ctx, m.vs.Claim(), st, up)
	}
	for n, sub := range local {
		if _, keep := recs[n]; !keep {
			if err := os.Remove(s.path(sub, n)); err != nil && !errors.Is(err, fs.ErrNotExist) {
				return fmt.Errorf("nsm: state directory: %w", err)
			}
		}
	}
	for n, b := range recs {
		if strings.ContainsAny(n, "/\x00") || n == "" || n == "." || n == ".." {
			continue // not a name this service writes
		}
		if sub, have := local[n]; have {
			if cur, err := os.ReadFile(s.path(sub, n)); err == nil && string(cur) == string(b) {
				continue
			}
			os.Remove(s.path(sub, n))
		}
		if err := os.WriteFile(s.path(smDir, n), b, filePerm); err != nil {
			return fmt.Errorf("nsm: state directory: %w", err)
		}
	}
	for _, d := range []string{filepath.Join(s.dir, smDir), filepath.Join(s.dir, notifyDir)} {
		if err := virtualserver.SyncDir(d); err != nil {
			return err
		}
	}
	if state > 0 {
		return virtualserver.WriteFileAtomic(filepath.Join(s.dir, stateFile), []byte(strconv.FormatInt(int64(state), 10)+"\n"), filePerm)
	}
	return nil
}

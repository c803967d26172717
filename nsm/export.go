package nsm

import (
	"encoding/binary"
	"encoding/hex"
	"fmt"
	"net/netip"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"time"

	"github.com/nlmha/nlmha/virtualserver"
)

// Dir is a virtual server's state directory opened directly, without a
// running service: for nlmadmin export-sm (which must work when nlmd does
// not), for tools and for tests. Its writers must not run beside an nlmd
// serving the same virtual server.
type Dir struct {
	st  *store
	vip netip.Addr
}

// OpenDir opens (creating it if need be) the directory of the virtual
// server vip under stateDir.
func OpenDir(stateDir string, vip netip.Addr) (*Dir, error) {
	st, err := openStore(VIPDir(stateDir, vip.Unmap().String()))
	if err != nil {
		return nil, err
	}
	for _, sub := range []string{smDir, notifyDir} {
		if err := virtualserver.CleanTemp(filepath.Join(st.dir, sub)); err != nil {
			return nil, fmt.Errorf("nsm: state directory: %w", err)
		}
	}
	return &Dir{st: st, vip: vip.Unmap()}, nil
}

// State is the stored state number (0: none yet).
func (d *Dir) State() (int32, error) { return d.st.readState() }

// SetState stores a state number.
func (d *Dir) SetState(n int32) error { return d.st.writeState(n) }

// Records returns the monitor records and the records still to be notified
// (a peer in both lists once). Damaged records are returned as errors
// beside the good ones.
func (d *Dir) Records() ([]Record, []error) {
	var out []Record
	var errs []error
	seen := map[string]bool{}
	states, _, err := d.st.readStates()
	if err != nil {
		errs = append(errs, err)
	}
	for _, sub := range []string{smDir, notifyDir} {
		ls, bad := d.st.load(sub)
		applyStates(ls, states)
		for _, b := range bad {
			errs = append(errs, b.err)
		}
		for _, l := range ls {
			if !seen[l.file] {
				seen[l.file] = true
				out = append(out, *l.rec)
			}
		}
	}
	return out, errs
}

// AddClient writes the monitor record of a client, as the service does the
// first time the client locks.
func (d *Dir) AddClient(c Client, myName string) error {
	if myName == "" {
		myName = d.vip.String()
	}
	c.Addr = c.Addr.Unmap()
	return d.st.put(smDir, clientRecord(c, myName, time.Now()))
}

// AddClients writes many client records at once, with one file-system
// sync for all (an import, or a benchmark's fixture).
func (d *Dir) AddClients(clients []Client, myName string) error {
	if myName == "" {
		myName = d.vip.String()
	}
	files := make(map[string][]byte, len(clients))
	now := time.Now()
	for _, c := range clients {
		c.Addr = c.Addr.Unmap()
		r := clientRecord(c, myName, now)
		b, err := marshalRecord(r)
		if err != nil {
			return err
		}
		files[r.fileName()] = b
	}
	return virtualserver.WriteFilesAtomic(filepath.Join(d.st.dir, smDir), files, filePerm)
}

// loopbackSAddr is INADDR_LOOPBACK as rpc.statd prints it in sm/ files:
// the network-order address read as a host integer.
var loopbackSAddr = binary.NativeEndian.Uint32([]byte{127, 0, 0, 1})

// smLine renders a record as one line of nfs-utils' sm/ format: callback
// address, my_prog, my_vers, my_proc, priv, mon_name, my_name. Clients are
// written as rpc.statd would have monitored them for the kernel's lockd
// (NLM version 4, procedure 16), the way CTDB's helper writes them.
func smLine(r *Record) string {
	prog, vers, proc := r.Prog, r.Vers, r.Proc
	if r.Kind == KindClient {
		prog, vers, proc = nlmProg, 4, nlmProcSMNotify
	}
	return fmt.Sprintf("%08x %08x %08x %08x %s %s %s\n", loopbackSAddr, prog, vers, proc,
		hex.EncodeToString(r.Priv[:]), r.MonName, r.MyName)
}

// ExportSM writes the virtual server's records — monitored and still to be
// notified — and state number to dst in nfs-utils' format (sm/ with one
// file per peer, an empty sm.bak/, and a native-endian state file), so
// that sm-notify can notify them instead of nlmd:
//
//	sm-notify -f -n -P DST
//
// Every line names the virtual server as my_name, which sm-notify sends as
// mon_name (-n sends the stored state as is; without it sm-notify bumps it
// by 2).
// It returns the number of records written.
func (d *Dir) ExportSM(dst string) (int, error) {
	recs, errs := d.Records()
	if len(errs) > 0 && len(recs) == 0 {
		return 0, fmt.Errorf("nsm: export: %w", errs[0])
	}
	state, err := d.State()
	if err != nil {
		return 0, err
	}
	if state == 0 {
		state = 1
	}
	for _, sub := range []string{"sm", "sm.bak"} {
		if err := os.MkdirAll(filepath.Join(dst, sub), 0o755); err != nil {
			return 0, fmt.Errorf("nsm: export: %w", err)
		}
	}
	byPeer := map[string][]string{}
	for i := range recs {
		r := &recs[i]
		if !validName(r.MonName) || (r.MyName != "" && !validName(r.MyName)) {
			continue // cannot be written as a blank-separated line
		}
		if r.MyName == "" {
			r.MyName = d.vip.String()
		}
		byPeer[r.MonName] = append(byPeer[r.MonName], smLine(r))
	}
	peers := make([]string, 0, len(byPeer))
	for p := range byPeer {
		peers = append(peers, p)
	}
	slices.Sort(peers)
	n := 0
	for _, p := range peers {
		lines := byPeer[p]
		slices.Sort(lines)
		lines = slices.Compact(lines)
		if err := virtualserver.WriteFileAtomic(filepath.Join(dst, "sm", p), []byte(strings.Join(lines, "")), 0o644); err != nil {
			return n, err
		}
		n += len(lines)
	}
	var b [4]byte
	binary.NativeEndian.PutUint32(b[:], uint32(state))
	if err := virtualserver.WriteFileAtomic(filepath.Join(dst, "state"), b[:], 0o644); err != nil {
		return n, err
	}
	return n, nil
}

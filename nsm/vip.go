package nsm

import (
	"context"
	"log/slog"
	"net/netip"
	"os"
	"slices"
	"sync"

	"github.com/nlmha/nlmha/virtualserver"
)

// vip is the NSM state of one virtual server.
type vip struct {
	vs    *virtualserver.Server
	st    *store
	log   *slog.Logger  // the service's
	ready chan struct{} // closed once the records are in, or the start failed (err)
	err   error
	// started is closed once Start is over (err tells how): the state
	// number is set, the notification prepared.
	started chan struct{}
	// pace: loading the records waits for notifications (set before it).
	pace *pacer
	// launched is closed once Notify has launched what Start prepared:
	// the records load after. hurry is closed when the virtual server is
	// released: they load at once, without waiting for notifications (see
	// pacer).
	launched     chan struct{}
	launchedOnce sync.Once
	hurry        chan struct{}
	hurryOnce    sync.Once

	// io is held shared by record writes and exclusively by a restart, so
	// that no write lands in sm/ while the records are being retired.
	io sync.RWMutex

	// fmu orders the file moves of notified clients' records (see acked)
	// and the writes of the reboot journal. Lock order: io, fmu, mu.
	fmu          sync.Mutex
	journalLines int // lines in the reboot journal

	// detached is set, under io held exclusively, when the virtual server
	// leaves this node: no writer touches its directory after that (the
	// next owner may be writing it already).
	detached bool

	mu    sync.Mutex
	state int32
	recs  map[string]*entry
	// byName and byAddr index recs by the names and addresses a reboot
	// notification may give (see Record.matches).
	byName  map[string][]*entry
	byAddr  map[netip.Addr][]*entry
	writing map[string]chan struct{}
	// listed are the file names of the notify list until the records are
	// in (sorted): its clients are monitored meanwhile (pendingClient).
	listed []string
	// pending are the client records still in notify/, by file name: their
	// clients count as monitored (a crash notifies them again) and, once
	// they answer, their records move back to sm/ (see acked).
	pending map[string]*entry
	// toNotify is the notification a start prepared and Notify launches.
	toNotify *prepared
	job      *job
	stop     context.CancelFunc
	jobDone  chan struct{}
}

type entry struct {
	rec *Record
	// doomed marks a client record found idle by one Prune; the next
	// Prune removes it unless the client was monitored again in between.
	doomed bool
	// file is the record's file in notify/ while its client waits to be
	// notified (it is pending: v.pending[file] is this entry).
	file string
}

// pendingClient reports whether the record of client c waits in the
// notify list of v while its records load: c is monitored (its record is
// as durable there as in sm/), and Monitor need not wait for the records.
// Notified clients reclaim at once, and the records load behind the
// notification.
func (v *vip) pendingClient(c Client) bool {
	v.mu.Lock()
	listed := v.listed
	v.mu.Unlock()
	if len(listed) == 0 {
		return false
	}
	r := Record{Kind: KindClient, Caller: c.Caller, Addrs: []netip.Addr{c.Addr}}
	_, found := slices.BinarySearch(listed, r.fileName())
	return found
}

// detaching makes the records load at once: they are waited for.
func (v *vip) detaching() { v.hurryOnce.Do(func() { close(v.hurry) }) }

func (v *vip) currentState() int32 {
	v.mu.Lock()
	defer v.mu.Unlock()
	return v.state
}

// setRecs installs the records and indexes them; v.mu is held (or v is
// not shared yet).
func (v *vip) setRecs(recs map[string]*entry) {
	v.recs = recs
	v.byName, v.byAddr = indexOf(recs, nil)
}

// indexOf builds the indexes of recs (see vip.byName), giving way to p
// now and then.
func indexOf(recs map[string]*entry, p *pacer) (byName map[string][]*entry, byAddr map[netip.Addr][]*entry) {
	// Sized for a client each (one name, one address): growing maps of
	// 100 000 entries step by step cost as much as filling them.
	byName, byAddr = make(map[string][]*entry, len(recs)), make(map[netip.Addr][]*entry, len(recs))
	n := 0
	for _, e := range recs {
		index(byName, byAddr, e)
		if n++; n%pacedChunk == 0 {
			p.yield()
		}
	}
	return byName, byAddr
}

// putRec adds a record; v.mu is held.
func (v *vip) putRec(key string, e *entry) {
	v.recs[key] = e
	v.index(e)
}

// delRec removes a record; v.mu is held.
func (v *vip) delRec(key string) {
	e := v.recs[key]
	if e == nil {
		return
	}
	delete(v.recs, key)
	drop := func(l []*entry) []*entry { return slices.DeleteFunc(l, func(x *entry) bool { return x == e }) }
	var buf [2]string
	for _, n := range e.appendNames(buf[:0]) {
		if l := drop(v.byName[n]); len(l) > 0 {
			v.byName[n] = l
		} else {
			delete(v.byName, n)
		}
	}
	for _, a := range e.rec.Addrs {
		a = a.Unmap()
		if l := drop(v.byAddr[a]); len(l) > 0 {
			v.byAddr[a] = l
		} else {
			delete(v.byAddr, a)
		}
	}
}

func (v *vip) index(e *entry) { index(v.byName, v.byAddr, e) }

func index(byName map[string][]*entry, byAddr map[netip.Addr][]*entry, e *entry) {
	var buf [2]string
	for _, n := range e.appendNames(buf[:0]) {
		byName[n] = append(byName[n], e)
	}
	for _, a := range e.rec.Addrs {
		byAddr[a.Unmap()] = append(byAddr[a.Unmap()], e)
	}
}

// appendNames appends the names a notification may call the record's
// host by (two at most), but for a mon_name that is one of its addresses
// (a client's always is): that one is found through byAddr (see
// matching).
func (e *entry) appendNames(out []string) []string {
	if a, err := netip.ParseAddr(e.rec.MonName); err != nil || !slices.ContainsFunc(e.rec.Addrs, func(x netip.Addr) bool { return x.Unmap() == a.Unmap() }) {
		out = append(out, e.rec.MonName)
	}
	if e.rec.Caller != "" && e.rec.Caller != e.rec.MonName {
		out = append(out, e.rec.Caller)
	}
	return out
}

// matching returns the records a notification from sender naming monName
// is about (Record.matches), each once; v.mu is held.
func (v *vip) matching(monName string, sender netip.Addr) []*entry {
	var out []*entry
	add := func(l []*entry) {
		for _, e := range l {
			if !slices.Contains(out, e) {
				out = append(out, e)
			}
		}
	}
	if monName != "" {
		add(v.byName[monName])
		if a, err := netip.ParseAddr(monName); err == nil {
			add(v.byAddr[a.Unmap()])
		}
	}
	add(v.byAddr[sender.Unmap()])
	return out
}

// load reads a list, setting damaged records aside and removing the
// temporary files of interrupted writes; v.io is held exclusively.
func (v *vip) load(sub string) []loaded {
	names, err := v.st.list(sub, true)
	if err != nil {
		v.log.Warn("nsm: cannot read a list of monitor records", "vip", v.vs.Addr(), "err", err)
		return nil
	}
	return v.read(sub, names)
}

// read reads the record files names of a list (as listed), setting
// damaged records aside.
func (v *vip) read(sub string, names []string) []loaded {
	list, bad := v.st.read(sub, names, v.pace)
	for _, b := range bad {
		v.log.Warn("nsm: skipping a damaged monitor record", "vip", v.vs.Addr(), "err", b.err)
		if b.path != "" {
			v.quarantine(b.path)
		}
	}
	return list
}

// quarantine renames a damaged record file so that it is reported once
// and kept for inspection.
func (v *vip) quarantine(path string) {
	if err := os.Rename(path, path+".damaged"); err != nil {
		v.log.Warn("nsm: cannot set a damaged record aside", "path", path, "err", err)
	}
}

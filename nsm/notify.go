package nsm

import (
	"context"
	"errors"
	"fmt"
	"net/netip"
	"os"
	"path/filepath"
	"time"

	"golang.org/x/sys/unix"

	"github.com/nlmha/nlmha/virtualserver"
)

// prepared is a notification ready to go: the state announced and the
// peers to tell.
type prepared struct {
	state int32
	list  []target
}

// prepare readies the notification of list, for Notify; v.io is held.
func (s *Service) prepare(v *vip, state int32, list []target) {
	if s.cfg.Notify.Disabled {
		return
	}
	v.mu.Lock()
	v.toNotify = &prepared{state: state, list: list}
	v.mu.Unlock()
}

// Notify sends the notifications that the start of the virtual server vs
// prepared (none after a planned takeover with nobody left to notify).
func (s *Service) Notify(vs *virtualserver.Server) error {
	// Not waiting for the records to load: the notification needs none.
	s.mu.Lock()
	v := s.vips[vs.Addr()]
	s.mu.Unlock()
	if v == nil || v.vs != vs {
		return fmt.Errorf("%w: %v", ErrNotServed, vs.Addr())
	}
	s.launch(v)
	return nil
}

// launch starts the prepared notification, if any; v.io is held, or the
// records are yet to load (nothing else restarts the virtual server).
func (s *Service) launch(v *vip) {
	v.mu.Lock()
	p := v.toNotify
	v.toNotify = nil
	v.mu.Unlock()
	if p != nil {
		s.notify(v, p.state, p.list)
	}
	v.launchedOnce.Do(func() { close(v.launched) })
}

// notify starts the notification of list; v.io is held.
func (s *Service) notify(v *vip, state int32, list []target) {
	from := netip.AddrPortFrom(v.vs.Addr(), s.cfg.Port)
	j := newJob(s.cfg.Notify, s.cfg.RPC, from, v.vs.Name(), state, list, time.Now())
	// Answers are acted on once the records are loaded (they may come
	// first: the notification starts from the list's names).
	rm := newAcker(func(files []string) {
		<-v.ready
		v.acked(files)
	})
	j.acked = rm.add
	vs := v.vs
	j.settled = func(client netip.Addr, answered bool) {
		if answered {
			vs.GraceNotified(client)
		} else {
			vs.GraceUnreachable(client)
		}
	}
	j.logf, j.warnf = s.log.Debug, s.log.Warn
	j.notifying = s.notifying
	// In its first pass from now: the records (loading next) wait.
	j.inPass = true
	s.notifying.begin(time.Now())
	ctx, stop := context.WithCancel(s.ctx)
	done := make(chan struct{})
	v.mu.Lock()
	v.job, v.stop, v.jobDone = j, stop, done
	v.mu.Unlock()
	s.wg.Go(func() {
		defer close(done)
		defer stop()
		j.run(ctx)
		rm.close()
		p := j.progress()
		s.log.Info("nsm: notification finished", "vip", p.VIP, "state", p.State, "notified", p.Done,
			"failed", p.Failed, "pending", p.Pending(), "took", p.Finished.Sub(p.Started).Round(time.Millisecond))
	})
}

// keepPending adds the client records of the notify list to recs, unless
// the client's record is in sm/ too, and to pending by file name.
//
// A client being notified stays monitored: its record in notify/ is as
// durable as one in sm/ (a crash notifies it again), so the reclaims that
// follow a restart need no record written. After a takeover by a node
// whose state directory sits on shared storage that is hundreds of fsyncs
// off the reclaim path (a thousand clients: 1.1 s → 0.3 s to reclaim).
func keepPending(list []loaded, recs, pending map[string]*entry, p *pacer) {
	for i, l := range list {
		if i%pacedChunk == pacedChunk-1 {
			p.yield()
		}
		if l.rec.Kind != KindClient {
			continue // SM_MON's lock manager monitors again as rpc.statd expects
		}
		k := l.rec.key()
		if recs[k] != nil {
			continue
		}
		e := &entry{rec: l.rec, file: l.file}
		recs[k], pending[l.file] = e, e
	}
}

// acked settles the records of clients whose statd answered: a client
// still monitored has its record moved back to sm/; any other file is
// removed. A move or removal lost in a crash only means one more
// notification next time, so directories are not synced for each.
//
// The files move relative to the two directories, opened once per batch:
// after a takeover they come by the hundred thousand, while the clients
// reclaim.
func (v *vip) acked(files []string) {
	v.fmu.Lock()
	defer v.fmu.Unlock()
	nd, err := os.Open(filepath.Join(v.st.dir, notifyDir))
	if err != nil {
		v.log.Warn("nsm: settling notified clients' records", "vip", v.vs.Addr(), "err", err)
		return
	}
	defer nd.Close()
	var sm *os.File
	var gone []string
	defer func() {
		// Records of clients no longer monitored leave the mirror too (a
		// failure leaves one more notification for the next owner).
		if err := v.st.unmirror(gone); err != nil {
			v.log.Warn("nsm: removing notified clients' records from the shared store", "vip", v.vs.Addr(), "err", err)
		}
	}()
	for _, f := range files {
		v.mu.Lock()
		e := v.pending[f]
		delete(v.pending, f)
		keep := e != nil && v.recs[e.rec.key()] == e
		v.mu.Unlock()
		if !keep {
			gone = append(gone, f)
			if err := unix.Unlinkat(int(nd.Fd()), f, 0); err != nil && !errors.Is(err, unix.ENOENT) {
				v.log.Warn("nsm: removing a record from the notify list", "vip", v.vs.Addr(), "file", f, "err", err)
			}
			continue
		}
		if sm == nil {
			if sm, err = os.Open(filepath.Join(v.st.dir, smDir)); err != nil {
				v.log.Warn("nsm: moving a notified client's record back to the monitor list", "vip", v.vs.Addr(), "file", f, "err", err)
				return
			}
			defer sm.Close()
		}
		if err := renameAt(nd, sm, f); err != nil {
			v.log.Warn("nsm: moving a notified client's record back to the monitor list", "vip", v.vs.Addr(), "file", f, "err", err)
		}
	}
}

// Renotify tells every client of the virtual server vs, monitored or still
// to be notified, that it restarted: a new state number and SM_NOTIFY to
// each, as SM_SIMU_CRASH does. Clients reclaim; their locks are there, so
// each reclaim is granted as it stands.
func (s *Service) Renotify(ctx context.Context, vs *virtualserver.Server) (Started, error) {
	v, err := s.vipFor(ctx, vs)
	if err != nil {
		return Started{}, err
	}
	return s.restartAndNotify(v)
}

// restartAndNotify restarts a served virtual server's monitor and
// notifies its peers at once (SM_SIMU_CRASH, an admin's renotify).
func (s *Service) restartAndNotify(v *vip) (Started, error) { return s.restart(v, true) }

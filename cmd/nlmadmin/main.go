// Command nlmadmin administers nlmd through its control API (a Unix
// socket), and works on its state directory directly where nlmd may be
// down (export-sm).
//
// Exit codes, for scripts and resource agents: 0 done; 1 failed; 2 bad
// usage; 3 nlmd is not running; 7 (vip status) the virtual server is not
// served here — OCF's "not running".
package main

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/netip"
	"os"
	"strings"
	"text/tabwriter"
	"time"

	"github.com/spf13/cobra"

	"github.com/nlmha/nlmha/hacallout"
	"github.com/nlmha/nlmha/nsm"
)

// Exit codes.
const (
	exitFailed     = 1
	exitUsage      = 2
	exitNotRunning = 3
	exitNotServed  = 7
)

// exitError carries an exit code.
type exitError struct {
	code int
	err  error
}

func (e *exitError) Error() string {
	if e.err == nil {
		return fmt.Sprintf("exit status %d", e.code)
	}
	return e.err.Error()
}
func (e *exitError) Unwrap() error { return e.err }

func main() {
	os.Exit(run(os.Args[1:], os.Stdout, os.Stderr))
}

func run(args []string, stdout, stderr io.Writer) int {
	root := newRoot(stdout, stderr)
	root.SetArgs(args)
	err := root.Execute()
	if err == nil {
		return 0
	}
	var ee *exitError
	if errors.As(err, &ee) && ee.err == nil {
		return ee.code
	}
	fmt.Fprintln(stderr, "nlmadmin:", err)
	switch {
	case errors.As(err, &ee):
		return ee.code
	case errors.Is(err, hacallout.ErrNotRunning):
		return exitNotRunning
	case isUsage(err):
		return exitUsage
	}
	return exitFailed
}

func isUsage(err error) bool {
	s := err.Error()
	return strings.Contains(s, "unknown command") || strings.Contains(s, "unknown flag") || strings.Contains(s, "accepts ") ||
		strings.Contains(s, "requires at least") || strings.Contains(s, "invalid argument")
}

type app struct {
	socket   string
	jsonOut  bool
	stateDir string
	timeout  time.Duration
	out      io.Writer
}

func (a *app) client() *hacallout.Client { return hacallout.NewClient(a.socket) }

func (a *app) ctx() (context.Context, context.CancelFunc) {
	return context.WithTimeout(context.Background(), a.timeout)
}

// show prints v as JSON with --json, else through table.
func (a *app) show(v any, table func(w *tabwriter.Writer)) error {
	if a.jsonOut {
		enc := json.NewEncoder(a.out)
		enc.SetIndent("", "  ")
		return enc.Encode(v)
	}
	w := tabwriter.NewWriter(a.out, 0, 4, 2, ' ', 0)
	table(w)
	return w.Flush()
}

// onVIP runs fn for a command whose one argument is a virtual server's
// address, with the control API client and a timeout.
func (a *app) onVIP(fn func(ctx context.Context, c *hacallout.Client, addr netip.Addr) error) func(*cobra.Command, []string) error {
	return func(_ *cobra.Command, args []string) error {
		addr, err := parseVIP(args[0])
		if err != nil {
			return err
		}
		ctx, cancel := a.ctx()
		defer cancel()
		return fn(ctx, a.client(), addr)
	}
}

func parseVIP(s string) (netip.Addr, error) {
	v, err := netip.ParseAddr(s)
	if err != nil {
		return netip.Addr{}, &exitError{exitUsage, fmt.Errorf("%q is not an IP address", s)}
	}
	return v.Unmap(), nil
}

func newRoot(stdout, stderr io.Writer) *cobra.Command {
	a := &app{out: stdout}
	root := &cobra.Command{
		Use:   "nlmadmin",
		Short: "Administer nlmd, the NFSv3 lock failover server",
		Long: `nlmadmin talks to nlmd over its control socket.

Exit codes: 0 done; 1 failed; 2 bad usage; 3 nlmd is not running;
7 (vip status) the virtual server is not served here.`,
		SilenceUsage:  true,
		SilenceErrors: true,
	}
	root.SetOut(stdout)
	root.SetErr(stderr)
	sock := os.Getenv("NLMHA_SOCKET")
	if sock == "" {
		sock = hacallout.DefaultSocket
	}
	root.PersistentFlags().StringVar(&a.socket, "socket", sock, "nlmd's control socket (or $NLMHA_SOCKET)")
	root.PersistentFlags().BoolVar(&a.jsonOut, "json", false, "print JSON instead of tables")
	root.PersistentFlags().DurationVar(&a.timeout, "timeout", 60*time.Second, "how long to wait for nlmd")
	root.PersistentFlags().StringVar(&a.stateDir, "state-dir", "/var/lib/nlmha", "nlmd's state directory (export-sm)")

	root.AddCommand(a.statusCmd(), a.vipCmd(), a.locksCmd(), a.clientsCmd(), a.clientCmd(), a.exportCmd(), a.clusterCmd())
	return root
}

// group is a command that only holds subcommands: without one it shows
// its help; with an unknown one it fails as bad usage.
func group(use, short string) *cobra.Command {
	return &cobra.Command{Use: use, Short: short, Args: cobra.ArbitraryArgs,
		RunE: func(cmd *cobra.Command, args []string) error {
			if len(args) > 0 {
				return &exitError{exitUsage, fmt.Errorf("unknown command %q for %q", args[0], cmd.CommandPath())}
			}
			return cmd.Help()
		}}
}

func (a *app) statusCmd() *cobra.Command {
	return &cobra.Command{
		Use:   "status",
		Short: "Show nlmd and its virtual servers",
		Args:  cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			ctx, cancel := a.ctx()
			defer cancel()
			st, err := a.client().Status(ctx)
			if err != nil {
				return err
			}
			return a.show(st, func(w *tabwriter.Writer) {
				fmt.Fprintf(w, "nlmd %s, pid %d on %s, up %s, listen mode %s, state in %s\n\n", st.Version, st.PID, st.Host,
					time.Since(st.Started).Round(time.Second), st.Listen, st.StateDir)
				vipTable(w, st.VIPs)
			})
		},
	}
}

func vipTable(w io.Writer, vips []hacallout.VIPStatus) {
	fmt.Fprintln(w, "VIP\tNAME\tSTATE\tEPOCH\tGRACE\tNSM\tLOCKS\tBLOCKED\tSHARES\tCLIENTS\tNOTIFY")
	for _, v := range vips {
		grace := "-"
		if v.Grace.Active {
			grace = fmt.Sprintf("%s left, %d/%d pending", time.Until(v.Grace.Until).Round(time.Second), v.Grace.Pending, v.Grace.Clients)
		}
		notify := "-"
		if n := v.Notify; n != nil {
			notify = fmt.Sprintf("%d done, %d failed, %d pending", n.Done, n.Failed, n.Pending)
		}
		fmt.Fprintf(w, "%s\t%s\t%s\t%d\t%s\t%d\t%d\t%d\t%d\t%d\t%s\n", v.VIP, v.Name, v.State, v.Epoch, grace, v.NSMState,
			v.Locks, v.Blocked, v.Shares, v.Clients, notify)
	}
}

func (a *app) vipCmd() *cobra.Command {
	vip := group("vip", "List, take over and release virtual servers")
	vip.AddCommand(&cobra.Command{
		Use:   "list",
		Short: "List the virtual servers known on this node",
		Args:  cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			ctx, cancel := a.ctx()
			defer cancel()
			vips, err := a.client().VIPs(ctx)
			if err != nil {
				return err
			}
			return a.show(vips, func(w *tabwriter.Writer) { vipTable(w, vips) })
		},
	})
	vip.AddCommand(&cobra.Command{
		Use:   "status VIP",
		Short: "Show one virtual server; exit 7 when it is not served here",
		Args:  cobra.ExactArgs(1),
		RunE: a.onVIP(func(ctx context.Context, c *hacallout.Client, addr netip.Addr) error {
			v, err := c.VIP(ctx, addr)
			var ae *hacallout.APIError
			if errors.As(err, &ae) && ae.Status == 404 {
				fmt.Fprintf(a.out, "%s is not served here\n", addr)
				return &exitError{code: exitNotServed}
			}
			if err != nil {
				return err
			}
			if err := a.show(v, func(w *tabwriter.Writer) { vipTable(w, []hacallout.VIPStatus{v}) }); err != nil {
				return err
			}
			if v.State != "serving" {
				return &exitError{code: exitNotServed}
			}
			return nil
		}),
	})
	var name string
	takeover := &cobra.Command{
		Use:   "takeover VIP",
		Short: "Start serving a virtual server here (planned: from its release snapshot; else with grace and SM_NOTIFY)",
		Args:  cobra.ExactArgs(1),
		RunE: a.onVIP(func(ctx context.Context, c *hacallout.Client, addr netip.Addr) error {
			r, err := c.Takeover(ctx, addr, name)
			if err != nil {
				return err
			}
			return a.show(r, func(w *tabwriter.Writer) {
				switch {
				case r.Already:
					fmt.Fprintf(w, "%s is already served here (epoch %d)\n", r.VIP, r.Epoch)
				case r.Planned && r.GraceResumed:
					fmt.Fprintf(w, "took over %s (epoch %d) from its snapshot: %d locks, %d blocked, %d shares; its grace period goes on until %s, notifying %d clients (%s)\n",
						r.VIP, r.Epoch, r.Locks, r.Waiters, r.Shares, r.GraceUntil.Local().Format(time.TimeOnly), r.Notifying, time.Duration(r.Took))
				case r.Planned:
					fmt.Fprintf(w, "took over %s (epoch %d) from its snapshot: %d locks, %d blocked, %d shares; no grace period (%s)\n",
						r.VIP, r.Epoch, r.Locks, r.Waiters, r.Shares, time.Duration(r.Took))
				default:
					fmt.Fprintf(w, "took over %s (epoch %d) after an unplanned stop: NSM state %d, notifying %d clients, grace until %s (%s)\n",
						r.VIP, r.Epoch, r.NSMState, r.Notifying, r.GraceUntil.Local().Format(time.TimeOnly), time.Duration(r.Took))
				}
			})
		}),
	}
	takeover.Flags().StringVar(&name, "name", "", "the virtual server's name in callbacks (default: configured, or its address)")
	vip.AddCommand(takeover)
	var noSnapshot bool
	rel := &cobra.Command{
		Use:   "release VIP",
		Short: "Stop serving a virtual server here, handing its locks to the next node in a snapshot",
		Args:  cobra.ExactArgs(1),
		RunE: a.onVIP(func(ctx context.Context, c *hacallout.Client, addr netip.Addr) error {
			r, err := c.Release(ctx, addr, !noSnapshot)
			if err != nil {
				return err
			}
			return a.show(r, func(w *tabwriter.Writer) {
				if r.Already {
					fmt.Fprintf(w, "%s is not served here\n", r.VIP)
					return
				}
				fmt.Fprintf(w, "released %s (epoch %d): %d locks, %d blocked, %d shares; snapshot %v (%s)\n",
					r.VIP, r.Epoch, r.Locks, r.Waiters, r.Shares, r.Snapshot, time.Duration(r.Took))
				if r.GraceLeft > 0 && r.Snapshot {
					fmt.Fprintf(w, "in grace: %s left, %d clients still to reclaim, handed over with the snapshot\n",
						time.Duration(r.GraceLeft).Round(time.Millisecond), r.GracePending)
				}
			})
		}),
	}
	rel.Flags().BoolVar(&noSnapshot, "no-snapshot", false, "drop the locks without a snapshot: the next takeover goes through grace and reclaim")
	vip.AddCommand(rel)
	grace := group("grace", "Start or end a virtual server's grace period")
	for _, action := range []string{"start", "end"} {
		short := "Start a full grace period (only reclaims served until it ends)"
		if action == "end" {
			short = "End the grace period now"
		}
		grace.AddCommand(&cobra.Command{
			Use:   action + " VIP",
			Short: short,
			Args:  cobra.ExactArgs(1),
			RunE: a.onVIP(func(ctx context.Context, c *hacallout.Client, addr netip.Addr) error {
				v, err := c.Grace(ctx, addr, action)
				if err != nil {
					return err
				}
				return a.show(v, func(w *tabwriter.Writer) { vipTable(w, []hacallout.VIPStatus{v}) })
			}),
		})
	}
	vip.AddCommand(grace)
	vip.AddCommand(&cobra.Command{
		Use:   "notify VIP",
		Short: "Send SM_NOTIFY with a new NSM state to every client of a virtual server (they reclaim; their locks stay)",
		Args:  cobra.ExactArgs(1),
		RunE: a.onVIP(func(ctx context.Context, c *hacallout.Client, addr netip.Addr) error {
			v, err := c.Notify(ctx, addr)
			if err != nil {
				return err
			}
			return a.show(v, func(w *tabwriter.Writer) { vipTable(w, []hacallout.VIPStatus{v}) })
		}),
	})
	return vip
}

func (a *app) locksCmd() *cobra.Command {
	locks := group("locks", "Show locks")
	var vip, client, fh string
	var limit int
	list := &cobra.Command{
		Use:   "list",
		Short: "List held locks and blocked requests (owner, range, mode, age)",
		Args:  cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			ctx, cancel := a.ctx()
			defer cancel()
			r, err := a.client().Locks(ctx, vip, client, fh, limit)
			if err != nil {
				return err
			}
			return a.show(r, func(w *tabwriter.Writer) {
				fmt.Fprintln(w, "VIP\tNODE\tCLIENT\tCALLER\tSVID\tFILE HANDLE\tRANGE\tMODE\tAGE")
				for _, l := range r.Locks {
					end := "EOF"
					if l.End != 0 {
						end = fmt.Sprint(l.End)
					}
					mode := "read"
					if l.Exclusive {
						mode = "write"
					}
					if l.Blocked {
						mode += " (blocked)"
					}
					age := "-"
					if !l.Since.IsZero() {
						age = time.Since(l.Since).Round(time.Second).String()
					}
					node := l.Node
					if node == "" {
						node = "-"
					}
					fmt.Fprintf(w, "%s\t%s\t%s\t%s\t%d\t%s\t[%d,%s)\t%s\t%s\n", l.VIP, node, l.Client, l.Caller, l.SVID, l.FH, l.Start, end, mode, age)
				}
				if r.Truncated {
					fmt.Fprintln(w, "(more: raise --limit)")
				}
			})
		},
	}
	list.Flags().StringVar(&vip, "vip", "", "only locks held through this virtual server")
	list.Flags().StringVar(&client, "client", "", "only locks of this client address")
	list.Flags().StringVar(&fh, "fh", "", "only locks of this file handle (hex)")
	list.Flags().IntVar(&limit, "limit", 10000, "list at most this many")
	locks.AddCommand(list)
	return locks
}

func (a *app) clusterCmd() *cobra.Command {
	cluster := group("cluster", "Show the nodes that share the lock backend (--backend etcd)")
	cluster.AddCommand(&cobra.Command{
		Use:   "status",
		Short: "Show the nodes, their leases, the virtual servers with owner and epoch, and the etcd endpoints' health",
		Args:  cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			ctx, cancel := a.ctx()
			defer cancel()
			st, err := a.client().Cluster(ctx)
			if err != nil {
				return err
			}
			return a.show(st, func(w *tabwriter.Writer) {
				fenced := ""
				if st.SelfFenced {
					fenced = " — SELF-FENCED: serves nothing until restarted"
				}
				fmt.Fprintf(w, "this node %s (%s, prefix %s): lease holds for %s%s\n\n", st.Node, st.Backend, st.Prefix,
					time.Until(st.LeaseDeadline).Round(time.Millisecond), fenced)
				if st.Error != "" {
					fmt.Fprintf(w, "the store cannot be read: %s\n\n", st.Error)
				}
				fmt.Fprintln(w, "NODE\tUP\tLEASE TTL")
				for _, n := range st.Nodes {
					fmt.Fprintf(w, "%s\t%s\t%ds\n", n.Name, time.Since(n.Started).Round(time.Second), n.LeaseTTL)
				}
				fmt.Fprintln(w, "\nVIP\tOWNER\tEPOCH\tHANDOFF")
				for _, v := range st.VirtualServers {
					owner := v.Owner
					if owner == "" {
						owner = "(nobody)"
					}
					fmt.Fprintf(w, "%s\t%s\t%d\t%v\n", v.VIP, owner, v.Epoch, v.Handoff)
				}
				fmt.Fprintln(w, "\nENDPOINT\tHEALTHY\tLEADER\tVERSION\tDB SIZE\tTOOK\tERROR")
				for _, e := range st.Endpoints {
					fmt.Fprintf(w, "%s\t%v\t%v\t%s\t%d\t%s\t%s\n", e.Endpoint, e.Healthy, e.Leader, e.Version, e.DBSize,
						time.Duration(e.Took).Round(time.Microsecond), e.Error)
				}
			})
		},
	})
	return cluster
}

func (a *app) clientsCmd() *cobra.Command {
	clients := group("clients", "Show client hosts")
	var vip string
	list := &cobra.Command{
		Use:   "list",
		Short: "List client hosts per virtual server: monitored, what they hold, their notification",
		Args:  cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			ctx, cancel := a.ctx()
			defer cancel()
			r, err := a.client().Clients(ctx, vip)
			if err != nil {
				return err
			}
			return a.show(r, func(w *tabwriter.Writer) {
				fmt.Fprintln(w, "VIP\tCLIENT\tCALLERS\tMONITORED\tLOCKS\tBLOCKED\tSHARES\tNOTIFY")
				for _, c := range r {
					notify := c.Notify
					if notify == "" {
						notify = "-"
					}
					fmt.Fprintf(w, "%s\t%s\t%s\t%v\t%d\t%d\t%d\t%s\n", c.VIP, c.Client, strings.Join(c.Callers, ","), c.Monitored,
						c.Locks, c.Blocked, c.Shares, notify)
				}
			})
		},
	}
	list.Flags().StringVar(&vip, "vip", "", "only this virtual server's clients")
	clients.AddCommand(list)
	return clients
}

func (a *app) clientCmd() *cobra.Command {
	client := group("client", "Act on one client host")
	var vip string
	drop := &cobra.Command{
		Use:   "drop CLIENT",
		Short: "Drop a client host's locks, blocked requests and shares, as if it had rebooted",
		Args:  cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			if _, err := parseVIP(args[0]); err != nil {
				return err
			}
			ctx, cancel := a.ctx()
			defer cancel()
			r, err := a.client().DropClient(ctx, vip, args[0])
			if err != nil {
				return err
			}
			return a.show(r, func(w *tabwriter.Writer) {
				fmt.Fprintf(w, "dropped the state of %s (%d host records)\n", r.Client, r.Hosts)
			})
		},
	}
	drop.Flags().StringVar(&vip, "vip", "", "only through this virtual server")
	client.AddCommand(drop)
	return client
}

func (a *app) exportCmd() *cobra.Command {
	return &cobra.Command{
		Use:   "export-sm VIP DIR",
		Short: "Write a virtual server's monitor list in nfs-utils' sm/ format",
		Long: `export-sm writes the clients of one virtual server — those it monitors and
those still waiting for its last restart's SM_NOTIFY — and its NSM state
number to DIR in nfs-utils' format (DIR/sm/, DIR/sm.bak/, DIR/state), so
that nfs-utils' sm-notify can notify them in nlmd's place:

    nlmadmin export-sm 192.0.2.10 /tmp/vip-sm
    sm-notify -f -n -P /tmp/vip-sm

Each record names the virtual server as my_name, which sm-notify sends as
mon_name. -n sends the stored state number as it is; without it sm-notify
bumps it by 2. sm-notify -v VIP also sends from the virtual server's
address, but needs a reverse DNS name for it and sends that name instead.
export-sm reads the state directory directly and works whether nlmd runs
or not.`,
		Args: cobra.ExactArgs(2),
		RunE: func(cmd *cobra.Command, args []string) error {
			vip, err := parseVIP(args[0])
			if err != nil {
				return err
			}
			if _, err := os.Stat(nsm.VIPDir(a.stateDir, vip.String())); err != nil {
				if errors.Is(err, os.ErrNotExist) {
					return fmt.Errorf("no state for virtual server %v under %s", vip, a.stateDir)
				}
				return err
			}
			d, err := nsm.OpenDir(a.stateDir, vip)
			if err != nil {
				return err
			}
			_, bad := d.Records()
			for _, e := range bad {
				fmt.Fprintln(cmd.ErrOrStderr(), "nlmadmin: skipped:", e)
			}
			n, err := d.ExportSM(args[1])
			if err != nil {
				return err
			}
			state, _ := d.State()
			fmt.Fprintf(a.out, "exported %d records of %v (state %d) to %s\n", n, vip, state, args[1])
			return nil
		},
	}
}

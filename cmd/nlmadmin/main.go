// Command nlmadmin is nlmha's admin tool.
//
// This first version works on the state directory directly, so that its
// commands serve when nlmd is down — which is when the fallback they offer
// is needed.
package main

import (
	"errors"
	"fmt"
	"io"
	"net/netip"
	"os"

	"github.com/spf13/cobra"

	"github.com/nlmha/nlmha/nsm"
)

func main() {
	if err := newRoot(os.Stdout, os.Stderr).Execute(); err != nil {
		fmt.Fprintln(os.Stderr, "nlmadmin:", err)
		os.Exit(1)
	}
}

func newRoot(stdout, stderr io.Writer) *cobra.Command {
	root := &cobra.Command{
		Use:           "nlmadmin",
		Short:         "Administer nlmd, the NFSv3 lock failover server",
		SilenceUsage:  true,
		SilenceErrors: true,
	}
	root.SetOut(stdout)
	root.SetErr(stderr)
	stateDir := root.PersistentFlags().String("state-dir", "/var/lib/nlmha", "nlmd's state directory")
	root.AddCommand(&cobra.Command{
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
			vip, err := netip.ParseAddr(args[0])
			if err != nil {
				return fmt.Errorf("VIP %q: %w", args[0], err)
			}
			if _, err := os.Stat(nsm.VIPDir(*stateDir, vip.Unmap().String())); err != nil {
				if errors.Is(err, os.ErrNotExist) {
					return fmt.Errorf("no state for virtual server %v under %s", vip, *stateDir)
				}
				return err
			}
			d, err := nsm.OpenDir(*stateDir, vip)
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
			fmt.Fprintf(cmd.OutOrStdout(), "exported %d records of %v (state %d) to %s\n", n, vip, state, args[1])
			return nil
		},
	})
	return root
}

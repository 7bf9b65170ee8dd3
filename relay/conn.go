package relay

import (
	"context"
	"fmt"
	"net"
	"strconv"
	"strings"
	"syscall"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"
	"github.com/jackc/pgx/v5/pgxpool"
)

// ConfigurePool prepares a pool configuration for the relay: every
// connection of the pool gets the settings of prepareConnConfig. Use it on
// the pool you pass to New (the binary does); the relay's own dedicated
// connections (ownership, wake-up) are prepared by New either way.
func ConfigurePool(pc *pgxpool.Config, cfg Config) {
	prepareConnConfig(pc.ConnConfig, cfg)
}

// prepareConnConfig is the one place where a relay connection is set up; it
// changes cc in place.
//
// Keepalives and a user timeout, derived from OUTBOX_OWNER_LEASE, on both
// ends of every connection: a partitioned owner's session then dies within
// about the lease on the server (which frees its advisory locks for a
// standby), and its own connections fail within about the lease too (which
// stops its workers), instead of after the kernel defaults (two hours and
// more). A frozen owner (SIGSTOP, a VM pause) still answers keepalives from
// its kernel: the lease in <table>_owner covers that case.
func prepareConnConfig(cc *pgx.ConnConfig, cfg Config) {
	lease := cfg.ownerLease()
	idle := max(time.Second, (lease / 2).Truncate(time.Second))
	interval := max(time.Second, (lease / 6).Truncate(time.Second))
	const probes = 3

	// Client side: the socket options of every connection the relay dials.
	d := &net.Dialer{
		KeepAliveConfig: net.KeepAliveConfig{Enable: true, Idle: idle, Interval: interval, Count: probes},
		Control: func(network, _ string, c syscall.RawConn) error {
			if !strings.HasPrefix(network, "tcp") {
				return nil // a Unix socket: no TCP options
			}
			return setTCPUserTimeout(c, lease)
		},
	}
	cc.DialFunc = d.DialContext

	// Server side: the same for the server's end of the session. Set after
	// connecting rather than as startup parameters, which connection
	// poolers refuse.
	settings := []serverSetting{
		{"tcp_keepalives_idle", strconv.Itoa(int(idle / time.Second))},
		{"tcp_keepalives_interval", strconv.Itoa(int(interval / time.Second))},
		{"tcp_keepalives_count", strconv.Itoa(probes)},
		{"tcp_user_timeout", strconv.FormatInt(lease.Milliseconds(), 10)},
	}
	prev := cc.AfterConnect
	cc.AfterConnect = func(ctx context.Context, pc *pgconn.PgConn) error {
		if prev != nil {
			if err := prev(ctx, pc); err != nil {
				return err
			}
		}
		return applySettings(ctx, pc, settings)
	}
}

// serverSetting is one session setting the relay sets on every connection.
type serverSetting struct{ name, value string }

// applySettings sets every setting in one round trip. The TCP settings are
// best effort: a server that cannot set one (an old version, a platform
// without TCP_USER_TIMEOUT) keeps its default, and the lease still bounds
// fail-over.
func applySettings(ctx context.Context, pc *pgconn.PgConn, settings []serverSetting) error {
	var b strings.Builder
	for _, s := range settings {
		fmt.Fprintf(&b, "SET %s = %s;", s.name, quoteLiteral(s.value))
	}
	if err := pc.Exec(ctx, b.String()).Close(); err == nil {
		return nil
	}
	for _, s := range settings {
		if err := pc.Exec(ctx, "SET "+s.name+" = "+quoteLiteral(s.value)).Close(); err != nil && pc.IsClosed() {
			return fmt.Errorf("set %s: %w", s.name, err)
		}
	}
	return nil
}

func quoteLiteral(s string) string { return "'" + strings.ReplaceAll(s, "'", "''") + "'" }

package integration

import (
	"context"
	"net"
	"testing"
	"time"

	"github.com/jackc/pgx/v5/pgxpool"
	"golang.org/x/sys/unix"

	"github.com/outbox-relay/outbox-relay/integration/testenv"
	"github.com/outbox-relay/outbox-relay/relay"
)

// TestRelayConnectionsDetectADeadPeerWithinTheLease: a pool prepared for
// the relay (relay.ConfigurePool, what the binary does) sets TCP keepalives
// and a user timeout derived from OUTBOX_OWNER_LEASE on both ends of every
// connection, so that a partitioned owner's session dies within about the
// lease rather than after the kernel's two hours.
func TestRelayConnectionsDetectADeadPeerWithinTheLease(t *testing.T) {
	ctx := context.Background()
	db := testenv.NewDB(t)
	// TCP without TLS, so that the test can read the socket's options.
	pc, err := pgxpool.ParseConfig(db.URL + "?sslmode=disable&host=127.0.0.1")
	if err != nil {
		t.Fatal(err)
	}
	cfg := relay.Config{OwnerLease: 6 * time.Second}
	relay.ConfigurePool(pc, cfg)
	pool, err := pgxpool.NewWithConfig(ctx, pc)
	if err != nil {
		t.Fatal(err)
	}
	defer pool.Close()
	conn, err := pool.Acquire(ctx)
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Release()

	// Server side: the session's settings.
	want := map[string]string{"tcp_keepalives_idle": "3", "tcp_keepalives_interval": "1", "tcp_keepalives_count": "3", "tcp_user_timeout": "6000"}
	for name, v := range want {
		var got string
		if err := conn.QueryRow(ctx, "SHOW "+name).Scan(&got); err != nil {
			t.Fatal(err)
		}
		if got != v {
			t.Errorf("server side %s = %s, want %s", name, got, v)
		}
	}

	// Client side: the socket's options.
	tc, ok := conn.Conn().PgConn().Conn().(*net.TCPConn)
	if !ok {
		t.Fatalf("the connection is a %T, want a TCP connection", conn.Conn().PgConn().Conn())
	}
	raw, err := tc.SyscallConn()
	if err != nil {
		t.Fatal(err)
	}
	opts := map[string]struct {
		level, opt, want int
	}{
		"SO_KEEPALIVE":     {unix.SOL_SOCKET, unix.SO_KEEPALIVE, 1},
		"TCP_KEEPIDLE":     {unix.IPPROTO_TCP, unix.TCP_KEEPIDLE, 3},
		"TCP_KEEPINTVL":    {unix.IPPROTO_TCP, unix.TCP_KEEPINTVL, 1},
		"TCP_KEEPCNT":      {unix.IPPROTO_TCP, unix.TCP_KEEPCNT, 3},
		"TCP_USER_TIMEOUT": {unix.IPPROTO_TCP, unix.TCP_USER_TIMEOUT, 6000},
	}
	for name, o := range opts {
		var got int
		var gerr error
		if err := raw.Control(func(fd uintptr) { got, gerr = unix.GetsockoptInt(int(fd), o.level, o.opt) }); err != nil {
			t.Fatal(err)
		}
		if gerr != nil {
			t.Fatalf("getsockopt %s: %v", name, gerr)
		}
		if got != o.want {
			t.Errorf("client side %s = %d, want %d", name, got, o.want)
		}
	}
}

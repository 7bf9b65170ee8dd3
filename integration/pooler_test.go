package integration

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/url"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"

	"github.com/outbox-relay/outbox-relay/integration/testenv"
	"github.com/outbox-relay/outbox-relay/relay"
)

// startPgBouncer runs PgBouncer in front of the test server in the given
// pool mode and returns db's URL through it. Server connections are handed
// out round robin, as under load, so that consecutive transactions of one
// client land in different server sessions.
func startPgBouncer(t *testing.T, db *testenv.DB, mode string) string {
	t.Helper()
	bin, err := exec.LookPath("pgbouncer")
	if err != nil {
		bin = "/usr/sbin/pgbouncer"
		if _, serr := os.Stat(bin); serr != nil {
			t.Fatalf("pgbouncer is not installed (apt-get install pgbouncer; .ci/run installs it): %v", err)
		}
	}
	u, err := url.Parse(db.URL)
	if err != nil {
		t.Fatal(err)
	}
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	port := ln.Addr().(*net.TCPAddr).Port
	ln.Close()
	dir, err := os.MkdirTemp("", "outbox-pgbouncer-")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(dir) })
	if err := os.Chmod(dir, 0o755); err != nil { // PgBouncer runs as nobody
		t.Fatal(err)
	}
	users := filepath.Join(dir, "users.txt")
	if err := os.WriteFile(users, []byte(`"`+u.User.Username()+`" ""`+"\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	ini := filepath.Join(dir, "pgbouncer.ini")
	conf := fmt.Sprintf(`[databases]
* = host=%s port=%s
[pgbouncer]
listen_addr = 127.0.0.1
listen_port = %d
unix_socket_dir =
auth_type = trust
auth_file = %s
pool_mode = %s
server_round_robin = 1
default_pool_size = 10
max_client_conn = 100
ignore_startup_parameters = extra_float_digits
`, u.Hostname(), u.Port(), port, users, mode)
	if err := os.WriteFile(ini, []byte(conf), 0o644); err != nil {
		t.Fatal(err)
	}
	var out strings.Builder
	var mu sync.Mutex
	cmd := exec.Command(bin, ini)
	if os.Geteuid() == 0 {
		cmd.Args = []string{bin, "-u", "nobody", ini}
	}
	cmd.Stdout = &lockedWriter{w: &out, mu: &mu}
	cmd.Stderr = cmd.Stdout
	if err := cmd.Start(); err != nil {
		t.Fatalf("start pgbouncer: %v", err)
	}
	t.Cleanup(func() {
		_ = cmd.Process.Kill()
		_ = cmd.Wait()
	})
	via := *u
	via.Host = fmt.Sprintf("127.0.0.1:%d", port)
	// PgBouncer 1.18 keeps no prepared statements across transactions.
	via.RawQuery = "sslmode=disable&default_query_exec_mode=exec"
	ctx := context.Background()
	for deadline := time.Now().Add(15 * time.Second); ; {
		c, err := pgx.Connect(ctx, via.String())
		if err == nil {
			c.Close(ctx)
			break
		}
		if time.Now().After(deadline) {
			mu.Lock()
			defer mu.Unlock()
			t.Fatalf("pgbouncer does not answer: %v\n%s", err, out.String())
		}
		time.Sleep(50 * time.Millisecond)
	}
	// Several server sessions, so that round robin has some to turn over.
	var conns []*pgx.Conn
	for range 8 {
		c, err := pgx.Connect(ctx, via.String())
		if err != nil {
			t.Fatal(err)
		}
		conns = append(conns, c)
	}
	var txs []pgx.Tx
	for _, c := range conns {
		tx, err := c.Begin(ctx)
		if err != nil {
			t.Fatal(err)
		}
		if _, err := tx.Exec(ctx, `SELECT 1`); err != nil {
			t.Fatal(err)
		}
		txs = append(txs, tx)
	}
	for i, tx := range txs {
		_ = tx.Commit(ctx)
		conns[i].Close(ctx)
	}
	return via.String()
}

type lockedWriter struct {
	w  *strings.Builder
	mu *sync.Mutex
}

func (l *lockedWriter) Write(p []byte) (int, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.w.Write(p)
}

// TestTransactionPoolerIsRefused: behind a pooler in transaction mode
// (PgBouncer's pool_mode=transaction), consecutive statements of one client
// run in different server sessions, so session advisory locks (shard
// ownership) and LISTEN silently stop meaning anything: two relays could own
// one shard. The relay must notice that its session does not hold the lock
// it just took and stop, saying it needs a direct or session-pooled
// connection; and must run normally behind a pooler in session mode.
func TestTransactionPoolerIsRefused(t *testing.T) {
	db := testenv.NewDB(t)
	k := testenv.NewKafka(t, 1, "payments")
	ids := db.Insert(t, "payments", 5, nil)

	cfg := testenv.RelayConfig(db, k)
	// startIdentityRelay and runUntilOwned give the relay a pool of its own
	// on URL; the test's checks use db's direct pool.
	cfg.DatabaseURL = startPgBouncer(t, db, "transaction")
	ir := startIdentityRelay(t, &testenv.DB{URL: cfg.DatabaseURL, Pool: db.Pool, Table: db.Table}, cfg)
	// The check runs at start and on every tick; by chance a statement may
	// land in the session holding the lock, so the relay may own the shard
	// for a tick before it stops.
	select {
	case err := <-ir.done:
		ir.done <- err // for the cleanup
		if !errors.Is(err, relay.ErrSessionNeeded) || !strings.Contains(err.Error(), "pooler") || !strings.Contains(err.Error(), "session mode") {
			t.Fatalf("behind a transaction-mode pooler Run returned %v, want ErrSessionNeeded saying to connect directly or through a pooler in session mode", err)
		}
	case <-time.After(20 * time.Second):
		t.Fatalf("the relay still runs behind a transaction-mode pooler after 20s (owns %v shards, %d of %d rows published): "+
			"its session advisory locks mean nothing there", ir.owned(t), len(ids)-db.Unpublished(t), len(ids))
	}

	// In session mode the relay works.
	cfg.DatabaseURL = startPgBouncer(t, db, "session")
	runUntilOwned(t, &testenv.DB{URL: cfg.DatabaseURL, Pool: db.Pool, Table: db.Table}, cfg, 1)
	testenv.CheckExactlyOnce(t, ids, k.NewConsumer(t, "payments").WaitFor(t, len(ids), 30*time.Second))
}

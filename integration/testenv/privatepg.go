package testenv

import (
	"context"
	"fmt"
	"net"
	"os"
	"os/exec"
	"os/user"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
)

// PrivatePostgres is a PostgreSQL server of the test's own, for tests that
// crash, restart or reconfigure the server: they must never touch the
// shared one. It runs as the operating system user postgres (initdb refuses
// root) in a temporary directory, on a free port, and is stopped and removed
// with the test.
type PrivatePostgres struct {
	tb   testing.TB
	dir  string
	data string
	port int
	args []string
}

// PGBinEnv names the environment variable that points private servers at
// a directory of PostgreSQL server programs (initdb, pg_ctl, postgres) of
// the major under test, such as those .ci/postgres-majors caches. Unset,
// they come from PATH or Debian's /usr/lib/postgresql/<version>/bin.
const PGBinEnv = "OUTBOX_TEST_PG_BIN"

// lookPGBin finds a PostgreSQL server program: in $OUTBOX_TEST_PG_BIN when
// it is set (and nowhere else: a program of another major would not do),
// else on PATH or in Debian's /usr/lib/postgresql/<version>/bin.
func lookPGBin(name string) (string, error) {
	if dir := os.Getenv(PGBinEnv); dir != "" {
		p := filepath.Join(dir, name)
		if _, err := os.Stat(p); err != nil {
			return "", fmt.Errorf("%s is not in %s=%s: %w", name, PGBinEnv, dir, err)
		}
		return p, nil
	}
	if p, err := exec.LookPath(name); err == nil {
		return p, nil
	}
	matches, _ := filepath.Glob("/usr/lib/postgresql/*/bin/" + name)
	if len(matches) == 0 {
		return "", fmt.Errorf("%s not found on PATH or in /usr/lib/postgresql/*/bin: install the PostgreSQL server package, or set %s", name, PGBinEnv)
	}
	return matches[len(matches)-1], nil
}

// pgBin is lookPGBin that fails the test when the program is missing.
func pgBin(tb testing.TB, name string) string {
	tb.Helper()
	p, err := lookPGBin(name)
	if err != nil {
		tb.Fatal(err)
	}
	return p
}

// StartPrivatePostgres runs initdb and starts the server with the given
// extra settings (name=value, passed as -c options).
func StartPrivatePostgres(tb testing.TB, settings ...string) *PrivatePostgres {
	tb.Helper()
	dir, err := os.MkdirTemp("", "outbox-pg-")
	if err != nil {
		tb.Fatal(err)
	}
	tb.Cleanup(func() { os.RemoveAll(dir) })
	if err := os.Chmod(dir, 0o755); err != nil {
		tb.Fatal(err)
	}
	pg := &PrivatePostgres{tb: tb, dir: dir, data: filepath.Join(dir, "data"), port: freePort(tb)}
	if os.Geteuid() == 0 {
		u, err := user.Lookup("postgres")
		if err != nil {
			tb.Fatalf("private PostgreSQL needs the user postgres when the tests run as root: %v", err)
		}
		uid, _ := strconv.Atoi(u.Uid)
		gid, _ := strconv.Atoi(u.Gid)
		if err := os.Chown(dir, uid, gid); err != nil {
			tb.Fatal(err)
		}
	}
	pg.run("initdb", "-D", pg.data, "-A", "trust", "-U", "postgres", "--no-sync")
	pg.args = []string{"-p", strconv.Itoa(pg.port), "-k", dir, "-c", "listen_addresses=127.0.0.1"}
	for _, s := range settings {
		pg.args = append(pg.args, "-c", s)
	}
	pg.Start()
	tb.Cleanup(func() { pg.stop("fast") })
	return pg
}

func freePort(tb testing.TB) int {
	tb.Helper()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		tb.Fatal(err)
	}
	defer l.Close()
	return l.Addr().(*net.TCPAddr).Port
}

// run runs a PostgreSQL program, as postgres when the tests run as root.
func (pg *PrivatePostgres) run(name string, args ...string) string {
	pg.tb.Helper()
	bin := pgBin(pg.tb, name)
	var cmd *exec.Cmd
	if os.Geteuid() == 0 {
		cmd = exec.Command("runuser", append([]string{"-u", "postgres", "--", bin}, args...)...)
	} else {
		cmd = exec.Command(bin, args...)
	}
	cmd.Dir = pg.dir
	out, err := cmd.CombinedOutput()
	if err != nil {
		pg.tb.Fatalf("%s %s: %v\n%s", name, strings.Join(args, " "), err, out)
	}
	return string(out)
}

// URL is the connection URL of database db on the private server as user.
func (pg *PrivatePostgres) URL(user, db string) string {
	return fmt.Sprintf("postgres://%s@127.0.0.1:%d/%s", user, pg.port, db)
}

// Start starts the server (again) and waits until it accepts connections.
func (pg *PrivatePostgres) Start() {
	pg.tb.Helper()
	pg.run("pg_ctl", "-D", pg.data, "-l", filepath.Join(pg.dir, "server.log"), "-w", "-t", "60", "-o", strings.Join(pg.args, " "), "start")
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	for {
		c, err := pgx.Connect(ctx, pg.URL("postgres", "postgres"))
		if err == nil {
			c.Close(ctx)
			return
		}
		if ctx.Err() != nil {
			pg.tb.Fatalf("private PostgreSQL did not come up: %v", err)
		}
		time.Sleep(100 * time.Millisecond)
	}
}

// Crash stops the server as a power cut would: immediate shutdown, no
// checkpoint; what was committed but not flushed to the WAL is lost.
func (pg *PrivatePostgres) Crash() { pg.stop("immediate") }

func (pg *PrivatePostgres) stop(mode string) {
	bin := pgBin(pg.tb, "pg_ctl")
	args := []string{"-D", pg.data, "-m", mode, "-w", "stop"}
	var cmd *exec.Cmd
	if os.Geteuid() == 0 {
		cmd = exec.Command("runuser", append([]string{"-u", "postgres", "--", bin}, args...)...)
	} else {
		cmd = exec.Command(bin, args...)
	}
	_ = cmd.Run() // already stopped is fine
}

// Port is the server's port.
func (pg *PrivatePostgres) Port() int { return pg.port }

// Standby is a physical streaming standby of a private primary.
type Standby struct {
	*PrivatePostgres
	// Name is its application_name, as the primary's
	// pg_stat_replication and synchronous_standby_names know it.
	Name    string
	stalled int
}

// StartStandby makes a streaming standby of pg named name (its
// application_name) with pg_basebackup (or, when $OUTBOX_TEST_PG_BIN has
// none, with the low-level backup functions and a file copy), starts it and waits until the
// primary lists it as streaming. The primary needs nothing but its
// defaults (wal_level=replica, max_wal_senders, initdb's replication line
// in pg_hba.conf). It is stopped and removed with the test.
func (pg *PrivatePostgres) StartStandby(tb testing.TB, name string, settings ...string) *Standby {
	tb.Helper()
	dir, err := os.MkdirTemp("", "outbox-pg-standby-")
	if err != nil {
		tb.Fatal(err)
	}
	tb.Cleanup(func() { os.RemoveAll(dir) })
	if err := os.Chmod(dir, 0o755); err != nil {
		tb.Fatal(err)
	}
	sb := &PrivatePostgres{tb: tb, dir: dir, data: filepath.Join(dir, "data"), port: freePort(tb)}
	if os.Geteuid() == 0 {
		u, err := user.Lookup("postgres")
		if err != nil {
			tb.Fatal(err)
		}
		uid, _ := strconv.Atoi(u.Uid)
		gid, _ := strconv.Atoi(u.Gid)
		if err := os.Chown(dir, uid, gid); err != nil {
			tb.Fatal(err)
		}
	}
	if _, err := lookPGBin("pg_basebackup"); err == nil {
		sb.run("pg_basebackup", "-h", "127.0.0.1", "-p", strconv.Itoa(pg.port), "-U", "postgres", "-D", sb.data, "-X", "stream", "-c", "fast", "--no-sync")
	} else {
		// No pg_basebackup of this major ($OUTBOX_TEST_PG_BIN holds the
		// server programs only): the same backup by hand.
		copyBackup(tb, pg, sb.data)
	}
	conninfo := fmt.Sprintf("host=127.0.0.1 port=%d user=postgres application_name=%s", pg.port, name)
	if err := os.WriteFile(filepath.Join(sb.data, "standby.signal"), nil, 0o600); err != nil {
		tb.Fatal(err)
	}
	if os.Geteuid() == 0 {
		u, _ := user.Lookup("postgres")
		uid, _ := strconv.Atoi(u.Uid)
		gid, _ := strconv.Atoi(u.Gid)
		_ = os.Chown(filepath.Join(sb.data, "standby.signal"), uid, gid)
	}
	sb.args = []string{"-p", strconv.Itoa(sb.port), "-k", dir, "-c", "listen_addresses=127.0.0.1", "-c", "primary_conninfo='" + conninfo + "'", "-c", "hot_standby=on"}
	for _, s := range settings {
		sb.args = append(sb.args, "-c", s)
	}
	sb.Start()
	st := &Standby{PrivatePostgres: sb, Name: name}
	tb.Cleanup(func() { st.Resume(); sb.stop("immediate") })
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	c, err := pgx.Connect(ctx, pg.URL("postgres", "postgres"))
	if err != nil {
		tb.Fatal(err)
	}
	defer c.Close(context.Background())
	for {
		var n int
		if err := c.QueryRow(ctx, `SELECT count(*) FROM pg_stat_replication WHERE application_name = $1 AND state = 'streaming'`, name).Scan(&n); err != nil {
			tb.Fatal(err)
		}
		if n == 1 {
			return st
		}
		if ctx.Err() != nil {
			tb.Fatalf("standby %s did not start streaming", name)
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// Promote ends the standby's recovery: it becomes a primary on a new
// timeline, with the WAL it had received.
func (s *Standby) Promote() {
	s.tb.Helper()
	s.run("pg_ctl", "-D", s.data, "-w", "-t", "60", "promote")
}

// receiver is the pid of the standby's WAL receiver (0 when none runs).
func (s *Standby) receiver() int {
	s.tb.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	c, err := pgx.Connect(ctx, s.URL("postgres", "postgres"))
	if err != nil {
		s.tb.Fatal(err)
	}
	defer c.Close(context.Background())
	var pid int
	if err := c.QueryRow(ctx, `SELECT coalesce((SELECT pid FROM pg_stat_wal_receiver), 0)`).Scan(&pid); err != nil {
		s.tb.Fatal(err)
	}
	return pid
}

// Stall stops the standby's WAL receiver (SIGSTOP): it receives and
// flushes nothing until Resume, as a standby behind a slow network would.
func (s *Standby) Stall() {
	s.tb.Helper()
	pid := s.receiver()
	if pid == 0 {
		s.tb.Fatal("standby has no WAL receiver to stall")
	}
	if err := syscall.Kill(pid, syscall.SIGSTOP); err != nil {
		s.tb.Fatal(err)
	}
	s.stalled = pid
}

// Cut kills the standby's stalled WAL receiver (SIGKILL), as a lost
// connection would end it: what it had received and not flushed is gone.
// The standby's postmaster restarts its processes and recovers from the
// WAL it flushed.
func (s *Standby) Cut() {
	s.tb.Helper()
	if s.stalled == 0 {
		s.tb.Fatal("Cut needs a stalled standby")
	}
	_ = syscall.Kill(s.stalled, syscall.SIGKILL)
	s.stalled = 0
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	for {
		c, err := pgx.Connect(ctx, s.URL("postgres", "postgres"))
		if err == nil {
			c.Close(ctx)
			return
		}
		if ctx.Err() != nil {
			s.tb.Fatalf("standby did not come back after its WAL receiver was killed: %v", err)
		}
		time.Sleep(100 * time.Millisecond)
	}
}

// Stalled is the pid of the WAL receiver Stall stopped, 0 when none is.
func (s *Standby) Stalled() int { return s.stalled }

// Resume lets a stalled WAL receiver run again.
func (s *Standby) Resume() {
	if s.stalled != 0 {
		_ = syscall.Kill(s.stalled, syscall.SIGCONT)
		s.stalled = 0
	}
}

// SetHBA replaces the server's pg_hba.conf with lines and reloads it, for
// tests of authentication (initdb's default trusts every local client).
func (pg *PrivatePostgres) SetHBA(lines ...string) {
	pg.tb.Helper()
	path := filepath.Join(pg.data, "pg_hba.conf")
	if err := os.WriteFile(path, []byte(strings.Join(lines, "\n")+"\n"), 0o644); err != nil {
		pg.tb.Fatal(err)
	}
	pg.run("pg_ctl", "-D", pg.data, "reload")
}

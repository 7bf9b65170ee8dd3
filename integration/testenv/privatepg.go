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

// pgBin finds a PostgreSQL server program: on PATH, or in Debian's
// /usr/lib/postgresql/<version>/bin.
func pgBin(tb testing.TB, name string) string {
	tb.Helper()
	if p, err := exec.LookPath(name); err == nil {
		return p
	}
	matches, _ := filepath.Glob("/usr/lib/postgresql/*/bin/" + name)
	if len(matches) == 0 {
		tb.Fatalf("%s not found on PATH or in /usr/lib/postgresql/*/bin: install the PostgreSQL server package", name)
	}
	return matches[len(matches)-1]
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

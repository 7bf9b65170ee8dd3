package integration

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"

	"github.com/outbox-relay/outbox-relay/integration/testenv"
	"github.com/outbox-relay/outbox-relay/migrations"
	"github.com/outbox-relay/outbox-relay/outbox"
	"github.com/outbox-relay/outbox-relay/pgauth"
	"github.com/outbox-relay/outbox-relay/relay"
)

// TestDatabasePasswordRotationWhileTheRelayRuns: with
// OUTBOX_DATABASE_PASSWORD_FILE, the password changes (ALTER ROLE, and the
// file, as a Kubernetes secret rotation does) while the relay runs; every
// connection is then ended, so the relay's pool, its ownership and wake-up
// sessions and the writers all connect again: with the new password, read
// from the file, and no row is lost or published twice. The server is a
// private one that requires SCRAM passwords over TCP (the shared server
// trusts 127.0.0.1, where a password would prove nothing).
func TestDatabasePasswordRotationWhileTheRelayRuns(t *testing.T) {
	for _, source := range []string{"poll", "replication"} {
		t.Run(source, func(t *testing.T) { testPasswordRotation(t, source) })
	}
}

// testPasswordRotation runs the rotation with OUTBOX_SOURCE=source: with
// replication, the relay's replication connection reconnects too.
func testPasswordRotation(t *testing.T, source string) {
	ctx := context.Background()
	pg := testenv.StartPrivatePostgres(t, "password_encryption=scram-sha-256", "wal_level=logical")
	super, err := pgx.Connect(ctx, pg.URL("postgres", "postgres"))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { super.Close(context.Background()) })
	const role = "outbox_rotating"
	for _, q := range []string{
		`CREATE ROLE ` + role + ` LOGIN REPLICATION PASSWORD 'first-password-1'`,
		`CREATE DATABASE rotating OWNER ` + role,
	} {
		if _, err := super.Exec(ctx, q); err != nil {
			t.Fatalf("%s: %v", q, err)
		}
	}
	t.Cleanup(func() {
		c := context.Background()
		_, _ = super.Exec(c, `SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE usename = $1`, role)
		_, _ = super.Exec(c, `SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots WHERE database = 'rotating' AND NOT active`)
		for _, q := range []string{`DROP DATABASE IF EXISTS rotating WITH (FORCE)`, `DROP ROLE IF EXISTS ` + role} {
			if _, err := super.Exec(c, q); err != nil {
				t.Logf("%s: %v", q, err)
			}
		}
	})
	pg.SetHBA("local all all trust", "host all postgres 127.0.0.1/32 trust", "host all all 127.0.0.1/32 scram-sha-256")
	url := fmt.Sprintf("postgres://%s@127.0.0.1:%d/rotating", role, pg.Port())
	connectsWith := func(pw string) error {
		cctx, cancel := context.WithTimeout(ctx, 10*time.Second)
		defer cancel()
		cc, err := pgx.ParseConfig(url)
		if err != nil {
			t.Fatal(err)
		}
		cc.Password = pw
		c, err := pgx.ConnectConfig(cctx, cc)
		if err != nil {
			return err
		}
		return c.Close(cctx)
	}
	for deadline := time.Now().Add(10 * time.Second); connectsWith("") == nil; time.Sleep(100 * time.Millisecond) {
		if time.Now().After(deadline) {
			t.Fatal("the server still lets the role in without a password after the pg_hba.conf reload")
		}
	}

	file := filepath.Join(t.TempDir(), "password")
	writeSecret := func(pw string) { // as the kubelet does: a new file, renamed over the old
		if err := os.WriteFile(file+".new", []byte(pw+"\n"), 0o600); err != nil {
			t.Fatal(err)
		}
		if err := os.Rename(file+".new", file); err != nil {
			t.Fatal(err)
		}
	}
	writeSecret("first-password-1")
	auth := pgauth.Config{PasswordFile: file}

	writers, err := relay.OpenPoolAuth(ctx, url, 4, nil, auth)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(writers.Close)
	m, err := migrations.New(writers, "public", "outbox")
	if err != nil {
		t.Fatal(err)
	}
	if _, err := m.Up(ctx); err != nil {
		t.Fatalf("migrate: %v", err)
	}
	db := &testenv.DB{URL: url, Pool: writers, Table: outbox.DefaultTable}

	topic := testenv.RandomName("rotation-")
	k := testenv.NewKafka(t, 1, topic)
	cfg := testenv.RelayConfig(db, k)
	cfg.DatabaseAuth = auth
	if source == "replication" {
		cfg.Source, cfg.DeadLetterOrder = "replication", "skip"
	}
	if err := cfg.Validate(); err != nil {
		t.Fatal(err)
	}
	var logs testenv.SyncBuffer
	relayPool, err := relay.OpenPool(ctx, url, cfg.Shards+4, &cfg)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(relayPool.Close)
	run := testenv.StartRelay(t, &testenv.DB{URL: url, Pool: relayPool, Table: outbox.DefaultTable}, cfg, relay.WithLogger(testenv.Logger(t, &logs)))
	cons := k.NewConsumer(t, topic)

	var ids []int64
	waitPublished := func(what string) {
		t.Helper()
		if source == "replication" { // no marks: the records tell
			if seen := cons.WaitFor(t, len(ids), 60*time.Second); len(seen) < len(ids) {
				t.Fatalf("%s: %d records of %d rows after 60 s", what, len(seen), len(ids))
			}
			return
		}
		deadline := time.Now().Add(60 * time.Second)
		for db.Unpublished(t) > 0 {
			if time.Now().After(deadline) {
				t.Fatalf("%s: %d rows still unpublished after 60 s", what, db.Unpublished(t))
			}
			time.Sleep(200 * time.Millisecond)
		}
	}
	ids = db.Insert(t, topic, 30, []string{"a", "b"})
	waitPublished("before the rotation")

	// Rotate: the role's password, then the file.
	rotatedAt := time.Now()
	if _, err := super.Exec(ctx, `ALTER ROLE `+role+` PASSWORD 'second-password-2'`); err != nil {
		t.Fatal(err)
	}
	writeSecret("second-password-2")
	if err := connectsWith("first-password-1"); err == nil {
		t.Fatal("the old password still works after ALTER ROLE")
	}
	// Force new connections everywhere.
	var ended int
	if err := super.QueryRow(ctx, `SELECT count(*) FROM (SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE usename = $1) t`, role).Scan(&ended); err != nil {
		t.Fatal(err)
	}
	writers.Reset()
	ids = append(ids, db.Insert(t, topic, 30, []string{"a", "b"})...)
	waitPublished("after the rotation")
	ids = append(ids, db.Insert(t, topic, 30, []string{"a", "b"})...)
	waitPublished("after the rotation, again")

	var fresh int
	if err := super.QueryRow(ctx, `SELECT count(*) FROM pg_stat_activity WHERE usename = $1 AND backend_start > $2`, role, rotatedAt).Scan(&fresh); err != nil {
		t.Fatal(err)
	}
	t.Logf("ended %d sessions of %s at the rotation; %d sessions opened since, with the new password", ended, role, fresh)
	if ended < 3 || fresh < 2 {
		t.Fatalf("ended %d sessions and %d new ones opened: the test did not force the relay's connections to be made again", ended, fresh)
	}
	if source == "replication" {
		var walsenders int
		if err := super.QueryRow(ctx, `SELECT count(*) FROM pg_stat_activity WHERE usename = $1 AND backend_type = 'walsender' AND backend_start > $2`, role, rotatedAt).Scan(&walsenders); err != nil {
			t.Fatal(err)
		}
		if walsenders == 0 {
			t.Fatal("no replication connection was opened again after the rotation")
		}
	}
	seen := cons.WaitFor(t, len(ids), 30*time.Second)
	testenv.CheckExactlyOnce(t, ids, seen)
	if err := run.Stop(); err != nil {
		t.Fatalf("relay: %v", err)
	}
	for _, pw := range []string{"first-password-1", "second-password-2"} {
		if strings.Contains(logs.String(), pw) {
			t.Fatal("the relay's log shows the password")
		}
	}
}

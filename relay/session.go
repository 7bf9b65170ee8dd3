package relay

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"strconv"
	"sync"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"
	"github.com/jackc/pgx/v5/pgxpool"

	"github.com/outbox-relay/outbox-relay/pgauth"
)

// durableSession sets up every connection the relay opens (its pool and its
// dedicated connections):
//
//   - commits are durable at least to a local WAL flush. With
//     synchronous_commit=off (for the role, the database or the server: a
//     common throughput setting) PostgreSQL acknowledges a commit before it is
//     flushed, so a crash after the relay marked a batch loses the mark and
//     the batch is published again. The relay raises "off" to "local" and
//     keeps any stronger level the operator set (on, remote_write,
//     remote_apply), which fail-over to a synchronous standby needs (I5).
//   - every statement runs under statement_timeout and lock_timeout, so an
//     outside lock on the outbox table or a stuck query shows up as a failed
//     batch (logged, counted, retried) instead of a silent hang.
//
// An operator's own statement_timeout or lock_timeout in the connection
// string wins over the relay's.
func durableSession(cc *pgx.ConnConfig, cfg Config, log *slog.Logger) {
	// Set after connecting, not as startup parameters, which PgBouncer
	// refuses.
	var timeouts string
	for _, t := range []struct {
		name string
		v    time.Duration
	}{{"statement_timeout", cfg.StatementTimeout}, {"lock_timeout", cfg.LockTimeout}} {
		if _, set := cc.RuntimeParams[t.name]; !set && t.v > 0 {
			timeouts += "SET " + t.name + " = " + strconv.FormatInt(t.v.Milliseconds(), 10) + "; "
		}
	}
	var once sync.Once
	prev := cc.AfterConnect
	cc.AfterConnect = func(ctx context.Context, pc *pgconn.PgConn) error {
		if prev != nil {
			if err := prev(ctx, pc); err != nil {
				return err
			}
		}
		if timeouts != "" {
			if _, err := pc.Exec(ctx, timeouts).ReadAll(); err != nil {
				return fmt.Errorf("set statement_timeout and lock_timeout: %w", err)
			}
		}
		res, err := pc.Exec(ctx, `SHOW synchronous_commit`).ReadAll()
		if err != nil {
			return fmt.Errorf("read synchronous_commit: %w", err)
		}
		if len(res) == 1 && len(res[0].Rows) == 1 && string(res[0].Rows[0][0]) == "off" {
			if _, err := pc.Exec(ctx, `SET synchronous_commit = local`).ReadAll(); err != nil {
				return fmt.Errorf("raise synchronous_commit from off to local: %w", err)
			}
			once.Do(func() {
				log.Warn("synchronous_commit is off for the relay's role or database: the relay's connections use local, so that a mark it relies on survives a crash")
			})
		}
		return nil
	}
}

// ownPool returns a pool like pool whose connections get the relay's
// keepalives (prepareConnConfig) and durableSession. It connects lazily, so
// creating it costs nothing until it is used.
func ownPool(pool *pgxpool.Pool, cfg Config, log *slog.Logger) (*pgxpool.Pool, error) {
	pcfg := pool.Config() // a copy
	// Each pipelined shard runs up to three statements at once (the mark
	// of the last batch, the read of the next, and its own step), besides
	// the ownership and wake-up connections, which are not pooled.
	pcfg.MaxConns = max(pcfg.MaxConns, int32(3*cfg.Shards+2))
	prepareConnConfig(pcfg.ConnConfig, cfg)
	durableSession(pcfg.ConnConfig, cfg, log)
	p, err := pgxpool.NewWithConfig(context.Background(), pcfg)
	if err != nil {
		return nil, fmt.Errorf("relay connection pool: %w", err)
	}
	return p, nil
}

// OpenPool connects to PostgreSQL at url with room for at least conns
// connections and checks the connection, with errors that never show the
// password. With a relay configuration, every connection is prepared for the
// relay (ConfigurePool: keepalives and a user timeout from
// OUTBOX_OWNER_LEASE); the relay's own connections get that regardless.
// The credentials of new connections follow cfg.DatabaseAuth (package
// pgauth: a password file, RDS IAM tokens).
func OpenPool(ctx context.Context, url string, conns int, cfg *Config) (*pgxpool.Pool, error) {
	var auth pgauth.Config
	if cfg != nil {
		auth = cfg.DatabaseAuth
	}
	return OpenPoolAuth(ctx, url, conns, cfg, auth)
}

// OpenPoolAuth is OpenPool with the credentials of new connections from
// auth (for commands that take no relay configuration).
func OpenPoolAuth(ctx context.Context, url string, conns int, cfg *Config, auth pgauth.Config) (*pgxpool.Pool, error) {
	pcfg, err := pgxpool.ParseConfig(url)
	if err != nil {
		return nil, errors.New("OUTBOX_DATABASE_URL is malformed: expected a PostgreSQL URL or key=value string")
	}
	pcfg.MaxConns = max(pcfg.MaxConns, int32(conns))
	if cfg != nil {
		ConfigurePool(pcfg, *cfg)
	}
	if auth.Enabled() {
		p, err := pgauth.New(ctx, auth)
		if err != nil {
			return nil, fmt.Errorf("database credentials: %w", err)
		}
		p.Configure(pcfg)
	}
	pool, err := pgxpool.NewWithConfig(ctx, pcfg)
	if err != nil {
		return nil, fmt.Errorf("connect to PostgreSQL at %s: %w", RedactURL(url), err)
	}
	pctx, cancel := context.WithTimeout(ctx, 15*time.Second)
	defer cancel()
	if err := pool.Ping(pctx); err != nil {
		pool.Close()
		return nil, fmt.Errorf("connect to PostgreSQL at %s (check OUTBOX_DATABASE_URL%s): %s", RedactURL(url), authHint(auth), ConnectProblem(err))
	}
	return pool, nil
}

// authHint names the credential settings in a connection error.
func authHint(auth pgauth.Config) string {
	switch {
	case auth.PasswordFile != "":
		return " and the password in OUTBOX_DATABASE_PASSWORD_FILE"
	case auth.IAM:
		return ", OUTBOX_DATABASE_IAM_AUTH: the role needs rds_iam and the AWS identity rds-db:connect"
	}
	return ""
}

// connectDedicated opens one of the relay's own connections (ownership,
// wake-up, reshard) from cc, giving it fresh credentials first with the
// pool's BeforeConnect (a password file, an IAM token) on a copy of cc.
func connectDedicated(ctx context.Context, cc *pgx.ConnConfig, before func(context.Context, *pgx.ConnConfig) error) (*pgx.Conn, error) {
	if before != nil {
		cc = cc.Copy()
		if err := before(ctx, cc); err != nil {
			return nil, fmt.Errorf("credentials: %w", err)
		}
	}
	return pgx.ConnectConfig(ctx, cc)
}

package testenv

import (
	"context"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"os"
	"os/user"
	"path/filepath"
	"strconv"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
)

// backupSkipped are the entries of a data directory whose contents a base
// backup leaves out (PostgreSQL's documentation, "Making a Base Backup
// Using the Low Level API"); the directories themselves are kept, empty.
// pg_wal is copied on its own once the backup has ended.
var backupSkipped = map[string]bool{
	"pg_wal": true, "pg_replslot": true, "pg_dynshmem": true, "pg_notify": true,
	"pg_serial": true, "pg_snapshots": true, "pg_stat_tmp": true, "pg_subtrans": true,
}

// backupSkippedFiles are files of the data directory's top level a base
// backup leaves out.
var backupSkippedFiles = map[string]bool{
	"postmaster.pid": true, "postmaster.opts": true, "backup_label": true,
	"backup_manifest": true, "tablespace_map": true, "standby.signal": true, "recovery.signal": true,
}

// copyBackup makes dst a base backup of the running server pg without
// pg_basebackup: a non-exclusive backup with the low-level functions of
// pg's major (pg_backup_start/pg_backup_stop from 15,
// pg_start_backup/pg_stop_backup before), a copy of the data directory in
// between, the backup_label pg_backup_stop returns, and then a copy of
// pg_wal with the WAL up to the backup's end. A standby started on dst
// replays it and streams the rest from pg.
func copyBackup(tb testing.TB, pg *PrivatePostgres, dst string) {
	tb.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	// One session from start to stop: a non-exclusive backup belongs to
	// the session that started it.
	c, err := pgx.Connect(ctx, pg.URL("postgres", "postgres"))
	if err != nil {
		tb.Fatalf("base backup: connect to the primary: %v", err)
	}
	defer c.Close(context.Background())
	var version int
	if err := c.QueryRow(ctx, `SELECT current_setting('server_version_num')::int`).Scan(&version); err != nil {
		tb.Fatalf("base backup: server version: %v", err)
	}
	start, stop := `SELECT pg_backup_start($1, true)`, `SELECT labelfile, spcmapfile FROM pg_backup_stop(false)`
	if version < 150000 {
		start, stop = `SELECT pg_start_backup($1, true, false)`, `SELECT labelfile, spcmapfile FROM pg_stop_backup(false, false)`
	}
	if _, err := c.Exec(ctx, start, "outbox-relay test standby"); err != nil {
		tb.Fatalf("base backup: start: %v", err)
	}
	uid, gid := -1, -1
	if os.Geteuid() == 0 {
		u, err := user.Lookup("postgres")
		if err != nil {
			tb.Fatal(err)
		}
		uid, _ = strconv.Atoi(u.Uid)
		gid, _ = strconv.Atoi(u.Gid)
	}
	if err := copyTree(pg.data, dst, uid, gid, func(rel string, d fs.DirEntry) (skipContents, skip bool) {
		if d.IsDir() {
			return backupSkipped[rel], false
		}
		if filepath.Base(rel) == "pg_internal.init" {
			return false, true
		}
		return false, backupSkippedFiles[rel]
	}); err != nil {
		tb.Fatalf("base backup: copy the data directory: %v", err)
	}
	var label, spcmap string
	if err := c.QueryRow(ctx, stop).Scan(&label, &spcmap); err != nil {
		tb.Fatalf("base backup: stop: %v", err)
	}
	if err := copyTree(filepath.Join(pg.data, "pg_wal"), filepath.Join(dst, "pg_wal"), uid, gid, func(rel string, d fs.DirEntry) (bool, bool) {
		return d.IsDir() && rel == "archive_status", false
	}); err != nil {
		tb.Fatalf("base backup: copy pg_wal: %v", err)
	}
	files := map[string]string{"backup_label": label}
	if spcmap != "" {
		files["tablespace_map"] = spcmap
	}
	for name, content := range files {
		p := filepath.Join(dst, name)
		if err := os.WriteFile(p, []byte(content), 0o600); err != nil {
			tb.Fatalf("base backup: %v", err)
		}
		if uid >= 0 {
			if err := os.Chown(p, uid, gid); err != nil {
				tb.Fatalf("base backup: %v", err)
			}
		}
	}
}

// copyTree copies the directory src into dst (an empty one or none), owned by
// uid:gid when uid >= 0. filter, given a path relative to src, says whether
// to copy a directory empty or to leave a file out. Files that vanish while
// the server runs are skipped, as a base backup does.
func copyTree(src, dst string, uid, gid int, filter func(rel string, d fs.DirEntry) (skipContents, skip bool)) error {
	return filepath.WalkDir(src, func(path string, d fs.DirEntry, err error) error {
		if err != nil {
			if errors.Is(err, fs.ErrNotExist) {
				return nil
			}
			return err
		}
		rel, err := filepath.Rel(src, path)
		if err != nil {
			return err
		}
		target := filepath.Join(dst, rel)
		skipContents, skip := false, false
		if rel != "." {
			skipContents, skip = filter(rel, d)
		}
		if skip {
			return nil
		}
		info, err := d.Info()
		if err != nil {
			if errors.Is(err, fs.ErrNotExist) {
				return nil
			}
			return err
		}
		switch {
		case d.IsDir():
			if err := os.Mkdir(target, info.Mode().Perm()); err != nil && !(rel == "." && errors.Is(err, fs.ErrExist)) {
				return err
			}
		case d.Type()&fs.ModeSymlink != 0:
			to, err := os.Readlink(path)
			if err != nil {
				return err
			}
			if err := os.Symlink(to, target); err != nil {
				return err
			}
		case d.Type().IsRegular():
			if err := copyFile(path, target, info.Mode().Perm()); err != nil {
				if errors.Is(err, fs.ErrNotExist) {
					return nil
				}
				return err
			}
		default:
			return nil // sockets and the like: not part of a backup
		}
		if uid >= 0 {
			if err := os.Lchown(target, uid, gid); err != nil {
				return err
			}
		}
		if d.IsDir() && skipContents {
			return filepath.SkipDir
		}
		return nil
	})
}

func copyFile(src, dst string, perm fs.FileMode) error {
	in, err := os.Open(src)
	if err != nil {
		return err
	}
	defer in.Close()
	out, err := os.OpenFile(dst, os.O_WRONLY|os.O_CREATE|os.O_EXCL, perm)
	if err != nil {
		return err
	}
	if _, err := io.Copy(out, in); err != nil {
		out.Close()
		return fmt.Errorf("copy %s: %w", src, err)
	}
	return out.Close()
}

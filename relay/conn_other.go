//go:build !linux

package relay

import (
	"syscall"
	"time"
)

// setTCPUserTimeout is a no-op where TCP_USER_TIMEOUT does not exist; the
// keepalives and the lease still apply.
func setTCPUserTimeout(syscall.RawConn, time.Duration) error { return nil }

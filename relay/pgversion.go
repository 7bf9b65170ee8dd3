package relay

// serverMajor is the major version in a server_version parameter ("13.23",
// "18.4 (Debian 18.4-1)", "16beta1"), 0 when it does not start with one.
func serverMajor(version string) int {
	n := 0
	for _, c := range version {
		if c < '0' || c > '9' {
			break
		}
		n = n*10 + int(c-'0')
	}
	return n
}

// terminateWaits says whether the server of version (its server_version
// parameter) has pg_terminate_backend(pid, timeout), which waits for the
// session's end: PostgreSQL 14 and later. An unknown version is taken for
// a current one.
func terminateWaits(version string) bool {
	m := serverMajor(version)
	return m == 0 || m >= 14
}

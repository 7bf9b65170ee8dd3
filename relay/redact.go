package relay

import (
	"errors"
	"fmt"
	"regexp"
	"strings"

	"github.com/jackc/pgx/v5/pgconn"
)

// queryPassword matches the password and sslpassword parameters of a URL's
// query.
var queryPassword = regexp.MustCompile(`(?i)((?:^|[?&])(?:ssl)?password=)[^&#]*`)

// splitURLPassword parses a URL-form connection string as its author meant
// it, reserved characters in the password left unescaped included: the
// user information ends at the last '@' before the query, and the password
// is what follows the first ':' in it (so "p@ss:w0rd" is a password, though
// no URL parser reads it so). It returns the string with the password and
// the query's passwords masked, the raw password (pw, hasPW), and ok false
// when dsn is not a URL.
func splitURLPassword(dsn string) (safe, pw string, hasPW, ok bool) {
	i := strings.Index(dsn, "://")
	if i < 0 {
		return "", "", false, false
	}
	scheme, rest := dsn[:i], dsn[i+3:]
	head, tail := rest, ""
	if q := strings.IndexAny(rest, "?#"); q >= 0 {
		head, tail = rest[:q], rest[q:]
	}
	tail = queryPassword.ReplaceAllString(tail, "${1}xxxxx")
	at := strings.LastIndex(head, "@")
	if at < 0 {
		return scheme + "://" + head + tail, "", false, true
	}
	user, pw, hasPW := strings.Cut(head[:at], ":")
	userinfo := user
	if hasPW {
		userinfo += ":xxxxx"
	}
	return scheme + "://" + userinfo + "@" + head[at+1:] + tail, pw, hasPW, true
}

// unescapedReserved reports whether pw holds a character a URL's password
// must percent-encode: '@', ':', '/', '?', '#', or a '%' that does not start
// an escape.
func unescapedReserved(pw string) bool {
	for i := 0; i < len(pw); i++ {
		switch pw[i] {
		case '@', ':', '/', '?', '#', '[', ']':
			return true
		case '%':
			if i+2 >= len(pw) || !isHex(pw[i+1]) || !isHex(pw[i+2]) {
				return true
			}
		}
	}
	return false
}

func isHex(b byte) bool {
	return '0' <= b && b <= '9' || 'a' <= b && b <= 'f' || 'A' <= b && b <= 'F'
}

// parseProblem explains why pgx could not parse dsn, without any part of
// its password: for a URL with a password, pgx's own text (which quotes
// the string, redacted on a guess of where the password ends) is replaced
// by the masked URL and pgx's reason alone.
func parseProblem(err error, dsn string) string {
	safe, pw, hasPW, isURL := splitURLPassword(dsn)
	if !isURL || !hasPW {
		return redactErr(err, dsn)
	}
	reason := "not a valid URL"
	var pce *pgconn.ParseConfigError
	if errors.As(err, &pce) {
		// "cannot parse `...`: <reason>[ (<cause>)]": keep the reason,
		// which is pgx's fixed text; the cause may quote the string.
		msg := pce.Error()
		if i := strings.LastIndex(msg, "`: "); i >= 0 {
			msg = msg[i+3:]
			if inner := errors.Unwrap(pce); inner != nil {
				msg = strings.TrimSuffix(msg, " ("+inner.Error()+")")
			}
			if !strings.Contains(msg, pw) && !strings.ContainsAny(msg, "`\"") {
				reason = msg
			}
		}
	}
	if unescapedReserved(pw) {
		return fmt.Sprintf("%s: %s; the password holds a character a URL reserves (@ : / ? # %%): percent-encode it (@ is %%40, : is %%3A, / is %%2F, %% is %%25), or use the key=value form with password='...'", safe, reason)
	}
	return fmt.Sprintf("%s: %s", safe, reason)
}

// ConnectProblem returns a PostgreSQL connection error as one line, with
// its real cause: pgx reports every attempt it made, one a line, so the
// default sslmode=prefer prints a misleading "server refused TLS
// connection" (the first attempt, which it then retried in plain text)
// before the actual cause, and a dial error twice. This keeps each
// distinct failure once and drops the TLS refusal when another attempt
// followed it. The text holds no password (pgx's errors name the user and
// database, never the password).
func ConnectProblem(err error) string {
	var ce *pgconn.ConnectError
	if !errors.As(err, &ce) {
		return strings.ReplaceAll(err.Error(), "\n", "; ")
	}
	attempts := []error{errors.Unwrap(ce)}
	if j, ok := attempts[0].(interface{ Unwrap() []error }); ok {
		attempts = j.Unwrap()
	}
	var causes []string
	seen := map[string]bool{}
	for i, a := range attempts {
		if a == nil {
			continue
		}
		msg := strings.ReplaceAll(a.Error(), "\n", "; ")
		if strings.HasSuffix(msg, "server refused TLS connection") && i < len(attempts)-1 {
			continue // sslmode=prefer: the plain-text attempt that followed says what went wrong
		}
		if !seen[msg] {
			seen[msg] = true
			causes = append(causes, msg)
		}
	}
	return fmt.Sprintf("user=%s database=%s: %s", ce.Config.User, ce.Config.Database, strings.Join(causes, "; "))
}

package integration

import (
	"net/url"
	"strings"
	"testing"

	"github.com/outbox-relay/outbox-relay/integration/testenv"
)

// TestMigrateUpAsTheRelayRoleSaysToUseTheAdminRole: `migrate up` run with a
// role that may not create (the relay role of the README's grants, which is
// what a deploy that gives the migration the relay's URL does) fails with
// PostgreSQL's "permission denied" and says what to do: run it with the
// admin role. The role is dropped with the test.
func TestMigrateUpAsTheRelayRoleSaysToUseTheAdminRole(t *testing.T) {
	bin := buildRelayBinary(t)
	superURL := testenv.CreateDatabase(t)
	u, err := url.Parse(superURL)
	if err != nil {
		t.Fatal(err)
	}
	database := strings.TrimPrefix(u.Path, "/")
	// A login role with no CREATE on the database nor on schema public (the
	// default since PostgreSQL 15; revoked here for older servers).
	relayRole := testenv.RandomName("outbox_relay_")
	relayURL := createRole(t, superURL, relayRole)
	execSQL(t, superURL, "REVOKE CREATE ON DATABASE "+database+" FROM PUBLIC; REVOKE CREATE ON SCHEMA public FROM PUBLIC")

	env := append(baseEnv(), "OUTBOX_DATABASE_URL="+relayURL)
	code, out := cliAs(t, bin, env, "migrate", "up")
	t.Logf("migrate up as a role without CREATE: exit %d: %s", code, strings.TrimSpace(out))
	if code == 0 {
		t.Fatalf("migrate up without the CREATE privilege exited 0:\n%s", out)
	}
	if !strings.Contains(out, "permission denied") {
		t.Errorf("migrate up without CREATE: the output does not give PostgreSQL's cause (permission denied):\n%s", out)
	}
	if want := "run migrate with the admin role (see README grants)"; !strings.Contains(out, want) {
		t.Errorf("migrate up without CREATE: the output does not say %q:\n%s", want, out)
	}
	if strings.Count(strings.TrimSpace(out), "\n") > 0 {
		t.Errorf("migrate up without CREATE: want one line, got:\n%s", out)
	}
}

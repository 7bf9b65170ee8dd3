package pgauth

import (
	"context"
	"net/url"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/jackc/pgx/v5/pgconn"
	"github.com/jackc/pgx/v5/pgxpool"
)

func TestPasswordFileIsReadForEveryConnection(t *testing.T) {
	file := filepath.Join(t.TempDir(), "pw")
	if err := os.WriteFile(file, []byte("one\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	p, err := New(context.Background(), Config{PasswordFile: file})
	if err != nil {
		t.Fatal(err)
	}
	pc, err := pgxpool.ParseConfig("postgres://relay:in-url@db.example:5432/app")
	if err != nil {
		t.Fatal(err)
	}
	p.Configure(pc)
	for _, want := range []string{"one", "two"} {
		if err := os.WriteFile(file, []byte(want+"\n"), 0o600); err != nil {
			t.Fatal(err)
		}
		cc := pc.ConnConfig.Copy()
		if err := pc.BeforeConnect(context.Background(), cc); err != nil {
			t.Fatal(err)
		}
		if cc.Password != want {
			t.Fatalf("password %q, want %q from the file", cc.Password, want)
		}
	}
	if err := os.WriteFile(file, nil, 0o600); err != nil {
		t.Fatal(err)
	}
	err = p.Apply(context.Background(), &pgconn.Config{})
	if err == nil || !strings.Contains(err.Error(), "OUTBOX_DATABASE_PASSWORD_FILE") || !strings.Contains(err.Error(), "empty") {
		t.Fatalf("empty file: %v", err)
	}
	if _, err := New(context.Background(), Config{PasswordFile: filepath.Join(t.TempDir(), "missing")}); err == nil || !strings.Contains(err.Error(), "OUTBOX_DATABASE_PASSWORD_FILE") {
		t.Fatalf("missing file: %v", err)
	}
}

func TestIAMTokenIsSignedForTheConnectionsHostAndUser(t *testing.T) {
	t.Setenv("AWS_ACCESS_KEY_ID", "AKIDEXAMPLE")
	t.Setenv("AWS_SECRET_ACCESS_KEY", "very-secret-key")
	t.Setenv("AWS_SESSION_TOKEN", "")
	t.Setenv("AWS_CONFIG_FILE", os.DevNull)
	t.Setenv("AWS_SHARED_CREDENTIALS_FILE", os.DevNull)
	t.Setenv("AWS_REGION", "")
	ctx := context.Background()
	if _, err := New(ctx, Config{IAM: true}); err == nil || !strings.Contains(err.Error(), "OUTBOX_DATABASE_IAM_REGION") {
		t.Fatalf("no region: %v", err)
	}
	p, err := New(ctx, Config{IAM: true, IAMRegion: "eu-west-1"})
	if err != nil {
		t.Fatal(err)
	}
	pc, err := pgconn.ParseConfig("postgres://payments_relay@ledger.cluster-abc.eu-west-1.rds.amazonaws.com:5432/app?sslmode=require")
	if err != nil {
		t.Fatal(err)
	}
	if err := p.Apply(ctx, pc); err != nil {
		t.Fatal(err)
	}
	u, err := url.Parse("https://" + pc.Password)
	if err != nil {
		t.Fatalf("token %q: %v", pc.Password, err)
	}
	q := u.Query()
	if u.Host != "ledger.cluster-abc.eu-west-1.rds.amazonaws.com:5432" || q.Get("Action") != "connect" || q.Get("DBUser") != "payments_relay" ||
		!strings.HasPrefix(q.Get("X-Amz-Credential"), "AKIDEXAMPLE/") || !strings.Contains(q.Get("X-Amz-Credential"), "/eu-west-1/rds-db/") ||
		q.Get("X-Amz-Expires") != "900" || q.Get("X-Amz-Signature") == "" {
		t.Fatalf("RDS auth token %q", pc.Password)
	}
	if strings.Contains(pc.Password, "very-secret-key") {
		t.Fatal("the token carries the secret key")
	}
	unix, _ := pgconn.ParseConfig("host=/var/run/postgresql user=u")
	if err := p.Apply(ctx, unix); err == nil || !strings.Contains(err.Error(), "TCP host") {
		t.Fatalf("unix socket: %v", err)
	}
}

func TestValidateAndFromEnviron(t *testing.T) {
	if _, err := FromEnviron([]string{"OUTBOX_DATABASE_PASSWORD_FILE=/x", "OUTBOX_DATABASE_IAM_AUTH=true"}); err == nil || !strings.Contains(err.Error(), "choose one") {
		t.Fatalf("both: %v", err)
	}
	if _, err := FromEnviron([]string{"OUTBOX_DATABASE_IAM_REGION=eu-west-1"}); err == nil || !strings.Contains(err.Error(), "OUTBOX_DATABASE_IAM_AUTH") {
		t.Fatalf("region alone: %v", err)
	}
	if _, err := FromEnviron([]string{"OUTBOX_DATABASE_IAM_AUTH=maybe"}); err == nil || !strings.Contains(err.Error(), "OUTBOX_DATABASE_IAM_AUTH") {
		t.Fatalf("malformed bool: %v", err)
	}
	c, err := FromEnviron([]string{"OUTBOX_DATABASE_IAM_AUTH=true", "OUTBOX_DATABASE_IAM_REGION=us-east-1"})
	if err != nil || !c.IAM || c.IAMRegion != "us-east-1" || !c.Enabled() {
		t.Fatalf("%+v %v", c, err)
	}
	if (Config{}).Enabled() {
		t.Fatal("zero Config enabled")
	}
}

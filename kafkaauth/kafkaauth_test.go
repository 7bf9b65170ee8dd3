package kafkaauth

import (
	"bytes"
	"context"
	"encoding/json"
	"log/slog"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"
)

// endpoint is a token endpoint whose answers the test controls.
type endpoint struct {
	mu      sync.Mutex
	n       int
	fail    bool
	ttl     int
	secret  string
	lastReq *http.Request
	form    map[string]string
}

func (e *endpoint) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	e.mu.Lock()
	defer e.mu.Unlock()
	_ = r.ParseForm()
	e.form = map[string]string{"grant_type": r.PostForm.Get("grant_type"), "scope": r.PostForm.Get("scope")}
	_, sec, _ := r.BasicAuth()
	if e.fail || sec != e.secret {
		w.WriteHeader(http.StatusUnauthorized)
		_ = json.NewEncoder(w).Encode(map[string]string{"error": "invalid_client", "error_description": "client secret " + sec + " is wrong"})
		return
	}
	e.n++
	_ = json.NewEncoder(w).Encode(map[string]any{"access_token": "token-" + string(rune('A'+e.n-1)), "token_type": "bearer", "expires_in": e.ttl})
}

func TestClientCredentialsTokenIsCachedAndRefreshedBeforeExpiry(t *testing.T) {
	ep := &endpoint{ttl: 100, secret: "s3cret-value"}
	srv := httptest.NewServer(ep)
	defer srv.Close()
	var logs bytes.Buffer
	now := time.Unix(1_700_000_000, 0)
	o := options{log: slog.New(slog.NewTextHandler(&logs, nil)), now: func() time.Time { return now }}
	src, _ := newClientCredentials(OAuth{TokenEndpointURL: srv.URL, ClientID: "relay", ClientSecret: ep.secret, Scope: "kafka"}, o)
	ctx := context.Background()
	get := func() string {
		t.Helper()
		tok, err := src.Token(ctx)
		if err != nil {
			t.Fatal(err)
		}
		return tok
	}
	if tok := get(); tok != "token-A" {
		t.Fatalf("first token %q", tok)
	}
	if ep.form["grant_type"] != "client_credentials" || ep.form["scope"] != "kafka" {
		t.Fatalf("request form %v", ep.form)
	}
	now = now.Add(79 * time.Second)
	if tok := get(); tok != "token-A" || ep.n != 1 {
		t.Fatalf("at 79%% of the lifetime: %q after %d fetches, want the cached token-A after 1", tok, ep.n)
	}
	now = now.Add(2 * time.Second) // 81 s: past 80%
	if tok := get(); tok != "token-B" || ep.n != 2 {
		t.Fatalf("at 81%% of the lifetime: %q after %d fetches, want a new token-B", tok, ep.n)
	}
	// The provider fails while token-B is valid: token-B is kept.
	ep.mu.Lock()
	ep.fail = true
	ep.mu.Unlock()
	now = now.Add(90 * time.Second)
	if tok := get(); tok != "token-B" {
		t.Fatalf("endpoint down, token still valid: %q", tok)
	}
	// ... and once it has expired, the error says so, without the secret.
	now = now.Add(20 * time.Second)
	_, err := src.Token(ctx)
	if err == nil || !strings.Contains(err.Error(), "invalid_client") || !strings.Contains(err.Error(), "OUTBOX_KAFKA_SASL_OAUTHBEARER_CLIENT_ID") {
		t.Fatalf("expired token and endpoint down: %v", err)
	}
	for _, s := range []string{err.Error(), logs.String()} {
		if strings.Contains(s, ep.secret) || strings.Contains(s, "token-A") || strings.Contains(s, "token-B") {
			t.Fatalf("a secret or token leaked: %s", s)
		}
	}
}

func TestOAuthBearerMessageCarriesTheTokenAndExtensions(t *testing.T) {
	ep := &endpoint{ttl: 3600, secret: "x"}
	srv := httptest.NewServer(ep)
	defer srv.Close()
	secretFile := filepath.Join(t.TempDir(), "secret")
	if err := os.WriteFile(secretFile, []byte("x\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	m, err := New(context.Background(), Config{Mechanism: "oauthbearer", OAuth: OAuth{TokenEndpointURL: srv.URL, ClientID: "relay", ClientSecretFile: secretFile,
		Extensions: "logicalCluster=lkc-1,identityPoolId=pool-2"}})
	if err != nil {
		t.Fatal(err)
	}
	if m.Name() != "OAUTHBEARER" {
		t.Fatalf("name %q", m.Name())
	}
	_, msg, err := m.Authenticate(context.Background(), "broker:9092")
	if err != nil {
		t.Fatal(err)
	}
	if want := "n,,\x01auth=Bearer token-A\x01identityPoolId=pool-2\x01logicalCluster=lkc-1\x01\x01"; string(msg) != want {
		t.Fatalf("client message %q, want %q", msg, want)
	}
}

func TestTokenFileIsReadOnEveryAuthentication(t *testing.T) {
	file := filepath.Join(t.TempDir(), "token")
	m, err := New(context.Background(), Config{Mechanism: OAuthBearer, OAuth: OAuth{TokenFile: file}})
	if err != nil {
		t.Fatal(err)
	}
	if _, _, err := m.Authenticate(context.Background(), "b:9092"); err == nil || !strings.Contains(err.Error(), "OUTBOX_KAFKA_SASL_OAUTHBEARER_TOKEN_FILE") {
		t.Fatalf("missing file: %v", err)
	}
	for _, tok := range []string{"first", "second"} {
		if err := os.WriteFile(file, []byte(tok+"\n"), 0o600); err != nil {
			t.Fatal(err)
		}
		_, msg, err := m.Authenticate(context.Background(), "b:9092")
		if err != nil {
			t.Fatal(err)
		}
		if !strings.Contains(string(msg), "auth=Bearer "+tok+"\x01") {
			t.Fatalf("message %q does not carry %q", msg, tok)
		}
	}
}

func TestAWSMSKIAMSignsWithTheChainsCredentials(t *testing.T) {
	t.Setenv("AWS_ACCESS_KEY_ID", "AKIDEXAMPLE")
	t.Setenv("AWS_SECRET_ACCESS_KEY", "very-secret-key")
	t.Setenv("AWS_SESSION_TOKEN", "session-token-value")
	t.Setenv("AWS_REGION", "eu-central-1")
	t.Setenv("AWS_CONFIG_FILE", os.DevNull)
	t.Setenv("AWS_SHARED_CREDENTIALS_FILE", os.DevNull)
	m, err := New(context.Background(), Config{Mechanism: "AWS_MSK_IAM"})
	if err != nil {
		t.Fatal(err)
	}
	_, msg, err := m.Authenticate(context.Background(), "b-1.payments.abc123.c2.kafka.eu-central-1.amazonaws.com:9098")
	if err != nil {
		t.Fatal(err)
	}
	var fields map[string]string
	if err := json.Unmarshal(msg, &fields); err != nil {
		t.Fatal(err)
	}
	if fields["action"] != "kafka-cluster:Connect" || !strings.HasPrefix(fields["x-amz-credential"], "AKIDEXAMPLE/") ||
		!strings.Contains(fields["x-amz-credential"], "/eu-central-1/kafka-cluster/") || fields["x-amz-security-token"] != "session-token-value" ||
		len(fields["x-amz-signature"]) != 64 || fields["user-agent"] != "outbox-relay" {
		t.Fatalf("AWS_MSK_IAM message %v", fields)
	}
	if strings.Contains(string(msg), "very-secret-key") {
		t.Fatal("the message carries the secret key")
	}
}

func TestValidateNamesTheVariableAndTheFix(t *testing.T) {
	for _, tc := range []struct {
		cfg  Config
		want string
	}{
		{Config{Mechanism: "GSSAPI"}, "expected PLAIN, SCRAM-SHA-256, SCRAM-SHA-512, AWS_MSK_IAM, OAUTHBEARER"},
		{Config{Mechanism: "PLAIN"}, "OUTBOX_KAFKA_SASL_USERNAME is empty"},
		{Config{Mechanism: "SCRAM-SHA-512", Username: "u"}, "OUTBOX_KAFKA_SASL_PASSWORD is empty"},
		{Config{Username: "u", Password: "p"}, "OUTBOX_KAFKA_SASL_MECHANISM is not"},
		{Config{Mechanism: "OAUTHBEARER"}, "needs OUTBOX_KAFKA_SASL_OAUTHBEARER_TOKEN_ENDPOINT_URL"},
		{Config{Mechanism: "OAUTHBEARER", OAuth: OAuth{TokenFile: "/t", TokenEndpointURL: "https://x/token"}}, "both set"},
		{Config{Mechanism: "OAUTHBEARER", OAuth: OAuth{TokenEndpointURL: "login.example.com/token", ClientID: "a", ClientSecret: "b"}}, "not an http(s) URL"},
		{Config{Mechanism: "OAUTHBEARER", OAuth: OAuth{TokenEndpointURL: "https://x/token", ClientSecret: "b"}}, "_CLIENT_ID is empty"},
		{Config{Mechanism: "OAUTHBEARER", OAuth: OAuth{TokenEndpointURL: "https://x/token", ClientID: "a"}}, "exactly one of OUTBOX_KAFKA_SASL_OAUTHBEARER_CLIENT_SECRET"},
		{Config{Mechanism: "OAUTHBEARER", OAuth: OAuth{TokenFile: "/t", Extensions: "a=1,=2"}}, "OUTBOX_KAFKA_SASL_OAUTHBEARER_EXTENSIONS"},
	} {
		got := strings.Join(tc.cfg.Validate(), "; ")
		if !strings.Contains(got, tc.want) {
			t.Errorf("%+v: %q, want it to contain %q", tc.cfg, got, tc.want)
		}
	}
	for _, ok := range []Config{{}, {Mechanism: "scram-sha-512", Username: "u", Password: "p"}, {Mechanism: "AWS_MSK_IAM"},
		{Mechanism: "OAUTHBEARER", OAuth: OAuth{TokenEndpointURL: "https://x/token", ClientID: "a", ClientSecret: "b", Extensions: "logicalCluster=lkc-1"}}} {
		if p := ok.Validate(); len(p) > 0 {
			t.Errorf("%+v: %v", ok, p)
		}
	}
}

func TestJWTExpiryDecidesTheLifetimeWithoutExpiresIn(t *testing.T) {
	now := time.Unix(1_700_000_000, 0)
	// header.{"exp":1700000600}.signature
	tok := "eyJhbGciOiJub25lIn0.eyJleHAiOjE3MDAwMDA2MDB9.sig"
	if got := lifetime(tokenResponse{AccessToken: tok}, now); got != 600*time.Second {
		t.Fatalf("JWT lifetime %v, want 10m", got)
	}
	if got := lifetime(tokenResponse{AccessToken: "opaque", ExpiresIn: json.RawMessage(`"120"`)}, now); got != 120*time.Second {
		t.Fatalf("string expires_in lifetime %v", got)
	}
	if got := lifetime(tokenResponse{AccessToken: "opaque"}, now); got != defaultTokenLifetime {
		t.Fatalf("no expiry: %v", got)
	}
}

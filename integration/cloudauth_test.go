package integration

import (
	"bytes"
	"context"
	"crypto/hmac"
	"crypto/rand"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"net/http"
	"net/http/httptest"
	"net/url"
	"os"
	"path/filepath"
	"sort"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/twmb/franz-go/pkg/kadm"
	"github.com/twmb/franz-go/pkg/kfake"
	"github.com/twmb/franz-go/pkg/kgo"

	"github.com/outbox-relay/outbox-relay/integration/faultproxy"
	"github.com/outbox-relay/outbox-relay/integration/testenv"
	"github.com/outbox-relay/outbox-relay/kafkaauth"
	"github.com/outbox-relay/outbox-relay/relay"
)

// kfake offers PLAIN and SCRAM only (its SaslHandshake answers
// UNSUPPORTED_SASL_MECHANISM to anything else), so the brokers that require
// OAUTHBEARER and AWS_MSK_IAM here are faultproxy's SASL gate in front of
// kfake (or of KAFKA_BROKERS): a Kafka-protocol listener over TCP that
// checks the mechanism's message as the broker would (the token against the
// issuer, the SigV4 signature against the secret key), gives each session a
// lifetime that ends with the credential (KIP-368) and closes a session
// used after it.

func randomSecret(t *testing.T) string {
	t.Helper()
	b := make([]byte, 16)
	if _, err := rand.Read(b); err != nil {
		t.Fatal(err)
	}
	return hex.EncodeToString(b)
}

// oauthIssuer is an OIDC provider's token endpoint (client-credentials
// grant) and the broker's check of its tokens.
type oauthIssuer struct {
	t            *testing.T
	clientID     string
	clientSecret string
	scope        string
	ttl          time.Duration

	mu      sync.Mutex
	tokens  map[string]time.Time // token -> expiry
	fetches int
	denied  int
}

func newOAuthIssuer(t *testing.T, ttl time.Duration) (*oauthIssuer, *httptest.Server) {
	is := &oauthIssuer{t: t, clientID: "outbox-relay", clientSecret: randomSecret(t), scope: "kafka", ttl: ttl, tokens: map[string]time.Time{}}
	srv := httptest.NewServer(http.HandlerFunc(is.serveToken))
	t.Cleanup(srv.Close)
	return is, srv
}

func (is *oauthIssuer) serveToken(w http.ResponseWriter, r *http.Request) {
	id, sec, ok := r.BasicAuth()
	if ok {
		id, _ = url.QueryUnescape(id)
		sec, _ = url.QueryUnescape(sec)
	}
	if err := r.ParseForm(); err != nil || r.Method != http.MethodPost || r.PostForm.Get("grant_type") != "client_credentials" ||
		!ok || id != is.clientID || sec != is.clientSecret || r.PostForm.Get("scope") != is.scope {
		is.mu.Lock()
		is.denied++
		is.mu.Unlock()
		w.Header().Set("Content-Type", "application/json")
		w.WriteHeader(http.StatusUnauthorized)
		// A provider that repeats the secret it was sent.
		_ = json.NewEncoder(w).Encode(map[string]string{"error": "invalid_client", "error_description": "bad secret " + sec})
		return
	}
	tok := "tok-" + randomSecret(is.t)
	is.mu.Lock()
	is.tokens[tok] = time.Now().Add(is.ttl)
	is.fetches++
	is.mu.Unlock()
	w.Header().Set("Content-Type", "application/json")
	_ = json.NewEncoder(w).Encode(map[string]any{"access_token": tok, "token_type": "Bearer", "expires_in": is.ttl.Seconds()})
}

func (is *oauthIssuer) Mechanism() string { return "OAUTHBEARER" }

// Authenticate checks an OAUTHBEARER client message (RFC 7628 3.1):
// "n,," (GS2 header), then \x01-separated key=value pairs with
// auth=Bearer <token>, then \x01\x01.
func (is *oauthIssuer) Authenticate(msg []byte) ([]byte, time.Duration, error) {
	s := string(msg)
	if !strings.HasPrefix(s, "n,") || !strings.HasSuffix(s, "\x01\x01") {
		return nil, 0, errors.New("malformed OAUTHBEARER message")
	}
	var tok string
	for _, kv := range strings.Split(s, "\x01") {
		if v, ok := strings.CutPrefix(kv, "auth=Bearer "); ok {
			tok = v
		}
	}
	is.mu.Lock()
	exp, known := is.tokens[tok]
	is.mu.Unlock()
	switch {
	case !known:
		return nil, 0, errors.New("unknown token")
	case !time.Now().Before(exp):
		return nil, 0, errors.New("token expired")
	}
	return nil, time.Until(exp), nil
}

func (is *oauthIssuer) tokenList() []string {
	is.mu.Lock()
	defer is.mu.Unlock()
	var out []string
	for tok := range is.tokens {
		out = append(out, tok)
	}
	return out
}

// publishThroughExpiringCredentials runs a relay through the gate while
// rows are written for span (several credential lifetimes) and checks that
// every row arrives exactly once, that the sessions re-authenticated, that
// none failed, and that the relay's log has none of secrets.
func publishThroughExpiringCredentials(t *testing.T, srv faultproxy.SASLServer, span time.Duration, set func(*relay.Config), secrets func() []string) faultproxy.SASLStats {
	t.Helper()
	ctx := context.Background()
	topic := testenv.RandomName("cloudauth-")
	k := testenv.NewKafka(t, 1, topic)
	proxy, err := faultproxy.New(ctx, testenv.Logger(t, nil), k.Brokers...)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(proxy.Close)
	proxy.RequireSASL(srv)

	db := testenv.NewDB(t)
	cfg := testenv.RelayConfig(db, k)
	cfg.KafkaBrokers = proxy.Addrs()
	set(&cfg)
	if err := cfg.Validate(); err != nil {
		t.Fatal(err)
	}
	var logs testenv.SyncBuffer
	log := testenv.Logger(t, &logs)
	opts, err := relay.KafkaOptions(cfg, log)
	if err != nil {
		t.Fatal(err)
	}
	// franz-go's own debug log too: it names each re-authentication.
	opts = append(opts, kgo.WithLogger(kgo.BasicLogger(&logs, kgo.LogLevelDebug, nil)))
	testenv.StartRelay(t, db, cfg, relay.WithLogger(log), relay.WithKafkaOptions(opts...))

	// A consumer through the gate too, with the same options (as verify,
	// bench and inbox consumers get them).
	cl, err := kgo.NewClient(append([]kgo.Opt{kgo.SeedBrokers(proxy.Addrs()...), kgo.ConsumeTopics(topic),
		kgo.ConsumeResetOffset(kgo.NewOffset().AtStart()), kgo.FetchIsolationLevel(kgo.ReadCommitted()),
		kgo.FetchMaxWait(200 * time.Millisecond)}, opts...)...)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(cl.Close)

	var ids []int64
	deadline := time.Now().Add(span)
	for time.Now().Before(deadline) {
		ids = append(ids, db.Insert(t, topic, 10, []string{"a", "b", "c"})...)
		time.Sleep(250 * time.Millisecond)
	}
	seen := map[int64]int{}
	wait := time.Now().Add(90 * time.Second)
	for len(seen) < len(ids) && time.Now().Before(wait) {
		pctx, cancel := context.WithTimeout(ctx, time.Second)
		fs := cl.PollFetches(pctx)
		cancel()
		fs.EachRecord(func(r *kgo.Record) {
			for _, h := range r.Headers {
				if h.Key == "outbox-id" {
					var id int64
					fmt.Sscan(string(h.Value), &id)
					seen[id]++
				}
			}
		})
	}
	var missing, dup []int64
	for _, id := range ids {
		switch seen[id] {
		case 0:
			missing = append(missing, id)
		case 1:
		default:
			dup = append(dup, id)
		}
	}
	if len(missing) > 0 || len(dup) > 0 || len(seen) != len(ids) {
		t.Fatalf("through the gate: %d rows written, %d distinct records read; missing %v, duplicated %v", len(ids), len(seen), firstIDs(missing), firstIDs(dup))
	}
	if n := db.Unpublished(t); n != 0 {
		t.Fatalf("%d rows unpublished", n)
	}
	st := proxy.SASLStats()
	t.Logf("%d rows over %v; gate: %+v", len(ids), span, st)
	if st.Failures != 0 {
		t.Fatalf("%d authentications failed at the gate: a credential was used after it expired or was wrong", st.Failures)
	}
	if st.Reauthentications == 0 {
		t.Fatalf("no session re-authenticated in %v with credentials living less: gate %+v", span, st)
	}
	out := logs.String()
	if !strings.Contains(out, "reauthenticating") {
		t.Fatalf("franz-go's log does not name a re-authentication")
	}
	for _, s := range secrets() {
		if strings.Contains(out, s) {
			t.Fatalf("the log shows a secret (%.8s...)", s)
		}
	}
	return st
}

// TestOAuthBearerTokenExpiresDuringARunNothingIsLost: OUTBOX_KAFKA_SASL_MECHANISM=OAUTHBEARER
// with the client-credentials flow (client secret from a file) against a
// broker that gives each session the token's lifetime (4 s): over 14 s the
// relay fetches new tokens before the old ones expire, re-authenticates its
// connections (KIP-368), and every row arrives exactly once; the secret and
// the tokens never reach the log.
func TestOAuthBearerTokenExpiresDuringARunNothingIsLost(t *testing.T) {
	is, srv := newOAuthIssuer(t, 4*time.Second)
	secretFile := filepath.Join(t.TempDir(), "client-secret")
	if err := os.WriteFile(secretFile, []byte(is.clientSecret+"\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	st := publishThroughExpiringCredentials(t, is, 14*time.Second, func(c *relay.Config) {
		c.KafkaSASLMech = "OAUTHBEARER"
		c.KafkaOAuth = kafkaauth.OAuth{TokenEndpointURL: srv.URL + "/oauth2/token", ClientID: is.clientID, ClientSecretFile: secretFile, Scope: is.scope}
	}, func() []string { return append(is.tokenList(), is.clientSecret) })
	is.mu.Lock()
	fetches, denied := is.fetches, is.denied
	is.mu.Unlock()
	t.Logf("token endpoint: %d tokens issued, %d requests denied; gate %+v", fetches, denied, st)
	if fetches < 3 {
		t.Fatalf("%d tokens fetched in 14 s of 4 s tokens: the token was not refreshed before it expired", fetches)
	}
	if denied != 0 {
		t.Fatalf("the token endpoint denied %d requests", denied)
	}
}

// TestOAuthBearerTokenFileRotatedBySidecar: OUTBOX_KAFKA_SASL_OAUTHBEARER_TOKEN_FILE
// is read on every authentication: a sidecar that writes a new token before
// the old one expires keeps the relay publishing.
func TestOAuthBearerTokenFileRotatedBySidecar(t *testing.T) {
	is, _ := newOAuthIssuer(t, 4*time.Second)
	file := filepath.Join(t.TempDir(), "token")
	rotate := func() {
		tok := "tok-" + randomSecret(t)
		is.mu.Lock()
		is.tokens[tok] = time.Now().Add(is.ttl)
		is.mu.Unlock()
		tmp := file + ".tmp"
		if err := os.WriteFile(tmp, []byte(tok), 0o600); err != nil {
			t.Error(err)
		}
		if err := os.Rename(tmp, file); err != nil { // atomically, as kubelet's projected volumes do
			t.Error(err)
		}
	}
	rotate()
	stop := make(chan struct{})
	done := make(chan struct{})
	go func() {
		defer close(done)
		for {
			select {
			case <-stop:
				return
			case <-time.After(is.ttl / 2):
				rotate()
			}
		}
	}()
	defer func() { close(stop); <-done }()
	publishThroughExpiringCredentials(t, is, 12*time.Second, func(c *relay.Config) {
		c.KafkaSASLMech = "OAUTHBEARER"
		c.KafkaOAuth = kafkaauth.OAuth{TokenFile: file}
	}, is.tokenList)
}

// awsIdentity is an AWS credential source (the container credentials
// endpoint of the SDK's default chain: ECS, EKS Pod Identity) issuing
// credentials that live ttl, and the MSK broker's check of the SigV4
// signed AWS_MSK_IAM message.
type awsIdentity struct {
	t   *testing.T
	ttl time.Duration

	mu      sync.Mutex
	keys    map[string]awsKey // access key id -> key
	fetches int
}

type awsKey struct {
	secret, token string
	expiry        time.Time
}

func (a *awsIdentity) serve(w http.ResponseWriter, r *http.Request) {
	id := "ASIA" + strings.ToUpper(randomSecret(a.t)[:16])
	k := awsKey{secret: randomSecret(a.t), token: "session-" + randomSecret(a.t), expiry: time.Now().Add(a.ttl).UTC()}
	a.mu.Lock()
	a.keys[id] = k
	a.fetches++
	a.mu.Unlock()
	w.Header().Set("Content-Type", "application/json")
	_ = json.NewEncoder(w).Encode(map[string]string{"AccessKeyId": id, "SecretAccessKey": k.secret, "Token": k.token,
		"Expiration": k.expiry.Format(time.RFC3339)})
}

func (a *awsIdentity) Mechanism() string { return "AWS_MSK_IAM" }

// Authenticate checks the AWS_MSK_IAM message: a JSON object of a SigV4
// presigned kafka-cluster:Connect request, signed by a key this identity
// issued and that has not expired. The session lives until the key
// expires, as on MSK.
func (a *awsIdentity) Authenticate(msg []byte) ([]byte, time.Duration, error) {
	var m map[string]string
	if err := json.Unmarshal(msg, &m); err != nil {
		return nil, 0, fmt.Errorf("not JSON: %v", err)
	}
	if m["version"] != "2020_10_22" || m["action"] != "kafka-cluster:Connect" || m["x-amz-algorithm"] != "AWS4-HMAC-SHA256" {
		return nil, 0, fmt.Errorf("unexpected fields %q %q %q", m["version"], m["action"], m["x-amz-algorithm"])
	}
	cred := strings.Split(m["x-amz-credential"], "/") // id/date/region/service/aws4_request
	if len(cred) != 5 || cred[3] != "kafka-cluster" {
		return nil, 0, fmt.Errorf("bad credential scope %q", m["x-amz-credential"])
	}
	a.mu.Lock()
	k, ok := a.keys[cred[0]]
	a.mu.Unlock()
	if !ok {
		return nil, 0, errors.New("unknown access key")
	}
	if !time.Now().Before(k.expiry) {
		return nil, 0, errors.New("expired credentials")
	}
	if m["x-amz-security-token"] != k.token {
		return nil, 0, errors.New("wrong session token")
	}
	signedAt, err := time.Parse("20060102T150405Z", m["x-amz-date"])
	if err != nil || time.Since(signedAt) > 15*time.Minute || time.Until(signedAt) > time.Minute {
		return nil, 0, fmt.Errorf("x-amz-date %q not current", m["x-amz-date"])
	}
	// Recompute the signature (SigV4 query presigning, as MSK does).
	v := url.Values{}
	for _, f := range []string{"Action", "X-Amz-Algorithm", "X-Amz-Credential", "X-Amz-Date", "X-Amz-Expires", "X-Amz-SignedHeaders", "X-Amz-Security-Token"} {
		v.Set(f, m[strings.ToLower(f)])
	}
	qs := strings.ReplaceAll(v.Encode(), "+", "%20")
	canon := "GET\n/\n" + qs + "\nhost:" + m["host"] + "\n\nhost\ne3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
	sum := sha256.Sum256([]byte(canon))
	scope := strings.Join(cred[1:], "/")
	sts := "AWS4-HMAC-SHA256\n" + m["x-amz-date"] + "\n" + scope + "\n" + hex.EncodeToString(sum[:])
	key := []byte("AWS4" + k.secret)
	for _, part := range []string{cred[1], cred[2], cred[3], "aws4_request"} {
		h := hmac.New(sha256.New, key)
		h.Write([]byte(part))
		key = h.Sum(nil)
	}
	h := hmac.New(sha256.New, key)
	h.Write([]byte(sts))
	if want := hex.EncodeToString(h.Sum(nil)); !hmac.Equal([]byte(want), []byte(m["x-amz-signature"])) {
		return nil, 0, errors.New("signature does not match")
	}
	return []byte(`{"version":"2020_10_22","request-id":"test"}`), time.Until(k.expiry), nil
}

func (a *awsIdentity) secrets() []string {
	a.mu.Lock()
	defer a.mu.Unlock()
	var out []string
	for _, k := range a.keys {
		out = append(out, k.secret, k.token)
	}
	sort.Strings(out)
	return out
}

// TestAWSMSKIAMCredentialsRefreshBeforeTheyExpire: OUTBOX_KAFKA_SASL_MECHANISM=AWS_MSK_IAM
// takes its credentials from the AWS SDK's default chain (here its
// container credentials endpoint, which serves 6 s credentials), signs each
// authentication with current ones (asking the SDK's credentials cache,
// which fetches new ones 5 minutes before the old expire: here on every
// authentication), and re-authenticates every session before its
// credentials end:
// nothing lost, no secret key or session token in the log.
func TestAWSMSKIAMCredentialsRefreshBeforeTheyExpire(t *testing.T) {
	a := &awsIdentity{t: t, ttl: 6 * time.Second, keys: map[string]awsKey{}}
	srv := httptest.NewServer(http.HandlerFunc(a.serve))
	t.Cleanup(srv.Close)
	empty := filepath.Join(t.TempDir(), "empty")
	if err := os.WriteFile(empty, nil, 0o600); err != nil {
		t.Fatal(err)
	}
	for k, v := range map[string]string{
		"AWS_CONTAINER_CREDENTIALS_FULL_URI": srv.URL + "/creds", "AWS_REGION": "eu-west-1",
		"AWS_ACCESS_KEY_ID": "", "AWS_SECRET_ACCESS_KEY": "", "AWS_SESSION_TOKEN": "", "AWS_PROFILE": "",
		"AWS_WEB_IDENTITY_TOKEN_FILE": "", "AWS_CONFIG_FILE": empty, "AWS_SHARED_CREDENTIALS_FILE": empty, "AWS_EC2_METADATA_DISABLED": "true",
	} {
		t.Setenv(k, v)
		if v == "" {
			os.Unsetenv(k)
		}
	}
	publishThroughExpiringCredentials(t, a, 14*time.Second, func(c *relay.Config) {
		c.KafkaSASLMech = "AWS_MSK_IAM"
	}, a.secrets)
	a.mu.Lock()
	fetches := a.fetches
	a.mu.Unlock()
	if fetches < 3 {
		t.Fatalf("%d credentials fetched in 14 s of 6 s credentials: they were not refreshed", fetches)
	}
	t.Logf("credentials endpoint: %d fetches", fetches)
}

// TestSCRAMReauthenticatesWhenKfakeLimitsTheSession: PLAIN and SCRAM end to
// end on kfake's own SASL, with connections.max.reauth.ms=3000: the
// relay's sessions re-authenticate (KIP-368) and every row arrives once.
func TestSCRAMReauthenticatesWhenKfakeLimitsTheSession(t *testing.T) {
	if testenv.RealBrokers() != nil {
		t.Skip("needs kfake's SASL users and connections.max.reauth.ms")
	}
	for _, mech := range []string{"PLAIN", "SCRAM-SHA-512"} {
		t.Run(mech, func(t *testing.T) {
			c, err := kfake.NewCluster(kfake.NumBrokers(1), kfake.EnableSASL(), kfake.Superuser(mech, "relay", "pw-"+mech),
				kfake.BrokerConfigs(map[string]string{"connections.max.reauth.ms": "3000"}))
			if err != nil {
				t.Fatal(err)
			}
			t.Cleanup(c.Close)
			db := testenv.NewDB(t)
			k := &testenv.Kafka{Brokers: c.ListenAddrs(), Cluster: c}
			cfg := testenv.RelayConfig(db, k)
			cfg.KafkaSASLMech, cfg.KafkaSASLUser, cfg.KafkaSASLPassword = mech, "relay", "pw-"+mech
			var logs testenv.SyncBuffer
			opts, err := relay.KafkaOptions(cfg)
			if err != nil {
				t.Fatal(err)
			}
			opts = append(opts, kgo.WithLogger(kgo.BasicLogger(&logs, kgo.LogLevelDebug, nil)))
			admin, err := kgo.NewClient(append([]kgo.Opt{kgo.SeedBrokers(c.ListenAddrs()...)}, opts...)...)
			if err != nil {
				t.Fatal(err)
			}
			defer admin.Close()
			if _, err := kadm.NewClient(admin).CreateTopic(context.Background(), 1, 1, nil, "payments"); err != nil {
				t.Fatal(err)
			}
			testenv.StartRelay(t, db, cfg, relay.WithLogger(testenv.Logger(t, nil)), relay.WithKafkaOptions(opts...))
			var ids []int64
			for range 16 {
				ids = append(ids, db.Insert(t, "payments", 5, []string{"k"})...)
				time.Sleep(500 * time.Millisecond)
			}
			seen := securityConsume(t, c.ListenAddrs(), len(ids), opts[:len(opts)-1]...)
			testenv.CheckExactlyOnce(t, ids, seen)
			if !strings.Contains(logs.String(), "reauthenticating") {
				t.Fatalf("no re-authentication in 8 s of 3 s sessions")
			}
			if bytes.Contains([]byte(logs.String()), []byte("pw-"+mech)) {
				t.Fatalf("the log shows the password")
			}
		})
	}
}

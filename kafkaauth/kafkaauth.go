// Package kafkaauth builds the SASL mechanism the relay, verify, bench and
// inbox consumers authenticate to Kafka with: PLAIN and SCRAM with a user
// and password, AWS_MSK_IAM with credentials from the standard AWS chain,
// and OAUTHBEARER with a token from the OIDC client-credentials flow or from
// a file that a sidecar rotates.
//
// Short-lived credentials are asked for on every authentication, which
// franz-go does on every new connection and on every re-authentication
// (KIP-368: before the session lifetime the broker gave runs out), and are
// refreshed before they expire: an expiring token never stops the relay.
//
// Secrets (passwords, client secrets, tokens, AWS keys) come only from the
// environment or from files, and no error or log line of this package
// contains one.
package kafkaauth

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net/url"
	"os"
	"strings"
	"time"

	"github.com/aws/aws-sdk-go-v2/aws"
	awsconfig "github.com/aws/aws-sdk-go-v2/config"
	"github.com/twmb/franz-go/pkg/sasl"
	kaws "github.com/twmb/franz-go/pkg/sasl/aws"
	"github.com/twmb/franz-go/pkg/sasl/oauth"
	"github.com/twmb/franz-go/pkg/sasl/plain"
	"github.com/twmb/franz-go/pkg/sasl/scram"
)

// The mechanisms, as OUTBOX_KAFKA_SASL_MECHANISM names them.
const (
	Plain       = "PLAIN"
	ScramSHA256 = "SCRAM-SHA-256"
	ScramSHA512 = "SCRAM-SHA-512"
	AWSMSKIAM   = "AWS_MSK_IAM"
	OAuthBearer = "OAUTHBEARER"
)

// Mechanisms lists every mechanism Config.Mechanism may name.
var Mechanisms = []string{Plain, ScramSHA256, ScramSHA512, AWSMSKIAM, OAuthBearer}

// Config selects the mechanism and its credentials.
type Config struct {
	// Mechanism is OUTBOX_KAFKA_SASL_MECHANISM: empty (no SASL), PLAIN,
	// SCRAM-SHA-256, SCRAM-SHA-512, AWS_MSK_IAM or OAUTHBEARER (any case).
	Mechanism string
	// Username and Password are PLAIN's and SCRAM's credentials
	// (OUTBOX_KAFKA_SASL_USERNAME, OUTBOX_KAFKA_SASL_PASSWORD).
	Username, Password string
	// OAuth configures OAUTHBEARER.
	OAuth OAuth
}

// OAuth configures OAUTHBEARER: a token file, or the client-credentials
// flow against a token endpoint. The names follow Kafka's
// sasl.oauthbearer.* settings.
type OAuth struct {
	// TokenEndpointURL is sasl.oauthbearer.token.endpoint.url: the OIDC
	// provider's token endpoint, asked for a token with the
	// client-credentials grant.
	TokenEndpointURL string `env:"OUTBOX_KAFKA_SASL_OAUTHBEARER_TOKEN_ENDPOINT_URL"`
	// ClientID and ClientSecret authenticate the relay to the token
	// endpoint (HTTP basic authentication, RFC 6749 2.3.1); the secret
	// is read from ClientSecretFile when that is set.
	ClientID         string `env:"OUTBOX_KAFKA_SASL_OAUTHBEARER_CLIENT_ID"`
	ClientSecret     string `env:"OUTBOX_KAFKA_SASL_OAUTHBEARER_CLIENT_SECRET"`
	ClientSecretFile string `env:"OUTBOX_KAFKA_SASL_OAUTHBEARER_CLIENT_SECRET_FILE"`
	// Scope is sasl.oauthbearer.scope: the scope asked for, optional.
	Scope string `env:"OUTBOX_KAFKA_SASL_OAUTHBEARER_SCOPE"`
	// TokenFile is a file holding the token itself, kept fresh by a
	// sidecar; it is read again on every authentication. It excludes the
	// token endpoint.
	TokenFile string `env:"OUTBOX_KAFKA_SASL_OAUTHBEARER_TOKEN_FILE"`
	// Extensions are SASL extensions sent with the token (RFC 7628 3.1),
	// key=value pairs separated by commas, e.g. Confluent Cloud's
	// logicalCluster=lkc-abc123,identityPoolId=pool-xyz.
	Extensions string `env:"OUTBOX_KAFKA_SASL_OAUTHBEARER_EXTENSIONS"`
}

// Validate returns one line per problem, each naming the variable and the
// fix; none contains a secret.
func (c Config) Validate() []string {
	var problems []string
	add := func(f string, a ...any) { problems = append(problems, fmt.Sprintf(f, a...)) }
	mech := strings.ToUpper(c.Mechanism)
	o := c.OAuth
	switch mech {
	case "":
		if c.Username != "" || c.Password != "" {
			add("OUTBOX_KAFKA_SASL_USERNAME or OUTBOX_KAFKA_SASL_PASSWORD is set but OUTBOX_KAFKA_SASL_MECHANISM is not: the relay would connect without authenticating; set OUTBOX_KAFKA_SASL_MECHANISM to the mechanism of the brokers' listener (%s), or unset the credentials", strings.Join(Mechanisms, ", "))
		}
	case Plain, ScramSHA256, ScramSHA512:
		if c.Username == "" {
			add("OUTBOX_KAFKA_SASL_USERNAME is empty but OUTBOX_KAFKA_SASL_MECHANISM is %s: set the user name", mech)
		}
		if c.Password == "" {
			add("OUTBOX_KAFKA_SASL_PASSWORD is empty but OUTBOX_KAFKA_SASL_MECHANISM is %s: set the password", mech)
		}
	case AWSMSKIAM:
		// Credentials come from the AWS chain, checked when the
		// mechanism is built.
	case OAuthBearer:
		switch {
		case o.TokenFile != "" && o.TokenEndpointURL != "":
			add("OUTBOX_KAFKA_SASL_OAUTHBEARER_TOKEN_FILE and OUTBOX_KAFKA_SASL_OAUTHBEARER_TOKEN_ENDPOINT_URL are both set: set one (a file a sidecar rotates, or the token endpoint of the client-credentials flow)")
		case o.TokenFile == "" && o.TokenEndpointURL == "":
			add("OUTBOX_KAFKA_SASL_MECHANISM=OAUTHBEARER needs OUTBOX_KAFKA_SASL_OAUTHBEARER_TOKEN_ENDPOINT_URL (with _CLIENT_ID and _CLIENT_SECRET or _CLIENT_SECRET_FILE) or OUTBOX_KAFKA_SASL_OAUTHBEARER_TOKEN_FILE")
		case o.TokenEndpointURL != "":
			if u, err := url.Parse(o.TokenEndpointURL); err != nil || (u.Scheme != "https" && u.Scheme != "http") || u.Host == "" {
				add("OUTBOX_KAFKA_SASL_OAUTHBEARER_TOKEN_ENDPOINT_URL is not an http(s) URL: set it to the OIDC provider's token endpoint, e.g. https://login.example.com/oauth2/token")
			}
			if o.ClientID == "" {
				add("OUTBOX_KAFKA_SASL_OAUTHBEARER_CLIENT_ID is empty: set the client id the token endpoint knows the relay by")
			}
			if (o.ClientSecret == "") == (o.ClientSecretFile == "") {
				add("set exactly one of OUTBOX_KAFKA_SASL_OAUTHBEARER_CLIENT_SECRET and OUTBOX_KAFKA_SASL_OAUTHBEARER_CLIENT_SECRET_FILE")
			}
		}
		if _, err := parseExtensions(o.Extensions); err != nil {
			add("OUTBOX_KAFKA_SASL_OAUTHBEARER_EXTENSIONS: %v", err)
		}
	default:
		add("OUTBOX_KAFKA_SASL_MECHANISM is %q: expected %s", c.Mechanism, strings.Join(Mechanisms, ", "))
	}
	return problems
}

// parseExtensions reads "k=v,k=v" (RFC 7628: keys are letters, values have
// no control characters).
func parseExtensions(s string) (map[string]string, error) {
	if strings.TrimSpace(s) == "" {
		return nil, nil
	}
	out := map[string]string{}
	for _, kv := range strings.Split(s, ",") {
		k, v, ok := strings.Cut(strings.TrimSpace(kv), "=")
		if !ok || k == "" || k == "auth" {
			return nil, fmt.Errorf("%q: expected key=value pairs separated by commas (and no key named auth)", k)
		}
		for _, r := range k {
			if !(r >= 'a' && r <= 'z' || r >= 'A' && r <= 'Z') {
				return nil, fmt.Errorf("key %q: expected letters only", k)
			}
		}
		for _, r := range v {
			if r < 0x20 || r == 0x7f {
				return nil, fmt.Errorf("value of %q has a control character", k)
			}
		}
		out[k] = v
	}
	return out, nil
}

// Option changes how New builds a mechanism; tests use them.
type Option func(*options)

type options struct {
	log          *slog.Logger
	now          func() time.Time
	awsLoad      []func(*awsconfig.LoadOptions) error
	expiryWindow time.Duration
}

// WithLogger sets the logger for refreshes and their failures (never with
// a secret). The default discards.
func WithLogger(l *slog.Logger) Option { return func(o *options) { o.log = l } }

// WithAWSLoadOptions adds options to the AWS SDK's LoadDefaultConfig.
func WithAWSLoadOptions(fns ...func(*awsconfig.LoadOptions) error) Option {
	return func(o *options) { o.awsLoad = append(o.awsLoad, fns...) }
}

// WithExpiryWindow sets how long before their expiry AWS credentials are
// fetched again (default DefaultExpiryWindow).
func WithExpiryWindow(d time.Duration) Option { return func(o *options) { o.expiryWindow = d } }

// DefaultExpiryWindow is how long before their expiry AWS credentials are
// fetched again.
const DefaultExpiryWindow = 5 * time.Minute

// New returns the SASL mechanism of c, or nil when c.Mechanism is empty.
// For AWS_MSK_IAM it loads the AWS configuration (environment, shared
// files, web identity / IRSA, container and instance roles) and fails when
// the chain yields no credentials.
func New(ctx context.Context, c Config, opts ...Option) (sasl.Mechanism, error) {
	o := options{log: slog.New(slog.DiscardHandler), now: time.Now, expiryWindow: DefaultExpiryWindow}
	for _, fn := range opts {
		fn(&o)
	}
	if p := c.Validate(); len(p) > 0 {
		return nil, errors.New(strings.Join(p, "; "))
	}
	switch strings.ToUpper(c.Mechanism) {
	case "":
		return nil, nil
	case Plain:
		return plain.Auth{User: c.Username, Pass: c.Password}.AsMechanism(), nil
	case ScramSHA256:
		return scram.Auth{User: c.Username, Pass: c.Password}.AsSha256Mechanism(), nil
	case ScramSHA512:
		return scram.Auth{User: c.Username, Pass: c.Password}.AsSha512Mechanism(), nil
	case AWSMSKIAM:
		return newAWS(ctx, o)
	default: // OAUTHBEARER, Validate allows nothing else
		return newOAuth(c.OAuth, o)
	}
}

// newAWS is AWS_MSK_IAM: every authentication asks the SDK's credentials
// cache, which fetches new credentials o.expiryWindow before the current
// ones expire.
func newAWS(ctx context.Context, o options) (sasl.Mechanism, error) {
	load := append([]func(*awsconfig.LoadOptions) error{
		awsconfig.WithCredentialsCacheOptions(func(co *aws.CredentialsCacheOptions) { co.ExpiryWindow = o.expiryWindow }),
	}, o.awsLoad...)
	cfg, err := awsconfig.LoadDefaultConfig(ctx, load...)
	if err != nil {
		return nil, fmt.Errorf("OUTBOX_KAFKA_SASL_MECHANISM=AWS_MSK_IAM: load the AWS configuration: %w", err)
	}
	if cfg.Credentials == nil {
		return nil, errors.New("OUTBOX_KAFKA_SASL_MECHANISM=AWS_MSK_IAM: the AWS configuration has no credentials provider")
	}
	creds := cfg.Credentials
	if _, err := creds.Retrieve(ctx); err != nil {
		return nil, fmt.Errorf("OUTBOX_KAFKA_SASL_MECHANISM=AWS_MSK_IAM: no AWS credentials (set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, AWS_WEB_IDENTITY_TOKEN_FILE and AWS_ROLE_ARN (IRSA), or run with an instance or pod role): %w", err)
	}
	return kaws.ManagedStreamingIAM(func(ctx context.Context) (kaws.Auth, error) {
		c, err := creds.Retrieve(ctx)
		if err != nil {
			o.log.Warn("AWS credentials for Kafka", "err", err)
			return kaws.Auth{}, fmt.Errorf("AWS_MSK_IAM: retrieve AWS credentials: %w", err)
		}
		return kaws.Auth{AccessKey: c.AccessKeyID, SecretKey: c.SecretAccessKey, SessionToken: c.SessionToken, UserAgent: "outbox-relay"}, nil
	}), nil
}

// newOAuth is OAUTHBEARER, from a token file or the token endpoint.
func newOAuth(c OAuth, o options) (sasl.Mechanism, error) {
	ext, _ := parseExtensions(c.Extensions) // checked by Validate
	var token func(context.Context) (string, error)
	if c.TokenFile != "" {
		token = func(context.Context) (string, error) { return readTokenFile(c.TokenFile) }
	} else {
		src, err := newClientCredentials(c, o)
		if err != nil {
			return nil, err
		}
		token = src.Token
	}
	return oauth.Oauth(func(ctx context.Context) (oauth.Auth, error) {
		t, err := token(ctx)
		if err != nil {
			return oauth.Auth{}, err
		}
		return oauth.Auth{Token: t, Extensions: ext}, nil
	}), nil
}

// readTokenFile reads the token a sidecar keeps in path; it is read on
// every authentication, so a rotation is taken up by the next one.
func readTokenFile(path string) (string, error) {
	b, err := os.ReadFile(path)
	if err != nil {
		return "", fmt.Errorf("OUTBOX_KAFKA_SASL_OAUTHBEARER_TOKEN_FILE: %w", err)
	}
	t := strings.TrimSpace(string(b))
	if t == "" {
		return "", fmt.Errorf("OUTBOX_KAFKA_SASL_OAUTHBEARER_TOKEN_FILE %s is empty: the sidecar has not written a token yet", path)
	}
	return t, nil
}

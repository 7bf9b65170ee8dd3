// Package pgauth gives every new PostgreSQL connection fresh credentials,
// so that a rotated password or a short-lived token never needs a restart:
//
//   - a password file (OUTBOX_DATABASE_PASSWORD_FILE), read again for every
//     new connection: a Kubernetes secret mounted as a file is updated in
//     place when the secret rotates;
//   - an IAM authentication token for Amazon RDS and Aurora
//     (OUTBOX_DATABASE_IAM_AUTH), built for every new connection from the
//     standard AWS credential chain (environment, web identity / IRSA,
//     container and instance roles). A token is valid for 15 minutes, and
//     only for opening a connection: open connections are not affected
//     when it expires.
//
// Either replaces the password of the connection string. The credentials
// are set in pgx's BeforeConnect (Provider.BeforeConnect), which the pool
// calls for each connection it opens; connections opened outside the pool
// call Provider.Apply. No error of this package contains a password or a
// token.
package pgauth

import (
	"context"
	"errors"
	"fmt"
	"net"
	"os"
	"strconv"
	"strings"

	"github.com/aws/aws-sdk-go-v2/aws"
	awsconfig "github.com/aws/aws-sdk-go-v2/config"
	"github.com/aws/aws-sdk-go-v2/feature/rds/auth"
	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"
	"github.com/jackc/pgx/v5/pgxpool"
)

// Config chooses where new connections take their password from. The zero
// value keeps the connection string's password.
type Config struct {
	// PasswordFile is a file holding the password (surrounding white
	// space, such as a final newline, is ignored), read for every new
	// connection.
	PasswordFile string `env:"OUTBOX_DATABASE_PASSWORD_FILE"`
	// IAM makes the password an RDS / Aurora IAM authentication token for
	// the connection's user, host and port.
	IAM bool `env:"OUTBOX_DATABASE_IAM_AUTH" envDefault:"false"`
	// IAMRegion is the AWS region of the database; empty takes the AWS
	// configuration's (AWS_REGION, the shared config file).
	IAMRegion string `env:"OUTBOX_DATABASE_IAM_REGION"`
}

// Enabled reports whether c changes the password of new connections.
func (c Config) Enabled() bool { return c.PasswordFile != "" || c.IAM }

// Validate returns one line per problem, each naming the variable and the
// fix.
func (c Config) Validate() []string {
	var problems []string
	if c.PasswordFile != "" && c.IAM {
		problems = append(problems, "OUTBOX_DATABASE_PASSWORD_FILE and OUTBOX_DATABASE_IAM_AUTH=true are both set: choose one (a password file, or RDS IAM tokens)")
	}
	if c.IAMRegion != "" && !c.IAM {
		problems = append(problems, "OUTBOX_DATABASE_IAM_REGION is set but OUTBOX_DATABASE_IAM_AUTH is not true: set OUTBOX_DATABASE_IAM_AUTH=true or unset the region")
	}
	return problems
}

// FromEnviron reads the Config from environ (KEY=VALUE strings, as
// os.Environ returns) and validates it.
func FromEnviron(environ []string) (Config, error) {
	var c Config
	for _, kv := range environ {
		k, v, _ := strings.Cut(kv, "=")
		switch k {
		case "OUTBOX_DATABASE_PASSWORD_FILE":
			c.PasswordFile = v
		case "OUTBOX_DATABASE_IAM_REGION":
			c.IAMRegion = v
		case "OUTBOX_DATABASE_IAM_AUTH":
			if v == "" {
				continue
			}
			b, err := strconv.ParseBool(v)
			if err != nil {
				return Config{}, fmt.Errorf("OUTBOX_DATABASE_IAM_AUTH is %q: expected true or false", v)
			}
			c.IAM = b
		}
	}
	if p := c.Validate(); len(p) > 0 {
		return Config{}, errors.New(strings.Join(p, "; "))
	}
	return c, nil
}

// Provider sets the credentials of new connections.
type Provider struct {
	cfg    Config
	region string
	creds  aws.CredentialsProvider
}

// Option changes New; tests use them.
type Option func(*Provider, *[]func(*awsconfig.LoadOptions) error)

// WithAWSLoadOptions adds options to the AWS SDK's LoadDefaultConfig.
func WithAWSLoadOptions(fns ...func(*awsconfig.LoadOptions) error) Option {
	return func(_ *Provider, l *[]func(*awsconfig.LoadOptions) error) { *l = append(*l, fns...) }
}

// New returns the provider of c. With IAM it loads the AWS configuration
// and fails when it names no region or yields no credentials.
func New(ctx context.Context, c Config, opts ...Option) (*Provider, error) {
	if p := c.Validate(); len(p) > 0 {
		return nil, errors.New(strings.Join(p, "; "))
	}
	p := &Provider{cfg: c}
	var load []func(*awsconfig.LoadOptions) error
	for _, o := range opts {
		o(p, &load)
	}
	if c.PasswordFile != "" {
		if _, err := p.readPassword(); err != nil {
			return nil, err
		}
	}
	if c.IAM {
		if c.IAMRegion != "" {
			load = append(load, awsconfig.WithRegion(c.IAMRegion))
		}
		acfg, err := awsconfig.LoadDefaultConfig(ctx, load...)
		if err != nil {
			return nil, fmt.Errorf("OUTBOX_DATABASE_IAM_AUTH: load the AWS configuration: %w", err)
		}
		if acfg.Region == "" {
			return nil, errors.New("OUTBOX_DATABASE_IAM_AUTH: no AWS region: set OUTBOX_DATABASE_IAM_REGION or AWS_REGION")
		}
		if acfg.Credentials == nil {
			return nil, errors.New("OUTBOX_DATABASE_IAM_AUTH: the AWS configuration has no credentials provider")
		}
		if _, err := acfg.Credentials.Retrieve(ctx); err != nil {
			return nil, fmt.Errorf("OUTBOX_DATABASE_IAM_AUTH: no AWS credentials (set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, AWS_WEB_IDENTITY_TOKEN_FILE and AWS_ROLE_ARN (IRSA), or run with an instance or pod role): %w", err)
		}
		p.region, p.creds = acfg.Region, acfg.Credentials
	}
	return p, nil
}

func (p *Provider) readPassword() (string, error) {
	b, err := os.ReadFile(p.cfg.PasswordFile)
	if err != nil {
		return "", fmt.Errorf("OUTBOX_DATABASE_PASSWORD_FILE: %w", err)
	}
	pw := strings.TrimSpace(string(b))
	if pw == "" {
		return "", fmt.Errorf("OUTBOX_DATABASE_PASSWORD_FILE %s is empty: write the password into it", p.cfg.PasswordFile)
	}
	return pw, nil
}

// Apply sets the password of pc, a copy of the configuration about to be
// used for one new connection: the file's content now, or a new IAM token
// for pc's user, host and port (and those of its fall-back hosts, which
// get their own token: a token is signed for one host).
func (p *Provider) Apply(ctx context.Context, pc *pgconn.Config) error {
	switch {
	case p.cfg.PasswordFile != "":
		pw, err := p.readPassword()
		if err != nil {
			return err
		}
		pc.Password = pw
	case p.cfg.IAM:
		tok, err := p.token(ctx, pc.Host, pc.Port, pc.User)
		if err != nil {
			return err
		}
		pc.Password = tok
		if len(pc.Fallbacks) > 0 {
			// pgconn uses one password for every host: keep only the
			// hosts the token is valid for.
			var same []*pgconn.FallbackConfig
			for _, f := range pc.Fallbacks {
				if f.Host == pc.Host && f.Port == pc.Port {
					same = append(same, f)
				}
			}
			pc.Fallbacks = same
		}
	}
	return nil
}

// token builds an RDS IAM authentication token (a SigV4 presigned
// rds-db:connect request, valid 15 minutes).
func (p *Provider) token(ctx context.Context, host string, port uint16, user string) (string, error) {
	if host == "" || strings.HasPrefix(host, "/") {
		return "", fmt.Errorf("OUTBOX_DATABASE_IAM_AUTH needs a TCP host in OUTBOX_DATABASE_URL, not %q", host)
	}
	endpoint := net.JoinHostPort(host, strconv.Itoa(int(port)))
	tok, err := auth.BuildAuthToken(ctx, endpoint, p.region, user, p.creds)
	if err != nil {
		return "", fmt.Errorf("OUTBOX_DATABASE_IAM_AUTH: build the RDS auth token for %s@%s: %w", user, endpoint, err)
	}
	return tok, nil
}

// BeforeConnect is pgxpool.Config.BeforeConnect: the pool calls it with a
// copy of its connection configuration before each new connection.
func (p *Provider) BeforeConnect(ctx context.Context, cc *pgx.ConnConfig) error {
	return p.Apply(ctx, &cc.Config)
}

// Configure sets pc's BeforeConnect to p's, after any BeforeConnect
// already there.
func (p *Provider) Configure(pc *pgxpool.Config) {
	prev := pc.BeforeConnect
	pc.BeforeConnect = func(ctx context.Context, cc *pgx.ConnConfig) error {
		if prev != nil {
			if err := prev(ctx, cc); err != nil {
				return err
			}
		}
		return p.BeforeConnect(ctx, cc)
	}
}

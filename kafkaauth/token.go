package kafkaauth

import (
	"context"
	"encoding/base64"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"net/url"
	"os"
	"strings"
	"sync"
	"time"
)

// refreshFraction is how much of a token's lifetime passes before it is
// fetched again: 80%, so a token living an hour is renewed 12 minutes
// before it expires, and a failed fetch is tried again while it is valid.
const refreshFraction = 0.8

// defaultTokenLifetime is assumed for a token whose answer names no
// expires_in and that is not a JWT with an exp claim.
const defaultTokenLifetime = 5 * time.Minute

// clientCredentials fetches and caches tokens with the OAuth 2.0
// client-credentials grant (RFC 6749 4.4).
type clientCredentials struct {
	cfg  OAuth
	http *http.Client
	o    options

	mu        sync.Mutex
	token     string
	expiry    time.Time // when the token stops being valid
	refreshAt time.Time // when to fetch the next one
	fetches   int
}

func newClientCredentials(c OAuth, o options) (*clientCredentials, error) {
	return &clientCredentials{cfg: c, http: &http.Client{Timeout: 30 * time.Second}, o: o}, nil
}

// Token returns a valid token: the cached one until 80% of its lifetime has
// passed, then a new one from the endpoint. When the endpoint fails and the
// cached token is still valid, that one is returned (and the failure
// logged), so a short outage of the provider costs nothing.
func (s *clientCredentials) Token(ctx context.Context) (string, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	now := s.o.now()
	if s.token != "" && now.Before(s.refreshAt) {
		return s.token, nil
	}
	tok, lifetime, err := s.fetch(ctx)
	if err != nil {
		if s.token != "" && now.Before(s.expiry) {
			s.o.log.Warn("OAUTHBEARER token refresh failed; the current token is still valid", "err", err, "expires_in", s.expiry.Sub(now).Round(time.Second).String())
			return s.token, nil
		}
		return "", err
	}
	s.fetches++
	s.token = tok
	s.expiry = now.Add(lifetime)
	s.refreshAt = now.Add(time.Duration(float64(lifetime) * refreshFraction))
	s.o.log.Info("OAUTHBEARER token fetched", "expires_in", lifetime.Round(time.Second).String())
	return tok, nil
}

// tokenResponse is the token endpoint's answer (RFC 6749 5.1 and 5.2).
type tokenResponse struct {
	AccessToken      string          `json:"access_token"`
	TokenType        string          `json:"token_type"`
	ExpiresIn        json.RawMessage `json:"expires_in"`
	Error            string          `json:"error"`
	ErrorDescription string          `json:"error_description"`
}

func (s *clientCredentials) secret() (string, error) {
	if s.cfg.ClientSecretFile == "" {
		return s.cfg.ClientSecret, nil
	}
	// Read on every fetch: a rotated secret is taken up without a restart.
	b, err := os.ReadFile(s.cfg.ClientSecretFile)
	if err != nil {
		return "", fmt.Errorf("OUTBOX_KAFKA_SASL_OAUTHBEARER_CLIENT_SECRET_FILE: %w", err)
	}
	sec := strings.TrimSpace(string(b))
	if sec == "" {
		return "", fmt.Errorf("OUTBOX_KAFKA_SASL_OAUTHBEARER_CLIENT_SECRET_FILE %s is empty", s.cfg.ClientSecretFile)
	}
	return sec, nil
}

// fetch asks the token endpoint for a token. Its errors name the endpoint
// and the provider's error code, never the secret or a token.
func (s *clientCredentials) fetch(ctx context.Context) (string, time.Duration, error) {
	sec, err := s.secret()
	if err != nil {
		return "", 0, err
	}
	form := url.Values{"grant_type": {"client_credentials"}}
	if s.cfg.Scope != "" {
		form.Set("scope", s.cfg.Scope)
	}
	req, err := http.NewRequestWithContext(ctx, http.MethodPost, s.cfg.TokenEndpointURL, strings.NewReader(form.Encode()))
	if err != nil {
		return "", 0, fmt.Errorf("OAUTHBEARER token request: %w", err)
	}
	req.Header.Set("Content-Type", "application/x-www-form-urlencoded")
	req.Header.Set("Accept", "application/json")
	// RFC 6749 2.3.1: client id and secret form-urlencoded, then basic.
	req.SetBasicAuth(url.QueryEscape(s.cfg.ClientID), url.QueryEscape(sec))
	endpoint := redactedEndpoint(s.cfg.TokenEndpointURL)
	resp, err := s.http.Do(req)
	if err != nil {
		var uerr *url.Error
		if errors.As(err, &uerr) {
			err = uerr.Err // its text repeats the URL, which may carry a query
		}
		return "", 0, fmt.Errorf("OAUTHBEARER token endpoint %s (OUTBOX_KAFKA_SASL_OAUTHBEARER_TOKEN_ENDPOINT_URL): %w", endpoint, err)
	}
	defer resp.Body.Close()
	body, err := io.ReadAll(io.LimitReader(resp.Body, 1<<20))
	if err != nil {
		return "", 0, fmt.Errorf("OAUTHBEARER token endpoint %s: read the answer: %w", endpoint, err)
	}
	var tr tokenResponse
	jerr := json.Unmarshal(body, &tr)
	if resp.StatusCode != http.StatusOK {
		what := ""
		if jerr == nil && tr.Error != "" {
			what = fmt.Sprintf(": %s", printable(tr.Error))
			if tr.ErrorDescription != "" {
				what += " (" + printable(tr.ErrorDescription) + ")"
			}
			// A provider that repeats what it was sent must not make
			// the secret appear in a log.
			what = strings.ReplaceAll(what, sec, "xxxxx")
		}
		return "", 0, fmt.Errorf("OAUTHBEARER token endpoint %s answered %s%s: check OUTBOX_KAFKA_SASL_OAUTHBEARER_CLIENT_ID, the client secret and OUTBOX_KAFKA_SASL_OAUTHBEARER_SCOPE",
			endpoint, resp.Status, what)
	}
	if jerr != nil {
		return "", 0, fmt.Errorf("OAUTHBEARER token endpoint %s: the answer is not JSON: %v", endpoint, jerr)
	}
	if tr.AccessToken == "" {
		return "", 0, fmt.Errorf("OAUTHBEARER token endpoint %s: the answer has no access_token", endpoint)
	}
	if tr.TokenType != "" && !strings.EqualFold(tr.TokenType, "bearer") {
		return "", 0, fmt.Errorf("OAUTHBEARER token endpoint %s: token_type is %q, expected Bearer", endpoint, printable(tr.TokenType))
	}
	return tr.AccessToken, lifetime(tr, s.o.now()), nil
}

// lifetime is the token's lifetime: expires_in, else the exp claim of a
// JWT, else defaultTokenLifetime.
func lifetime(tr tokenResponse, now time.Time) time.Duration {
	if len(tr.ExpiresIn) > 0 {
		var n json.Number
		if err := json.Unmarshal(tr.ExpiresIn, &n); err != nil { // "3600" and 3600 both occur
			var s string
			if json.Unmarshal(tr.ExpiresIn, &s) == nil {
				n = json.Number(s)
			}
		}
		if f, err := n.Float64(); err == nil && f > 0 {
			return time.Duration(f * float64(time.Second))
		}
	}
	if exp, ok := jwtExpiry(tr.AccessToken); ok && exp.After(now) {
		return exp.Sub(now)
	}
	return defaultTokenLifetime
}

// jwtExpiry reads the exp claim of a JWT without checking its signature
// (the broker does that): it only decides when to refresh.
func jwtExpiry(tok string) (time.Time, bool) {
	parts := strings.Split(tok, ".")
	if len(parts) != 3 {
		return time.Time{}, false
	}
	b, err := base64.RawURLEncoding.DecodeString(parts[1])
	if err != nil {
		return time.Time{}, false
	}
	var claims struct {
		Exp float64 `json:"exp"`
	}
	if json.Unmarshal(b, &claims) != nil || claims.Exp <= 0 {
		return time.Time{}, false
	}
	return time.Unix(int64(claims.Exp), 0), true
}

// redactedEndpoint is the endpoint without user info and query.
func redactedEndpoint(raw string) string {
	u, err := url.Parse(raw)
	if err != nil {
		return "(unparsable URL)"
	}
	u.User, u.RawQuery, u.Fragment = nil, "", ""
	return u.String()
}

// printable keeps a provider's error text short and free of control
// characters.
func printable(s string) string {
	s = strings.Map(func(r rune) rune {
		if r < 0x20 || r == 0x7f {
			return ' '
		}
		return r
	}, s)
	if len(s) > 200 {
		s = s[:200] + "..."
	}
	return s
}

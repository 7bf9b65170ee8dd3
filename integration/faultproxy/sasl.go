package faultproxy

import (
	"encoding/binary"
	"fmt"
	"time"

	"github.com/twmb/franz-go/pkg/kerr"
	"github.com/twmb/franz-go/pkg/kmsg"
)

// Kafka API keys of SASL.
const (
	keySASLHandshake    int16 = 17
	keySASLAuthenticate int16 = 36
)

// SASLServer stands in for a broker's SASL server for one mechanism whose
// exchange is a single client message (OAUTHBEARER, AWS_MSK_IAM), for
// mechanisms that kfake does not offer.
type SASLServer interface {
	// Mechanism is the name clients ask for in SaslHandshake.
	Mechanism() string
	// Authenticate checks the client's message. It returns the server's
	// answer and the session's lifetime (0: none; KIP-368: the client
	// must re-authenticate before it ends), or an error, which fails the
	// authentication and closes the connection, as brokers do.
	Authenticate(msg []byte) (resp []byte, lifetime time.Duration, err error)
}

// SASLStats counts what the gate of RequireSASL saw.
type SASLStats struct {
	// Authentications succeeded, first ones and re-authentications;
	// Reauthentications counts the latter alone.
	Authentications, Reauthentications int
	// Failures are authentications Authenticate refused.
	Failures int
	// Expired are connections closed because a request other than a
	// re-authentication came after the session's lifetime (a broker
	// does the same, KIP-368).
	Expired int
	// Unauthenticated are connections closed for a request before any
	// authentication.
	Unauthenticated int
}

// RequireSASL makes the proxy a SASL listener for s: every client
// connection must authenticate with s before anything but ApiVersions is
// forwarded upstream (the upstream broker then needs no SASL), and must
// re-authenticate within the lifetime s returns. Call it before clients
// connect.
func (p *Proxy) RequireSASL(s SASLServer) {
	p.mu.Lock()
	defer p.mu.Unlock()
	p.sasl = s
}

// SASLStats returns the counts of the SASL gate.
func (p *Proxy) SASLStats() SASLStats {
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.saslStats
}

func (p *Proxy) saslServer() SASLServer {
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.sasl
}

func (p *Proxy) countSASL(f func(*SASLStats)) {
	p.mu.Lock()
	defer p.mu.Unlock()
	f(&p.saslStats)
}

// saslState is one connection's SASL state.
type saslState struct {
	handshaken    bool
	authenticated bool
	expiry        time.Time // zero: no lifetime
}

// gate handles a request frame when the proxy requires SASL: it answers
// SaslHandshake and SaslAuthenticate itself, and refuses other requests of
// an unauthenticated or expired session. It reports whether the frame was
// handled (not to be forwarded); an error closes the session.
func (s *session) gate(srv SASLServer, frame []byte, h requestHeader) (bool, error) {
	st := &s.sasl
	switch h.key {
	case keyAPIVersions:
		return false, nil
	case keySASLHandshake:
		req := kmsg.NewPtrSASLHandshakeRequest()
		req.SetVersion(h.version)
		if err := req.ReadFrom(frame[h.bodyOff:]); err != nil {
			return true, fmt.Errorf("decode SaslHandshake: %w", err)
		}
		resp := req.ResponseKind().(*kmsg.SASLHandshakeResponse)
		if req.Mechanism != srv.Mechanism() {
			resp.ErrorCode = kerr.UnsupportedSaslMechanism.Code
			resp.SupportedMechanisms = []string{srv.Mechanism()}
		} else {
			st.handshaken = true
		}
		return true, s.answer(h, resp)
	case keySASLAuthenticate:
		if !st.handshaken {
			return true, fmt.Errorf("SaslAuthenticate before SaslHandshake")
		}
		st.handshaken = false
		req := kmsg.NewPtrSASLAuthenticateRequest()
		req.SetVersion(h.version)
		if err := req.ReadFrom(frame[h.bodyOff:]); err != nil {
			return true, fmt.Errorf("decode SaslAuthenticate: %w", err)
		}
		resp := req.ResponseKind().(*kmsg.SASLAuthenticateResponse)
		answer, lifetime, err := srv.Authenticate(req.SASLAuthBytes)
		if err != nil {
			s.p.countSASL(func(c *SASLStats) { c.Failures++ })
			resp.ErrorCode = kerr.SaslAuthenticationFailed.Code
			msg := err.Error()
			resp.ErrorMessage = &msg
			if werr := s.answer(h, resp); werr != nil {
				return true, werr
			}
			return true, fmt.Errorf("authentication failed: %w", err)
		}
		reauth := st.authenticated
		st.authenticated = true
		st.expiry = time.Time{}
		if lifetime > 0 {
			st.expiry = time.Now().Add(lifetime)
			resp.SessionLifetimeMillis = lifetime.Milliseconds()
		}
		resp.SASLAuthBytes = answer
		s.p.countSASL(func(c *SASLStats) {
			c.Authentications++
			if reauth {
				c.Reauthentications++
			}
		})
		return true, s.answer(h, resp)
	}
	if !st.authenticated {
		s.p.countSASL(func(c *SASLStats) { c.Unauthenticated++ })
		return true, fmt.Errorf("%s before authentication", kmsg.NameForKey(h.key))
	}
	if !st.expiry.IsZero() && time.Now().After(st.expiry) {
		s.p.countSASL(func(c *SASLStats) { c.Expired++ })
		return true, fmt.Errorf("%s after the SASL session expired at %s", kmsg.NameForKey(h.key), st.expiry.Format(time.RFC3339Nano))
	}
	return false, nil
}

// answer writes the proxy's own response to request h, once every response
// due from upstream has been written, so that responses keep their order.
func (s *session) answer(h requestHeader, resp kmsg.Response) error {
	for {
		s.mu.Lock()
		n := len(s.pending)
		s.mu.Unlock()
		if n == 0 {
			break
		}
		select {
		case <-s.p.ctx.Done():
			return s.p.ctx.Err()
		case <-time.After(time.Millisecond):
		}
	}
	header := binary.BigEndian.AppendUint32(nil, uint32(h.corrID))
	if h.flexible {
		header = append(header, 0) // no tagged fields
	}
	s.wmu.Lock()
	defer s.wmu.Unlock()
	if _, err := s.client.Write(encodeResponse(header, resp)); err != nil {
		return fmt.Errorf("writing %s response to client: %w", kmsg.NameForKey(h.key), err)
	}
	return nil
}

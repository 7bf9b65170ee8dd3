package faultproxy

import (
	"encoding/binary"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"sync"

	"github.com/twmb/franz-go/pkg/kmsg"
)

// inflight is a request forwarded upstream whose response is still due.
type inflight struct {
	key      int16
	version  int16
	corrID   int32
	flexible bool
	drop     *dropRule // non-nil: discard the response and close the session
}

// session is one client connection paired with its upstream connection.
type session struct {
	p        *Proxy
	client   net.Conn
	upstream net.Conn
	upAddr   string
	log      *slog.Logger

	mu      sync.Mutex
	pending []inflight // in request order; Kafka answers in order per connection

	wmu  sync.Mutex // serializes writes to client
	sasl saslState  // read and written by forwardRequests only

	closeOnce sync.Once
}

// close closes both connections; it is idempotent.
func (s *session) close() {
	s.closeOnce.Do(func() {
		_ = s.client.Close() // best effort: the peer may already be gone
		_ = s.upstream.Close()
	})
}

// serve proxies one accepted client connection to upstream until either side
// closes, a protocol error occurs, or a drop rule fires.
func (p *Proxy) serve(client net.Conn, upstream string) {
	defer p.wg.Done()
	log := p.logger.With("client", client.RemoteAddr().String(), "upstream", upstream)

	p.waitThawed()
	d := net.Dialer{Timeout: dialTimeout}
	up, err := d.DialContext(p.ctx, "tcp", upstream)
	if err != nil {
		log.Warn("faultproxy: dialing upstream failed; closing client connection", "err", err)
		_ = client.Close()
		return
	}
	s := &session{p: p, client: client, upstream: up, upAddr: upstream, log: log}
	if !p.register(s) {
		s.close()
		return
	}
	defer p.unregister(s)
	log.Debug("faultproxy: connection opened")

	done := make(chan struct{})
	go func() {
		defer close(done)
		if err := s.forwardRequests(); err != nil {
			log.Debug("faultproxy: request stream ended", "err", err)
		}
		s.close()
	}()
	if err := s.forwardResponses(); err != nil {
		log.Debug("faultproxy: response stream ended", "err", err)
	}
	s.close()
	<-done
}

// forwardRequests copies request frames from the client to the broker,
// recording each one that expects a response.
func (s *session) forwardRequests() error {
	for {
		frame, err := readFrame(s.client)
		if err != nil {
			return fmt.Errorf("reading request from client: %w", err)
		}
		s.p.waitThawed()
		h, err := parseRequestHeader(frame)
		if err != nil {
			return fmt.Errorf("parsing request header: %w", err)
		}
		s.p.noteSeen(h.key)
		if srv := s.p.saslServer(); srv != nil {
			handled, err := s.gate(srv, frame, h)
			if err != nil {
				s.log.Info("faultproxy: SASL gate closes the connection", "err", err)
				return err
			}
			if handled {
				continue
			}
		}

		expectResponse := true
		if h.key == keyProduce && h.known {
			acks, err := produceAcks(frame, h)
			if err != nil {
				return fmt.Errorf("parsing produce v%d acks: %w", h.version, err)
			}
			expectResponse = acks != 0
		}
		if expectResponse {
			in := inflight{key: h.key, version: h.version, corrID: h.corrID, flexible: h.flexible}
			if rule, ok := s.p.takeDrop(h.key); ok {
				in.drop = rule
				s.log.Info("faultproxy: response will be dropped",
					"api", kmsg.NameForKey(h.key), "version", h.version, "correlation_id", h.corrID)
			}
			// Record before writing, so the response reader always finds
			// the entry when the response arrives.
			s.mu.Lock()
			s.pending = append(s.pending, in)
			s.mu.Unlock()
		}
		if _, err := s.upstream.Write(frame); err != nil {
			return fmt.Errorf("writing %s request upstream: %w", kmsg.NameForKey(h.key), err)
		}
	}
}

// errDropped ends a session after a drop rule fired.
var errDropped = errors.New("response dropped by fault rule")

// forwardResponses copies response frames from the broker to the client,
// rewriting broker addresses and applying drop rules.
func (s *session) forwardResponses() error {
	for {
		frame, err := readFrame(s.upstream)
		if err != nil {
			return fmt.Errorf("reading response from upstream: %w", err)
		}
		s.p.waitThawed()
		if len(frame) < 8 {
			return fmt.Errorf("response header: %w", errShortFrame)
		}
		corrID := int32(binary.BigEndian.Uint32(frame[4:8]))
		s.mu.Lock()
		if len(s.pending) == 0 {
			s.mu.Unlock()
			return fmt.Errorf("unsolicited response with correlation id %d", corrID)
		}
		in := s.pending[0]
		s.pending = s.pending[1:]
		s.mu.Unlock()
		if in.corrID != corrID {
			return fmt.Errorf("response correlation id %d does not match expected %d (%s)", corrID, in.corrID, kmsg.NameForKey(in.key))
		}

		if in.drop != nil {
			s.fireDrop(in, frame)
			return errDropped
		}

		switch in.key {
		case keyMetadata, keyFindCoordinator, keyDescribeCluster:
			frame, err = s.p.rewrite(frame, in)
			if err != nil {
				return fmt.Errorf("rewriting %s v%d response: %w", kmsg.NameForKey(in.key), in.version, err)
			}
		}
		s.wmu.Lock()
		_, err = s.client.Write(frame)
		s.wmu.Unlock()
		if err != nil {
			return fmt.Errorf("writing %s response to client: %w", kmsg.NameForKey(in.key), err)
		}
	}
}

// fireDrop records a dropped response and runs the rule's callback. The
// caller closes the session afterwards.
func (s *session) fireDrop(in inflight, frame []byte) {
	d := Drop{APIKey: in.key, APIVersion: in.version, CorrelationID: in.corrID, Upstream: s.upAddr}
	d.Response, _, d.DecodeErr = decodeResponse(frame, in.key, in.version, in.flexible)
	s.p.noteFired(in.key)
	s.log.Info("faultproxy: dropped response and closing connection",
		"api", kmsg.NameForKey(in.key), "version", in.version, "correlation_id", in.corrID)
	if in.drop.onDrop != nil {
		in.drop.onDrop(d)
	}
}

// rewrite replaces every broker address in a Metadata, FindCoordinator or
// DescribeCluster response frame with the address of the proxy listener for
// that broker, opening listeners for brokers not proxied yet.
func (p *Proxy) rewrite(frame []byte, in inflight) ([]byte, error) {
	resp, hdrLen, err := decodeResponse(frame, in.key, in.version, in.flexible)
	if err != nil {
		return nil, err
	}
	mapAddr := func(host *string, port *int32) error {
		if *host == "" || *port < 0 { // error responses carry no address
			return nil
		}
		r, err := p.routeFor(*host, *port)
		if err != nil {
			return err
		}
		*host, *port = r.localHost, r.localPort
		return nil
	}
	switch t := resp.(type) {
	case *kmsg.MetadataResponse:
		for i := range t.Brokers {
			if err := mapAddr(&t.Brokers[i].Host, &t.Brokers[i].Port); err != nil {
				return nil, fmt.Errorf("broker %d: %w", t.Brokers[i].NodeID, err)
			}
		}
	case *kmsg.FindCoordinatorResponse:
		if err := mapAddr(&t.Host, &t.Port); err != nil {
			return nil, fmt.Errorf("coordinator %d: %w", t.NodeID, err)
		}
		for i := range t.Coordinators {
			c := &t.Coordinators[i]
			if err := mapAddr(&c.Host, &c.Port); err != nil {
				return nil, fmt.Errorf("coordinator %d for %q: %w", c.NodeID, c.Key, err)
			}
		}
	case *kmsg.DescribeClusterResponse:
		for i := range t.Brokers {
			if err := mapAddr(&t.Brokers[i].Host, &t.Brokers[i].Port); err != nil {
				return nil, fmt.Errorf("broker %d: %w", t.Brokers[i].NodeID, err)
			}
		}
	default:
		return nil, fmt.Errorf("no address rewriting for %T", resp)
	}
	return encodeResponse(frame[4:4+hdrLen], resp), nil
}

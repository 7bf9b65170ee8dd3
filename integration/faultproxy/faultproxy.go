// Package faultproxy is a small Kafka-protocol-aware TCP proxy for
// fault-injection tests.
//
// A Proxy sits between a Kafka client (franz-go or any other) and a Kafka
// cluster (kfake or a real cluster). It listens on one loopback port per
// upstream broker and rewrites the broker addresses in Metadata (api key 3),
// FindCoordinator (api key 10) and DescribeCluster (api key 60) responses so
// that, once bootstrapped through a seed address from [Proxy.Addrs], the
// client keeps talking to every broker through the proxy. Brokers that show up
// in a rewritten response and are not proxied yet get a new listener on
// demand.
//
// Faults are armed at run time, from any goroutine, with
// [Proxy.DropResponseOnce] or [Proxy.DropResponses]: the next matching request
// is forwarded to the broker, the broker's response is read and discarded, and
// the client connection and its upstream connection are closed. This
// simulates "request applied, answer lost".
//
// A Metadata, FindCoordinator or DescribeCluster response that kmsg cannot
// decode (for example a version newer than kmsg knows) is never forwarded
// unrewritten, since the client would then bypass the proxy: the connection is
// closed and the error logged instead.
//
// With [Proxy.RequireSASL] the proxy is itself a SASL listener for one
// single-message mechanism (OAUTHBEARER, AWS_MSK_IAM: mechanisms kfake does
// not offer): it answers SaslHandshake v1 and SaslAuthenticate, honours
// re-authentication (KIP-368) and closes sessions that outlive their
// lifetime, as brokers do.
//
// Limitations: plaintext only (no TLS), and SASL passes through only when
// the proxy does not terminate it (the raw SaslAuthenticate v0 framing of
// SaslHandshake v0 is not understood). The proxy only listens on 127.0.0.1.
package faultproxy

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"strconv"
	"sync"
	"time"

	"github.com/twmb/franz-go/pkg/kmsg"
)

// dialTimeout bounds how long the proxy waits to connect to an upstream broker
// for a newly accepted client connection.
const dialTimeout = 10 * time.Second

// Drop describes one broker response that the proxy discarded because of a
// drop rule. It is passed to the callback given to [Proxy.DropResponses].
type Drop struct {
	// APIKey and APIVersion are those of the request whose response was
	// dropped.
	APIKey     int16
	APIVersion int16
	// CorrelationID is the request's correlation id.
	CorrelationID int32
	// Upstream is the broker address (host:port) that answered.
	Upstream string
	// Response is the broker's decoded response, or nil if kmsg could not
	// decode it (unknown key or version, or a malformed body); DecodeErr
	// then says why.
	Response  kmsg.Response
	DecodeErr error
}

// dropRule is an armed fault for one API key.
type dropRule struct {
	remaining int
	onDrop    func(Drop)
}

// Proxy is a Kafka-aware TCP proxy with run-time fault injection. Create it
// with [New]; all methods are safe for concurrent use.
type Proxy struct {
	ctx    context.Context
	cancel context.CancelFunc
	stop   func() bool // stops the context.AfterFunc registered by New
	logger *slog.Logger
	wg     sync.WaitGroup

	mu        sync.Mutex
	closed    bool
	seeds     []string            // local seed addresses, in the order given to New
	routes    map[string]*route   // upstream host:port -> route
	listeners []net.Listener      // every listener, for Close
	sessions  map[*session]func() // live connection pairs -> their close func
	drops     map[int16][]*dropRule
	seen      map[int16]int
	fired     map[int16]int
	frozen    chan struct{} // non-nil while frozen; closed by Thaw
	sasl      SASLServer    // non-nil: the proxy is a SASL listener (RequireSASL)
	saslStats SASLStats
}

// Freeze stops every byte through the proxy, in both directions, on open
// and new connections, until Thaw: a network partition that leaves TCP
// connections up and answers nothing (connections are still accepted, as a
// black-holing firewall in front of a load balancer would). Requests already
// read are held, not lost.
func (p *Proxy) Freeze() {
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.frozen == nil {
		p.frozen = make(chan struct{})
	}
}

// Thaw lets traffic through again after Freeze.
func (p *Proxy) Thaw() {
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.frozen != nil {
		close(p.frozen)
		p.frozen = nil
	}
}

// waitThawed blocks while the proxy is frozen (or until it closes).
func (p *Proxy) waitThawed() {
	p.mu.Lock()
	ch := p.frozen
	p.mu.Unlock()
	if ch != nil {
		select {
		case <-ch:
		case <-p.ctx.Done():
		}
	}
}

// route is one proxied broker: a local listener forwarding to upstream.
type route struct {
	upstream  string
	localHost string
	localPort int32
	ln        net.Listener
}

// New starts a proxy with one listener per upstream seed broker address
// (host:port) and returns it. The client should be given [Proxy.Addrs] as its
// seed brokers.
//
// logger receives connection-level events (accepted connections, fired
// faults, protocol errors); nil discards them. The proxy shuts down like
// [Proxy.Close] when ctx is done; callers should still call Close to wait for
// its goroutines.
//
// New fails if no seed is given, a seed is not a valid host:port, or a local
// listener cannot be opened; listeners opened so far are closed then.
func New(ctx context.Context, logger *slog.Logger, upstreamSeeds ...string) (*Proxy, error) {
	if len(upstreamSeeds) == 0 {
		return nil, errors.New("faultproxy: no upstream seed broker given")
	}
	if logger == nil {
		logger = slog.New(slog.DiscardHandler)
	}
	pctx, cancel := context.WithCancel(ctx)
	p := &Proxy{
		ctx:      pctx,
		cancel:   cancel,
		logger:   logger,
		routes:   make(map[string]*route),
		sessions: make(map[*session]func()),
		drops:    make(map[int16][]*dropRule),
		seen:     make(map[int16]int),
		fired:    make(map[int16]int),
	}
	for _, seed := range upstreamSeeds {
		host, portStr, err := net.SplitHostPort(seed)
		if err != nil {
			p.Close()
			return nil, fmt.Errorf("faultproxy: seed %q: %w", seed, err)
		}
		port, err := strconv.ParseInt(portStr, 10, 32)
		if err != nil {
			p.Close()
			return nil, fmt.Errorf("faultproxy: seed %q port: %w", seed, err)
		}
		r, err := p.routeFor(host, int32(port))
		if err != nil {
			p.Close()
			return nil, fmt.Errorf("faultproxy: seed %q: %w", seed, err)
		}
		p.mu.Lock()
		p.seeds = append(p.seeds, net.JoinHostPort(r.localHost, strconv.Itoa(int(r.localPort))))
		p.mu.Unlock()
	}
	p.stop = context.AfterFunc(ctx, p.shutdown)
	return p, nil
}

// Addr returns the local address (host:port) proxying the first seed broker
// given to New. It is a convenience for single-seed setups; see Addrs.
func (p *Proxy) Addr() string {
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.seeds[0]
}

// Addrs returns the local addresses (host:port) proxying the seed brokers
// given to New, in the same order. Give them to the client as its seeds.
func (p *Proxy) Addrs() []string {
	p.mu.Lock()
	defer p.mu.Unlock()
	return append([]string(nil), p.seeds...)
}

// Routes returns a snapshot of every proxied broker: upstream host:port ->
// local host:port. It grows as the proxy discovers brokers in rewritten
// responses.
func (p *Proxy) Routes() map[string]string {
	p.mu.Lock()
	defer p.mu.Unlock()
	m := make(map[string]string, len(p.routes))
	for up, r := range p.routes {
		m[up] = net.JoinHostPort(r.localHost, strconv.Itoa(int(r.localPort)))
	}
	return m
}

// DropResponseOnce arms a fault for the next request with apiKey that expects
// a response: the request is forwarded, the broker's response is read and
// discarded, and both the client connection and its upstream connection are
// closed. Calls accumulate: arming twice drops the next two responses.
//
// The rule is consumed when the matching request passes through the proxy;
// if the upstream connection dies before the response arrives, nothing is
// dropped and [Proxy.Fired] does not count it. Produce requests with acks=0
// have no response and never consume a rule.
func (p *Proxy) DropResponseOnce(apiKey int16) {
	p.DropResponses(apiKey, 1, nil)
}

// DropResponses arms a fault like [Proxy.DropResponseOnce] for the next n
// requests with apiKey. If onDrop is non-nil it is called synchronously for
// every dropped response, after the broker's response has been read and
// before the connections are closed, so while onDrop runs the broker has
// applied the request and the client has not seen any outcome. onDrop blocks
// only that connection; it must return for the proxy to make progress on it
// and for [Proxy.Close] to return. n <= 0 arms nothing.
func (p *Proxy) DropResponses(apiKey int16, n int, onDrop func(Drop)) {
	if n <= 0 {
		return
	}
	p.mu.Lock()
	defer p.mu.Unlock()
	p.drops[apiKey] = append(p.drops[apiKey], &dropRule{remaining: n, onDrop: onDrop})
}

// ClearFaults disarms every drop rule that has not fired yet.
func (p *Proxy) ClearFaults() {
	p.mu.Lock()
	defer p.mu.Unlock()
	clear(p.drops)
}

// Seen returns how many requests with apiKey the proxy has read from clients
// so far, including requests whose response was dropped.
func (p *Proxy) Seen(apiKey int16) int {
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.seen[apiKey]
}

// Fired returns how many responses to requests with apiKey the proxy has
// discarded because of drop rules.
func (p *Proxy) Fired(apiKey int16) int {
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.fired[apiKey]
}

// Close stops all listeners, closes every proxied connection and waits for
// the proxy's goroutines to finish (including running onDrop callbacks). It
// is idempotent and safe to call concurrently.
func (p *Proxy) Close() {
	if p.stop != nil {
		p.stop()
	}
	p.shutdown()
	p.wg.Wait()
}

// shutdown closes listeners and connections without waiting.
func (p *Proxy) shutdown() {
	p.cancel()
	p.mu.Lock()
	if p.closed {
		p.mu.Unlock()
		return
	}
	p.closed = true
	lns := p.listeners
	closers := make([]func(), 0, len(p.sessions))
	for _, c := range p.sessions {
		closers = append(closers, c)
	}
	p.mu.Unlock()
	for _, ln := range lns {
		_ = ln.Close() // closing is best effort; accept loops exit on the error
	}
	for _, c := range closers {
		c()
	}
}

// routeFor returns the route for the upstream broker host:port, opening a new
// local listener if there is none yet. It fails if the proxy is closed or the
// listener cannot be opened.
func (p *Proxy) routeFor(host string, port int32) (*route, error) {
	upstream := net.JoinHostPort(host, strconv.Itoa(int(port)))
	p.mu.Lock()
	defer p.mu.Unlock()
	if r, ok := p.routes[upstream]; ok {
		return r, nil
	}
	if p.closed {
		return nil, errors.New("proxy closed")
	}
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return nil, fmt.Errorf("listening for upstream %s: %w", upstream, err)
	}
	tcp, ok := ln.Addr().(*net.TCPAddr)
	if !ok {
		_ = ln.Close()
		return nil, fmt.Errorf("listener for upstream %s has non-TCP address %s", upstream, ln.Addr())
	}
	r := &route{upstream: upstream, localHost: tcp.IP.String(), localPort: int32(tcp.Port), ln: ln}
	p.routes[upstream] = r
	p.listeners = append(p.listeners, ln)
	p.wg.Add(1) // safe: New's caller or a counted goroutine holds the group open
	go p.accept(r)
	p.logger.Debug("faultproxy: proxying broker", "upstream", upstream, "local", ln.Addr().String())
	return r, nil
}

// accept serves one listener until it is closed.
func (p *Proxy) accept(r *route) {
	defer p.wg.Done()
	for {
		c, err := r.ln.Accept()
		if err != nil {
			if !errors.Is(err, net.ErrClosed) {
				p.logger.Error("faultproxy: accept failed; listener stops", "upstream", r.upstream, "err", err)
			}
			return
		}
		p.wg.Add(1)
		go p.serve(c, r.upstream)
	}
}

// takeDrop consumes one armed drop rule for key, if any.
func (p *Proxy) takeDrop(key int16) (*dropRule, bool) {
	p.mu.Lock()
	defer p.mu.Unlock()
	rules := p.drops[key]
	if len(rules) == 0 {
		return nil, false
	}
	r := rules[0]
	r.remaining--
	if r.remaining == 0 {
		p.drops[key] = rules[1:]
		if len(p.drops[key]) == 0 {
			delete(p.drops, key)
		}
	}
	return r, true
}

func (p *Proxy) noteSeen(key int16) {
	p.mu.Lock()
	defer p.mu.Unlock()
	p.seen[key]++
}

func (p *Proxy) noteFired(key int16) {
	p.mu.Lock()
	defer p.mu.Unlock()
	p.fired[key]++
}

// register records a live session so Close can tear it down. It returns false
// if the proxy is already closed.
func (p *Proxy) register(s *session) bool {
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.closed {
		return false
	}
	p.sessions[s] = s.close
	return true
}

func (p *Proxy) unregister(s *session) {
	p.mu.Lock()
	defer p.mu.Unlock()
	delete(p.sessions, s)
}

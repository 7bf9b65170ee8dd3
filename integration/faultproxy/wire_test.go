package faultproxy

import (
	"context"
	"encoding/binary"
	"net"
	"strconv"
	"testing"
	"time"

	"github.com/twmb/franz-go/pkg/kgo"
	"github.com/twmb/franz-go/pkg/kmsg"
)

// requestFrame encodes req as a full request frame (size prefix, header v1
// or v2 with a non-empty tagged-field section, body).
func requestFrame(req kmsg.Request, corrID int32, clientID string) []byte {
	b := make([]byte, 4, 128)
	b = binary.BigEndian.AppendUint16(b, uint16(req.Key()))
	b = binary.BigEndian.AppendUint16(b, uint16(req.GetVersion()))
	b = binary.BigEndian.AppendUint32(b, uint32(corrID))
	b = binary.BigEndian.AppendUint16(b, uint16(len(clientID)))
	b = append(b, clientID...)
	if req.IsFlexible() {
		// One tag (key 7) with a 2-byte value, to exercise skipTags.
		b = append(b, 1, 7, 2, 0xaa, 0xbb)
	}
	b = req.AppendTo(b)
	binary.BigEndian.PutUint32(b, uint32(len(b)-4))
	return b
}

// responseFrame encodes resp as a response frame with the header its
// request version calls for.
func responseFrame(resp kmsg.Response, corrID int32) []byte {
	b := make([]byte, 4, 128)
	b = binary.BigEndian.AppendUint32(b, uint32(corrID))
	if resp.IsFlexible() && resp.Key() != keyAPIVersions {
		b = append(b, 0)
	}
	b = resp.AppendTo(b)
	binary.BigEndian.PutUint32(b, uint32(len(b)-4))
	return b
}

func TestParseProduceHeaderAllVersions(t *testing.T) {
	txnID := "some-txn"
	for v := int16(0); v <= kmsg.NewPtrProduceRequest().MaxVersion(); v++ {
		for _, acks := range []int16{-1, 0, 1} {
			for _, txn := range []*string{nil, &txnID} {
				req := kmsg.NewPtrProduceRequest()
				req.SetVersion(v)
				req.Acks = acks
				req.TransactionID = txn
				req.TimeoutMillis = 1000
				frame := requestFrame(req, 42, "client-x")
				h, err := parseRequestHeader(frame)
				if err != nil {
					t.Fatalf("v%d: parseRequestHeader: %v", v, err)
				}
				if h.key != keyProduce || h.version != v || h.corrID != 42 || h.flexible != req.IsFlexible() || !h.known {
					t.Fatalf("v%d: header %+v", v, h)
				}
				got, err := produceAcks(frame, h)
				if err != nil {
					t.Fatalf("v%d acks %d: %v", v, acks, err)
				}
				if got != acks {
					t.Fatalf("v%d txn %v: acks = %d, want %d", v, txn != nil, got, acks)
				}
			}
		}
	}
}

func TestParseRequestHeaderErrors(t *testing.T) {
	if _, err := parseRequestHeader(make([]byte, 4+5)); err == nil {
		t.Error("short header parsed")
	}
	req := kmsg.NewPtrMetadataRequest()
	req.SetVersion(12) // flexible
	frame := requestFrame(req, 1, "c")
	// Truncate inside the tagged-field section.
	if _, err := parseRequestHeader(frame[:4+8+2+1+2]); err == nil {
		t.Error("truncated tagged fields parsed")
	}
	// A key kmsg does not know is forwarded as-is: not flexible, not known.
	unknown := binary.BigEndian.AppendUint16(make([]byte, 4), 30000)
	unknown = append(unknown, 0, 0, 0, 0, 0, 1, 0xff, 0xff)
	h, err := parseRequestHeader(unknown)
	if err != nil || h.known || h.flexible {
		t.Errorf("unknown key: %+v, %v", h, err)
	}
}

// TestRewriteAllVersions rewrites Metadata, FindCoordinator and
// DescribeCluster responses at every version kmsg knows and checks that
// addresses point at proxy listeners and everything else survives.
func TestRewriteAllVersions(t *testing.T) {
	p, err := New(context.Background(), nil, "127.0.0.1:1")
	if err != nil {
		t.Fatal(err)
	}
	defer p.Close()
	upstreams := []struct {
		id   int32
		host string
		port int32
	}{{1, "broker-a.example", 9092}, {2, "broker-b.example", 9093}}

	check := func(t *testing.T, host string, port int32, up string) {
		t.Helper()
		local, ok := p.Routes()[up]
		if !ok {
			t.Fatalf("no route for %s", up)
		}
		if got := net.JoinHostPort(host, strconv.Itoa(int(port))); got != local {
			t.Fatalf("rewritten to %s, want %s", got, local)
		}
	}
	roundTrip := func(t *testing.T, resp kmsg.Response, flexible bool) kmsg.Response {
		t.Helper()
		frame := responseFrame(resp, 99)
		out, err := p.rewrite(frame, inflight{key: resp.Key(), version: resp.GetVersion(), corrID: 99, flexible: flexible})
		if err != nil {
			t.Fatalf("rewrite: %v", err)
		}
		if binary.BigEndian.Uint32(out) != uint32(len(out)-4) || binary.BigEndian.Uint32(out[4:]) != 99 {
			t.Fatalf("bad frame header % x", out[:8])
		}
		got, _, err := decodeResponse(out, resp.Key(), resp.GetVersion(), flexible)
		if err != nil {
			t.Fatalf("decoding rewritten response: %v", err)
		}
		return got
	}

	for v := int16(0); v <= kmsg.NewPtrMetadataResponse().MaxVersion(); v++ {
		resp := kmsg.NewPtrMetadataResponse()
		resp.SetVersion(v)
		for _, u := range upstreams {
			b := kmsg.NewMetadataResponseBroker()
			b.NodeID, b.Host, b.Port = u.id, u.host, u.port
			resp.Brokers = append(resp.Brokers, b)
		}
		topic := kmsg.NewMetadataResponseTopic()
		topic.Topic = kmsg.StringPtr("t")
		resp.Topics = append(resp.Topics, topic)
		got := roundTrip(t, resp, resp.IsFlexible()).(*kmsg.MetadataResponse)
		for i, u := range upstreams {
			check(t, got.Brokers[i].Host, got.Brokers[i].Port, net.JoinHostPort(u.host, strconv.Itoa(int(u.port))))
			if got.Brokers[i].NodeID != u.id {
				t.Fatalf("Metadata v%d: node id %d, want %d", v, got.Brokers[i].NodeID, u.id)
			}
		}
		if len(got.Topics) != 1 || got.Topics[0].Topic == nil || *got.Topics[0].Topic != "t" {
			t.Fatalf("Metadata v%d: topics not preserved: %+v", v, got.Topics)
		}
	}

	for v := int16(0); v <= kmsg.NewPtrFindCoordinatorResponse().MaxVersion(); v++ {
		resp := kmsg.NewPtrFindCoordinatorResponse()
		resp.SetVersion(v)
		u := upstreams[1]
		if v < 4 {
			resp.NodeID, resp.Host, resp.Port = u.id, u.host, u.port
		} else {
			c := kmsg.NewFindCoordinatorResponseCoordinator()
			c.Key, c.NodeID, c.Host, c.Port = "g", u.id, u.host, u.port
			failed := kmsg.NewFindCoordinatorResponseCoordinator()
			failed.Key, failed.NodeID, failed.Port, failed.ErrorCode = "g2", -1, -1, 15
			resp.Coordinators = append(resp.Coordinators, c, failed)
		}
		got := roundTrip(t, resp, resp.IsFlexible()).(*kmsg.FindCoordinatorResponse)
		up := net.JoinHostPort(u.host, strconv.Itoa(int(u.port)))
		if v < 4 {
			check(t, got.Host, got.Port, up)
		} else {
			check(t, got.Coordinators[0].Host, got.Coordinators[0].Port, up)
			if c := got.Coordinators[1]; c.Host != "" || c.Port != -1 || c.ErrorCode != 15 {
				t.Fatalf("FindCoordinator v%d: error coordinator changed: %+v", v, c)
			}
		}
	}

	for v := int16(0); v <= kmsg.NewPtrDescribeClusterResponse().MaxVersion(); v++ {
		resp := kmsg.NewPtrDescribeClusterResponse()
		resp.SetVersion(v)
		u := upstreams[0]
		b := kmsg.NewDescribeClusterResponseBroker()
		b.NodeID, b.Host, b.Port = u.id, u.host, u.port
		resp.Brokers = append(resp.Brokers, b)
		got := roundTrip(t, resp, resp.IsFlexible()).(*kmsg.DescribeClusterResponse)
		check(t, got.Brokers[0].Host, got.Brokers[0].Port, net.JoinHostPort(u.host, strconv.Itoa(int(u.port))))
	}

	// 1 seed + 2 discovered upstreams.
	if got := len(p.Routes()); got != 3 {
		t.Errorf("routes = %v, want 3 entries", p.Routes())
	}
}

// TestAcksZeroKeepsStreamInSync produces with acks=0 (no response from the
// broker) through the proxy with a Produce drop armed: the rule must not be
// consumed, and the connection must keep matching later responses.
func TestAcksZeroKeepsStreamInSync(t *testing.T) {
	tc := newTestCluster(t)
	ctx, cancel := context.WithTimeout(t.Context(), testTimeout)
	defer cancel()
	p := newProxy(t, tc.seeds)
	p.DropResponseOnce(apiProduce)
	prefix := valuePrefix(t)
	const n = 10

	cl := newClient(t, "acks0",
		kgo.SeedBrokers(p.Addrs()...),
		kgo.RequiredAcks(kgo.NoAck()),
		kgo.DisableIdempotentWrite(),
	)
	if err := cl.ProduceSync(ctx, makeRecords(tc.topic, prefix, n)...).FirstErr(); err != nil {
		t.Fatalf("producing with acks=0: %v", err)
	}
	if err := cl.Ping(ctx); err != nil { // Metadata on the same connections
		t.Fatalf("ping after acks=0 produce: %v", err)
	}
	counts := consumeValues(t, ctx, tc.seeds, tc.topic, prefix, n)
	assertExactlyOnce(t, counts, prefix, n)
	if p.Seen(apiProduce) == 0 {
		t.Error("no Produce request went through the proxy")
	}
	if got := p.Fired(apiProduce); got != 0 {
		t.Errorf("Fired(Produce) = %d for acks=0 requests, want 0", got)
	}

	// The unconsumed rule still fires for the next acked produce.
	acked := newClient(t, "acked", kgo.SeedBrokers(p.Addrs()...), kgo.MetadataMinAge(100*time.Millisecond))
	if err := acked.ProduceSync(ctx, makeRecords(tc.topic, prefix+"acked-", 1)...).FirstErr(); err != nil {
		t.Fatalf("acked produce: %v", err)
	}
	if got := p.Fired(apiProduce); got != 1 {
		t.Errorf("Fired(Produce) = %d after an acked produce, want 1", got)
	}
}

package faultproxy

import (
	"encoding/binary"
	"errors"
	"fmt"
	"io"

	"github.com/twmb/franz-go/pkg/kmsg"
)

// maxFrameSize bounds the size of a single Kafka frame that the proxy is
// willing to buffer. Kafka's own default socket.request.max.bytes is 100 MiB;
// anything beyond this limit is treated as a corrupt stream.
const maxFrameSize = 256 << 20

// Kafka API keys the proxy has to understand.
const (
	keyProduce         int16 = 0
	keyMetadata        int16 = 3
	keyFindCoordinator int16 = 10
	keyAPIVersions     int16 = 18
	keyDescribeCluster int16 = 60
)

var errShortFrame = errors.New("frame too short")

// readFrame reads one length-prefixed Kafka frame from r. The returned slice
// includes the 4-byte size prefix so that it can be forwarded with a single
// write.
func readFrame(r io.Reader) ([]byte, error) {
	var sizeBuf [4]byte
	if _, err := io.ReadFull(r, sizeBuf[:]); err != nil {
		return nil, err // io.EOF on a clean close between frames
	}
	size := int32(binary.BigEndian.Uint32(sizeBuf[:]))
	if size < 0 || size > maxFrameSize {
		return nil, fmt.Errorf("invalid frame size %d", size)
	}
	frame := make([]byte, 4+int(size))
	copy(frame, sizeBuf[:])
	if _, err := io.ReadFull(r, frame[4:]); err != nil {
		return nil, fmt.Errorf("reading %d byte frame body: %w", size, err)
	}
	return frame, nil
}

// requestHeader is the decoded part of a request frame the proxy needs.
type requestHeader struct {
	key      int16
	version  int16
	corrID   int32
	flexible bool // whether the request (and so its response, except ApiVersions) uses flexible headers
	known    bool // whether kmsg knows this key and version
	bodyOff  int  // offset of the request body within the frame (including the size prefix)
}

// parseRequestHeader decodes the request header (v0, v1 or v2) of frame, which
// includes its 4-byte size prefix.
func parseRequestHeader(frame []byte) (requestHeader, error) {
	b := frame[4:]
	if len(b) < 10 {
		return requestHeader{}, fmt.Errorf("request header: %w (%d bytes)", errShortFrame, len(b))
	}
	h := requestHeader{
		key:     int16(binary.BigEndian.Uint16(b[0:2])),
		version: int16(binary.BigEndian.Uint16(b[2:4])),
		corrID:  int32(binary.BigEndian.Uint32(b[4:8])),
	}
	off := 8
	// The client id is a nullable non-compact string in every header version.
	clientIDLen := int(int16(binary.BigEndian.Uint16(b[off : off+2])))
	off += 2
	if clientIDLen > 0 {
		if len(b) < off+clientIDLen {
			return h, fmt.Errorf("request header client id: %w", errShortFrame)
		}
		off += clientIDLen
	}
	if req := kmsg.RequestForKey(h.key); req != nil && h.version >= 0 && h.version <= req.MaxVersion() {
		req.SetVersion(h.version)
		h.flexible = req.IsFlexible()
		h.known = true
	}
	if h.flexible {
		n, err := skipTags(b[off:])
		if err != nil {
			return h, fmt.Errorf("request header tagged fields: %w", err)
		}
		off += n
	}
	h.bodyOff = 4 + off
	return h, nil
}

// produceAcks returns the acks field of a Produce request frame whose header
// is h. A Produce request with acks=0 gets no response from the broker.
func produceAcks(frame []byte, h requestHeader) (int16, error) {
	b := frame[h.bodyOff:]
	if h.version >= 3 { // nullable transactional id precedes acks
		if h.flexible {
			n, used, err := uvarint(b)
			if err != nil {
				return 0, fmt.Errorf("produce transactional id length: %w", err)
			}
			b = b[used:]
			if n > 0 { // compact nullable string: length+1, 0 means null
				if uint64(len(b)) < n-1 {
					return 0, fmt.Errorf("produce transactional id: %w", errShortFrame)
				}
				b = b[n-1:]
			}
		} else {
			if len(b) < 2 {
				return 0, fmt.Errorf("produce transactional id length: %w", errShortFrame)
			}
			n := int(int16(binary.BigEndian.Uint16(b)))
			b = b[2:]
			if n > 0 {
				if len(b) < n {
					return 0, fmt.Errorf("produce transactional id: %w", errShortFrame)
				}
				b = b[n:]
			}
		}
	}
	if len(b) < 2 {
		return 0, fmt.Errorf("produce acks: %w", errShortFrame)
	}
	return int16(binary.BigEndian.Uint16(b)), nil
}

// responseHeaderLen returns the length of the response header (correlation
// id plus, for flexible responses, the tagged-field section) at the start of
// b, which is a response frame without its size prefix.
func responseHeaderLen(b []byte, key int16, requestFlexible bool) (int, error) {
	if len(b) < 4 {
		return 0, fmt.Errorf("response header: %w", errShortFrame)
	}
	// ApiVersions responses always use response header v0 so that a client
	// can parse them whatever version the broker ended up answering with.
	if !requestFlexible || key == keyAPIVersions {
		return 4, nil
	}
	n, err := skipTags(b[4:])
	if err != nil {
		return 0, fmt.Errorf("response header tagged fields: %w", err)
	}
	return 4 + n, nil
}

// decodeResponse decodes the body of a response frame (including its size
// prefix) into the kmsg response type for key at version. It returns the
// decoded response and the length of the response header within frame[4:].
func decodeResponse(frame []byte, key, version int16, requestFlexible bool) (kmsg.Response, int, error) {
	b := frame[4:]
	hdrLen, err := responseHeaderLen(b, key, requestFlexible)
	if err != nil {
		return nil, 0, err
	}
	resp := kmsg.ResponseForKey(key)
	if resp == nil {
		return nil, 0, fmt.Errorf("api key %d unknown to kmsg", key)
	}
	if version < 0 || version > resp.MaxVersion() {
		return nil, 0, fmt.Errorf("api key %d version %d outside kmsg's supported range 0..%d", key, version, resp.MaxVersion())
	}
	resp.SetVersion(version)
	if err := resp.ReadFrom(b[hdrLen:]); err != nil {
		return nil, 0, fmt.Errorf("decoding %s v%d response: %w", kmsg.NameForKey(key), version, err)
	}
	return resp, hdrLen, nil
}

// encodeResponse builds a response frame from the original response header
// bytes (correlation id and tagged fields) and resp.
func encodeResponse(header []byte, resp kmsg.Response) []byte {
	out := make([]byte, 4, 64)
	out = append(out, header...)
	out = resp.AppendTo(out)
	binary.BigEndian.PutUint32(out[:4], uint32(len(out)-4))
	return out
}

// uvarint decodes an unsigned varint, returning the value and bytes used.
func uvarint(b []byte) (uint64, int, error) {
	v, n := binary.Uvarint(b)
	if n <= 0 {
		return 0, 0, fmt.Errorf("invalid uvarint: %w", errShortFrame)
	}
	return v, n, nil
}

// skipTags returns the length of the tagged-field section at the start of b.
func skipTags(b []byte) (int, error) {
	num, off, err := uvarint(b)
	if err != nil {
		return 0, fmt.Errorf("tag count: %w", err)
	}
	for i := uint64(0); i < num; i++ {
		_, n, err := uvarint(b[off:])
		if err != nil {
			return 0, fmt.Errorf("tag key: %w", err)
		}
		off += n
		size, n, err := uvarint(b[off:])
		if err != nil {
			return 0, fmt.Errorf("tag size: %w", err)
		}
		off += n
		if uint64(len(b)-off) < size {
			return 0, fmt.Errorf("tag value: %w", errShortFrame)
		}
		off += int(size)
	}
	return off, nil
}

package outbox

import (
	"strings"
	"testing"
)

func TestValidTopic(t *testing.T) {
	for _, ok := range []string{"payments", "a.b-c_D9", strings.Repeat("x", 249), "__app_internal"} {
		if err := ValidTopic(ok); err != nil {
			t.Errorf("%q: %v", ok, err)
		}
	}
	for _, bad := range []string{"", ".", "..", "has space", "ünï", strings.Repeat("x", 250), "__consumer_offsets", "__transaction_state"} {
		if err := ValidTopic(bad); err == nil {
			t.Errorf("%q accepted", bad)
		}
	}
}

func TestMessageValidateNamesTheField(t *testing.T) {
	p := int32(-1)
	err := Message{Topic: "t", Partition: &p}.Validate()
	if err == nil || !strings.Contains(err.Error(), "Partition") {
		t.Fatalf("err = %v", err)
	}
	if err := (Message{}).Validate(); err == nil || !strings.Contains(err.Error(), "topic") {
		t.Fatalf("err = %v", err)
	}
	err = Message{Topic: "t", Headers: map[string]string{"outbox-id": "42"}}.Validate()
	if err == nil || !strings.Contains(err.Error(), `Headers sets "outbox-id", which is reserved`) {
		t.Fatalf("a message setting the reserved outbox-id header: err = %v", err)
	}
}

func TestIdentifiersAreQuoted(t *testing.T) {
	tb := Table{Schema: `a"b`, Name: "Out Box"}
	if got, want := tb.Ident(), `"a""b"."Out Box"`; got != want {
		t.Fatalf("Ident = %s, want %s", got, want)
	}
	if got, want := tb.DeadLetterIdent(), `"a""b"."Out Box_dead_letter"`; got != want {
		t.Fatalf("DeadLetterIdent = %s, want %s", got, want)
	}
}

// TestNearMissesOfOutboxIDAreReserved: a header a loose consumer would take
// for outbox-id (another case, spaces) is refused like outbox-id itself.
func TestNearMissesOfOutboxIDAreReserved(t *testing.T) {
	for _, name := range []string{"outbox-id", "Outbox-Id", "OUTBOX-ID", " outbox-id", "outbox-id "} {
		if !IsReservedHeader(name) {
			t.Errorf("%q is not reserved", name)
		}
		if err := (Message{Topic: "t", Headers: map[string]string{name: "1"}}).Validate(); err == nil {
			t.Errorf("a Message with header %q is accepted", name)
		}
	}
	for _, name := range []string{"outbox_id", "app-outbox-id", "outboxid"} {
		if IsReservedHeader(name) {
			t.Errorf("%q is reserved, want allowed", name)
		}
	}
}

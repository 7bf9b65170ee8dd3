package outbox

import (
	"strings"
	"testing"
)

func TestMessageEventID(t *testing.T) {
	for _, ev := range []string{"", "0b7c4c1e-3f4a-4d2b-9a55-0123456789ab", "7E57C0DE-0000-4000-8000-00000000C0FF", NewEventID()} {
		if err := (Message{Topic: "t", EventID: ev}).Validate(); err != nil {
			t.Errorf("EventID %q: %v", ev, err)
		}
	}
	for _, ev := range []string{"order-42", "0b7c4c1e3f4a4d2b9a550123456789ab", "{0b7c4c1e-3f4a-4d2b-9a55-0123456789ab}", "0b7c4c1e-3f4a-4d2b-9a55-0123456789ag"} {
		if err := (Message{Topic: "t", EventID: ev}).Validate(); err == nil || !strings.Contains(err.Error(), "EventID") {
			t.Errorf("EventID %q: %v, want an error naming EventID", ev, err)
		}
	}
	if err := (Message{Topic: "t", Headers: map[string]string{"Outbox-Event-Id": "x"}}).Validate(); err == nil || !strings.Contains(err.Error(), "reserved") {
		t.Errorf("header Outbox-Event-Id: %v, want reserved", err)
	}
	if a, b := NewEventID(), NewEventID(); a == b || ValidEventID(a) != nil || a[14] != '4' {
		t.Errorf("NewEventID: %q, %q", a, b)
	}
}

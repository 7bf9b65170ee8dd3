package txn

import (
	"errors"
	"fmt"

	"github.com/twmb/franz-go/pkg/kerr"
)

// The error classes of a batch. Callers branch with errors.Is.
var (
	// ErrFenced: a newer producer took this shard's transactional id. This
	// producer can never write again; its transaction did not commit. The
	// relay gives the shard up.
	ErrFenced = errors.New("producer fenced: another relay owns this shard")

	// ErrAborted: the transaction was aborted and nothing of it is visible
	// to read_committed consumers. The batch can be retried.
	ErrAborted = errors.New("transaction aborted")

	// ErrCommitUnknown: the commit was sent but its answer was lost, so the
	// transaction may or may not have committed. Close the producer and run
	// recovery: a new producer's InitProducerID completes or aborts it, and
	// the checkpoint then tells which.
	ErrCommitUnknown = errors.New("transaction commit outcome unknown")

	// ErrFatal: an error no retry mends (for example authorization); the
	// relay stops and says why.
	ErrFatal = errors.New("fatal Kafka error")
)

// RecordError is a record that Kafka refused for a reason of its own (too
// large, invalid topic, partition out of range, denied topic). Retrying it
// cannot succeed: it belongs in the dead-letter table.
type RecordError struct {
	ID  int64 // the outbox row id
	Err error
}

// Error names the row and Kafka's reason.
func (e *RecordError) Error() string { return fmt.Sprintf("outbox row %d: %v", e.ID, e.Err) }

// Unwrap returns Kafka's error, for errors.Is(err, kerr.MessageTooLarge).
func (e *RecordError) Unwrap() error { return e.Err }

// RecordErrors is the set of records a batch failed on. The transaction was
// aborted (or, with BeforeSend, never begun); other records of the batch may
// have failed only because they shared it.
type RecordErrors struct {
	Records []*RecordError
	// BeforeSend: the records were refused before anything was produced,
	// each on its own account (see Producer.Check); the rest of the batch
	// can be published without them.
	BeforeSend bool
}

// Error counts the refused records and names the first.
func (e *RecordErrors) Error() string {
	return fmt.Sprintf("%d records refused, first: %v (transaction aborted)", len(e.Records), e.Records[0])
}

// Unwrap makes errors.Is(err, ErrAborted) true.
func (e *RecordErrors) Unwrap() error { return ErrAborted }

// isFenced reports whether err says a newer producer owns the transactional id.
func isFenced(err error) bool {
	return errors.Is(err, kerr.ProducerFenced) || errors.Is(err, kerr.InvalidProducerEpoch)
}

// isRecordFatal reports whether err is about the record itself, so that
// no retry of the same record can succeed.
func isRecordFatal(err error) bool {
	for _, e := range []error{kerr.MessageTooLarge, kerr.RecordListTooLarge, kerr.InvalidTopicException,
		kerr.TopicAuthorizationFailed, kerr.InvalidRecord, kerr.CorruptMessage, kerr.UnknownTopicOrPartition} {
		if errors.Is(err, e) {
			return true
		}
	}
	return false
}

// isRelayFatal reports whether err stops the relay: the cluster denies it.
func isRelayFatal(err error) bool {
	return errors.Is(err, kerr.TransactionalIDAuthorizationFailed) || errors.Is(err, kerr.ClusterAuthorizationFailed) ||
		errors.Is(err, kerr.SaslAuthenticationFailed) || errors.Is(err, kerr.InvalidTransactionTimeout)
}

// classify turns an error met while producing into one of the classes above,
// keeping the original in the chain.
func classify(err error) error {
	switch {
	case err == nil:
		return nil
	case isFenced(err):
		return fmt.Errorf("%w: %w", ErrFenced, err)
	case isRelayFatal(err):
		return fmt.Errorf("%w: %w", ErrFatal, err)
	default:
		return fmt.Errorf("%w: %w", ErrAborted, err)
	}
}

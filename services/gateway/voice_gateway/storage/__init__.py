"""What the gateway keeps in NATS JetStream: call logs (stream ``CALLS``), the pending-call registry
(KV ``sessions``), and KV buckets that re-create themselves."""

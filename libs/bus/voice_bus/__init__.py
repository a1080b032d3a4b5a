"""NATS JetStream work bus shared by the gateway, the workers and the CLI."""

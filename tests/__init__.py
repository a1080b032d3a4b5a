"""Test suite of the voice platform (real nats-server, real gRPC servers, real models)."""

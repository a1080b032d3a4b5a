"""Generated voice.v1 protobuf and gRPC modules (see protos/ and `make protos`)."""

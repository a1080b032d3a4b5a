"""Process runtime of the workers: gRPC server, health, metrics, signals and drain."""

"""The HTTP side of the gateway: REST API keys and tokens, connection limits, strict JSON, log redaction."""

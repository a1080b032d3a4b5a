"""WebSocket gateway: sessions, dialects and the turn engine."""

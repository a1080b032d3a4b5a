"""Wire protocols: each module translates one dialect to and from the session's events."""

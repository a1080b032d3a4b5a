"""Speech-to-text worker."""

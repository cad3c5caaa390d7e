"""The HTTP receiver: authenticate, decode, queue in Redis, answer at once."""

"""The router service: teacher registry, routing policies and the concurrent HTTP fan-out."""

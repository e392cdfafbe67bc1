"""POST /v1/chat/completions: protocol (request models), serving, route."""

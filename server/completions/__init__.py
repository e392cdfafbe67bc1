"""POST /v1/completions (legacy text completions): protocol (request model), serving, route."""

"""POST /tokenize and /detokenize (vLLM's shapes): protocol (request models), serving, route."""

"""OpenAI's Responses API: protocol, output items, the response store, serving, route."""

"""Speculative decoding: draft tokens proposed cheaply, verified by the target in one forward."""

"""hearth's engine: loads checkpoints, runs continuous batched generation; never imports FastAPI.

Only torch-free modules are imported here: `engine.types`, `engine.config` and `engine.sources` are
safe for the server to use; the rest is loaded by the CLI.
"""

"""hearth's engine: loads checkpoints, runs continuous batched generation; never imports FastAPI.

Nothing is imported here. The torch-free modules `hearth.engine.types`, `hearth.engine.config`
and `hearth.engine.loading.sources` are safe for the server to use; the rest is loaded by
`hearth.launch` when it starts the models (docs/architecture.md maps the sub-packages).
"""

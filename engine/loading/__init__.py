"""Getting a checkpoint onto a device: model sources (local dir, cached hub id, GGUF), the GGUF
reader and its cached conversion, random-weight `dummy` models, and the loader that ties them."""

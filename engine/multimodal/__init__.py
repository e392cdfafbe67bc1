"""Images in the prompt: the processor that expands placeholders, and the prefill-time vision
encoder."""

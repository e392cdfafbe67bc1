"""hearth's HTTP side: FastAPI speaking OpenAI's API over engine clients; never imports torch."""

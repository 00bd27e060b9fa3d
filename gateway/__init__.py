"""Gateway: the only OpenAI-speaking process. See handlers.py for a request's lifecycle."""

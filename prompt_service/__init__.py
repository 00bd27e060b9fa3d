"""Prompt service: the prefill engine. See engine.py for a request's lifecycle here."""

"""Token service: the decode engine. See engine.py for a request's lifecycle here."""

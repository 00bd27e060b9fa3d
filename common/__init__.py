"""Shared by every service: settings, typed messages, errors, Redis metadata, sampling, models, KV."""

"""Corral: a fleet of Ollama servers behind Celery."""

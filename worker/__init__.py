"""Celery workers: thin tasks that load a row, call ``attacks``, store results."""

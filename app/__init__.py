"""poisonaudit's HTTP service: FastAPI front, Celery workers, SQL records, object storage.

The API process never imports torch; it validates with ``attacks.catalogue`` only.
"""

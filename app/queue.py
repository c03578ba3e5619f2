"""The Celery configuration (shared with ``worker.celery_app``) and the API's side of the queue.

The API enqueues by task name (``send_task``) and never imports the worker's tasks,
so it never loads torch.
"""

from __future__ import annotations

from typing import Any

from app.settings import Settings, get_settings

TASK_RUN_JOB = "worker.tasks.run_job"
TASK_PRETRAIN = "worker.tasks.pretrain_encoder"
TASK_CHECK_ENCODER = "worker.tasks.check_encoder"
TASK_FOR_KIND = {"attack": TASK_RUN_JOB, "pretrain": TASK_PRETRAIN}
QUEUES = ("gpu", "cpu")


def queue_for_device(device: str, settings: Settings) -> str:
    """Jobs are routed by the device they ask for; 'auto' goes to the configured queue."""
    return {"cuda": "gpu", "cpu": "cpu"}.get(device, settings.auto_queue)


def celery_config(settings: Settings) -> dict[str, Any]:
    from kombu import Queue

    conf: dict[str, Any] = dict(
        broker_url=settings.broker_url,
        result_backend=settings.result_backend,
        task_ignore_result=True,  # state lives in our database, not in the result backend
        task_serializer="json",
        accept_content=["json"],
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,
        task_create_missing_queues=False,
        task_queues=[Queue(q, routing_key=q) for q in QUEUES],
        task_default_queue="cpu",
        task_routes={TASK_CHECK_ENCODER: {"queue": "cpu"}},  # run_job/pretrain: by the job's device
        # A backstop only: the worker enforces job_time_limit_s itself (worker.runner), in every pool,
        # and records why; Celery's limits (which do nothing under --pool=solo) come later.
        task_time_limit=settings.job_time_limit_s + 60,
        task_soft_time_limit=settings.job_time_limit_s + 30,
        broker_connection_retry_on_startup=True,
        broker_connection_timeout=5,
        worker_hijack_root_logger=False,
        worker_cancel_long_running_tasks_on_connection_loss=False,
        enable_utc=True,
    )
    if settings.broker_url.startswith(("redis", "rediss")):
        conf["broker_transport_options"] = {"visibility_timeout": settings.visibility_timeout_s}
        conf["result_backend_transport_options"] = {"visibility_timeout": settings.visibility_timeout_s}
    elif settings.broker_url.startswith("sqla+sqlite"):
        # Passed to create_engine: only engine options may go here (no polling_interval).
        conf["broker_transport_options"] = {"connect_args": {"timeout": 30}}
    return conf


def create_celery(settings: Settings):
    from celery import Celery

    app = Celery("poisonaudit", set_as_current=False)
    app.conf.update(celery_config(settings))
    return app


class JobQueue:
    """What the API needs from the broker: enqueue by name, and a reachability check."""

    def __init__(self, celery):
        self.celery = celery

    def enqueue_job(self, job_id, kind: str, queue: str) -> None:
        self.celery.send_task(TASK_FOR_KIND[kind], args=[str(job_id)], queue=queue, ignore_result=True)

    def check_encoder(self, encoder_id) -> None:
        self.celery.send_task(TASK_CHECK_ENCODER, args=[str(encoder_id)], queue="cpu", ignore_result=True)

    def ping(self, timeout: float = 3.0) -> None:
        """A real round trip to the broker (connecting alone proves nothing for virtual transports)."""
        from amqp.exceptions import ChannelError

        with self.celery.connection_for_write() as conn:
            conn.ensure_connection(max_retries=1, interval_start=0, timeout=timeout)
            try:
                conn.default_channel.queue_declare(queue=QUEUES[0], passive=True)
            except ChannelError:  # "no such queue" is an answer: the broker is up
                pass


_queues: dict[int, tuple[Settings, JobQueue]] = {}


def get_queue() -> JobQueue:
    """FastAPI dependency: the queue for the current settings (override in tests)."""
    s = get_settings()
    hit = _queues.get(id(s))
    if hit is None or hit[0] is not s:
        hit = _queues[id(s)] = (s, JobQueue(create_celery(s)))
    return hit[1]

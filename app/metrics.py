"""Prometheus metrics, computed from the database at scrape time (so every API replica
reports the same numbers and nothing is lost when a worker dies)."""

from __future__ import annotations

import logging

from amqp.exceptions import ChannelError
from prometheus_client import CollectorRegistry
from prometheus_client.core import GaugeMetricFamily, HistogramMetricFamily
from sqlalchemy import case, func, select

from app.models import Job, JobStatus
from app.queue import QUEUES, JobQueue

log = logging.getLogger("app.metrics")
BUCKETS = (1, 5, 15, 30, 60, 120, 300, 600, 1800, 3600, 7200, 21600)


class JobCollector:
    def __init__(self, session, queue: JobQueue | None):
        self.session = session
        self.queue = queue

    def collect(self):
        s = self.session
        by_status = s.execute(select(Job.kind, Job.status, func.count()).group_by(Job.kind, Job.status)).all()
        queued = dict(s.execute(select(Job.queue, func.count()).where(Job.status == JobStatus.queued).group_by(Job.queue)).all())
        hist = {}
        for status in (JobStatus.succeeded, JobStatus.failed, JobStatus.cancelled):
            cols = [func.sum(case((Job.duration_s <= b, 1), else_=0)) for b in BUCKETS]
            row = s.execute(select(func.count(), func.coalesce(func.sum(Job.duration_s), 0.0), *cols)
                            .where(Job.status == status, Job.duration_s.is_not(None))).one()
            hist[str(status)] = row

        jobs = GaugeMetricFamily("poisonaudit_jobs", "Jobs by kind and status.", labels=["kind", "status"])
        seen = {(k, st) for k, st, _ in by_status}
        for kind, status, n in by_status:
            jobs.add_metric([kind, status], n)
        for status in JobStatus:
            if ("attack", str(status)) not in seen:
                jobs.add_metric(["attack", str(status)], 0)
        yield jobs

        depth = GaugeMetricFamily("poisonaudit_queue_depth", "Jobs waiting for a worker, by queue.", labels=["queue"])
        for q in QUEUES:
            depth.add_metric([q], queued.get(q, 0))
        yield depth

        dur = HistogramMetricFamily("poisonaudit_job_duration_seconds", "Run time of finished jobs.", labels=["status"])
        for status, row in hist.items():
            count, total, *cum = row
            buckets = [(str(float(b)), int(c or 0)) for b, c in zip(BUCKETS, cum)] + [("+Inf", int(count))]
            dur.add_metric([status], buckets, float(total or 0.0))
        yield dur

        broker = GaugeMetricFamily("poisonaudit_broker_messages", "Messages in the broker's queues.", labels=["queue"])
        try:
            if self.queue is None:
                raise RuntimeError("no queue")
            with self.queue.celery.connection_for_read() as conn:
                conn.ensure_connection(max_retries=1, interval_start=0, timeout=2)
                ch = conn.default_channel
                for q in QUEUES:
                    try:
                        n = ch.queue_declare(queue=q, passive=True).message_count
                    except ChannelError:  # Redis drops an empty queue's key: nothing waiting
                        n = 0
                    broker.add_metric([q], n)
        except Exception as exc:  # the broker is optional for metrics
            log.debug("broker depth unavailable: %s", exc)
        yield broker


def render(session, queue: JobQueue | None) -> bytes:
    from prometheus_client import generate_latest

    reg = CollectorRegistry(auto_describe=False)
    reg.register(JobCollector(session, queue))
    return generate_latest(reg)

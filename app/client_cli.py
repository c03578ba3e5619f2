"""Client commands of the ``poisonaudit`` CLI: ``submit``, ``status``, ``wait``, ``download``, ``audit``.

The server and the key come from ``--url`` / ``--api-key`` or POISONAUDIT_URL /
POISONAUDIT_API_KEY. Exit status: 0 done (and, when waiting, succeeded); 1 the job or
audit finished without succeeding (failed, cancelled, partial) or the wait timed out;
2 the server refused the request (4xx: the problem detail is printed) or bad usage;
3 the server failed (5xx) or could not be reached.
"""

from __future__ import annotations

import json
import os
import sys
from typing import Any

EXIT_NOT_SUCCEEDED, EXIT_REFUSED, EXIT_SERVER = 1, 2, 3


class UsageError(Exception):
    pass


def _json_arg(text: str | None, what: str) -> Any:
    if text is None:
        return None
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise UsageError(f"{what} is not valid JSON: {exc}") from None


def _params(pairs: list[str] | None, blob: str | None) -> dict[str, Any]:
    """The same --param/--params rules as `poisonaudit run` (attacks.cli)."""
    from attacks.cli import CLIError, _parse_params

    try:
        return _parse_params(pairs, blob)
    except CLIError as exc:
        raise UsageError(str(exc)) from None


def _client(args):
    from app.client import Client

    return Client(args.url, args.api_key, timeout=args.http_timeout)


class _JobBar:
    """A tqdm bar over a job's progress fraction, labelled with its stage."""

    def __init__(self, quiet: bool):
        self.quiet, self.bar = quiet, None

    def __call__(self, job) -> None:
        if self.quiet:
            return
        from tqdm import tqdm

        if self.bar is None:
            self.bar = tqdm(total=1000, file=sys.stderr, bar_format="{desc} {percentage:3.0f}%|{bar}| {elapsed}")
        frac = 1.0 if job.status in ("succeeded",) else (job.progress.fraction or 0.0)
        self.bar.set_description_str(f"{job.status:>9} {job.progress.stage or '':>17}")
        self.bar.update(int(frac * 1000) - self.bar.n)

    def close(self):
        if self.bar is not None:
            self.bar.close()


class _AuditBar(_JobBar):
    def __call__(self, audit) -> None:
        if self.quiet:
            return
        from tqdm import tqdm

        if self.bar is None:
            self.bar = tqdm(total=1000, file=sys.stderr, bar_format="{desc} {percentage:3.0f}%|{bar}| {elapsed}")
        c = audit.progress.jobs
        self.bar.set_description_str(f"{audit.status:>9} {c.succeeded}/{c.total} done, {c.running} running,"
                                     f" {c.failed + c.cancelled} failed")
        self.bar.update(int(audit.progress.fraction * 1000) - self.bar.n)


def _print_job(job, as_json: bool) -> None:
    if as_json:
        print(job.model_dump_json(indent=2))
        return
    line = f"job {job.id} {job.status}"
    if job.progress.stage and job.status == "running":
        line += f" ({job.progress.stage} {100 * (job.progress.fraction or 0):.0f}%)"
    m = job.metrics or {}
    if job.status == "succeeded" and "poisoned_accuracy" in m:
        line += (f": clean {m.get('clean_accuracy', float('nan')):.4f} -> poisoned {m['poisoned_accuracy']:.4f}"
                 f" (drop {m.get('drop', float('nan')):.4f})")
    if job.error:
        line += f": {job.error}"
    print(line)


def format_table(audit) -> str:
    """The audit table as text: one line per row, poisoned accuracy and drop per epsilon."""
    t = audit.table
    keys = [str(float(e)) for e in t.epsilons]
    w = max([len(r.label) for r in t.rows] + [6])
    clean = t.clean_accuracy
    out = [f"audit {audit.id} {audit.status}; clean accuracy "
           + (f"{clean.mean:.4f} ± {clean.std:.4f} (n={clean.n})" if clean else "n/a")]
    out.append(f"{'attack':<{w}}  " + "  ".join(f"{'eps ' + k:>24}" for k in keys))
    for r in t.rows:
        cells = []
        for k in keys:
            c = r.cells.get(k)
            if c is None or c.poisoned_accuracy is None:
                j = c.jobs if c else None
                cells.append(f"{('pending' if j and j.pending else 'failed' if j and j.failed else '-'):>24}")
            else:
                cells.append(f"{c.poisoned_accuracy.mean:.4f} (drop {c.drop.mean:+.4f})".rjust(24))
        out.append(f"{r.label:<{w}}  " + "  ".join(cells))
    for s in t.summary:
        out.append(f"worst at eps {s.epsilon:g}: " + (f"{s.attack}" + (f" beta={s.beta:g}" if s.beta is not None else "")
                                                      + f", drop {s.worst_drop:.4f}" if s.attack else "n/a"))
    return "\n".join(out)


# ------------------------------------------------------------------ commands
def _add_run_options(p) -> None:
    """How the jobs run, shared by submit and audit."""
    p.add_argument("--no-defences", action="store_true", help="skip measuring the defences (faster)")
    p.add_argument("--precision", choices=["fp32", "bf16"], help="bf16: autocast on a GPU (default: the server's, fp32)")


def _run_options(args) -> dict[str, Any]:
    """The request fields of _add_run_options' flags that were given (the rest is left to the server)."""
    out: dict[str, Any] = {}
    if args.no_defences:
        out["defences"] = False
    if args.precision:
        out["precision"] = args.precision
    return out


def cmd_submit(args) -> int:
    body: dict[str, Any] = {"encoder": args.encoder, "dataset": args.dataset, "attack": args.attack,
                            "epsilon": args.epsilon, "params": _params(args.param, args.params), "seed": args.seed,
                            "device": args.device}
    if args.beta is not None:
        body["beta"] = args.beta
    if args.head:
        body["head"] = _json_arg(args.head, "--head")
    body.update(_run_options(args))
    with _client(args) as c:
        job = c.submit_job(idempotency_key=args.idempotency_key, **body)
        if not args.wait:
            _print_job(job, args.json)
            return 0
        return _wait_job(c, job.id, args)


def _wait_job(c, job_id, args) -> int:
    bar = _JobBar(args.quiet)
    try:
        job = c.wait_job(job_id, on_progress=bar, poll_s=args.poll, timeout_s=args.timeout)
    finally:
        bar.close()
    _print_job(job, args.json)
    return 0 if job.status == "succeeded" else EXIT_NOT_SUCCEEDED


def _wait_audit(c, audit_id, args) -> int:
    bar = _AuditBar(args.quiet)
    try:
        audit = c.wait_audit(audit_id, on_progress=bar, poll_s=args.poll, timeout_s=args.timeout)
    finally:
        bar.close()
    print(audit.model_dump_json(indent=2) if args.json else format_table(audit))
    return 0 if audit.status == "succeeded" else EXIT_NOT_SUCCEEDED


def cmd_status(args) -> int:
    with _client(args) as c:
        if args.audit:
            a = c.get_audit(args.id)
            print(a.model_dump_json(indent=2) if args.json else format_table(a))
        else:
            _print_job(c.get_job(args.id), args.json)
    return 0


def cmd_wait(args) -> int:
    with _client(args) as c:
        return _wait_audit(c, args.id, args) if args.audit else _wait_job(c, args.id, args)


def cmd_download(args) -> int:
    with _client(args) as c:
        path = c.download_poisoned_set(args.id, args.out)
    print(f"wrote {path} ({os.path.getsize(path)} bytes)")
    return 0


def cmd_audit(args) -> int:
    if args.spec:
        try:
            with open(args.spec) as fh:
                body = json.load(fh)
        except (OSError, json.JSONDecodeError) as exc:
            raise UsageError(f"--spec: {exc}") from None
        if not isinstance(body, dict):
            raise UsageError(f"--spec must hold a JSON object (the POST /v1/audits body), not {type(body).__name__}")
    else:
        missing = [f"--{n}" for n in ("encoder", "dataset") if not getattr(args, n)]
        if missing:
            raise UsageError(f"give --spec FILE, or {', '.join(missing)} (without --attack: the paper's table)")
        per = {}
        for pair in args.attack_params or []:
            name, _, blob = pair.partition("=")
            per[name] = _json_arg(blob, f"--attack-params {name}")
        body = {"encoder": args.encoder, "dataset": args.dataset, "device": args.device}
        if args.attack:
            body["attacks"] = [{"name": n, "params": per.get(n, {})} for n in args.attack]
        for k, v in (("epsilons", args.epsilon), ("betas", args.beta), ("seeds", args.seed), ("name", args.name)):
            if v:
                body[k] = v
        if args.head:
            body["head"] = _json_arg(args.head, "--head")
    body.update(_run_options(args))
    with _client(args) as c:
        audit = c.submit_audit(idempotency_key=args.idempotency_key, **body)
        print(f"audit {audit.id}: {len(audit.jobs)} jobs queued", file=sys.stderr)
        if args.no_wait:
            print(audit.model_dump_json(indent=2) if args.json else format_table(audit))
            return 0
        return _wait_audit(c, audit.id, args)


def run(func, args) -> int:
    """Runs a client command, turning errors into messages and exit statuses."""
    import httpx
    from pydantic import ValidationError

    from app.client import ApiError, BadResponse, WaitTimeout

    try:
        return func(args)
    except ApiError as exc:
        print(f"poisonaudit: error: {exc}", file=sys.stderr)
        return EXIT_REFUSED if exc.status < 500 else EXIT_SERVER
    except BadResponse as exc:
        print(f"poisonaudit: error: malformed server response: {exc}", file=sys.stderr)
        return EXIT_SERVER
    except (UsageError, ValidationError) as exc:
        print(f"poisonaudit: error: {exc}", file=sys.stderr)
        return EXIT_REFUSED
    except WaitTimeout as exc:
        print(f"poisonaudit: {exc}", file=sys.stderr)
        return EXIT_NOT_SUCCEEDED
    except httpx.HTTPError as exc:
        print(f"poisonaudit: error: cannot reach the server: {exc}", file=sys.stderr)
        return EXIT_SERVER


def add_subcommands(subparsers) -> None:
    def common(p, wait=True):
        p.add_argument("--url", default=None, help="server URL (env POISONAUDIT_URL; default http://127.0.0.1:8000)")
        p.add_argument("--api-key", default=None, help="API key (env POISONAUDIT_API_KEY)")
        p.add_argument("--http-timeout", type=float, default=30.0, help="seconds per HTTP request")
        p.add_argument("--json", action="store_true", help="print the full JSON answer")
        if wait:
            p.add_argument("--poll", type=float, default=1.0, help="seconds between polls while waiting")
            p.add_argument("--timeout", type=float, default=None, help="give up waiting after this many seconds")
            p.add_argument("--quiet", action="store_true", help="no progress bar")

    def wrap(f):
        return lambda args: run(f, args)

    p = subparsers.add_parser("submit", help="submit a job to a poisonaudit server")
    common(p)
    p.add_argument("--encoder", required=True, help="encoder id")
    p.add_argument("--dataset", required=True, help="built-in name, server-side name or uploaded id")
    p.add_argument("--attack", required=True)
    p.add_argument("--epsilon", type=float, default=0.03)
    p.add_argument("--beta", type=float, default=None)
    p.add_argument("--param", action="append", metavar="KEY=VALUE", help="an attack parameter (repeatable)")
    p.add_argument("--params", help="attack parameters as a JSON object")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--head", help="head recipe as a JSON object")
    _add_run_options(p)
    p.add_argument("--idempotency-key")
    p.add_argument("--wait", action="store_true", help="wait for the job, with a progress bar")
    p.set_defaults(func=wrap(cmd_submit))

    for name, helptext, f in (("status", "show a job (or with --audit, an audit)", cmd_status),
                              ("wait", "wait for a job (or with --audit, an audit) to finish", cmd_wait)):
        p = subparsers.add_parser(name, help=helptext)
        common(p, wait=name == "wait")
        p.add_argument("id")
        p.add_argument("--audit", action="store_true", help="the id is an audit's")
        p.set_defaults(func=wrap(f))

    p = subparsers.add_parser("download", help="download a job's poisoned set (npz)")
    common(p, wait=False)
    p.add_argument("id")
    p.add_argument("--out", required=True, help="file to write")
    p.set_defaults(func=wrap(cmd_download))

    p = subparsers.add_parser("audit", help="submit an audit (attacks x betas x epsilons x seeds) and wait for its table")
    common(p)
    p.add_argument("--spec", help="the whole request as a JSON file (POST /v1/audits body)")
    p.add_argument("--encoder")
    p.add_argument("--dataset")
    p.add_argument("--name")
    p.add_argument("--attack", action="append",
                   help="an attack name (repeatable); none: the paper's table at the catalogue's defaults")
    p.add_argument("--attack-params", action="append", metavar="NAME=JSON", help="parameters of one attack (repeatable)")
    p.add_argument("--epsilon", action="append", type=float, help="repeatable (default 0.03 and 0.1)")
    p.add_argument("--beta", action="append", type=float, help="repeatable; for attacks that take one")
    p.add_argument("--seed", action="append", type=int, help="repeatable (default 0)")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--head", help="head recipe as a JSON object")
    _add_run_options(p)
    p.add_argument("--idempotency-key", help="a retry with the same key returns the audit the first request made")
    p.add_argument("--no-wait", action="store_true", help="print the queued audit and return")
    p.set_defaults(func=wrap(cmd_audit), poll=2.0)

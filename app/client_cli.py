"""Client commands of the ``poisonaudit`` CLI: ``submit``, ``status``, ``wait``, ``download``, ``audit``,
``encoders list|show|upload|pretrain``, ``datasets list|show|upload``, ``report`` and ``export``.

Accuracies print as percentages and drops in points (as in the reports); ``submit`` and
``audit`` both wait for the result unless ``--no-wait``.

The server and the key come from ``--url`` / ``--api-key`` or POISONAUDIT_URL /
POISONAUDIT_API_KEY. Exit status: 0 done (and, when waiting, succeeded); 1 the job or
audit finished without succeeding (failed, cancelled, partial) or the wait timed out;
2 the server refused the request (4xx: the problem detail is printed) or bad usage;
3 the server failed (5xx) or could not be reached.
"""

from __future__ import annotations

import argparse
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
        line += (f": clean {_pct(m.get('clean_accuracy'))} -> poisoned {_pct(m['poisoned_accuracy'])}"
                 f" (drop {_pts(m.get('drop'))})")
    if job.error:
        line += f": {job.error}"
    print(line)


def _num(v: Any) -> float | None:
    return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else None


def _pct(v: Any) -> str:
    """An accuracy (a fraction) as a percentage, as the reports show it."""
    v = _num(v)
    return "n/a" if v is None else f"{100 * v:.2f}%"


def _pts(v: Any, sign: bool = False) -> str:
    """A drop (a difference of fractions) in percentage points."""
    v = _num(v)
    return "n/a" if v is None else (f"{100 * v:+.2f}" if sign else f"{100 * v:.2f}") + " points"


def format_table(audit) -> str:
    """The audit table as text: one line per row, poisoned accuracy and drop per epsilon."""
    t = audit.table
    keys = [str(float(e)) for e in t.epsilons]
    w = max([len(r.label) for r in t.rows] + [6])
    clean = t.clean_accuracy
    out = [f"audit {audit.id} {audit.status}; clean accuracy "
           + (f"{_pct(clean.mean)} ± {100 * clean.std:.2f} (n={clean.n})" if clean else "n/a")]
    out.append(f"{'attack':<{w}}  " + "  ".join(f"{'eps ' + k:>30}" for k in keys))
    for r in t.rows:
        cells = []
        for k in keys:
            c = r.cells.get(k)
            if c is None or c.poisoned_accuracy is None:
                j = c.jobs if c else None
                cells.append(f"{('pending' if j and j.pending else 'failed' if j and j.failed else '-'):>30}")
            else:
                cells.append(f"{_pct(c.poisoned_accuracy.mean)} (drop {_pts(c.drop.mean, sign=True)})".rjust(30))
        out.append(f"{r.label:<{w}}  " + "  ".join(cells))
    for s in t.summary:
        out.append(f"worst at eps {s.epsilon:g}: " + (f"{s.attack}" + (f" beta={s.beta:g}" if s.beta is not None else "")
                                                      + f", drop {_pts(s.worst_drop)}" if s.attack else "n/a"))
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
        if args.no_wait:
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


# ------------------------------------------------------------------ encoders, datasets
def _print_encoder(enc, as_json: bool) -> None:
    if as_json:
        print(enc.model_dump_json(indent=2))
        return
    line = f"encoder {enc.id} {enc.status} {enc.architecture} {enc.name!r} ({enc.source})"
    if enc.sha256:
        line += f" sha256 {enc.sha256[:16]}"
    if enc.error:
        line += f": {enc.error}"
    print(line)


def _print_dataset(ds, as_json: bool) -> None:
    if as_json:
        print(ds.model_dump_json(indent=2))
        return
    line = f"dataset {ds.id} ({ds.kind}, {ds.loader}) {ds.name!r}"
    summary = ds.summary or {}
    if summary.get("n_train") is not None:
        line += f": {summary.get('n_train')} train / {summary.get('n_test')} test, {summary.get('n_classes')} classes"
    print(line)


def _settle_encoder(c, created, args) -> int:
    """Prints a created encoder, after waiting until it is ready or failed (unless --no-wait)."""
    enc = created.encoder
    if not args.no_wait and enc.status not in ("ready", "failed"):
        print(f"encoder {enc.id}: {enc.status}, waiting", file=sys.stderr)
        enc = c.wait_encoder(enc.id, poll_s=args.poll, timeout_s=args.timeout)
    _print_encoder(enc, args.json)
    return EXIT_NOT_SUCCEEDED if enc.status == "failed" else 0


def _list_or_show(args, listing, get, show) -> bool:
    """The ``list`` and ``show`` actions of a resource command; False for any other action."""
    if args.action == "list":
        items = listing()
        if args.json:
            print(items.model_dump_json(indent=2))
        for item in [] if args.json else items.data:
            show(item, False)
    elif args.action == "show":
        show(get(args.id), args.json)
    else:
        return False
    return True


def cmd_encoders(args) -> int:
    with _client(args) as c:
        if _list_or_show(args, c.list_encoders, c.get_encoder, _print_encoder):
            return 0
        spec = _json_arg(args.spec, "--spec") or {}
        if not isinstance(spec, dict):
            raise UsageError("--spec must be a JSON object")
        if args.action == "upload":
            if not os.path.isfile(args.file):
                raise UsageError(f"{args.file}: no such file")
            return _settle_encoder(c, c.upload_encoder(args.file, architecture=args.architecture, name=args.name,
                                                       spec=spec), args)
        config = _json_arg(args.config, "--config") or {}
        if not isinstance(config, dict):
            raise UsageError("--config must be a JSON object")
        created = c.pretrain_encoder(name=args.name or f"{args.architecture} on {args.dataset}",
                                     architecture=args.architecture, dataset=args.dataset, spec=spec, config=config,
                                     seed=args.seed, device=args.device)
        return _settle_encoder(c, created, args)


def cmd_datasets(args) -> int:
    with _client(args) as c:
        if not _list_or_show(args, c.list_datasets, c.get_dataset, _print_dataset):
            if not os.path.isfile(args.file):
                raise UsageError(f"{args.file}: no such file")
            _print_dataset(c.upload_dataset(args.file, name=args.name), args.json)
    return 0


# ------------------------------------------------------------------ reports, export
def cmd_report(args) -> int:
    """Writes a job's or an audit's HTML report to a file (the id tells which: a job's first, then
    an audit's; --audit asks for the audit's only); --open opens it."""
    from app.client import ApiError

    kind = "audit" if args.audit else "job"
    with _client(args) as c:
        if args.audit:
            html = c.audit_report(args.id)
        else:
            try:
                html = c.job_report(args.id)
            except ApiError as exc:
                if exc.status != 404:
                    raise
                try:
                    html, kind = c.audit_report(args.id), "audit"
                except ApiError as again:
                    if again.status != 404:
                        raise
                    raise exc from None  # neither: the job's 404
    path = args.out or f"{kind}-{args.id}.html"
    with open(path, "w", encoding="utf-8") as fh:
        fh.write(html)
    print(f"wrote {path} ({len(html.encode())} bytes)")
    if args.open:
        import webbrowser
        from pathlib import Path

        if not webbrowser.open(Path(path).resolve().as_uri()):
            print("poisonaudit: no browser to open it with here", file=sys.stderr)
    return 0


EXPORT_FIELDS = ("label", "attack", "beta", "epsilon", "poisoned_accuracy_mean", "poisoned_accuracy_std",
                 "drop_points_mean", "drop_points_std", "seeds", "jobs_succeeded", "jobs_failed", "jobs_pending")


def audit_rows(audit) -> list[dict[str, Any]]:
    """The audit table as flat rows, one per attack row and epsilon: accuracies as fractions,
    drops in points (as the reports), the job counts of the cell, and per defence the accuracy
    after it (``defence_<name>_accuracy``)."""
    out = []
    for r in audit.table.rows:
        for e in audit.table.epsilons:
            c = r.cells.get(str(float(e)))
            acc, drop = (c.poisoned_accuracy, c.drop) if c else (None, None)
            row: dict[str, Any] = {
                "label": r.label, "attack": r.attack, "beta": r.beta, "epsilon": float(e),
                "poisoned_accuracy_mean": acc.mean if acc else None, "poisoned_accuracy_std": acc.std if acc else None,
                "drop_points_mean": 100 * drop.mean if drop else None,
                "drop_points_std": 100 * drop.std if drop else None, "seeds": acc.n if acc else 0,
                "jobs_succeeded": c.jobs.succeeded if c else 0, "jobs_failed": c.jobs.failed if c else 0,
                "jobs_pending": c.jobs.pending if c else 0}
            for name, st in sorted((c.defences if c else {}).items()):
                row[f"defence_{name}_accuracy"] = st.mean
            out.append(row)
    return out


def cmd_export(args) -> int:
    with _client(args) as c:
        audit = c.get_audit(args.id)
    rows = audit_rows(audit)
    fh = open(args.out, "w", newline="", encoding="utf-8") if args.out else sys.stdout
    try:
        if args.format == "json":
            json.dump({"audit": str(audit.id), "name": audit.name, "status": audit.status,
                       "clean_accuracy": audit.table.clean_accuracy.model_dump() if audit.table.clean_accuracy else None,
                       "rows": rows}, fh, indent=2)
            fh.write("\n")
        else:
            import csv

            extra = sorted({k for r in rows for k in r} - set(EXPORT_FIELDS))
            w = csv.DictWriter(fh, fieldnames=[*EXPORT_FIELDS, *extra], restval="")
            w.writeheader()
            w.writerows(rows)
    finally:
        if fh is not sys.stdout:
            fh.close()
    if args.out:
        print(f"wrote {args.out} ({len(rows)} rows)", file=sys.stderr)
    return 0


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
    p.add_argument("--no-wait", action="store_true", help="print the queued job and return (default: wait for it, "
                                                          "with a progress bar, as `audit` does)")
    p.add_argument("--wait", action="store_true", help=argparse.SUPPRESS)  # the default; kept for old scripts
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

    p = subparsers.add_parser("encoders", help="list, show, upload or pre-train encoders on a server")
    sub = p.add_subparsers(dest="action", required=True, metavar="{list,show,upload,pretrain}")
    q = sub.add_parser("list", help="your team's encoders")
    common(q, wait=False)
    q = sub.add_parser("show", help="one encoder")
    common(q, wait=False)
    q.add_argument("id")
    for action, helptext in (("upload", "upload a checkpoint (safetensors or a torch state dict)"),
                             ("pretrain", "SimCLR pre-training on the server (a job)")):
        q = sub.add_parser(action, help=helptext)
        common(q)
        if action == "upload":
            q.add_argument("file")
        else:
            q.add_argument("--dataset", required=True, help="built-in name, server-side name or uploaded id")
            q.add_argument("--config", help="SimCLRConfig fields as a JSON object (epochs, batch_size, ...)")
            q.add_argument("--seed", type=int, default=0)
            q.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
        q.add_argument("--architecture", required=True, help="an architecture (small_cnn, resnet18, ...)")
        q.add_argument("--name")
        q.add_argument("--spec", help="further EncoderSpec fields as a JSON object (in_channels, width, ...)")
        q.add_argument("--no-wait", action="store_true", help="print the answer and return (default: wait until "
                                                              "the encoder is ready or failed)")
    p.set_defaults(func=wrap(cmd_encoders))

    p = subparsers.add_parser("datasets", help="list, show or upload datasets on a server")
    sub = p.add_subparsers(dest="action", required=True, metavar="{list,show,upload}")
    q = sub.add_parser("list", help="built-in, server-side and your team's uploaded datasets")
    common(q, wait=False)
    q = sub.add_parser("show", help="one dataset")
    common(q, wait=False)
    q.add_argument("id")
    q = sub.add_parser("upload", help="upload an .npz (x, y[, x_test, y_test, classes])")
    common(q, wait=False)
    q.add_argument("file")
    q.add_argument("--name")
    p.set_defaults(func=wrap(cmd_datasets))

    p = subparsers.add_parser("report", help="save a job's or an audit's HTML report (poisonaudit report ID --open)")
    common(p, wait=False)
    p.add_argument("id")
    p.add_argument("--audit", action="store_true", help="the id is an audit's (default: whichever it is)")
    p.add_argument("--out", help="file to write (default: job-ID.html or audit-ID.html)")
    p.add_argument("--open", action="store_true", help="open it in a browser")
    p.set_defaults(func=wrap(cmd_report))

    p = subparsers.add_parser("export", help="an audit's table as CSV or JSON (drops in points)")
    common(p, wait=False)
    p.add_argument("id", help="audit id")
    p.add_argument("--format", choices=["csv", "json"], default="csv")
    p.add_argument("--out", help="file to write (default: standard output)")
    p.set_defaults(func=wrap(cmd_export))

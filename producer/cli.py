"""`zfarm`: submit prompt files, follow and collect batches, list workers and profiles.

Output rules: results on stdout (tables on a terminal, tab-separated lines when piped, one JSON
object with --json), everything for the human on stderr. User errors are one clear line each on
stderr, never a traceback. Commands that run the worker side exec `python -m worker...`, so the
producer never imports torch.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from urllib.parse import urlparse

import redis

from producer.api import Farm, failure_reason, scale_advice
from producer.files import parse_prompt_file
from producer.progress import CountBar, Progress
from shared import archs, calibration, cards, profiles, redis_conn
from shared.errors import DefaultsError, PromptFileError, StorageError, UsageError, ZfarmError
from shared.schema import PRIORITIES, check_defaults
from shared.settings import Settings

EXIT_OK = 0
EXIT_FAILED = 1       # wait: some job failed or was cancelled
EXIT_USAGE = 2        # bad input, refused submission; wait: timed out
EXIT_UNAVAILABLE = 3  # Redis or storage unreachable
EXIT_TIMEOUT = 2
FAILURES_SHOWN = 20
STATUS_FIELDS = ("batch_id", "name", "priority", "total", "queued", "waiting_for_worker", "running",
                 "done", "failed", "cancelled")
WORKER_FIELDS = ("name", "host", "gpu", "arch", "vram_gb", "vram_class", "profile", "downgraded_from", "quality",
                 "state", "jobs_done", "jobs_failed", "s_per_image", "last_seen")
# Sub-commands handed whole to another module: their arguments are that module's to parse.
PASSTHROUGH = {"worker": "worker", "tiny-model": "worker.engine.tiny", "fetch-model": "worker.engine.fetch",
               "calibrate": "worker.calibrate"}
# Those of them that reach Redis and storage, and so take the global options as their own flags.
FARM_PASSTHROUGH = ("worker", "calibrate")
GLOBAL_OPTIONS = ("--redis-url", "--storage-url")




def _duration_arg(text: str) -> float:
    """A positive, finite duration for argparse, checked before anything is queued or waited on."""
    from shared.capacity import parse_duration_s

    try:
        return parse_duration_s(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="zfarm", description="Render farm for Z-Image-Turbo: queue prompt files, follow and collect batches.",
        epilog="exit codes: 0 ok; 1 jobs failed or were cancelled (wait); 2 bad input, refused, or timed out "
               "(wait); 3 Redis or storage unreachable (Redis after ZFARM_PRODUCER_REDIS_RETRY_S of retrying, 60 s by default)")
    parser.add_argument("--redis-url", help="overrides ZFARM_REDIS_URL")
    parser.add_argument("--storage-url", help="overrides ZFARM_STORAGE_URL")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("submit", help="queue a prompt file (.txt, .jsonl, .csv, or - for stdin)")
    p.add_argument("file")
    p.add_argument("--width", type=int)
    p.add_argument("--height", type=int)
    p.add_argument("--steps", type=int)
    p.add_argument("--guidance", type=float)
    p.add_argument("--seed", type=int, help="the same seed for every job (default: one drawn per job)")
    p.add_argument("--negative-prompt")
    p.add_argument("--priority", choices=PRIORITIES, default="normal")
    p.add_argument("--name", help="batch name; the same name and content again returns the first batch, "
                                  "other content is refused as a conflict")
    p.add_argument("--idempotency-key", help="as --name: the same key and content again returns the first batch")
    p.add_argument("--webhook", help="http(s) URL POSTed the final status when the batch finishes; its host must "
                                     "resolve to public addresses (ZFARM_WEBHOOK_ALLOWED_NETWORKS allows private ones)")
    p.add_argument("--allow-pending", action="store_true",
                   help="queue jobs larger than every live worker renders, for a worker yet to come")
    p.add_argument("--wait", action="store_true", help="wait for the batch to finish")
    p.add_argument("--out", help="with --wait: collect results into this folder")
    p.add_argument("--timeout", type=_duration_arg,
                   help="with --wait: give up after this long (seconds, or 90s, 45m, 2h)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_submit)

    p = sub.add_parser("status", help="counts and failure reasons of a batch")
    p.add_argument("batch")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_status)

    p = sub.add_parser("wait", help="wait for a batch: exit 0 all done, 1 some failed/cancelled, 2 timeout")
    p.add_argument("batch")
    p.add_argument("--timeout", type=_duration_arg, help="give up after this long (seconds, or 90s, 45m, 2h)")
    p.set_defaults(func=cmd_wait)

    p = sub.add_parser("collect", help="download results, manifest.jsonl and an index.html contact sheet")
    p.add_argument("batch")
    p.add_argument("--out", required=True)
    p.set_defaults(func=cmd_collect)

    p = sub.add_parser("cancel", help="cancel the jobs of a batch not yet started")
    p.add_argument("batch")
    p.set_defaults(func=cmd_cancel)

    p = sub.add_parser("retry", help="queue the failed jobs of a batch again")
    p.add_argument("batch")
    p.add_argument("--failed", action="store_true", required=True, help="retry the failed jobs (the only mode)")
    p.set_defaults(func=cmd_retry)

    p = sub.add_parser("workers", help="live workers")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_workers)

    p = sub.add_parser("profiles", help="the profile each VRAM class would run, from the measured table")
    p.add_argument("--vram-gb", type=float, help="show the choice for a card of this many GB (default: cpu)")
    p.add_argument("--ram-gb", type=float, help="host RAM the choice must fit (default: any)")
    p.add_argument("--arch", help="the card's architecture, e.g. sm_86 (RTX 3060/3090, A10), sm_89 (RTX 4090, L4), "
                                  "sm_75 (T4); default: judge no architecture")
    p.add_argument("--card", help="a card by name (RTX 3060, A10, T4...): its memory and architecture")
    p.add_argument("--torch", help="the worker's torch version (default: the one the table was measured with)")
    p.add_argument("--allow-lossy", action="store_true", default=None,
                   help="admit profiles whose images differ visibly from bf16 (default: ZFARM_ALLOW_LOSSY)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_profiles)

    p = sub.add_parser("scale-advice", help="when the queue drains, and workers to add/remove for a deadline")
    p.add_argument("--deadline", help="e.g. 45m, 2h, 1h30m (default: just the expected finish)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_scale_advice)

    for name, help_text in (("worker", "run a render worker (python -m worker ...)"),
                            ("calibrate", ("the quality gate by hand: probes against the bf16 references "
                                           "(python -m worker.calibrate ...)")),
                            ("tiny-model", "build a small random-weight model: tiny-model DIR"),
                            ("fetch-model", "download the model weights (python -m worker.engine.fetch ...)")):
        p = sub.add_parser(name, help=help_text, add_help=False)
        p.add_argument("args", nargs=argparse.REMAINDER)

    p = sub.add_parser("demo", help="a self-contained demo: local Redis, one CPU worker, a tiny model")
    p.add_argument("--dir", default="zfarm-demo", help="working folder (default ./zfarm-demo)")
    p.set_defaults(func=cmd_demo)
    return parser


def _split_passthrough(argv: list[str]):
    """(global options, command, its arguments) when the command is a pass-through one, else None.

    argparse cannot hand options like `--name` through to another program, so these are split off
    before it parses anything."""
    i = 0
    while i < len(argv):
        token = argv[i]
        if token in GLOBAL_OPTIONS:
            i += 2
        elif token.startswith(tuple(o + "=" for o in GLOBAL_OPTIONS)):
            i += 1
        elif token in PASSTHROUGH:
            return argv[:i], token, argv[i + 1:]
        else:
            return None
    return None


def _exec(argv: list[str]) -> None:
    """Replace this process (tests replace this function)."""
    os.execv(argv[0], argv)


def run_passthrough(args, command: str, rest: list[str]) -> int:
    """Run `zfarm worker|calibrate|tiny-model|fetch-model` as its own module. The global options go to
    the worker and to calibrate as their own flags; the other commands touch neither Redis nor storage."""
    if command == "tiny-model" and len(rest) != 1:
        raise UsageError("usage: zfarm tiny-model DIR")
    forwarded = []
    if command in FARM_PASSTHROUGH:
        forwarded += ["--redis-url", args.redis_url] if args.redis_url else []
        forwarded += ["--storage-url", args.storage_url] if args.storage_url else []
    sys.stdout.flush()
    sys.stderr.flush()
    _exec([sys.executable, "-m", PASSTHROUGH[command], *forwarded, *rest])
    return EXIT_OK


# Helpers
def _farm(args) -> Farm:
    """Every command rides out a Redis restart for ZFARM_PRODUCER_REDIS_RETRY_S, saying so while it waits."""
    def waiting(error, retry_s: float) -> None:
        _say(f"zfarm: Redis at {_redis_url_for_message(args)} is unreachable ({error}); retrying for up to "
             f"{retry_s:g} s (ZFARM_PRODUCER_REDIS_RETRY_S)")

    return Farm.from_env(redis_url=args.redis_url, storage_url=args.storage_url, on_redis_retry=waiting)


def _say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _print_json(obj) -> None:
    print(json.dumps(obj, indent=None, sort_keys=False, default=str))


def _cell(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.2f}"
    return str(value)


def _print_table(header: list[str], rows: list[list], tty: bool) -> None:
    """Aligned columns on a terminal, tab-separated lines otherwise."""
    cells = [[_cell(v) for v in row] for row in rows]
    if not tty:
        print("\t".join(header))
        for row in cells:
            print("\t".join(c.replace("\t", " ").replace("\n", " ") for c in row))
        return
    widths = [max([len(h)] + [len(r[i]) for r in cells]) for i, h in enumerate(header)]
    print("  ".join(h.upper().ljust(w) for h, w in zip(header, widths)).rstrip())
    for row in cells:
        print("  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip())


def _exit_for(status: dict) -> int:
    if not status["finished"]:
        return EXIT_TIMEOUT
    return EXIT_FAILED if status["failed"] or status["cancelled"] else EXIT_OK


def _wait(batch, timeout_s: float | None) -> dict:
    progress = Progress(sys.stderr)
    try:
        status = batch.wait(timeout_s=timeout_s, on_progress=progress)
    finally:
        progress.close()
    if not status["finished"]:
        _say(f"zfarm: timed out after {timeout_s:g} s; batch {batch.id} is still running "
             f"(zfarm wait {batch.id} to keep waiting)")
    elif status["failed"] or status["cancelled"]:
        _say(f"zfarm: batch {batch.id}: {status['done']} done, {status['failed']} failed, "
             f"{status['cancelled']} cancelled (zfarm status {batch.id} for reasons)")
    return status


def _collect(batch, out_dir: str) -> dict:
    bar = CountBar("collecting")
    try:
        summary = batch.collect(out_dir, on_progress=bar)
    finally:
        bar.close()
    _say(f"collected {summary['downloaded']} of {summary['jobs']} images into {summary['out_dir']}")
    if summary["missing_done"]:
        _say(f"zfarm: {len(summary['missing_done'])} done job(s) have no image in storage "
             f"(first: #{summary['missing_done'][0]})")
    if summary.get("note"):
        _say(f"zfarm: {summary['note']}")
    return summary


# Commands
def cmd_submit(args) -> int:
    if (args.out or args.timeout is not None) and not args.wait:
        raise UsageError("--out and --timeout need --wait")
    defaults = {"width": args.width, "height": args.height, "steps": args.steps, "guidance": args.guidance,
                "seed": args.seed, "negative_prompt": args.negative_prompt}
    # A bad flag is one error, named by its flag, before the file is read at all.
    bad_flags = check_defaults(defaults)
    if bad_flags:
        raise DefaultsError(bad_flags)
    bar = CountBar("validating")
    try:
        entries = parse_prompt_file(args.file, {k: v for k, v in defaults.items() if v is not None},
                                    on_progress=bar)
    finally:
        bar.close()
    farm = _farm(args)
    batch = farm.submit(entries, priority=args.priority, name=args.name, idempotency_key=args.idempotency_key,
                        webhook=args.webhook, allow_pending=args.allow_pending, source=args.file)
    result = {"batch_id": batch.id, "jobs": len(entries), "created": batch.created, "priority": args.priority,
              "name": args.name, "queues": batch.queues}
    if not batch.created:
        _say(f"zfarm: already submitted as batch {batch.id} (same name or idempotency key); nothing queued again")
    else:
        _say(f"queued {len(entries)} job(s) at priority {args.priority} as batch {batch.id}")
        if batch.live_workers == 0:
            _say("zfarm: no worker is live right now; the jobs wait in the queue until one starts")
        elif args.allow_pending:
            waiting = batch.status()["waiting_for_worker"]
            if waiting:
                _say(f"zfarm: {waiting} job(s) wait for a worker larger than any live one")
    exit_code = EXIT_OK
    if args.wait:
        status = _wait(batch, args.timeout)
        result["status"] = {k: status[k] for k in STATUS_FIELDS}
        exit_code = _exit_for(status)
        if args.out:
            result["collected"] = _collect(batch, args.out)
    if args.json:
        _print_json(result)
    else:
        if result.get("collected"):
            print(result["collected"]["index_html"])
        print(batch.id)
    return exit_code


def cmd_status(args) -> int:
    status = _farm(args).batch(args.batch).status()
    if args.json:
        # Not the whole meta: a webhook URL may carry a token.
        out = {k: v for k, v in status.items() if k != "meta"}
        out.update(source=status["meta"].get("source", ""), lane=status["meta"].get("lane"))
        _print_json(out)
        return EXIT_OK
    tty = sys.stdout.isatty()
    _print_table(["field", "value"], [[k, status.get(k)] for k in STATUS_FIELDS], tty)
    failures = status["failures"]
    if failures:
        print()
        shown = failures[:FAILURES_SHOWN] if tty else failures
        _print_table(["index", "worker", "reason"],
                     [[f["index"], f.get("worker"), failure_reason(f)] for f in shown], tty)
        if len(failures) > len(shown):
            print(f"... and {len(failures) - len(shown)} more (--json lists all)")
    return EXIT_OK


def cmd_wait(args) -> int:
    status = _wait(_farm(args).batch(args.batch), args.timeout)
    return _exit_for(status)


def cmd_collect(args) -> int:
    summary = _collect(_farm(args).batch(args.batch), args.out)
    print(summary["index_html"])
    return EXIT_OK


def cmd_cancel(args) -> int:
    batch = _farm(args).batch(args.batch)
    n = batch.cancel()
    _say(f"cancelled {n} queued job(s) of batch {batch.id}; jobs already running finish")
    print(n)
    return EXIT_OK


def cmd_retry(args) -> int:
    batch = _farm(args).batch(args.batch)
    n = batch.retry_failed()
    _say(f"queued {n} failed job(s) of batch {batch.id} again" if n else f"batch {batch.id} has no failed jobs")
    print(n)
    return EXIT_OK


def cmd_workers(args) -> int:
    workers = _farm(args).workers()
    if args.json:
        _print_json(workers)
        return EXIT_OK
    tty = sys.stdout.isatty()
    rows = []
    for w in workers:
        row = [calibration.summary(w.get(f)) if f == "quality" else w.get(f) for f in WORKER_FIELDS]
        if tty and w.get("last_seen"):
            row[-1] = _age(time.time() - float(w["last_seen"]))
        rows.append(row)
    _print_table(list(WORKER_FIELDS), rows, tty)
    if tty and not workers:
        _say("no live workers")
    return EXIT_OK


def _age(seconds: float) -> str:
    """How long ago, as a person reads it: '3 s ago', '4 min ago', '2 h ago'."""
    seconds = max(0.0, seconds)
    if seconds < 90:
        return f"{seconds:.0f} s ago"
    if seconds < 90 * 60:
        return f"{seconds / 60:.0f} min ago"
    return f"{seconds / 3600:.0f} h ago"


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "never (no live worker can render some of it)"
    hours, rest = divmod(int(round(seconds)), 3600)
    return f"{hours}h{rest // 60:02d}m" if hours else f"{rest // 60}m{rest % 60:02d}s"


def cmd_scale_advice(args) -> int:
    from shared.capacity import parse_duration_s

    try:
        deadline_s = parse_duration_s(args.deadline) if args.deadline else None
    except ValueError as exc:
        _say(f"zfarm: --deadline: {exc}")
        return EXIT_USAGE
    advice = scale_advice(_farm(args), deadline_s)
    if args.json:
        _print_json(advice)
        return EXIT_OK
    print(f"remaining: {advice['remaining_jobs']} jobs, {advice['remaining_work_units']:g} reference images "
          f"(1024x1024, 8 steps)")
    print(f"fleet: {advice['fleet_images_per_hour']:g} reference images/hour; "
          f"expected to finish in {_duration(advice['expected_finish_s'])}")
    for worker in advice["speeds"]:
        speed = "-" if worker["s_per_image"] is None else f"{worker['s_per_image']:g} s/img"
        print(f"  {worker['name']} ({worker['gpu']}): {speed}, {worker['source']}")
    if advice["stranded_tiers"]:
        print(f"no live worker can render the jobs of tier(s) {', '.join(advice['stranded_tiers'])}")
    if deadline_s is not None:
        if advice["meets_deadline"]:
            removable = ", ".join(f"{n} x {c} GB" for c, n in advice["remove"].items()) or "none"
            print(f"meets the {_duration(deadline_s)} deadline; workers that could go: {removable}")
        else:
            options = " or ".join(f"{n} x {c} GB" for c, n in advice["add"].items()) or "no measured class helps"
            print(f"misses the {_duration(deadline_s)} deadline; add {options}")
    return EXIT_OK


# Triton ships inside torch's CUDA wheels: a card judged from elsewhere is taken to have it.
BUNDLED_TRITON = "bundled with torch"


def profiles_report(table: dict, vram_gb: float | None, ram_gb: float | None, allow_lossy: bool = False,
                    arch: str | None = None, torch_version: str | None = None, card_name: str | None = None) -> dict:
    """What `zfarm profiles --json` prints: every class's choice, and for this card the choice, the
    profiles left out with the reason for each, and the card's expected speed (a model)."""
    card = cards.find(card_name) if card_name else None
    if card_name and card is None:
        raise UsageError(f"--card {card_name!r}: not a card zfarm knows (known: "
                         f"{', '.join(c.name for c in cards.CARDS)})")
    if card is not None:
        vram_gb = card.vram_gb if vram_gb is None else vram_gb
        arch = arch or card.arch
    caps = None
    if arch:
        torch_version = torch_version or (table.get("measured") or {}).get("torch") or ""
        caps = archs.capabilities(archs.parse_arch(arch).name, torch_version, BUNDLED_TRITON)
    vram_class = profiles.CPU_CLASS if vram_gb is None else profiles.class_for_override(vram_gb)
    report = {"classes": profiles.class_table(table, ram_gb, allow_lossy, caps), "source": table.get("source"),
              "vram_gb": vram_gb, "ram_gb": ram_gb, "allow_lossy": allow_lossy,
              "arch": caps.arch if caps else None, "capabilities": caps.to_dict() if caps else None,
              "card": card.name if card else None}
    found, excluded = profiles.assess(table, vram_class, ram_gb, allow_lossy, caps)
    report["excluded"] = excluded
    try:
        chosen = profiles.choose(table, vram_class, ram_gb, allow_lossy=allow_lossy, caps=caps)
    except profiles.ProfileError as exc:
        report["chosen"] = None
        report["error"] = str(exc)
        return report
    report["chosen"] = chosen.to_dict()
    report["excluded"] += [{"profile": c.profile, "reason": f"fits, but the chooser prefers {chosen.profile}"}
                           for c in found if c.profile != chosen.profile]
    row = profiles.row_for(table, chosen)
    expected_on = [card] if card else (cards.cards_for(caps.arch, vram_class) if caps else [])
    report["chosen"]["expected"] = [e for e in (cards.expected_s_per_image(row, c) for c in expected_on) if e]
    return report


def _fidelity_cell(row: dict) -> str:
    """Worst-seed PSNR against bf16, or whether the profile is lossy and was never compared."""
    if row.get("psnr_db_min") is not None:
        return f"{row['psnr_db_min']:.1f} dB"
    return "not compared" if row.get("lossy") else ("not lossy" if row.get("profile") else "-")


def cmd_profiles(args) -> int:
    settings = Settings.from_env()
    allow_lossy = settings.allow_lossy if args.allow_lossy is None else args.allow_lossy
    report = profiles_report(profiles.load_table(settings.profile_table), args.vram_gb, args.ram_gb, allow_lossy,
                             args.arch, args.torch, args.card)
    if args.json:
        _print_json(report)
        return EXIT_OK
    tty = sys.stdout.isatty()
    header = ["class", "profile", "s_per_image", "peak_reserved_gib", "host_rss_gib", "max_pixels", "cap_gib",
              "vs_bf16"]
    _print_table(header, [[profiles.class_label(r["vram_class"]), r.get("profile"), r.get("s_per_image"),
                           r.get("peak_reserved_gib"), r.get("host_rss_gib"), r.get("max_pixels"),
                           r.get("cap_gib"), _fidelity_cell(r)]
                          for r in report["classes"]], tty)
    card = report["card"] or ("cpu" if report["vram_gb"] is None else f"a {report['vram_gb']:g} GB card")
    card += f" ({report['arch']})" if report["arch"] else ""
    if report["chosen"]:
        chosen = report["chosen"]
        _say(f"{card} runs profile {chosen['profile']} (class {profiles.class_label(chosen['vram_class'])}), "
             f"measured on {chosen['measured_on'] or 'an unrecorded card'}; table: {report['source']}")
        for expected in chosen.get("expected", []):
            _say(f"  expected on {expected['card']}: {expected['s_per_image']:g} s/img (a model, not a "
                 f"measurement: {expected['basis']})")
    else:
        _say(f"{card}: {report['error']}")
    if report["arch"] and report["excluded"]:
        _say("left out:")
        for item in report["excluded"]:
            _say(f"  {item['profile']}: {item['reason']}")
    elif not report["arch"] and report["vram_gb"] is not None:
        _say("(add --arch sm_XY or --card NAME to judge a card by what its architecture can run)")
    return EXIT_OK


def cmd_demo(args) -> int:
    from producer import demo

    return demo.run(args.dir, redis_url=args.redis_url, storage_url=args.storage_url)


def _flag(field_name: str) -> str:
    """The command-line flag that sets a job field's default: negative_prompt -> --negative-prompt."""
    return "--" + field_name.replace("_", "-")


def _redact(url: str) -> str:
    """A Redis or Sentinel URL without its passwords, for error messages."""
    from shared.redis_conn import redact

    return redact(url)


def _redis_url_for_message(args) -> str:
    if args is not None and getattr(args, "redis_url", None):
        return _redact(args.redis_url)
    return _redact(Settings.from_env().redis_url)


def _report(exc: ZfarmError) -> int:
    """Say what went wrong, one line per problem, and give the exit code for it."""
    if isinstance(exc, PromptFileError):
        _say(f"zfarm: refused {exc.errors[0].file}: {len(exc.errors) + exc.more} error(s); nothing was queued")
        for error in exc.errors:
            _say(f"  {error}")
        if exc.more:
            _say(f"  ... and {exc.more} more")
        return EXIT_USAGE
    if isinstance(exc, DefaultsError):
        for error in exc.errors:
            _say(f"zfarm: {_flag(error.field)}: {error.message}")
        _say("zfarm: nothing was queued")
        return EXIT_USAGE
    if isinstance(exc, StorageError):
        _say(f"zfarm: storage: {exc}")
        return EXIT_UNAVAILABLE
    _say(f"zfarm: {exc}")
    return EXIT_USAGE


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = _build_parser()
    args = None
    split = _split_passthrough(argv)
    try:
        # argparse reports its own usage errors (exit 2) and --help (exit 0) by raising SystemExit.
        args = parser.parse_args([*split[0], split[1]] if split else argv)
    except SystemExit as exc:
        return exc.code if isinstance(exc.code, int) else EXIT_USAGE
    try:
        if split:
            return run_passthrough(args, split[1], split[2])
        return args.func(args)
    except ZfarmError as exc:
        return _report(exc)
    except redis.AuthenticationError as exc:  # a ConnectionError to redis-py, but no retry mends it
        url = (args.redis_url if args is not None and args.redis_url else None) or Settings.from_env().redis_url
        has_password = any(urlparse(part).password is not None for part in url.split(";"))
        _say(f"zfarm: {redis_conn.auth_failure(_redact(url), has_password, exc)}")
        return EXIT_UNAVAILABLE
    except (redis.ConnectionError, redis.TimeoutError) as exc:
        _say(f"zfarm: cannot reach Redis at {_redis_url_for_message(args)}: {exc}")
        return EXIT_UNAVAILABLE
    except KeyboardInterrupt:
        _say("zfarm: interrupted")
        return 130


if __name__ == "__main__":
    sys.exit(main())

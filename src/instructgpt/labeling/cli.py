"""``instructgpt label <command>``: run the labeling web app and manage its database.

    instructgpt label add-user  --db labels.sqlite alice [--admin] [--password P | --password-stdin]
    instructgpt label disable-user --db labels.sqlite alice      (enable-user to undo)
    instructgpt label import    --db labels.sqlite --prompts FILE.jsonl [--model DIR] [--k 4] [--overlap 2]
    instructgpt label serve     --db labels.sqlite [--prompts FILE.jsonl [--model DIR] [--k 4]] [--port 8765]
    instructgpt label stats     --db labels.sqlite
    instructgpt label export    --db labels.sqlite --out-dir data/labels

Without --password the password is prompted for (twice, not echoed).
"""

from __future__ import annotations

import argparse
import getpass
import sys
from typing import Callable

from instructgpt.data import DataError
from instructgpt.serving.security import is_loopback
from instructgpt.labeling.rubric import K_MAX, K_MIN

DEFAULT_PORT = 8765


def _db(p: argparse.ArgumentParser) -> None:
    p.add_argument("--db", required=True, help="the labeling database (SQLite; created if missing)")


def _import_args(p: argparse.ArgumentParser, required: bool) -> None:
    p.add_argument("--prompts", required=required, metavar="FILE.jsonl",
                   help='prompts to label: {"prompt"} or {"messages"} per line, optionally with "responses" to rank')
    p.add_argument("--model", metavar="DIR", help="generate K outputs per prompt with this model (ranking tasks)")
    p.add_argument("--k", type=int, default=4, help=f"outputs to generate per prompt, {K_MIN}..{K_MAX} (default 4)")
    p.add_argument("--overlap", type=int, default=1,
                   help="labelers per task, for the tasks this import adds (2+ measures inter-labeler agreement; "
                        "default 1)")
    p.add_argument("--tasks", choices=("auto", "demonstration", "ranking", "both"), default="auto",
                   help="task kind per prompt; auto: ranking when outputs are given or generated, else demonstration")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=8, help="prompts per generation batch")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="instructgpt label", description="The labeling web app (human feedback).")
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser("serve", help="run the web app (imports --prompts first)")
    _db(s)
    _import_args(s, required=False)
    s.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    s.add_argument("--port", type=int, default=DEFAULT_PORT)
    s.add_argument("--secure-cookies", action="store_true", help="mark cookies Secure (when served behind HTTPS)")
    s.add_argument("--forwarded-allow-ips", metavar="IPS",
                   help="trust X-Forwarded-For / X-Forwarded-Proto only from these proxy addresses (comma-separated, "
                        "as uvicorn's option; '*' trusts any). Default: trust no one, so a client cannot pick the "
                        "address the per-address login limit counts")

    s = sub.add_parser("add-user", help="create a labeler (or an admin)")
    _db(s)
    s.add_argument("username")
    s.add_argument("--admin", action="store_true", help="may see the admin page (progress and agreement)")
    s.add_argument("--password", help="the password (visible to other local users in the process list: prefer the "
                                      "prompt or --password-stdin)")
    s.add_argument("--password-stdin", action="store_true",
                   help="read the password from the first line of stdin (the default when stdin is not a terminal)")
    s.add_argument("--update", action="store_true", help="reset the password (and admin flag) of an existing user")

    for name, verb in (("disable-user", "end a user's sessions and give back their open claims; they may not log in "
                                        "until enabled again (their submissions stay)"),
                       ("enable-user", "let a disabled user log in again")):
        s = sub.add_parser(name, help=verb)
        _db(s)
        s.add_argument("username")

    s = sub.add_parser("import", help="add tasks from a prompts file")
    _db(s)
    _import_args(s, required=True)

    s = sub.add_parser("export", help="write demonstrations.jsonl and rankings.jsonl for sft and rm")
    _db(s)
    s.add_argument("--out-dir", required=True)

    s = sub.add_parser("stats", help="print progress per labeler and inter-labeler agreement")
    _db(s)
    return p


def _read_password(args: argparse.Namespace) -> str:
    if args.password is not None:
        return args.password
    if args.password_stdin or not sys.stdin.isatty():
        return sys.stdin.readline().rstrip("\r\n")
    first = getpass.getpass(f"Password for {args.username}: ")
    if getpass.getpass("Repeat the password: ") != first:
        raise ValueError("the passwords do not match")
    return first


def _import(store, args: argparse.Namespace, log: Callable[[str], None]) -> None:
    from instructgpt.labeling.formats import import_prompts

    generator = None
    if args.model:
        if not K_MIN <= args.k <= K_MAX:
            raise ValueError(f"--k must be {K_MIN}..{K_MAX}, got {args.k}")
        from instructgpt.labeling.outputs import model_generator

        generator = model_generator(args.model, args.k, max_new_tokens=args.max_new_tokens,
                                    temperature=args.temperature, top_p=args.top_p, seed=args.seed)
    summary = import_prompts(store, args.prompts, tasks=args.tasks, overlap=args.overlap, generator=generator,
                             model_id=args.model, k=args.k, batch_size=args.batch_size, log=log)
    log(f"{args.prompts}: {summary.added} tasks added, {summary.already_present} already present"
        + (f", {summary.generated} prompts generated" if args.model else "")
        + (f", {summary.dropped} dropped (fewer than {K_MIN} nonempty outputs)" if summary.dropped else ""))


def _stats(store, out: Callable[[str], None]) -> None:
    from instructgpt.labeling.agreement import agreement_report, format_rate

    counts = store.counts()
    report = agreement_report(store.rankings_by_task())
    out(f"tasks: {counts['demonstration_tasks']} demonstration, {counts['ranking_tasks']} ranking; "
        f"submissions: {counts['submissions']} of {counts['slots']} slots")
    mean_se = report.mean_and_stderr
    out(f"agreement: {format_rate(*mean_se) if mean_se else '—'} (mean ± s.e. over labelers), pooled "
        f"{format_rate(report.rate)} over {report.comparable} pairs on {report.tasks} overlapping tasks")
    out(f"{'labeler':<20} {'demos':>6} {'ranks':>6} {'skipped':>8} {'open':>5} {'agreement':>10}")
    for r in store.labeler_rows():
        la = report.per_labeler.get(r["username"])
        name = r["username"] + (" (disabled)" if r["disabled"] else "")
        out(f"{name:<20} {r['demonstrations']:>6} {r['rankings']:>6} {r['skipped']:>8} {r['claimed']:>5} "
            f"{format_rate(la.rate if la else None):>10}")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(sys.argv[1:] if argv is None else argv)
    from instructgpt.labeling.store import Store, StoreError

    def log(msg: str) -> None:
        print(f"instructgpt label: {msg}", file=sys.stderr)

    try:
        store = Store(args.db)
        if args.command == "add-user":
            user = store.add_user(args.username, _read_password(args), is_admin=args.admin, update=args.update)
            print(f"{'updated' if args.update else 'created'} {'admin' if user.is_admin else 'labeler'} "
                  f"{user.username}")
        elif args.command in ("disable-user", "enable-user"):
            user, released = store.set_disabled(args.username, args.command == "disable-user")
            print(f"{'disabled' if user.disabled else 'enabled'} {user.username}"
                  + (f"; {released} open claims given back" if user.disabled else ""))
        elif args.command == "import":
            _import(store, args, log)
        elif args.command == "export":
            from instructgpt.labeling.formats import export

            s = export(store, args.out_dir)
            print(f"wrote {s.demonstrations} demonstrations to {s.demonstrations_path} and {s.rankings} rankings to "
                  f"{s.rankings_path}" + (f" ({s.all_tied} all-tied rankings left out)" if s.all_tied else ""))
        elif args.command == "stats":
            _stats(store, print)
        elif args.command == "serve":
            return _serve(store, args, log)
    except (DataError, StoreError, ValueError) as e:
        log(f"error: {e}")
        return 2
    return 0


def _serve(store, args: argparse.Namespace, log: Callable[[str], None]) -> int:
    import uvicorn

    from instructgpt.labeling.app import LOOPBACK_HOSTS, create_app

    if args.prompts:
        _import(store, args, log)
    elif args.model:
        raise ValueError("--model needs --prompts (the prompts to generate outputs for)")
    loopback = is_loopback(args.host)
    if not loopback:
        log(f"WARNING: binding {args.host}, not loopback: anyone who can reach this address can try to log in. "
            "Serve it behind HTTPS (and pass --secure-cookies) on any shared network.")
    if not store.users():
        log("no users yet: create one with `instructgpt label add-user --db "
            f"{args.db} NAME` (add --admin for the admin page)")
    app = create_app(store, allowed_hosts=LOOPBACK_HOSTS if loopback else None, secure_cookies=args.secure_cookies)
    shown = f"[{args.host}]" if ":" in args.host else args.host
    log(f"labeling app on http://{shown}:{args.port}/")
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning", **proxy_settings(args.forwarded_allow_ips))
    return 0


def proxy_settings(forwarded_allow_ips: str | None) -> dict:
    """uvicorn's forwarding-header settings: none trusted by default (uvicorn's own default trusts 127.0.0.1, so any
    local client, or a proxy that passes a client's header through, could name its own address); behind a reverse
    proxy, the proxy's addresses."""
    if not forwarded_allow_ips:
        return {"proxy_headers": False}
    return {"proxy_headers": True, "forwarded_allow_ips": forwarded_allow_ips}


if __name__ == "__main__":
    sys.exit(main())

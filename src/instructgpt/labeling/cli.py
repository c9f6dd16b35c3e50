"""``instructgpt label <command>``: run the labeling web app and manage its database.

    instructgpt label add-user  --db labels.sqlite alice [--admin] [--password P | --password-stdin]
    instructgpt label disable-user --db labels.sqlite alice      (enable-user to undo)
    instructgpt label import    --db labels.sqlite --prompts FILE.jsonl [--model DIR] [--k 4] [--overlap 2]
    instructgpt label serve     --db labels.sqlite [--prompts FILE.jsonl [--model DIR] [--k 4]] [--port 8765]
    instructgpt label stats     --db labels.sqlite
    instructgpt label export    --db labels.sqlite --out-dir data/labels

Without --password the password is prompted for (twice, not echoed). Every command also takes ``--config FILE.yaml``
and ``key=value`` overrides of :class:`LabelConfig` (``db=labels.sqlite port=9000``); its flags set the same keys.
"""

from __future__ import annotations

import argparse
import getpass
import sys
from dataclasses import dataclass
from typing import Callable, Literal, Optional

from instructgpt.config import (ConfigError, add_alias, add_config_arguments, command_error, config_from_args,
                                parse_command_line)
from instructgpt.data import DataError
from instructgpt.labeling.agreement import agreement_report, format_rate
from instructgpt.labeling.app import LOOPBACK_HOSTS, create_app
from instructgpt.labeling.formats import export, import_prompts
from instructgpt.labeling.outputs import model_generator
from instructgpt.labeling.rubric import K_MAX, K_MIN
from instructgpt.labeling.store import Store, StoreError
from instructgpt.serving.security import is_loopback


@dataclass
class LabelConfig:
    """``instructgpt label``'s settings: the database, what an import adds, and where the app listens."""

    db: Optional[str] = None  # the labeling database (SQLite; created if missing)
    # prompts to label: {"prompt"} or {"messages"} per line, optionally with "responses" to rank
    prompts: Optional[str] = None
    model: Optional[str] = None  # generate K outputs per prompt with this model (ranking tasks)
    k: int = 4  # outputs to generate per prompt
    overlap: int = 1  # labelers per task, for the tasks an import adds (2+ measures inter-labeler agreement)
    # task kind per prompt; auto: ranking when outputs are given or generated, else demonstration
    tasks: Literal["auto", "demonstration", "ranking", "both"] = "auto"
    max_new_tokens: int = 64
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int = 0
    batch_size: int = 8  # prompts per generation batch
    host: str = "127.0.0.1"  # address to bind (127.0.0.1: this machine only)
    port: int = 8765
    secure_cookies: bool = False  # mark cookies Secure (when served behind HTTPS)
    # trust X-Forwarded-For / X-Forwarded-Proto only from these proxy addresses (comma-separated, as uvicorn's
    # option; '*' trusts any). None trusts no one, so a client cannot pick the address the per-address login limit
    # counts
    forwarded_allow_ips: Optional[str] = None
    out_dir: Optional[str] = None  # where `export` writes demonstrations.jsonl and rankings.jsonl

    def validate(self) -> None:
        if not self.db:
            raise ConfigError("db: required (--db FILE or db=FILE)")
        if self.model and not K_MIN <= self.k <= K_MAX:
            raise ConfigError(f"k: must be {K_MIN}..{K_MAX}, got {self.k}")


def _flag(p, *names: str, key: Optional[str] = None, **kw) -> None:
    add_alias(p, LabelConfig, *names, key=key or names[0][2:].replace("-", "_"), **kw)


def _common(p: argparse.ArgumentParser) -> None:
    add_config_arguments(p, example="db=labels.sqlite")
    _flag(p, "--db", help="the labeling database (SQLite; created if missing)")


def _import_args(p: argparse.ArgumentParser) -> None:
    _flag(p, "--prompts", metavar="FILE.jsonl",
          help='prompts to label: {"prompt"} or {"messages"} per line, optionally with "responses" to rank')
    _flag(p, "--model", metavar="DIR", help="generate K outputs per prompt with this model (ranking tasks)")
    _flag(p, "--k", help=f"outputs to generate per prompt, {K_MIN}..{K_MAX}")
    _flag(p, "--overlap", help="labelers per task, for the tasks this import adds (2+ measures inter-labeler "
                               "agreement)")
    _flag(p, "--tasks", help="task kind per prompt; auto: ranking when outputs are given or generated, else "
                             "demonstration")
    _flag(p, "--max-new-tokens")
    _flag(p, "--temperature")
    _flag(p, "--top-p")
    _flag(p, "--seed")
    _flag(p, "--batch-size", help="prompts per generation batch")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="instructgpt label", description="The labeling web app (human feedback).")
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser("serve", help="run the web app (imports --prompts first)")
    _common(s)
    _import_args(s)
    _flag(s, "--host", help="address to bind (127.0.0.1: this machine only)")
    _flag(s, "--port")
    _flag(s, "--secure-cookies", help="mark cookies Secure (when served behind HTTPS)")
    _flag(s, "--forwarded-allow-ips", metavar="IPS",
          help="trust X-Forwarded-For / X-Forwarded-Proto only from these proxy addresses (comma-separated, as "
               "uvicorn's option; '*' trusts any). Default: trust no one, so a client cannot pick the address the "
               "per-address login limit counts")

    s = sub.add_parser("add-user", help="create a labeler (or an admin)")
    _common(s)
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
        _common(s)
        s.add_argument("username")

    s = sub.add_parser("import", help="add tasks from a prompts file")
    _common(s)
    _import_args(s)

    s = sub.add_parser("export", help="write demonstrations.jsonl and rankings.jsonl for sft and rm")
    _common(s)
    _flag(s, "--out-dir")

    s = sub.add_parser("stats", help="print progress per labeler and inter-labeler agreement")
    _common(s)
    p.set_defaults(subcommands=sub.choices)
    return p


def parse(argv: list[str]) -> argparse.Namespace:
    """The subcommand's flags and dotted overrides, in any order."""
    p = build_parser()
    commands = p.get_default("subcommands")
    if argv and argv[0] in commands:
        args = parse_command_line(commands[argv[0]], argv[1:])
        args.command = argv[0]
        return args
    return p.parse_args(argv)  # --help, or an unknown command: argparse's message


def _read_password(args: argparse.Namespace) -> str:
    if args.password is not None:
        return args.password
    if args.password_stdin or not sys.stdin.isatty():
        return sys.stdin.readline().rstrip("\r\n")
    first = getpass.getpass(f"Password for {args.username}: ")
    if getpass.getpass("Repeat the password: ") != first:
        raise ValueError("the passwords do not match")
    return first


def _import(store: Store, cfg: LabelConfig, log: Callable[[str], None]) -> None:
    if not cfg.prompts:
        raise ConfigError("prompts: required (--prompts FILE.jsonl or prompts=FILE.jsonl)")
    generator = None
    if cfg.model:
        generator = model_generator(cfg.model, cfg.k, max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature,
                                    top_p=cfg.top_p, seed=cfg.seed)
    summary = import_prompts(store, cfg.prompts, tasks=cfg.tasks, overlap=cfg.overlap, generator=generator,
                             model_id=cfg.model, k=cfg.k, batch_size=cfg.batch_size, log=log)
    log(f"{cfg.prompts}: {summary.added} tasks added, {summary.already_present} already present"
        + (f", {summary.generated} prompts generated" if cfg.model else "")
        + (f", {summary.dropped} dropped (fewer than {K_MIN} nonempty outputs)" if summary.dropped else ""))


def _stats(store: Store, out: Callable[[str], None]) -> None:
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
    args = parse(sys.argv[1:] if argv is None else argv)

    def log(msg: str) -> None:
        print(f"instructgpt label: {msg}", file=sys.stderr)

    try:
        cfg = config_from_args(LabelConfig, args)
        store = Store(cfg.db)
        if args.command == "add-user":
            user = store.add_user(args.username, _read_password(args), is_admin=args.admin, update=args.update)
            print(f"{'updated' if args.update else 'created'} {'admin' if user.is_admin else 'labeler'} "
                  f"{user.username}")
        elif args.command in ("disable-user", "enable-user"):
            user, released = store.set_disabled(args.username, args.command == "disable-user")
            print(f"{'disabled' if user.disabled else 'enabled'} {user.username}"
                  + (f"; {released} open claims given back" if user.disabled else ""))
        elif args.command == "import":
            _import(store, cfg, log)
        elif args.command == "export":
            if not cfg.out_dir:
                raise ConfigError("out_dir: required (--out-dir DIR or out_dir=DIR)")
            s = export(store, cfg.out_dir)
            print(f"wrote {s.demonstrations} demonstrations to {s.demonstrations_path} and {s.rankings} rankings to "
                  f"{s.rankings_path}" + (f" ({s.all_tied} all-tied rankings left out)" if s.all_tied else ""))
        elif args.command == "stats":
            _stats(store, print)
        elif args.command == "serve":
            return _serve(store, cfg, log)
    except ConfigError as e:
        return command_error("label", e)
    except (DataError, StoreError, ValueError) as e:
        log(f"error: {e}")
        return 2
    return 0


def _serve(store: Store, cfg: LabelConfig, log: Callable[[str], None]) -> int:
    import uvicorn

    if cfg.prompts:
        _import(store, cfg, log)
    elif cfg.model:
        raise ConfigError("model: needs prompts (the prompts to generate outputs for)")
    loopback = is_loopback(cfg.host)
    if not loopback:
        log(f"WARNING: binding {cfg.host}, not loopback: anyone who can reach this address can try to log in. "
            "Serve it behind HTTPS (and pass --secure-cookies) on any shared network.")
    if not store.users():
        log("no users yet: create one with `instructgpt label add-user --db "
            f"{cfg.db} NAME` (add --admin for the admin page)")
    app = create_app(store, allowed_hosts=LOOPBACK_HOSTS if loopback else None, secure_cookies=cfg.secure_cookies)
    shown = f"[{cfg.host}]" if ":" in cfg.host else cfg.host
    log(f"labeling app on http://{shown}:{cfg.port}/")
    uvicorn.run(app, host=cfg.host, port=cfg.port, log_level="warning", **proxy_settings(cfg.forwarded_allow_ips))
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

"""The ``reliable-messaging`` command (also ``python -m reliable_messaging``), on click and rich.

Exit codes:

- 0: done; for ``verify``, every guarantee audited held;
- 1: ``verify``: a guarantee did not hold (the report says which and by how much); ``check``: a finding is an
  error; ``brokers``: it failed;
- 2: invalid usage or configuration (a bad option, an unknown setting, an invalid URL);
- 3: the run could not be carried out (unreachable broker, a consumer process that died on its own, a timeout;
  ``redrive``: a copy the broker did not confirm, whose dead letter stays);
- 130: ``verify`` interrupted (Ctrl-C, SIGTERM), after killing its consumer and deleting its topic/queue.
"""

from __future__ import annotations

import contextlib
import json
import logging
import signal
import sys
from collections.abc import Iterator
from typing import Any

try:
    import click
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
    from rich.table import Table
except ImportError as exc:  # pragma: no cover - depends on the installed extras
    raise ImportError("the reliable-messaging command needs click and rich: "
                      "pip install 'reliable-messaging[cli]'") from exc

from ._broker import Guarantee
from ._check import Finding, Severity, check
from ._errors import ConfigurationError, ReliableMessagingError
from ._log import redact
from ._redrive import redrive
from ._verify import VerifyReport, verify

EXIT_NOT_HELD = 1
EXIT_USAGE = 2
EXIT_FAILED = 3
EXIT_INTERRUPTED = 130


def parse_setting(text: str) -> tuple[str, Any]:
    """``field=value`` -> (field, value): the value as JSON when it parses (numbers, true/false, null, quoted
    strings, lists), else as a plain string (``acks=all``, ``commit_mode=auto``)."""
    name, sep, raw = text.partition("=")
    if not sep or not name.strip():
        raise click.BadParameter(f"expected field=value, got {text!r}", param_hint="--set")
    try:
        value: Any = json.loads(raw)
    except ValueError:
        value = raw
    return name.strip(), value


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="reliable-messaging")
@click.option("-v", "--verbose", count=True, help="Log the library's INFO lines too (-vv: DEBUG) on stderr; "
              "default: WARNING and above.")
def main(verbose: int) -> None:
    """Reliable delivery over Kafka and RabbitMQ: audit it, run local brokers."""
    # The library's loggers have a NullHandler only; a command is an application, so it says where logs go.
    level = (logging.WARNING, logging.INFO, logging.DEBUG)[min(verbose, 2)]
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("reliable_messaging").setLevel(level)


@main.command(name="verify")
@click.argument("urls", nargs=-1, required=True, metavar="URL...")
@click.option("-g", "--guarantee", "guarantees", multiple=True,
              type=click.Choice([g.value for g in Guarantee]), help="Audit this preset (repeatable; default "
              "effectively-once).")
@click.option("-n", "--messages", default=2000, show_default=True, type=click.IntRange(min=1),
              help="Messages to publish and consume.")
@click.option("-k", "--kill-consumer-every", "kill_every", default=500, show_default=True,
              type=click.IntRange(min=0), help="SIGKILL the consumer process after about this many handled "
              "messages (0.5 to 1.5 times it, at random), and restart it; 0: no kills.")
@click.option("-c", "--concurrency", default=1, show_default=True, type=click.IntRange(min=1),
              help="Handlers the consumer runs at once.")
@click.option("-s", "--set", "settings", multiple=True, metavar="FIELD=VALUE",
              help="A connect() setting, e.g. --set prefetch=50, --set commit_mode=auto --set allow_weaker=true "
              "(repeatable).")
@click.option("--seed", type=int, default=None, help="Seed of the kill points (replays a run's choices).")
@click.option("--timeout", default=300.0, show_default=True, type=click.FloatRange(min=1),
              help="Seconds one audit may take.")
@click.option("--cut-connections", "cut", is_flag=True,
              help="Also reset the consumer's connections through a TCP proxy, about every --cut-every seconds "
              "(Kafka: the local broker of `brokers up` only).")
@click.option("--cut-every", default=2.0, show_default=True, type=click.FloatRange(min=0.1),
              help="Seconds between cuts, on average (0.5 to 1.5 times it).")
@click.option("--json", "as_json", is_flag=True, help="One JSON object per audit on stdout, nothing else.")
def verify_command(urls: tuple[str, ...], guarantees: tuple[str, ...], messages: int, kill_every: int,
                   concurrency: int, settings: tuple[str, ...], seed: int | None, timeout: float,
                   cut: bool, cut_every: float, as_json: bool) -> None:
    """Publish numbered messages to each URL, consume them in a separate process killed at random moments, and
    report what was lost and repeated against what each guarantee promises.

    URL: kafka://host:port[,host:port] or amqp://user:password@host:port/vhost. Exits 0 only if every promise held.
    """
    overrides = dict(parse_setting(s) for s in settings)
    wanted = [Guarantee(g) for g in guarantees] or [Guarantee.EFFECTIVELY_ONCE]
    # SIGTERM unwinds like Ctrl-C: the audit's consumer process is killed and its topic/queue deleted on the way out.
    signal.signal(signal.SIGTERM, _interrupt)
    console = Console(stderr=True)
    if not console.is_terminal:  # a log or a pipe: no wrapping at 80 columns
        console = Console(stderr=True, width=140)
    reports: list[VerifyReport] = []
    for url in urls:
        for guarantee in wanted:
            label = f"{redact(url)} {guarantee.value}"
            try:
                with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                              TextColumn("kills {task.fields[kills]}"), TimeElapsedColumn(), console=console,
                              disable=as_json or not console.is_terminal, transient=True) as bar:
                    task = bar.add_task(label, total=messages, kills=0)

                    def progress(handled: int, total: int, kills: int, task: Any = task, bar: Any = bar) -> None:
                        bar.update(task, completed=handled, total=total, kills=kills)

                    report = verify(url, guarantee=guarantee, messages=messages, kill_every=kill_every,
                                    concurrency=concurrency, settings=overrides, seed=seed, timeout=timeout,
                                    progress=progress, cut_every=cut_every if cut else None)
            except ConfigurationError as exc:
                console.print(f"[red]error:[/red] {label}: {exc}", markup=True, highlight=False)
                sys.exit(EXIT_USAGE)
            except ReliableMessagingError as exc:
                console.print(f"[red]error:[/red] {label}: {type(exc).__name__}: {exc}", highlight=False)
                sys.exit(EXIT_FAILED)
            except KeyboardInterrupt:  # Ctrl-C or SIGTERM: verify() killed its consumer and deleted its topic/queue
                console.print(f"interrupted: {label}", highlight=False, markup=False)
                sys.exit(EXIT_INTERRUPTED)
            reports.append(report)
            if as_json:
                click.echo(json.dumps(report.to_json()))
            elif not console.is_terminal:
                console.print(f"{label}: {'held' if report.held else 'NOT HELD'} "
                              f"(lost {report.lost}, repeated {report.duplicates_processed}, kills {report.kills}, "
                              f"cuts {report.cuts}, "
                              f"{report.seconds:.0f} s)", highlight=False)
    if not as_json:
        stdout_console().print(report_table(reports))
    sys.exit(0 if all(r.held for r in reports) else EXIT_NOT_HELD)


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


@contextlib.contextmanager
def exits_on_errors(console: Console, url: str) -> Iterator[None]:
    """Invalid arguments exit 2, broker trouble 3, each with one line on stderr (the URL without its password)."""
    try:
        yield
    except ConfigurationError as exc:
        console.print(f"error: {exc}", highlight=False, markup=False)
        sys.exit(EXIT_USAGE)
    except ReliableMessagingError as exc:
        console.print(f"error: {redact(url)}: {type(exc).__name__}: {exc}", highlight=False, markup=False)
        sys.exit(EXIT_FAILED)


def stdout_console() -> Console:
    """Tables on stdout; a log or a pipe gets 140 columns, not rich's 80."""
    out = Console()
    return out if out.is_terminal else Console(width=140)


def short_promise(report: VerifyReport) -> str:
    if report.guarantee == Guarantee.AT_MOST_ONCE.value:
        return "repeated = 0"
    if report.guarantee == Guarantee.AT_LEAST_ONCE.value:
        return "lost = 0"
    return f"lost = 0, repeated <= {report.repeat_bound}"


def report_table(reports: list[VerifyReport]) -> Table:
    table = Table(title="Delivery audit: consumer SIGKILLed at random moments, restarted on the same store",
                  title_justify="left")
    for column, justify in (("broker", "left"), ("guarantee", "left"), ("promise", "left"), ("confirmed", "right"),
                            ("kills", "right"), ("lost", "right"), ("repeated", "right"),
                            ("deduplicated", "right"), ("seconds", "right"), ("held", "left")):
        table.add_column(column, justify=justify, no_wrap=column != "promise")  # type: ignore[arg-type]
    for r in reports:
        table.add_row(r.broker, r.guarantee, short_promise(r), f"{r.confirmed:,}", str(r.kills), f"{r.lost:,}",
                      f"{r.duplicates_processed:,}", f"{r.duplicates_delivered - r.duplicates_processed:,}",
                      f"{r.seconds:.0f}", "[green]yes[/green]" if r.held else "[red]NO[/red]")
    return table


@main.command(name="check")
@click.argument("url")
@click.option("-t", "--topic", help="Kafka: the topic to check.")
@click.option("-q", "--queue", help="RabbitMQ: the queue to check.")
@click.option("-g", "--guarantee", default=Guarantee.AT_LEAST_ONCE.value, show_default=True,
              type=click.Choice([g.value for g in Guarantee]), help="The guarantee the settings must keep.")
@click.option("--group", help="Kafka: a consumer group whose lag on the topic to report.")
@click.option("--management-url", help="RabbitMQ: the management API (default http://<host>:15672, the URL's "
              "credentials).")
@click.option("--timeout", default=10.0, show_default=True, type=click.FloatRange(min=0.1),
              help="Seconds each request to the broker may take.")
@click.option("--json", "as_json", is_flag=True, help="One JSON object per finding on stdout, nothing else.")
def check_command(url: str, topic: str | None, queue: str | None, guarantee: str, group: str | None,
                  management_url: str | None, timeout: float, as_json: bool) -> None:
    """Read the broker's settings for a topic or queue and report what undoes the guarantee.

    Exits 1 if any finding is an error (e.g. a topic whose min.insync.replicas equals its replication factor, a
    queue that is not durable, a dead-letter exchange bound to nothing), 0 otherwise; warnings are printed.
    """
    with exits_on_errors(Console(stderr=True), url):
        findings = check(url, topic=topic, queue=queue, guarantee=guarantee, group=group,
                         management_url=management_url, timeout=timeout)
    if as_json:
        for finding in findings:
            click.echo(json.dumps(finding.to_json()))
    else:
        out = stdout_console()
        out.print(findings_table(f"{redact(url)} {topic or queue} under {guarantee}", findings))
    sys.exit(EXIT_NOT_HELD if any(f.severity is Severity.ERROR for f in findings) else 0)


def findings_table(title: str, findings: list[Finding]) -> Table:
    table = Table(title=title, title_justify="left")
    table.add_column("severity", no_wrap=True)
    table.add_column("subject", no_wrap=True)
    table.add_column("finding")
    style = {Severity.ERROR: "[red]error[/red]", Severity.WARNING: "[yellow]warning[/yellow]",
             Severity.OK: "[green]ok[/green]"}
    for finding in findings:
        table.add_row(style[finding.severity], finding.subject, finding.message)
    return table


@main.command(name="redrive")
@click.argument("url")
@click.option("--from", "dead_letters", required=True, metavar="SOURCE[.DLT|.dlq]",
              help="The source whose dead letters to move back (its dead-letter topic or queue may be named).")
@click.option("-n", "--max", "limit", type=click.IntRange(min=1), help="Move at most this many.")
@click.option("--rate", type=click.FloatRange(min=0.001), help="At most this many per second.")
@click.option("--error-type", help="Only dead letters whose last error is of this class (name or dotted path).")
@click.option("--reason", help="Only dead letters whose reason contains this text.")
@click.option("--dry-run", is_flag=True, help="List what would move; move nothing.")
@click.option("--timeout", default=30.0, show_default=True, type=click.FloatRange(min=0.1),
              help="Seconds a copy may take to be confirmed, and the broker to answer.")
@click.option("--json", "as_json", is_flag=True, help="The report as one JSON object on stdout.")
def redrive_command(url: str, dead_letters: str, limit: int | None, rate: float | None, error_type: str | None,
                    reason: str | None, dry_run: bool, timeout: float, as_json: bool) -> None:
    """Move dead letters back to their origin: each copy confirmed by the broker before its dead letter is removed,
    the message id kept (an effectively-once consumer handles a copy repeated by a crash once).

    Exits 0 when it went through the dead letters (up to --max), 3 if a copy was not confirmed (the dead letter
    stays) or the broker could not be reached.
    """
    source = dead_letters
    for suffix in (".DLT", ".dlq"):
        source = source.removesuffix(suffix)
    console = Console(stderr=True)
    with exits_on_errors(console, url), \
            Progress(TextColumn(f"redrive {source}"), TextColumn("{task.completed} moved"), TimeElapsedColumn(),
                     console=console, disable=as_json or not console.is_terminal, transient=True) as bar:
        task = bar.add_task("redrive", total=None)
        report = redrive(url, source, limit=limit, rate=rate, error_type=error_type, reason=reason,
                         dry_run=dry_run, timeout=timeout, progress=lambda moved: bar.update(task, completed=moved))
    if as_json:
        click.echo(json.dumps(report.to_json()))
        return
    out = stdout_console()
    if dry_run:
        table = Table(title=f"{len(report.listed)} dead letter(s) of {report.dead_letters} would move",
                      title_justify="left")
        for column in ("message id", "origin", "error type", "reason"):
            table.add_column(column)
        for letter in report.listed:
            table.add_row(letter.message_id or "", letter.origin, letter.error_type or "", letter.reason or "")
        out.print(table)
    else:
        out.print(f"moved {report.moved} dead letter(s) from {report.dead_letters} back to their origin"
                  + (f"; {report.skipped} did not match the filters" if report.skipped else ""), highlight=False)


@main.command(name="brokers", add_help_option=False,
              context_settings={"ignore_unknown_options": True, "allow_extra_args": True})
@click.argument("args", nargs=-1, type=click.UNPROCESSED)
def brokers_command(args: tuple[str, ...]) -> None:
    """Local brokers for development and tests: up|down|status|env|kill|restart [targets] (see `brokers -h`)."""
    from .testing.brokers import main as brokers_main

    sys.exit(brokers_main(list(args), prog="reliable-messaging brokers"))


if __name__ == "__main__":  # pragma: no cover
    main()

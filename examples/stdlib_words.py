"""A real workload for qmlkit: word statistics over the Python standard library.

One job per ``.py`` file of the running interpreter's standard library (well over a
thousand files) counts lines, definitions and identifier frequencies. The script
enqueues them in bulk on the embedded SQLite storage, runs an in-process server until
every job has finished, with a live progress display, then prints an aggregate summary.

Run it from the repository root::

    python examples/stdlib_words.py [--threads 4] [--storage sqlite:///stdlib-words.db]

The same jobs can be run by a separate worker process instead:
``qmlkit worker examples.stdlib_words:app --storage sqlite:///stdlib-words.db``.
"""

from __future__ import annotations

import argparse
import re
import sys
import sysconfig
import time
from collections import Counter
from pathlib import Path

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from qmlkit import App

DEFAULT_DB = "stdlib-words.db"
app = App("stdlib-words", storage=f"sqlite:///{DEFAULT_DB}")

_WORD = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_DEF = re.compile(r"^\s*(?:async\s+)?def\s", re.MULTILINE)
_CLASS = re.compile(r"^\s*class\s", re.MULTILINE)


@app.job(queue="default", max_retries=0)
def word_stats(path: str) -> dict[str, object]:
    """Count lines, functions, classes and the 20 most frequent identifiers of one file.

    Args:
        path: Absolute path of a Python source file.

    Returns:
        ``{"path", "lines", "words", "functions", "classes", "top": [[word, n], ...]}``.

    Raises:
        UnicodeDecodeError: The file is not UTF-8 (a few test fixtures are not on
            purpose); the job fails and the summary lists it.
    """
    text = Path(path).read_text(encoding="utf-8")
    words = Counter(_WORD.findall(text))
    return {
        "path": path,
        "lines": text.count("\n"),
        "words": sum(words.values()),
        "functions": len(_DEF.findall(text)),
        "classes": len(_CLASS.findall(text)),
        "top": words.most_common(20),
    }


def stdlib_files() -> list[str]:
    """Return every ``.py`` file of the standard library, site-packages excluded, sorted."""
    root = Path(sysconfig.get_paths()["stdlib"])
    return sorted(
        str(p) for p in root.rglob("*.py")
        if "site-packages" not in p.parts and "dist-packages" not in p.parts
    )


def main(argv: list[str] | None = None) -> int:
    """Enqueue, process and summarise the workload. Returns the process exit code."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=4, help="worker threads (default 4)")
    parser.add_argument("--storage", default=None,
                        help=f"storage URL (default sqlite:///{DEFAULT_DB}, reset each run)")
    args = parser.parse_args(argv)
    console = Console()

    storage_url = args.storage
    if storage_url is None:
        for suffix in ("", "-wal", "-shm"):  # a fresh database each run
            Path(DEFAULT_DB + suffix).unlink(missing_ok=True)
        storage_url = f"sqlite:///{DEFAULT_DB}"
    runner = App("stdlib-words", storage=storage_url)
    runner.registry = app.registry

    files = stdlib_files()
    started = time.perf_counter()
    ids = word_stats_many(runner, files)
    enqueue_s = time.perf_counter() - started
    console.print(f"enqueued [b]{len(ids)}[/b] jobs on {storage_url} in {enqueue_s:.2f} s")

    server = runner.server(worker_count=args.threads, queues=("default",),
                           polling_interval=0.2, log_attempts=False)
    run_started = time.perf_counter()
    server.start()
    try:
        with Progress(TextColumn("[progress.description]{task.description}"), BarColumn(),
                      MofNCompleteColumn(), TimeElapsedColumn(), console=console) as progress:
            task = progress.add_task("processing", total=len(ids))
            while True:
                counts = runner.storage.count_jobs()
                done = sum(n for (q, s), n in counts.items() if s in ("Succeeded", "Failed"))
                failed = counts.get(("default", "Failed"), 0)
                progress.update(task, completed=done, description=f"processing ({failed} failed)")
                if done >= len(ids):
                    break
                time.sleep(0.2)
    finally:
        server.stop()
    elapsed = time.perf_counter() - run_started
    summarise(console, runner, len(ids), elapsed)
    runner.close()
    return 0


def word_stats_many(runner: App, files: list[str]) -> list[str]:
    """Enqueue one ``word_stats`` job per file in bulk transactions of 500."""
    ids: list[str] = []
    for i in range(0, len(files), 500):
        batch = [runner.make_job(word_stats.name, args=(f,)) for f in files[i : i + 500]]
        ids += runner.enqueue_jobs(batch)
    return ids


def summarise(console: Console, runner: App, total: int, elapsed: float) -> None:
    """Print totals, the top identifiers, the largest modules and the failures."""
    words: Counter[str] = Counter()
    lines = functions = classes = word_total = 0
    biggest: list[tuple[int, str]] = []
    offset = 0
    while True:
        page = runner.storage.list_jobs(state="Succeeded", limit=1000, offset=offset)
        for job in page:
            r = job.state.result  # type: ignore[union-attr]
            lines += r["lines"]
            functions += r["functions"]
            classes += r["classes"]
            word_total += r["words"]
            words.update(dict(r["top"]))
            biggest.append((r["lines"], r["path"]))
        if len(page) < 1000:
            break
        offset += 1000
    failed = runner.storage.list_jobs(state="Failed", limit=10_000)
    ok = total - len(failed)

    table = Table(title="Python standard library, by qmlkit", show_header=False)
    table.add_row("files processed", f"{ok} succeeded, {len(failed)} failed, {total} total")
    table.add_row("lines / identifiers", f"{lines:,} / {word_total:,}")
    table.add_row("functions / classes", f"{functions:,} / {classes:,}")
    table.add_row("throughput", f"{total / elapsed:,.0f} jobs/s ({elapsed:.2f} s)")
    table.add_row("top identifiers", ", ".join(f"{w} ({n:,})" for w, n in words.most_common(10)))
    stdlib = sysconfig.get_paths()["stdlib"]
    table.add_row("largest modules", ", ".join(
        f"{Path(p).relative_to(stdlib)} ({n:,})" for n, p in sorted(biggest, reverse=True)[:5]))
    console.print(table)
    for job in failed[:10]:
        state = job.state
        name = Path(job.args[0]).relative_to(stdlib)
        console.print(f"  failed: {name}: {state.exception_type}: {state.message[:80]}")  # type: ignore[union-attr]


if __name__ == "__main__":
    sys.exit(main())

"""What every fixture service's `sync` task does: record the run, behave as told, report.

The repository root holds fixture.json with {"log": "<path>"}: every task run appends a
"start" and an "end" line (JSON) to that log, which the tests read back. A service directory
may hold behaviour.json with {"sleep": seconds, "exit": code} to make its task slow or fail,
with {"output_lines": n, "line_bytes": m, "unterminated_bytes": k} to make it print n
lines of m bytes, then k bytes without a newline, with "echo_env": [names] to print those
variables as NAME=value, and with "plant_hook": true to leave a git hook in the checkout that,
if git ever ran it, would write hook-ran.txt beside the log.

Every run imports `uuid` (each record carries a run id), which fails if the task sees the
repository's `platform/` package ahead of the standard library's `platform` module.
"""

import json
import os
import pathlib
import sys
import time
import uuid


def _append(log: str, record: dict) -> None:
    line = (json.dumps(record) + "\n").encode()
    fd = os.open(log, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, line)
    finally:
        os.close(fd)


def _print_as_told(behaviour: dict) -> None:
    line = "x" * int(behaviour.get("line_bytes", 0))
    for i in range(int(behaviour.get("output_lines", 0))):
        print(f"{i:06d}{line}", flush=True)
    unterminated = int(behaviour.get("unterminated_bytes", 0))
    while unterminated > 0:
        chunk = min(unterminated, 1 << 20)
        sys.stdout.write("y" * chunk)
        sys.stdout.flush()
        unterminated -= chunk


def run_sync(deploy_file: str) -> None:
    service_dir = pathlib.Path(deploy_file).resolve().parent
    root = service_dir
    while not (root / "fixture.json").exists():
        root = root.parent
    log = json.loads((root / "fixture.json").read_text())["log"]
    behaviour_file = service_dir / "behaviour.json"
    behaviour = json.loads(behaviour_file.read_text()) if behaviour_file.exists() else {}
    record = {
        "task": os.environ.get("IAC_TASK"),
        "service": os.environ.get("IAC_SERVICE"),
        "commit": os.environ.get("IAC_COMMIT"),
        "force": os.environ.get("IAC_FORCE") == "1",
        "dir": service_dir.name,
        "pid": os.getpid(),
        "cwd": os.getcwd(),
        "run_id": uuid.uuid4().hex,
        "env": dict(os.environ),
    }
    _append(log, dict(record, phase="start", t=time.time()))
    print(f"syncing {service_dir.name}", flush=True)
    _print_as_told(behaviour)
    for name in behaviour.get("echo_env", []):
        print(f"{name}={os.environ.get(name)}", flush=True)
    if behaviour.get("plant_hook"):
        _plant_hooks(pathlib.Path(log).parent / "hook-ran.txt")
    time.sleep(float(behaviour.get("sleep", 0)))
    _append(log, dict(record, phase="end", t=time.time()))
    code = int(behaviour.get("exit", 0))
    if code:
        print(f"deploy of {service_dir.name} failed: boom", file=sys.stderr, flush=True)
        sys.exit(code)
    print(f"{service_dir.name} synced", flush=True)


def _plant_hooks(marker: pathlib.Path) -> None:
    hooks = pathlib.Path(".git/hooks")
    hooks.mkdir(parents=True, exist_ok=True)
    for name in ("post-checkout", "reference-transaction", "post-merge"):
        hook = hooks / name
        hook.write_text(f"#!/bin/sh\necho {name} >> '{marker}'\n")
        hook.chmod(0o755)

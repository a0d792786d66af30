"""A Dagster deployment of the tiny pipeline as a user runs one: a DAGSTER_HOME with the shipped
instance settings (``.dagster_home/dagster.yaml``), a code location in a definitions file, and
the ``dagster`` commands and daemons run in processes of their own. Everything it starts is
killed by PID at teardown."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Callable, Optional

import dagster as dg
import psutil
import yaml
from dagster._core.instance.ref import InstanceRef

from tests.helpers.data import questions, write_jsonl
from tests.helpers.processes import kill_processes

PROJECT = Path(__file__).resolve().parent.parent.parent
INSTANCE_SETTINGS = PROJECT / ".dagster_home" / "dagster.yaml"
WORKSPACE = "load_from:\n  - python_file:\n      relative_path: defs.py\n      working_directory: .\n"
BIN = Path(sys.executable).parent
# The env variables the definitions read (code_location_env writes them).
PREFIX = "DEPLOYMENT"


def definitions(
    pipeline: str = "make_pipeline(landing, model)", imports: str = "from tests.helpers.pipelines import make_pipeline"
) -> str:
    """A definitions file whose PIPELINES hold ``pipeline`` (a Python expression over ``landing``
    and ``model``), with the deployment's storage."""
    return textwrap.dedent(f"""\
        import os

        from llm_assets.defs.factory import build_definitions
        from llm_assets.resources import PartitionStorage, make_resources
        {imports}

        landing, model = os.environ["{PREFIX}_LANDING"], os.environ["{PREFIX}_MODEL"]
        PIPELINES = [{pipeline}]
        defs = build_definitions(PIPELINES, make_resources(PartitionStorage(root=os.environ["{PREFIX}_STORAGE"])))
        """)


def code_location_env(home: Path, prefix: str, landing: Path, storage: Path, model: str) -> dict[str, str]:
    """What the Dagster processes a test starts need (code server, daemon, run workers): the
    instance, the code location's landing folder, storage and model (``{prefix}_LANDING``...),
    this checkout on the import path, no hub."""
    return {
        "DAGSTER_HOME": str(home),
        f"{prefix}_LANDING": str(landing),
        f"{prefix}_STORAGE": str(storage),
        f"{prefix}_MODEL": model,
        "PYTHONPATH": os.pathsep.join([str(PROJECT), *filter(None, [os.environ.get("PYTHONPATH")])]),
        "HF_HUB_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false",
    }


def open_instance(home: Path) -> dg.DagsterInstance:
    return dg.DagsterInstance.from_ref(InstanceRef.from_dir(str(home)))


def message(record) -> str:
    return (record.dagster_event.message or "") if record.is_dagster_event else record.user_message


def messages(instance: dg.DagsterInstance, run_id: str) -> list[str]:
    return [message(r) for r in instance.all_logs(run_id)]


class Deployment:
    """``files``: landing files to write (name -> rows); ``adjust``: a change to the shipped
    instance settings (a dict, changed in place)."""

    def __init__(
        self,
        tmp: Path,
        model: str,
        definitions_text: Optional[str] = None,
        files: Optional[dict[str, int]] = None,
        adjust: Callable[[dict], None] = lambda settings: None,
    ):
        self.tmp = tmp
        (tmp / "landing").mkdir(parents=True, exist_ok=True)
        for file_name, rows in (files or {}).items():
            write_jsonl(tmp / "landing" / file_name, questions(rows, file_name[0]))
        (tmp / "defs.py").write_text(definitions_text or definitions())
        (tmp / "workspace.yaml").write_text(WORKSPACE)
        self.home = tmp / "dagster_home"
        self.home.mkdir()
        settings = yaml.safe_load(INSTANCE_SETTINGS.read_text())
        adjust(settings)
        (self.home / "dagster.yaml").write_text(yaml.safe_dump(settings))
        self.env = {**os.environ, **code_location_env(self.home, PREFIX, tmp / "landing", tmp / "storage", model)}
        self.daemons: list[subprocess.Popen] = []
        self.started: list[psutil.Process] = []  # every process seen under a daemon or command, for teardown

    def dagster(self, *args: str) -> subprocess.CompletedProcess:
        result = subprocess.run(
            [str(BIN / "dagster"), *args], cwd=self.tmp, env=self.env, capture_output=True, text=True, timeout=120
        )
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
        return result

    def launch(self, tags: dict) -> None:
        """`dagster job launch` on the workspace: the run is queued for the daemon, as the UI queues it."""
        self.dagster("job", "launch", "-w", "workspace.yaml", "-j", "tiny_job", "--tags", json.dumps(tags))

    def execute(self, tags: dict) -> subprocess.Popen:
        """`dagster job execute` on the definitions file: the run executes in that command's own
        process (the README's command), with no run launcher behind it."""
        n = len(list(self.tmp.glob("execute-*.log")))
        return subprocess.Popen(
            [str(BIN / "dagster"), "job", "execute", "-f", "defs.py", "-j", "tiny_job", "--tags", json.dumps(tags)],
            cwd=self.tmp,
            env=self.env,
            stdout=open(self.tmp / f"execute-{n}.log", "w"),
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )

    def start_daemon(self) -> subprocess.Popen:
        n = len(self.daemons)
        daemon = subprocess.Popen(
            [str(BIN / "dagster-daemon"), "run", "-w", "workspace.yaml"],
            cwd=self.tmp,
            env=self.env,
            stdout=open(self.tmp / f"daemon-{n}.log", "w"),
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        self.daemons.append(daemon)
        return daemon

    def daemon_logs(self, tail: Optional[int] = 3000) -> str:
        """The daemons' logs: the last ``tail`` characters of each (None: all of it)."""
        return "\n".join(
            f"--- daemon-{n}.log:\n{(self.tmp / f'daemon-{n}.log').read_text()[-(tail or 0) :]}"
            for n in range(len(self.daemons))
        )

    def tree(self, pid: int) -> list[psutil.Process]:
        root = psutil.Process(pid)
        processes = [root, *root.children(recursive=True)]
        self.started.extend(processes)
        return processes

    def teardown(self) -> None:
        for daemon in self.daemons:
            if daemon.poll() is None:
                self.tree(daemon.pid)
        kill_processes(self.started, timeout_s=10)
        for daemon in self.daemons:
            daemon.wait(timeout=10)

"""Processes tests start and must leave none of: trees, kills, waits, free ports."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time

import psutil


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(condition, timeout_s: float, what: str, explain=lambda: ""):
    """``condition()``'s first true value within ``timeout_s``, else fail saying ``what`` (and ``explain()``)."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = condition()
        if value:
            return value
        assert time.monotonic() < deadline, f"{what}: not within {timeout_s} s\n{explain()}"
        time.sleep(0.3)


def tree(pid: int) -> list[psutil.Process]:
    """The process and all its descendants, plus anything else in its process group."""
    try:
        root = psutil.Process(pid)
        processes = {p.pid: p for p in [root, *root.children(recursive=True)]}
    except psutil.NoSuchProcess:
        processes = {}
    for process in psutil.process_iter():
        try:
            if process.pid not in processes and os.getpgid(process.pid) == pid:
                processes[process.pid] = process
        except (ProcessLookupError, psutil.Error):  # gone since it was listed
            continue
    return list(processes.values())


def name(process: psutil.Process) -> str:
    try:
        return process.name()
    except psutil.NoSuchProcess:  # ended since it was listed
        return "(gone)"


def alive(processes: list[psutil.Process]) -> list[psutil.Process]:
    running = []
    for process in processes:
        try:
            if process.is_running() and process.status() != psutil.STATUS_ZOMBIE:
                running.append(process)
        except psutil.NoSuchProcess:  # ended between the two calls
            continue
    return running


def describe(processes: list[psutil.Process]) -> list[str]:
    described = []
    for process in processes:
        try:
            described.append(f"{process.pid} {' '.join(process.cmdline())[:120] or name(process)}")
        except psutil.NoSuchProcess:
            continue
    return described


def kill_processes(processes: list, timeout_s: float = 30) -> None:
    """SIGKILL each psutil.Process (those already gone are skipped) and wait for them."""
    for process in processes:
        try:
            process.kill()
        except psutil.NoSuchProcess:  # ended by itself meanwhile
            continue
    psutil.wait_procs(processes, timeout=timeout_s)


def stop_group(popen: subprocess.Popen, processes: list[psutil.Process], timeout: float = 30) -> list[str]:
    """SIGTERM the process group that ``popen`` leads, SIGKILL whatever is left after ``timeout``;
    returns the processes still alive (there should be none)."""
    everything = list({p.pid: p for p in [*processes, *tree(popen.pid)]}.values())
    try:
        os.killpg(popen.pid, signal.SIGTERM)
    except ProcessLookupError:
        pass
    _, left = psutil.wait_procs(everything, timeout=timeout)
    kill_processes([*left, *tree(popen.pid)], timeout_s=10)
    try:
        os.killpg(popen.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    try:
        popen.wait(timeout=10)
    except subprocess.TimeoutExpired:
        pass
    return describe(alive(everything))


def new_descendants(before: set[int]) -> list[psutil.Process]:
    """This process's descendants that were not in ``before`` (pids)."""
    return [p for p in psutil.Process().children(recursive=True) if p.pid not in before]

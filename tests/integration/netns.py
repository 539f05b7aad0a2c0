"""Hosts for multi-host tests on one machine: Linux network namespaces, each with its own
address in 198.18.0.0/15 (the benchmarking range), joined by veth pairs to a bridge that lives
in a namespace of its own -- so nothing touches the machine's own interfaces, and traffic goes
only between the namespaces the test made (and each one's loopback).

``Hosts`` makes them (root only: ``unavailable()`` says why not), runs the test's processes in
them with ``ip netns exec``, and on close kills exactly the processes inside its namespaces,
then deletes the namespaces.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
import uuid
from collections.abc import Mapping, Sequence
from pathlib import Path

SUBNET = "198.18.0"  # hosts get .1, .2, ... on a /24


def unavailable() -> str | None:
    """Why network namespaces cannot be made here, or None."""
    if os.geteuid() != 0:
        return "network namespaces need root"
    if shutil.which("ip") is None:
        return "no `ip` command (Debian package iproute2)"
    probe = f"ssprobe-{uuid.uuid4().hex[:6]}"
    made = subprocess.run(["ip", "netns", "add", probe], capture_output=True, text=True)
    if made.returncode != 0:
        return f"cannot create a network namespace: {made.stderr.strip()}"
    subprocess.run(["ip", "netns", "del", probe], check=True)
    return None


class Hosts:
    """One namespace per name, addressed in order (``address(name)``); use as a context manager."""

    def __init__(self, names: Sequence[str], workdir: Path):
        tag = uuid.uuid4().hex[:6]
        self.names = list(names)
        self.workdir = workdir
        self._ns = {name: f"ss{tag}-{name}" for name in names}
        self._switch = f"ss{tag}-sw"
        self._links = {name: f"ss{tag}{i}" for i, name in enumerate(names)}  # <= 15 characters
        self._made: list[str] = []

    def __enter__(self) -> Hosts:
        try:
            self._make()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def address(self, name: str) -> str:
        return f"{SUBNET}.{self.names.index(name) + 1}"

    def command(self, name: str, argv: Sequence[str]) -> list[str]:
        """``argv`` as run in host ``name`` (``ip netns exec`` execs it: a Popen's pid is the command's)."""
        return ["ip", "netns", "exec", self._ns[name], *argv]

    def popen(self, name: str, argv: Sequence[str], env: Mapping[str, str], log: str) -> subprocess.Popen:
        """``argv`` running in host ``name`` with environment ``env``, its output into ``log``
        under the work folder."""
        with open(self.workdir / log, "ab") as out:  # the child keeps its own copy
            return subprocess.Popen(self.command(name, argv), stdout=out, stderr=subprocess.STDOUT, env=env)

    def run(self, name: str, argv: Sequence[str], env: Mapping[str, str],
            timeout_s: float = 120.0) -> subprocess.CompletedProcess:
        return subprocess.run(self.command(name, argv), capture_output=True, text=True, env=env, timeout=timeout_s)

    def pids(self, name: str) -> list[int]:
        """Every process inside host ``name``."""
        listed = subprocess.run(["ip", "netns", "pids", self._ns[name]], capture_output=True, text=True)
        return [int(p) for p in listed.stdout.split()]

    def kill(self, name: str, command_contains: str, sig: int = signal.SIGKILL) -> list[int]:
        """Signal the processes in host ``name`` whose command line contains ``command_contains``."""
        hit = []
        for pid in self.pids(name):
            try:
                command = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
                if command_contains in command:
                    os.kill(pid, sig)
                    hit.append(pid)
            except (FileNotFoundError, ProcessLookupError):
                pass
        return hit

    def close(self) -> None:
        """Stop every process in the namespaces made (TERM, then KILL), then delete them."""
        for name in self.names:
            if self._ns[name] in self._made:
                self._stop_all(name)
        for ns in reversed(self._made):
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)
        self._made.clear()

    # ------------------------------------------------------------------------------ making

    def _make(self) -> None:
        self._ip("netns", "add", self._switch)
        self._made.append(self._switch)
        self._ip("-n", self._switch, "link", "add", "br0", "type", "bridge")
        self._ip("-n", self._switch, "link", "set", "br0", "up")
        for name in self.names:
            ns, link = self._ns[name], self._links[name]
            self._ip("netns", "add", ns)
            self._made.append(ns)
            self._ip("link", "add", link, "type", "veth", "peer", "name", f"{link}b")
            self._ip("link", "set", link, "netns", ns)
            self._ip("link", "set", f"{link}b", "netns", self._switch)
            self._ip("-n", self._switch, "link", "set", f"{link}b", "master", "br0")
            self._ip("-n", self._switch, "link", "set", f"{link}b", "up")
            self._ip("-n", ns, "link", "set", "lo", "up")
            self._ip("-n", ns, "addr", "add", f"{self.address(name)}/24", "dev", link)
            self._ip("-n", ns, "link", "set", link, "up")

    def _stop_all(self, name: str, grace_s: float = 5.0) -> None:
        for sig in (signal.SIGTERM, signal.SIGKILL):
            for pid in self.pids(name):
                try:
                    os.kill(pid, sig)
                except ProcessLookupError:
                    pass
            deadline = time.monotonic() + grace_s
            while self.pids(name) and time.monotonic() < deadline:
                time.sleep(0.1)

    @staticmethod
    def _ip(*args: str) -> None:
        done = subprocess.run(["ip", *args], capture_output=True, text=True)
        if done.returncode != 0:
            raise RuntimeError(f"ip {' '.join(args)}: {done.stderr.strip()}")

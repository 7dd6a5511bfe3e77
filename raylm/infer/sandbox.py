"""Running model-written Python (PAL) in a process the kernel confines.

    from raylm.infer.sandbox import run_program
    result = run_program("print(6 * 7)", timeout_s=5, memory_mb=256)
    result.ok, result.stdout, result.error          # True, "42\\n", None

A PAL program is hostile input: a request can make the model write anything. It runs in a
separate Python (standard library only, empty environment) in a fresh temporary folder, started
through `sandbox_launcher.py`, which confines itself before the program's first line:
- files: Landlock — the standard library is readable, the folder readable and writable, nothing
  else exists for it (no /proc, /etc, home, the server's files);
- processes and network: seccomp — fork/clone/exec, sockets, ptrace, kill, namespaces, mounts and
  other kernel interfaces return EPERM; and, where unprivileged user namespaces work, an empty
  network namespace (`unshare -rn`) around it;
- resources: CPU seconds, address space, file size and open files as rlimits; a wall-clock limit
  that kills the process group; stdout and stderr read up to OUTPUT_LIMIT bytes, past which the
  process is killed (nothing unbounded enters the server's memory).
The launcher applies its limits to itself (no `preexec_fn`, which can deadlock a threaded server).
Where the kernel lacks Landlock or seccomp the program is not run: the result says why, unless
`confine=False` (the spec's `sandbox: unconfined`, which keeps only the rlimits and bounds).
A program that fails, loops or breaks a rule returns ok=False with the reason; nothing raises.
"""

from __future__ import annotations

import functools
import json
import os
import selectors
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

OUTPUT_LIMIT = 64_000  # bytes of stdout and of stderr read from the program; more kills it
FILE_MB = 16  # largest file the program may write
OPEN_FILES = 32
LAUNCHER = Path(__file__).with_name("sandbox_launcher.py")
CONFINEMENT_FAILED = 86  # sandbox_launcher.CONFINEMENT_FAILED


class SandboxUnavailable(RuntimeError):
    """The kernel cannot confine PAL programs here; the message says what is missing."""


@dataclass
class SandboxResult:
    ok: bool
    stdout: str
    error: str | None  # why it failed: the exception's last line, a limit, a signal

    @property
    def answer(self) -> str | None:
        """The program's result: the last line it printed."""
        lines = [line.strip() for line in self.stdout.splitlines() if line.strip()]
        return lines[-1] if self.ok and lines else None


@functools.cache
def _network_namespace_prefix() -> tuple[str, ...]:
    """`unshare -rn` where unprivileged user namespaces work (an empty network namespace), else ()."""
    unshare = shutil.which("unshare") or next(
        (p for p in ("/usr/bin/unshare", "/bin/unshare") if os.path.exists(p)), None
    )
    if unshare is None:
        return ()
    try:
        probe = subprocess.run([unshare, "-rn", "true"], capture_output=True, timeout=5)
    except (OSError, subprocess.SubprocessError):
        return ()
    return (unshare, "-rn") if probe.returncode == 0 else ()


@functools.cache
def _library_paths() -> tuple[str, ...]:
    """Where the launcher imports `landlock` and `pyseccomp` from (before it locks itself in)."""
    try:
        import landlock
        import pyseccomp
    except (ImportError, OSError) as err:  # pyseccomp loads libseccomp.so.2 at import
        raise SandboxUnavailable(
            f"the PAL sandbox needs the landlock and pyseccomp packages and libseccomp ({err}); "
            "install raylm's dependencies (and Debian's libseccomp2), or set "
            "strategy.sandbox: unconfined only for trusted models"
        ) from None
    paths = (Path(landlock.__file__).parent.parent, Path(pyseccomp.__file__).parent)
    return tuple(dict.fromkeys(str(p) for p in paths))


def check() -> None:
    """Raise SandboxUnavailable unless a program here runs confined (a server calls this at start)."""
    probe = run_program("print('confined')", timeout_s=20)
    if not probe.ok:
        raise SandboxUnavailable(probe.error)


def run_program(
    program: str, timeout_s: float = 5.0, memory_mb: int = 256, confine: bool = True
) -> SandboxResult:
    """Run `program` under the confinement above; its stdout is the result."""
    try:
        settings = {
            "cpu_s": int(timeout_s) + 1,
            "memory_mb": memory_mb,
            "file_mb": FILE_MB,
            "open_files": OPEN_FILES,
            "confine": confine,
            "library_paths": list(_library_paths()) if confine else [],
        }
    except SandboxUnavailable as err:
        return SandboxResult(False, "", str(err))
    with tempfile.TemporaryDirectory(prefix="raylm-pal-", ignore_cleanup_errors=True) as folder:
        Path(folder, "program.py").write_text(program, encoding="utf-8", errors="replace")
        command = [
            *(_network_namespace_prefix() if confine else ()),
            sys.executable, "-I", "-S", "-X", "utf8", str(LAUNCHER), json.dumps(settings),
        ]  # fmt: skip
        try:
            proc = subprocess.Popen(
                command,
                cwd=folder,
                env={},
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                start_new_session=True,
            )
        except OSError as err:
            return SandboxResult(False, "", f"could not start the sandbox: {err}")
        try:
            out, err, overflow, timed_out = _read_bounded(proc, timeout_s)
        finally:
            _kill(proc)
            proc.wait()
        stdout, stderr = _text(out), _text(err)
        if timed_out:
            return SandboxResult(False, stdout, f"time limit: the program ran past {timeout_s:g} s")
        if overflow:
            return SandboxResult(
                False, stdout, f"output limit: the program printed more than {OUTPUT_LIMIT} bytes"
            )
        if proc.returncode == 0:
            return SandboxResult(True, stdout, None)
        if proc.returncode == CONFINEMENT_FAILED and stderr.startswith("sandbox unavailable"):
            return SandboxResult(False, "", _unavailable(stderr))
        return SandboxResult(False, stdout, _failure(proc.returncode, stderr, timeout_s, memory_mb))


def _read_bounded(proc: subprocess.Popen, timeout_s: float) -> tuple[bytes, bytes, bool, bool]:
    """Read stdout and stderr until both close, the deadline passes or one exceeds OUTPUT_LIMIT."""
    chunks = {proc.stdout: bytearray(), proc.stderr: bytearray()}
    deadline = time.monotonic() + timeout_s
    with selectors.DefaultSelector() as selector:
        for stream in chunks:
            selector.register(stream, selectors.EVENT_READ)
        while selector.get_map():
            left = deadline - time.monotonic()
            if left <= 0:
                return bytes(chunks[proc.stdout]), bytes(chunks[proc.stderr]), False, True
            for key, _ in selector.select(left):
                data = os.read(key.fd, 65536)
                if not data:
                    selector.unregister(key.fileobj)
                    continue
                chunks[key.fileobj] += data
                if len(chunks[key.fileobj]) > OUTPUT_LIMIT:
                    return bytes(chunks[proc.stdout]), bytes(chunks[proc.stderr]), True, False
    try:  # both pipes closed: the process is exiting
        proc.wait(max(deadline - time.monotonic(), 0.05))
    except subprocess.TimeoutExpired:
        return bytes(chunks[proc.stdout]), bytes(chunks[proc.stderr]), False, True
    return bytes(chunks[proc.stdout]), bytes(chunks[proc.stderr]), False, False


def _kill(proc: subprocess.Popen) -> None:
    for kill in (lambda: os.killpg(proc.pid, signal.SIGKILL), proc.kill):
        try:
            kill()
        except (ProcessLookupError, PermissionError):
            pass
    for stream in (proc.stdout, proc.stderr):
        stream.close()


def _text(data: bytes) -> str:
    return data[:OUTPUT_LIMIT].decode("utf-8", "replace")


def _unavailable(stderr: str) -> str:
    return (
        f"{' '.join(stderr.split())} — this kernel cannot confine PAL programs (the sandbox needs "
        "Landlock, Linux >= 5.13 with landlock in the LSM list, and seccomp); the program was not run. "
        "strategy.sandbox: unconfined runs it without confinement: only for trusted models"
    )


def _failure(code: int, stderr: str, timeout_s: float, memory_mb: int) -> str:
    if code in (-signal.SIGXCPU, -signal.SIGKILL) and not stderr.strip():
        return f"time limit: the program used more than {int(timeout_s) + 1} s of CPU"
    if code == -signal.SIGSYS:
        return "the program made a system call of another architecture and was killed"
    lines = [line for line in stderr.strip().splitlines() if line.strip()]
    last = lines[-1] if lines else f"exited with status {code}"
    if last.startswith("MemoryError"):
        return f"memory limit: the program needed more than {memory_mb} MB"
    return last

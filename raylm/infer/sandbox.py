"""Running model-written Python (PAL) without trusting it.

    from raylm.infer.sandbox import run_program
    result = run_program("print(6 * 7)", timeout_s=5, memory_mb=256)
    result.ok, result.stdout, result.error          # True, "42\\n", None

The program runs in a separate Python process (isolated mode, no site-packages: the standard
library only) in a fresh temporary folder, with
- a wall-clock limit (the whole process group is killed) and a CPU-time limit,
- an address-space limit (an unbounded allocation ends in MemoryError), a file-size limit,
- an audit hook installed before the program runs that refuses sockets, new processes, ctypes, and
  any file access outside the temporary folder except reading the standard library,
- and, where the kernel allows unprivileged user namespaces, its own empty network namespace.
A program that fails, loops or breaks a rule returns ok=False with the reason; nothing raises.
"""

from __future__ import annotations

import functools
import os
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
from dataclasses import dataclass

OUTPUT_LIMIT = 20_000  # characters of stdout / stderr kept

# Runs first in the child: reads the program from stdin, then locks the process down and runs it.
_BOOT = r"""
import os, sys
program = sys.stdin.read()
sys.stdin.close()
ROOT = os.path.realpath(os.getcwd())
READABLE = tuple(os.path.realpath(p) for p in sys.path if p) + (ROOT,)
WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC
PATH_EVENTS = {"os.remove", "os.rename", "os.replace", "os.mkdir", "os.rmdir", "os.chmod", "os.chown",
               "os.link", "os.symlink", "os.truncate", "os.utime", "os.chdir",
               "os.chflags", "os.setxattr", "os.removexattr", "shutil.rmtree", "shutil.copyfile",
               "shutil.move", "shutil.copytree", "os.mkfifo", "os.mknod"}
FORBIDDEN = ("socket.", "subprocess.", "os.exec", "os.spawn", "os.posix_spawn", "os.fork", "os.forkpty",
             "os.system", "os.kill", "os.killpg", "ctypes.", "_ctypes.", "os.startfile", "pty.", "mmap.",
             "sys._current_frames", "sys.setprofile", "sys.settrace", "os.putenv", "resource.setrlimit",
             "sys.addaudithook", "urllib.", "http.", "ftplib.", "smtplib.", "webbrowser.", "import")

def inside(path, roots):
    path = os.path.realpath(os.fsdecode(path))
    return any(path == r or path.startswith(r + os.sep) for r in roots)

def hook(event, args):
    if event == "open":
        path, mode, flags = args
        if path is None or isinstance(path, int):
            return
        writing = (isinstance(mode, str) and any(c in mode for c in "wax+")) or bool((flags or 0) & WRITE_FLAGS)
        if not inside(path, (ROOT,) if writing else READABLE):
            raise PermissionError(f"file access outside the sandbox folder is not allowed: {path}")
    elif event in ("os.listdir", "os.scandir"):
        if args[0] is not None and not isinstance(args[0], int) and not inside(args[0], READABLE):
            raise PermissionError(f"{event} outside the sandbox folder is not allowed: {args[0]}")
    elif event in PATH_EVENTS:
        for path in args[:2]:
            if isinstance(path, (str, bytes, os.PathLike)) and not inside(path, (ROOT,)):
                raise PermissionError(f"{event} outside the sandbox folder is not allowed: {path}")
    elif event == "import":
        if args[0].split(".")[0] in ("ctypes", "_ctypes", "socket", "_socket", "ssl", "_ssl", "subprocess",
                                      "_posixsubprocess", "multiprocessing", "mmap", "pty"):
            raise PermissionError(f"importing {args[0]} is not allowed in the sandbox")
    elif event.startswith(FORBIDDEN):
        raise PermissionError(f"{event} is not allowed in the sandbox")

sys.addaudithook(hook)
del hook
exec(compile(program, "<program>", "exec"), {"__name__": "__main__"})
"""


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
    unshare = shutil.which("unshare")
    if unshare is None:
        return ()
    try:
        probe = subprocess.run([unshare, "-rn", "true"], capture_output=True, timeout=5)
    except (OSError, subprocess.SubprocessError):
        return ()
    return (unshare, "-rn") if probe.returncode == 0 else ()


def _limits(timeout_s: float, memory_mb: int):
    def apply() -> None:
        cpu = int(timeout_s) + 1
        resource.setrlimit(resource.RLIMIT_CPU, (cpu, cpu))
        memory = memory_mb * 1024 * 1024
        resource.setrlimit(resource.RLIMIT_AS, (memory, memory))
        resource.setrlimit(resource.RLIMIT_FSIZE, (16 << 20, 16 << 20))
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))

    return apply


def run_program(program: str, timeout_s: float = 5.0, memory_mb: int = 256) -> SandboxResult:
    """Run `program` under the limits above; its stdout is the result."""
    with tempfile.TemporaryDirectory(prefix="raylm-pal-") as folder:
        command = [*_network_namespace_prefix(), sys.executable, "-I", "-S", "-c", _BOOT]
        env = {"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8", "PYTHONIOENCODING": "utf-8", "HOME": folder}
        try:
            proc = subprocess.Popen(
                command,
                cwd=folder,
                env=env,
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                start_new_session=True,
                preexec_fn=_limits(timeout_s, memory_mb),
            )
        except OSError as err:
            return SandboxResult(False, "", f"could not start the sandbox: {err}")
        try:
            out, err = proc.communicate(program.encode("utf-8", "replace"), timeout=timeout_s)
        except subprocess.TimeoutExpired:
            _kill(proc)
            out, err = proc.communicate()
            return SandboxResult(False, _text(out), f"time limit: the program ran past {timeout_s:g} s")
        stdout, stderr = _text(out), _text(err)
        if proc.returncode == 0:
            return SandboxResult(True, stdout, None)
        return SandboxResult(False, stdout, _failure(proc.returncode, stderr, timeout_s, memory_mb))


def _kill(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def _text(data: bytes) -> str:
    return data.decode("utf-8", "replace")[:OUTPUT_LIMIT]


def _failure(code: int, stderr: str, timeout_s: float, memory_mb: int) -> str:
    if code in (-signal.SIGXCPU, -signal.SIGKILL) and not stderr.strip():
        return f"time limit: the program used more than {int(timeout_s) + 1} s of CPU"
    lines = [line for line in stderr.strip().splitlines() if line.strip()]
    last = lines[-1] if lines else f"exited with status {code}"
    if last.startswith("MemoryError"):
        return f"memory limit: the program needed more than {memory_mb} MB"
    return last

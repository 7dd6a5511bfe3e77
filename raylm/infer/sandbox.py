"""Running model-written Python (PAL) in a process the kernel confines.

    from raylm.infer.sandbox import run_program
    result = run_program("print(6 * 7)", timeout_s=5, memory_mb=256)
    result.ok, result.stdout, result.error          # True, "42\\n", None

A PAL program is hostile input: a request can make the model write anything. It runs in a
separate Python (standard library only, empty environment) in a fresh temporary folder, started
through `sandbox_launcher.py` inside new mount, network, PID and IPC namespaces (`unshare`), which
confines itself before the program's first line:
- files: Landlock — the standard library is readable, the folder readable and writable, nothing
  else exists for it (no /proc, /etc, home, site-packages, the server's files); seccomp refuses
  changing any file's metadata (chmod, chown, xattrs, times), which Landlock does not govern;
- processes and network: seccomp — fork/clone/exec, sockets, ptrace, signals and scheduling aimed
  at other processes, namespaces, mounts, IPC and other kernel interfaces return EPERM; the PID
  and network namespaces leave it no other process and no interface to reach;
- resources: CPU seconds, address space, file size and open files as rlimits; its folder a tmpfs of
  DISK_MB; a wall-clock limit that kills the process group; stdout and stderr read up to
  OUTPUT_LIMIT bytes, past which the process is killed (nothing unbounded enters the server).
The launcher applies its limits to itself (no `preexec_fn`, which can deadlock a threaded server).
Where the kernel lacks Landlock or seccomp the program is not run: the result says why, unless
`confine=False` (the spec's `sandbox: unconfined`, which keeps only the rlimits and bounds).
A program that fails, loops or breaks a rule returns ok=False with the reason; nothing raises.
"""

from __future__ import annotations

import functools
import json
import logging
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
DISK_MB = 64  # the program's folder is a tmpfs of this size where mount namespaces work
NOBODY = 65534
LAUNCHER = Path(__file__).with_name("sandbox_launcher.py")


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
def _namespaces() -> tuple[tuple[str, ...], bool, bool]:
    """(the `unshare` command line the launcher starts under, whether it has its own mount namespace,
    whether the launcher must drop root itself).

    New user, mount, network, PID and IPC namespaces: inside, the program is root of namespaces it
    owns and holds no capability over anything outside them (also when the server runs as root); it
    sees no interface, no other process, no shared memory of others, and its folder can be a bounded
    tmpfs. Where user namespaces are unavailable and the server is root, the namespaces without one,
    and the launcher switches to nobody (uid 65534) before confining itself. Where none of this
    works, () — Landlock and seccomp still confine the program."""
    unshare = _tool("unshare")
    if unshare is None:
        return (), False, os.geteuid() == 0
    full = ("--mount", "--net", "--pid", "--ipc", "--fork", "--kill-child")
    user = ("--user", "--map-root-user")
    candidates = [(user + full, True, False), (user + ("--net",), False, False)]
    if os.geteuid() == 0:
        candidates += [(full, True, True), (("--net",), False, True)]
    for flags, mounts, drop in candidates:
        try:
            probe = subprocess.run([unshare, *flags, "true"], capture_output=True, timeout=10)
        except (OSError, subprocess.SubprocessError):
            continue
        if probe.returncode == 0:
            return (unshare, *flags), mounts, drop
    return (), False, os.geteuid() == 0


def _tool(name: str) -> str | None:
    return shutil.which(name) or next(
        (p for p in (f"/usr/bin/{name}", f"/bin/{name}") if os.path.exists(p)), None
    )


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
    """Run `program` under the confinement above; its stdout is the result. Never raises."""
    try:
        library_paths = list(_library_paths()) if confine else []
    except SandboxUnavailable as err:
        return SandboxResult(False, "", str(err))
    prefix, mounts, drop = _namespaces() if confine else ((), False, False)
    try:
        work = tempfile.mkdtemp(prefix="raylm-pal-")
    except OSError as err:
        return SandboxResult(False, "", f"could not make the program's folder: {err}")
    read_status, write_status = os.pipe()
    try:
        Path(work, "program.py").write_text(program, encoding="utf-8", errors="replace")
        Path(work, "run").mkdir()
        if drop:  # the launcher becomes nobody: its folder must be nobody's
            os.chown(Path(work, "run"), NOBODY, NOBODY)
            os.chmod(work, 0o755)
            os.chmod(Path(work, "program.py"), 0o644)
        settings = {
            "cpu_s": int(timeout_s) + 1,
            "memory_mb": memory_mb,
            "file_mb": FILE_MB,
            "open_files": OPEN_FILES,
            "disk_mb": DISK_MB,
            "mount": (_tool("mount") or "") if mounts else "",
            "confine": confine,
            "library_paths": library_paths,
            "status_fd": write_status,
            "drop_to": NOBODY if drop else None,
        }
        command = [*prefix, sys.executable, "-I", "-S", "-X", "utf8", str(LAUNCHER), json.dumps(settings)]
        try:
            proc = subprocess.Popen(
                command,
                cwd=work,
                env={},
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                start_new_session=True,
                pass_fds=(write_status,),
            )
        except OSError as err:
            return SandboxResult(False, "", f"could not start the sandbox: {err}")
        finally:
            os.close(write_status)
        try:
            out, err, overflow, timed_out = _read_bounded(proc, timeout_s)
        finally:
            _stop(proc)
        status = _read_status(read_status)
    finally:
        os.close(read_status)
        _remove(work)
    stdout, stderr = _text(out), _text(err)
    if confine and status.startswith("unavailable"):
        return SandboxResult(False, "", _unavailable(status))
    if confine and mounts and status and "tmpfs" not in status.split():
        return SandboxResult(
            False, "", _unavailable("unavailable: could not mount the program's bounded tmpfs")
        )
    if timed_out:
        return SandboxResult(False, stdout, f"time limit: the program ran past {timeout_s:g} s")
    if overflow:
        return SandboxResult(
            False, stdout, f"output limit: the program printed more than {OUTPUT_LIMIT} bytes"
        )
    if not status:
        return SandboxResult(False, "", f"the sandbox did not start: {_last_line(stderr) or proc.returncode}")
    if proc.returncode == 0:
        return SandboxResult(True, stdout, None)
    return SandboxResult(False, stdout, _failure(proc.returncode, stderr, timeout_s, memory_mb))


def _read_bounded(proc: subprocess.Popen, timeout_s: float) -> tuple[bytes, bytes, bool, bool]:
    """Read stdout and stderr until both close and the process exits (not reaped: its pid, and with it
    its process group, stay ours to kill), the deadline passes or one exceeds OUTPUT_LIMIT."""
    chunks = {proc.stdout: bytearray(), proc.stderr: bytearray()}
    deadline = time.monotonic() + timeout_s

    def result(overflow=False, timed_out=False):
        return bytes(chunks[proc.stdout]), bytes(chunks[proc.stderr]), overflow, timed_out

    with selectors.DefaultSelector() as selector:
        for stream in chunks:
            selector.register(stream, selectors.EVENT_READ)
        while selector.get_map():
            left = deadline - time.monotonic()
            if left <= 0:
                return result(timed_out=True)
            for key, _ in selector.select(left):
                data = os.read(key.fd, 65536)
                if not data:
                    selector.unregister(key.fileobj)
                    continue
                chunks[key.fileobj] += data
                if len(chunks[key.fileobj]) > OUTPUT_LIMIT:
                    return result(overflow=True)
    while os.waitid(os.P_PID, proc.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is None:
        if time.monotonic() >= deadline:  # both pipes closed, yet it runs on
            return result(timed_out=True)
        time.sleep(0.01)
    return result()


def _stop(proc: subprocess.Popen) -> None:
    """Kill the process group (before reaping: the pid cannot have been reused), then reap."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    proc.wait()
    for stream in (proc.stdout, proc.stderr):
        stream.close()


def _read_status(fd: int) -> str:
    os.set_blocking(fd, False)  # everyone holding the write end is dead by now: this cannot block
    try:
        return os.read(fd, 4096).decode("utf-8", "replace").strip()
    except BlockingIOError:
        return ""


def _remove(work: str) -> None:
    """Delete the program's folder whatever it holds (shutil.rmtree recurses: a folder nested a few
    thousand deep would raise RecursionError out of it in Python 3.11)."""
    try:
        shutil.rmtree(work)
    except (OSError, RecursionError):
        rm = _tool("rm")
        done = subprocess.run([rm, "-rf", "--", work], capture_output=True) if rm else None
        if done is None or done.returncode:
            logging.getLogger(__name__).warning("could not delete the PAL program's folder %s", work)


def _last_line(text: str) -> str:
    lines = [line for line in text.strip().splitlines() if line.strip()]
    return lines[-1] if lines else ""


def _text(data: bytes) -> str:
    return data[:OUTPUT_LIMIT].decode("utf-8", "replace")


def _unavailable(status: str) -> str:
    return (
        f"sandbox {status} — this kernel cannot confine PAL programs (the sandbox needs "
        "Landlock, Linux >= 5.13 with landlock in the LSM list, and seccomp); the program was not run. "
        "strategy.sandbox: unconfined runs it without confinement: only for trusted models"
    )


def _failure(code: int, stderr: str, timeout_s: float, memory_mb: int) -> str:
    if code in (-signal.SIGXCPU, -signal.SIGKILL) and not stderr.strip():
        return f"time limit: the program used more than {int(timeout_s) + 1} s of CPU"
    if code == -signal.SIGSYS:
        return "the program made a system call of another architecture and was killed"
    last = _last_line(stderr) or f"exited with status {code}"
    if last.startswith("MemoryError"):
        return f"memory limit: the program needed more than {memory_mb} MB"
    return last

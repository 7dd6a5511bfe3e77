"""The child side of the PAL sandbox: confines its own process, then runs the program in it.

    python -I -S -X utf8 sandbox_launcher.py '<json settings>'      # started by sandbox.run_program

Runs with the standard library only and an empty environment, started by the parent in its own
session inside new mount, network, PID and IPC namespaces (`unshare`; plus a user namespace when the
server is not root), in this order — each step before the program's first line, none of them
undoable by the program:
1. the modules a PAL program commonly imports are imported while their shared libraries can
   still be read (afterwards nothing outside the standard library and the folder can be);
2. a tmpfs of `disk_mb` is mounted over the program's folder (run/) in the private mount namespace;
3. rlimits: CPU seconds, address space, file size, open files, no core dumps;
4. Landlock (the `landlock` package): the standard library is readable (not the site-packages that
   some installs keep inside it), the folder readable and writable, nothing else on any filesystem
   exists for the process (/proc, /etc, $HOME ...);
5. seccomp (libseccomp through `pyseccomp`), an allow-list: file I/O, memory, time, signals to
   itself and facts about itself; everything else returns EPERM — new processes and threads, exec,
   sockets, anything aimed at another process, file metadata (chmod, chown, xattrs, flags, times),
   ioctls but a few terminal queries, locks and leases, scheduling, namespaces, mounts, IPC, and
   every syscall newer than the list; other architectures' syscalls kill it;
6. the status pipe says "confined" and is closed; an audit hook, a second layer only, turns the
   common refusals into readable errors; the program runs.
If step 4 or 5 fails the launcher reports why on the status pipe and exits with CONFINEMENT_FAILED
before running anything; with "confine": false (the spec's `sandbox: unconfined`) it skips them.
"""

import json
import os
import resource
import sys

CONFINEMENT_FAILED = 86  # exit status: the kernel refused a confinement step; nothing ran (the status
# pipe says why: a program could exit with 86 too)

# An allow-list: every system call not named here returns EPERM — those of kernels newer than this
# list included (a deny-list missed file_setattr, listmount, ioctls on read-only files). These are
# what CPython and its standard library need to compute, read the standard library, use the folder,
# allocate, sleep and exit; none reaches another process, the network or anything's metadata.
ALLOWED_SYSCALLS = (
    # files and folders (Landlock decides which paths)
    "read", "write", "readv", "writev", "pread64", "pwrite64", "preadv", "pwritev", "lseek", "open", "openat", "openat2", "creat", "close", "close_range", "dup", "dup2",
    "dup3", "fstat", "stat", "lstat", "newfstatat", "statx", "access", "faccessat", "faccessat2",
    "getdents", "getdents64", "getcwd", "chdir", "fchdir", "mkdir", "mkdirat", "rmdir", "unlink",
    "unlinkat", "rename", "renameat", "renameat2", "link", "linkat", "symlink", "symlinkat",
    "readlink", "readlinkat", "umask", "truncate", "ftruncate", "fallocate", "fsync", "fdatasync",
    "statfs", "fstatfs", "sendfile", "copy_file_range", "splice", "tee", "pipe", "pipe2",
    # memory
    "brk", "mmap", "munmap", "mprotect", "mremap", "msync",
    # signals to itself, time, waiting
    "rt_sigaction", "rt_sigprocmask", "rt_sigreturn", "rt_sigpending", "rt_sigtimedwait",
    "rt_sigsuspend", "sigaltstack", "restart_syscall", "alarm", "setitimer", "getitimer",
    "timerfd_create", "timerfd_settime", "timerfd_gettime", "clock_gettime", "clock_getres",
    "gettimeofday", "time", "nanosleep", "clock_nanosleep", "poll", "ppoll", "select", "pselect6",
    "epoll_create", "epoll_create1", "epoll_ctl", "epoll_wait", "epoll_pwait", "epoll_pwait2",
    "eventfd", "eventfd2", "futex", "futex_waitv", "sched_yield",
    # reading facts about itself
    "getpid", "getppid", "gettid", "getpgrp", "getpgid", "getsid", "getuid", "geteuid", "getgid",
    "getegid", "getgroups", "getresuid", "getresgid", "getrlimit", "getrusage", "times", "uname",
    "sysinfo", "getrandom", "getcpu", "getpriority", "sched_getaffinity", "sched_getparam",
    "sched_getscheduler", "sched_get_priority_max", "sched_get_priority_min",
    # the C runtime
    "exit", "exit_group", "set_robust_list", "set_tid_address", "rseq", "arch_prctl",
)  # fmt: skip
IOCTLS = (
    0x5401,
    0x5413,
    0x541B,
    0x5421,
    0x5450,
    0x5451,
)  # TCGETS TIOCGWINSZ FIONREAD FIONBIO FIONCLEX FIOCLEX
FCNTLS = (0, 1, 2, 3, 4, 1030, 1032)  # F_DUPFD F_GETFD F_SETFD F_GETFL F_SETFL F_DUPFD_CLOEXEC F_GETPIPE_SZ
# madvise on its own memory only: NORMAL RANDOM SEQUENTIAL WILLNEED DONTNEED FREE HUGEPAGE NOHUGEPAGE
# DONTDUMP DODUMP (not PAGEOUT / COLD on shared file mappings: evicting the host's page cache of the
# standard library, a flush-and-reload channel)
MADVISE = (0, 1, 2, 3, 4, 8, 14, 15, 16, 17)
# Imported before Landlock: their extension modules may need shared libraries outside the stdlib.
PRELOAD = (
    "math", "cmath", "decimal", "fractions", "statistics", "random", "itertools", "functools",
    "collections", "datetime", "calendar", "re", "json", "string", "heapq", "bisect", "operator",
    "textwrap", "unicodedata", "array", "struct", "copy", "dataclasses", "enum", "typing",
)  # fmt: skip

REFUSED_IMPORTS = ("ctypes", "_ctypes", "socket", "_socket", "ssl", "_ssl", "subprocess",
                   "_posixsubprocess", "multiprocessing", "_multiprocessing", "mmap", "pty", "pyseccomp",
                   "landlock")  # fmt: skip
REFUSED_EVENTS = ("socket.", "subprocess.", "os.exec", "os.spawn", "os.posix_spawn", "os.fork",
                  "os.forkpty", "os.system", "os.kill", "os.killpg", "ctypes.", "os.putenv",
                  "resource.setrlimit", "sys.addaudithook")  # fmt: skip


def limit_resources(settings: dict) -> None:
    cpu = settings["cpu_s"]
    resource.setrlimit(resource.RLIMIT_CPU, (cpu, cpu))
    memory = settings["memory_mb"] << 20
    resource.setrlimit(resource.RLIMIT_AS, (memory, memory))
    size = settings["file_mb"] << 20
    resource.setrlimit(resource.RLIMIT_FSIZE, (size, size))
    resource.setrlimit(resource.RLIMIT_NOFILE, (settings["open_files"],) * 2)
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    # queued signals are counted per user, and in its user namespace the program may be the server's
    # user: it must not take the queue that user's other processes need
    resource.setrlimit(resource.RLIMIT_SIGPENDING, (16, 16))


def standard_library(paths: list[str]) -> list[str]:
    """What the program may read: the interpreter's sys.path without the third-party packages that
    some installs (pyenv, a venv's base) keep inside the standard library's folder."""
    readable = []
    for path in paths:
        children = os.listdir(path) if os.path.isdir(path) else []
        if {"site-packages", "dist-packages"} & set(children):
            readable += [
                os.path.join(path, c) for c in children if c not in ("site-packages", "dist-packages")
            ]
        else:
            readable.append(path)
    return readable


def mount_folder(mount: str, folder: str, disk_mb: int, owner: int | None) -> bool:
    """A tmpfs of disk_mb over the folder, in the launcher's own mount namespace: what the program
    writes is bounded and vanishes with the namespace. False where it cannot be mounted."""
    import subprocess

    options = f"size={disk_mb}m,nr_inodes=16k,mode=0700,nodev,nosuid,noexec"  # inodes cost kernel memory
    if owner is not None:
        options += f",uid={owner},gid={owner}"
    done = subprocess.run([mount, "-t", "tmpfs", "-o", options, "raylm-pal", folder], capture_output=True)
    return done.returncode == 0


def confine_files(folder: str, readable: list[str]) -> None:
    from landlock import FSAccess, Ruleset

    rules = Ruleset()  # handles every filesystem access right the kernel knows: all denied by default
    read_file = FSAccess.READ_FILE
    for path in readable:
        rights = read_file | FSAccess.READ_DIR if os.path.isdir(path) else read_file
        rules.allow(path, rules=rights & rules.restrict_rules)
    rules.allow(folder, rules=rules.restrict_rules & ~FSAccess.EXECUTE)
    rules.apply()  # also sets no_new_privs, which seccomp needs
    os.close(rules._fd)  # the ruleset is in force; its descriptor is of no use to the program


def confine_syscalls() -> None:
    import errno

    import pyseccomp as seccomp  # imported (libseccomp loaded) in main, before Landlock

    allow = seccomp.ALLOW
    syscalls = seccomp.SyscallFilter(seccomp.ERRNO(errno.EPERM))
    for name in ALLOWED_SYSCALLS:
        try:
            syscalls.add_rule(allow, name)
        except OSError:  # a syscall this architecture does not have (e.g. open on arm64)
            continue
    for request in IOCTLS:
        syscalls.add_rule(allow, "ioctl", seccomp.Arg(1, seccomp.EQ, request))
    for command in FCNTLS:
        syscalls.add_rule(allow, "fcntl", seccomp.Arg(1, seccomp.EQ, command))
    for advice in MADVISE:
        syscalls.add_rule(allow, "madvise", seccomp.Arg(2, seccomp.EQ, advice))
    # its own limits, read only; signals to itself only (abort, raise)
    syscalls.add_rule(allow, "prlimit64", seccomp.Arg(0, seccomp.EQ, 0), seccomp.Arg(2, seccomp.EQ, 0))
    syscalls.add_rule(allow, "tgkill", seccomp.Arg(0, seccomp.EQ, os.getpid()))
    syscalls.load()  # syscalls of other architectures (int 0x80, x32) kill the process


def second_layer() -> None:
    """Readable refusals for what the kernel refuses anyway (PEP 578: a hook is not a boundary)."""

    def hook(event, args):
        if event == "import" and args[0].split(".")[0] in REFUSED_IMPORTS:
            raise PermissionError(f"importing {args[0]} is not allowed in the sandbox")
        if event.startswith(REFUSED_EVENTS):
            raise PermissionError(f"{event} is not allowed in the sandbox")

    sys.addaudithook(hook)


def main() -> None:
    settings = json.loads(sys.argv[1])
    work = os.getcwd()  # the parent's folder: program.py, and run/ where the program runs
    with open(os.path.join(work, "program.py"), encoding="utf-8") as file:
        program = file.read()
    status = os.fdopen(settings["status_fd"], "w")  # closed before the program runs: it cannot forge it
    folder = os.path.join(work, "run")
    readable = standard_library(
        [p for p in dict.fromkeys(os.path.realpath(p) for p in sys.path if p) if os.path.exists(p)]
    )
    for name in PRELOAD:
        __import__(name)
    owner = settings["drop_to"]
    bounded = bool(settings["mount"]) and mount_folder(settings["mount"], folder, settings["disk_mb"], owner)
    if owner is not None:  # root without a user namespace: no capability may reach the program
        os.setgroups([])
        os.setresgid(owner, owner, owner)
        os.setresuid(owner, owner, owner)
    os.chdir(folder)
    limit_resources(settings)
    if settings["confine"]:
        sys.path[:0] = settings["library_paths"]  # landlock, pyseccomp: importable before locking only
        try:
            import landlock  # noqa: F401 - both load their C libraries while files can still be read
            import pyseccomp  # noqa: F401

            confine_files(folder, readable)
            confine_syscalls()
        except Exception as err:  # noqa: BLE001 - any failure means: do not run the program
            status.write(f"unavailable: {type(err).__name__}: {' '.join(str(err).split())}")
            status.close()
            os._exit(CONFINEMENT_FAILED)
        del sys.path[: len(settings["library_paths"])]
    status.write(("confined" if settings["confine"] else "unconfined") + (" tmpfs" if bounded else ""))
    status.close()
    for name in [m for m in sys.modules if m.split(".")[0] in REFUSED_IMPORTS]:
        del sys.modules[name]  # the confinement's own imports: a program importing them is refused
    second_layer()
    code = compile(program, "<program>", "exec")
    del program, settings, status
    exec(code, {"__name__": "__main__", "__builtins__": __builtins__})


if __name__ == "__main__":
    main()

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
5. seccomp (libseccomp through `pyseccomp`): new processes and threads, exec, sockets, signals and
   scheduling aimed at other processes, file metadata (chmod, chown, xattrs, times), namespaces,
   mounts, IPC, modules, io_uring, bpf ... return EPERM; other architectures' syscalls kill it;
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

# EPERM for these; everything else a Python program needs stays allowed.
DENIED_SYSCALLS = (
    # no new processes or threads, no other programs
    "fork", "vfork", "clone", "clone3", "execve", "execveat",
    # no network, no local sockets (the empty network namespace is the other layer)
    "socket", "socketpair", "connect", "bind", "listen", "accept", "accept4",
    "sendto", "sendmsg", "sendmmsg", "recvfrom", "recvmsg", "recvmmsg",
    # no touching other processes (the PID namespace hides them too): signals, tracing, priorities
    "ptrace", "process_vm_readv", "process_vm_writev", "process_madvise", "process_mrelease", "kill",
    "tkill", "rt_sigqueueinfo", "rt_tgsigqueueinfo", "pidfd_open", "pidfd_send_signal", "pidfd_getfd",
    "kcmp", "setsid", "setpgid", "prctl", "seccomp", "setpriority", "ioprio_set", "migrate_pages",
    "move_pages", "setrlimit",
    # no changing any file's metadata: Landlock governs opening files, not chmod / chown / xattrs /
    # times, and the program may run with the server's user (root in a container)
    "chmod", "fchmod", "fchmodat", "fchmodat2", "chown", "fchown", "lchown", "fchownat",
    "setxattr", "lsetxattr", "fsetxattr", "setxattrat", "removexattr", "lremovexattr", "fremovexattr",
    "removexattrat", "utime", "utimes", "utimensat", "futimesat", "sync", "syncfs",
    # no System V / POSIX message queues or shared memory outside files (an IPC namespace as well)
    "shmget", "shmat", "shmctl", "shmdt", "msgget", "msgsnd", "msgrcv", "msgctl", "semget", "semop",
    "semctl", "semtimedop", "mq_open", "mq_unlink", "mq_timedsend", "mq_timedreceive", "mq_notify",
    "mq_getsetattr",
    # no namespaces, mounts, keys, kernel interfaces that bypass the filter
    "unshare", "setns", "mount", "umount2", "pivot_root", "chroot", "move_mount", "open_tree",
    "fsopen", "fsmount", "fsconfig", "fspick", "mount_setattr", "keyctl", "add_key", "request_key",
    "bpf", "perf_event_open", "userfaultfd", "io_uring_setup", "io_uring_enter", "io_uring_register",
    "open_by_handle_at", "name_to_handle_at", "personality", "memfd_create", "memfd_secret",
    "modify_ldt", "uselib", "sysfs", "fanotify_init", "fanotify_mark", "inotify_init",
    "inotify_init1", "quotactl", "quotactl_fd", "lookup_dcookie", "nfsservctl",
    # what only root could do (the server may run as root in a container)
    "iopl", "ioperm", "init_module", "finit_module", "delete_module", "kexec_load",
    "kexec_file_load", "reboot", "swapon", "swapoff", "sethostname", "setdomainname",
    "settimeofday", "clock_settime", "clock_adjtime", "adjtimex", "acct", "syslog",
    "vhangup", "capset", "setuid", "setgid", "setreuid", "setregid", "setresuid", "setresgid",
    "setgroups", "setfsuid", "setfsgid", "mknod", "mknodat",
)  # fmt: skip
# Allowed only on the process itself (argument 0 names a process; 0 means the caller).
SELF_ONLY = ("sched_setaffinity", "sched_setscheduler", "sched_setparam", "sched_setattr", "prlimit64")
F_SETOWN, F_SETSIG, F_SETOWN_EX = 8, 10, 15  # fcntls that aim SIGIO (any signal) at another process
TIOCSTI, TIOCLINUX = 0x5412, 0x541C  # ioctls that type into a terminal

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


def mount_folder(mount: str, folder: str, disk_mb: int) -> bool:
    """A tmpfs of disk_mb over the folder, in the launcher's own mount namespace: what the program
    writes is bounded and vanishes with the namespace. False where it cannot be mounted."""
    import subprocess

    options = f"size={disk_mb}m,mode=0700,nodev,nosuid,noexec"
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

    refuse = seccomp.ERRNO(errno.EPERM)
    syscalls = seccomp.SyscallFilter(seccomp.ALLOW)
    for name in DENIED_SYSCALLS:
        try:
            syscalls.add_rule(refuse, name)
        except OSError:  # a syscall this architecture does not have (e.g. vfork on arm64)
            continue
    for request in (TIOCSTI, TIOCLINUX):
        syscalls.add_rule(refuse, "ioctl", seccomp.Arg(1, seccomp.EQ, request))
    for command in (F_SETOWN, F_SETSIG, F_SETOWN_EX):
        syscalls.add_rule(refuse, "fcntl", seccomp.Arg(1, seccomp.EQ, command))
    for name in SELF_ONLY:
        syscalls.add_rule(refuse, name, seccomp.Arg(0, seccomp.NE, 0))
    syscalls.add_rule(refuse, "prlimit64", seccomp.Arg(2, seccomp.NE, 0))  # reading its limits only
    syscalls.add_rule(refuse, "tgkill", seccomp.Arg(0, seccomp.NE, os.getpid()))  # signals to itself only
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
    bounded = bool(settings["mount"]) and mount_folder(settings["mount"], folder, settings["disk_mb"])
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

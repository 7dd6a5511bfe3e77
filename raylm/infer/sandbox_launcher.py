"""The child side of the PAL sandbox: confines its own process, then runs the program in it.

    python -I -S -X utf8 sandbox_launcher.py '<json settings>'      # started by sandbox.run_program

Runs with the standard library only and an empty environment, in the program's fresh folder, in
this order (each step before the program's first line, none of them undoable by the program):
1. rlimits: CPU seconds, address space, file size, open files, no core dumps;
2. the modules a PAL program commonly imports are imported while their shared libraries can
   still be read (afterwards nothing outside the standard library and the folder can be);
3. Landlock (the `landlock` package): the standard library is readable, the folder readable and
   writable, nothing else on any filesystem exists for the process (/proc, /etc, $HOME ...);
4. seccomp (libseccomp through `pyseccomp`): socket, fork/clone, exec, ptrace, kill, namespace,
   mount, module, io_uring, bpf ... syscalls return EPERM; other architectures' syscalls kill it;
5. an audit hook, a second layer only, that turns the common refusals into readable errors.
It is started as its own session (the parent kills the whole group on the wall-clock limit) and,
where unprivileged user namespaces work, inside `unshare -rn` (an empty network namespace, no
capabilities outside it). If step 3 or 4 fails the launcher exits with CONFINEMENT_FAILED before
running anything; with "confine": false (the spec's `sandbox: unconfined`) it skips them.
"""

import json
import os
import resource
import sys

CONFINEMENT_FAILED = 86  # exit status: the kernel refused a confinement step; nothing ran

# EPERM for these; everything else a Python program needs stays allowed.
DENIED_SYSCALLS = (
    # no new processes or threads, no other programs
    "fork", "vfork", "clone", "clone3", "execve", "execveat",
    # no network, no local sockets (the empty network namespace is the other layer)
    "socket", "socketpair", "connect", "bind", "listen", "accept", "accept4",
    "sendto", "sendmsg", "sendmmsg", "recvfrom", "recvmsg", "recvmmsg",
    # no touching other processes
    "ptrace", "process_vm_readv", "process_vm_writev", "kill", "tkill", "pidfd_open",
    "pidfd_send_signal", "pidfd_getfd", "kcmp", "setsid", "setpgid", "prctl", "seccomp",
    # no namespaces, mounts, keys, kernel interfaces that bypass the filter
    "unshare", "setns", "mount", "umount2", "pivot_root", "chroot", "move_mount", "open_tree",
    "fsopen", "fsmount", "fsconfig", "fspick", "mount_setattr", "keyctl", "add_key", "request_key",
    "bpf", "perf_event_open", "userfaultfd", "io_uring_setup", "io_uring_enter", "io_uring_register",
    "open_by_handle_at", "name_to_handle_at", "personality", "memfd_create", "memfd_secret",
    # what only root could do (the server may run as root in a container)
    "iopl", "ioperm", "init_module", "finit_module", "delete_module", "kexec_load",
    "kexec_file_load", "reboot", "swapon", "swapoff", "sethostname", "setdomainname",
    "settimeofday", "clock_settime", "clock_adjtime", "adjtimex", "acct", "quotactl", "syslog",
    "vhangup", "capset", "setuid", "setgid", "setreuid", "setregid", "setresuid", "setresgid",
    "setgroups", "setfsuid", "setfsgid", "mknod", "mknodat", "fanotify_init", "inotify_init",
    "inotify_init1",
)  # fmt: skip
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


def confine_files(folder: str, readable: list[str]) -> None:
    from landlock import FSAccess, Ruleset

    rules = Ruleset()  # handles every filesystem access right the kernel knows: all denied by default
    read_file = FSAccess.READ_FILE
    for path in readable:
        rights = read_file | FSAccess.READ_DIR if os.path.isdir(path) else read_file
        rules.allow(path, rules=rights & rules.restrict_rules)
    rules.allow(folder, rules=rules.restrict_rules & ~FSAccess.EXECUTE)
    rules.apply()  # also sets no_new_privs, which seccomp needs


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
    folder = os.getcwd()
    with open(os.path.join(folder, "program.py"), encoding="utf-8") as file:
        program = file.read()
    readable = [p for p in dict.fromkeys(os.path.realpath(p) for p in sys.path if p) if os.path.exists(p)]
    for name in PRELOAD:
        __import__(name)
    limit_resources(settings)
    if settings["confine"]:
        sys.path[:0] = settings["library_paths"]  # landlock, pyseccomp: importable before locking only
        try:
            import landlock  # noqa: F401 - both load their C libraries while files can still be read
            import pyseccomp  # noqa: F401

            confine_files(folder, readable)
            confine_syscalls()
        except Exception as err:  # noqa: BLE001 - any failure means: do not run the program
            sys.stderr.write(f"sandbox unavailable: {type(err).__name__}: {err}\n")
            os._exit(CONFINEMENT_FAILED)
        del sys.path[: len(settings["library_paths"])]
    for name in [m for m in sys.modules if m.split(".")[0] in REFUSED_IMPORTS]:
        del sys.modules[name]  # the confinement's own imports: a program importing them is refused
    second_layer()
    code = compile(program, "<program>", "exec")
    del program, settings
    exec(code, {"__name__": "__main__", "__builtins__": __builtins__})


if __name__ == "__main__":
    main()

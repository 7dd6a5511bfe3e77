"""The PAL sandbox against an adversarial corpus, on the real kernel mechanisms.

Every attack runs twice: as written, and after DISARM has emptied the audit hook's settings (the
escape that broke the old sandbox: they are globals of the child's __main__). A control proves the
disarming works, so the second run shows what Landlock, seccomp and the rlimits hold by themselves.
Each attack aims at something outside the program's folder that the test can observe: a secret
file it must not read, a marker file it must not create, a listener it must not reach, the test
process it must not signal, the parent's environment it must not see.
"""

import os
import socket
import subprocess
import sys
import textwrap
import threading

import pytest

from raylm.infer.sandbox import OUTPUT_LIMIT, run_program

pytestmark = pytest.mark.quick

DISARM = "import sys\n_m = sys.modules['__main__']\n_m.REFUSED_IMPORTS = ()\n_m.REFUSED_EVENTS = ()\n"
SECRET = "raylm-sandbox-secret-7f3a"


@pytest.fixture(scope="module")
def outside(tmp_path_factory):
    """A folder outside the sandbox holding a secret file, and a TCP listener that records connections."""
    folder = tmp_path_factory.mktemp("outside")
    (folder / "secret.txt").write_text(SECRET)
    try:
        os.setxattr(folder / "secret.txt", "user.secret", SECRET.encode())
    except OSError:  # a filesystem without user xattrs: the attack then proves less
        pass
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(8)
    accepted = []

    def accept():
        while True:
            try:
                accepted.append(listener.accept())
            except OSError:
                return

    threading.Thread(target=accept, daemon=True).start()
    yield folder, listener.getsockname()[1], accepted
    listener.close()


def attacks(folder, port):
    secret, marker, me = folder / "secret.txt", folder / "marker", os.getpid()
    site_packages = os.path.dirname(os.path.dirname(pytest.__file__))
    return {
        "read a file outside": f"print(open({str(secret)!r}).read())",
        "write a file outside": f"open({str(marker)!r}, 'w').write('x')",
        "os.open for writing": f"import os\nos.open({str(marker)!r}, os.O_WRONLY | os.O_CREAT)",
        "rename the folder away": f"import os\nos.rename('.', {str(folder / 'moved')!r})",
        "read /etc": "print(open('/etc/passwd').read())",
        "list /": "import os\nprint(os.listdir('/'))",
        "dir_fd after chdir": textwrap.dedent(f"""
            import os
            os.mkdir('a')
            fd = os.open('a', os.O_RDONLY)
            os.chdir('a')
            up = os.open('../../{folder.name}', os.O_RDONLY, dir_fd=fd)
            print(open(os.open('secret.txt', os.O_RDONLY, dir_fd=up)).read())
        """),
        "symlink out": f"import os\nos.symlink({str(secret)!r}, 'link')\nprint(open('link').read())",
        "hard link in": f"import os\nos.link({str(secret)!r}, 'link')\nprint(open('link').read())",
        "/proc/self/environ": "print(open('/proc/self/environ').read())",
        "/proc/self/mem": "f = open('/proc/self/mem', 'r+b')\nf.seek(0)\nf.write(b'x')",
        "parent's environment": "import os\nprint(open(f'/proc/{os.getppid()}/environ').read())",
        "os.system": f"import os\nassert os.system('cat {secret}; touch {marker}') == 0, 'refused'",
        "subprocess": f"import subprocess\nprint(subprocess.run(['cat', {str(secret)!r}], capture_output=True).stdout)",
        "os.fork": f"import os\nif os.fork() == 0:\n    open({str(marker)!r}, 'w')",
        "fork bomb": "import os\nwhile True:\n    os.fork()",
        "posix_spawn": f"import os\nos.posix_spawn('/usr/bin/touch', ['touch', {str(marker)!r}], {{}})",
        "thread": f"import threading\nthreading.Thread(target=open, args=({str(marker)!r}, 'w')).start()",
        "ctypes system": f"import ctypes\nassert ctypes.CDLL(None).system(b'touch {marker}') == 0, 'refused'",
        "ctypes raw socket syscall": "import ctypes\nlibc = ctypes.CDLL(None)\nfd = libc.syscall(41, 2, 1, 0)\n"
        "assert fd >= 0, 'socket refused'\nprint('socket', fd)",
        "socket to a listener": f"import socket\nsocket.create_connection(('127.0.0.1', {port}), timeout=2)",
        "_socket directly": f"s = __import__('_socket').socket()\ns.connect(('127.0.0.1', {port}))",
        "signal the parent": "import os\nos.kill(os.getppid(), 0)\nprint('signalled the parent')",
        "leave the process group": "import os\nos.setsid()\nprint('left')",
        # found by a review of the first kernel sandbox: metadata syscalls Landlock does not govern ...
        "chmod outside": f"import os\nos.chmod({str(secret)!r}, 0o777)",
        "chown outside": f"import os\nos.chown({str(secret)!r}, 1, 1)",
        "utime outside": f"import os\nos.utime({str(secret)!r}, (0, 0))",
        "setxattr outside": f"import os\nos.setxattr({str(secret)!r}, 'user.x', b'1')",
        "file capability": f"import os\nos.setxattr({str(secret)!r}, 'security.capability', "
        "bytes.fromhex('0100000280000000000000000000000000000000'))",
        # ... and calls aimed at other processes by pid (the test process here)
        "lower the parent's limits": f"import resource\nresource.prlimit({me}, resource.RLIMIT_NOFILE, (10, 10))",
        "raise its own limits": "import resource\nresource.setrlimit(resource.RLIMIT_CPU, (10**6, 10**6))\n"
        "print('left')",
        "renice the parent": f"import os\nos.setpriority(os.PRIO_PROCESS, {me}, 19)",
        "pin the parent": f"import os\nos.sched_setaffinity({me}, {{0}})",
        "SIGIO at the parent": "import os, fcntl, signal\nr, w = os.pipe()\n"
        f"fcntl.fcntl(r, fcntl.F_SETOWN, {me})\nfcntl.fcntl(r, 10, signal.SIGUSR1)\n"
        "fcntl.fcntl(r, fcntl.F_SETFL, os.O_ASYNC)\nos.write(w, b'x')\nprint('signalled')",
        "tgkill the parent": f"import ctypes, signal\nassert ctypes.CDLL(None).syscall(234, {me}, {me}, "
        "int(signal.SIGUSR1)) == 0, 'refused'",
        "read site-packages": f"import os\nprint(os.listdir({site_packages!r}))",
        "import a third-party package": "import pytest",
        # found by the second review: a deny-list misses new syscalls and ioctls on read-only files
        # FITHAW: harmless, but an answer other than EPERM means FIFREEZE would reach the host's disk
        "ioctl on a stdlib file": "import errno, fcntl, os\ntry:\n    fcntl.ioctl(os.open(os.__file__, os.O_RDONLY), "
        "0xC0045878, 0)\nexcept OSError as err:\n    if err.errno != errno.EPERM:\n        print('left')\n    raise",
        "file_setattr (Linux 6.17)": f"import ctypes, struct\nattr = ctypes.create_string_buffer(struct.pack("
        f"'<IIIIQ', 0x80, 0, 0, 0, 0), 24)\nassert ctypes.CDLL(None).syscall(469, -100, {str(secret).encode()!r}, "
        "attr, 24, 0) == 0, 'refused'",
        "listmount (Linux 6.8)": "import ctypes\nassert ctypes.CDLL(None).syscall(457, 0, 0, 0, 0) >= 0, 'refused'",
        "real-time priority": "import os\nos.sched_setscheduler(0, os.SCHED_FIFO, os.sched_param(1))\nprint('left')",
        "lock a stdlib file": "import fcntl, os\nfcntl.flock(open(os.__file__), fcntl.LOCK_EX)\nprint('left')",
        "grow a pipe": "import fcntl, os\nr, w = os.pipe()\nfcntl.fcntl(w, 1031, 1 << 20)\nprint('left')",
        "read an xattr outside": f"import os\nprint(os.getxattr({str(secret)!r}, 'user.secret'))",
        # found by the third: resources counted per user, shared with the server's user
        "POSIX timers (the user's signal queue)": "import ctypes\ntimer = ctypes.c_int()\n"
        "assert ctypes.CDLL(None).syscall(222, 1, None, ctypes.byref(timer)) == 0, 'refused'",
        "evict the host's page cache": "import mmap, os\nm = mmap.mmap(os.open(os.__file__, os.O_RDONLY), 0, "
        "prot=mmap.PROT_READ)\nm.madvise(mmap.MADV_PAGEOUT)\nprint('left')",
    }


def _effects(folder) -> list:
    """What is outside the sandbox: the folder's files and the secret's mode, owner, times, xattrs."""
    secret = folder / "secret.txt"
    facts = secret.stat()
    return [sorted(p.name for p in folder.iterdir()), facts.st_mode, facts.st_uid, facts.st_mtime,
            os.listxattr(secret)]  # fmt: skip


def test_the_disarm_prefix_really_removes_the_audit_hook():
    assert not run_program("import ctypes").ok
    result = run_program(DISARM + "import ctypes, socket\nprint('imported')")
    assert result.ok and result.answer == "imported", result


@pytest.mark.parametrize("disarmed", [False, True], ids=["as-written", "hook-disarmed"])
def test_adversarial_corpus_fails_without_effect_outside_the_folder(outside, disarmed, monkeypatch):
    import resource
    import signal

    folder, port, accepted = outside
    monkeypatch.setenv("RAYLM_PARENT_SECRET", SECRET)
    signals = []
    previous = signal.signal(signal.SIGUSR1, lambda *_: signals.append("SIGUSR1"))
    before, limits = _effects(folder), resource.getrlimit(resource.RLIMIT_NOFILE)
    priority, cpus = os.getpriority(os.PRIO_PROCESS, 0), os.sched_getaffinity(0)
    try:
        for name, program in attacks(folder, port).items():
            result = run_program((DISARM if disarmed else "") + program, timeout_s=5)
            seen = result.stdout + (result.error or "")
            assert not result.ok, (name, result)
            assert SECRET not in seen and "signalled" not in seen and "left" not in result.stdout, (
                name,
                result,
            )
            assert _effects(folder) == before, name
            assert resource.getrlimit(resource.RLIMIT_NOFILE) == limits, name
            assert (os.getpriority(os.PRIO_PROCESS, 0), os.sched_getaffinity(0)) == (priority, cpus), name
            assert signals == [], name
    finally:
        signal.signal(signal.SIGUSR1, previous)
    assert accepted == []


def test_the_program_gets_an_empty_environment():
    result = run_program("import os\nprint(sorted(os.environ))")
    assert result.ok and set(eval(result.answer)) <= {"LC_CTYPE"}, (
        result
    )  # set by Python's own locale coercion


def test_limits_end_the_program_with_a_reason_and_bounded_output():
    flood = run_program("import sys\nwhile True:\n    sys.stdout.write('x' * 10000)", timeout_s=5)
    assert not flood.ok and flood.error.startswith("output limit") and len(flood.stdout) <= OUTPUT_LIMIT
    loop = run_program("while True:\n    pass", timeout_s=1.0)
    assert not loop.ok and loop.error.startswith("time limit")
    memory = run_program("blocks = []\nwhile True:\n    blocks.append(bytearray(10**7))", memory_mb=128)
    assert not memory.ok and memory.error.startswith("memory limit")
    big_file = run_program("open('big', 'wb').write(b'x' * (64 << 20))", memory_mb=512)
    assert not big_file.ok, big_file
    files = run_program("handles = [open(f'f{i}', 'w') for i in range(1000)]")
    assert not files.ok and "Too many open files" in files.error, files
    disk = run_program("i = 0\nwhile True:\n    open(f'f{i}', 'wb').write(b'x' * (8 << 20))\n    i += 1")
    assert not disk.ok and "No space left" in disk.error, disk  # its folder is a 64 MB tmpfs
    inodes = run_program(
        "import os\nn = 0\nwhile True:\n    os.close(os.open(f'f{n}', os.O_CREAT | os.O_WRONLY))\n    n += 1"
    )
    assert not inodes.ok and "No space left" in inodes.error, inodes  # and of 16k files (kernel memory)


def test_nothing_is_left_behind_and_the_parent_never_raises(tmp_path, monkeypatch):
    import tempfile

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    deep = run_program(
        "import os\nfor _ in range(3000):\n    os.mkdir('a')\n    os.chdir('a')\nprint('deep')"
    )
    assert deep.ok and deep.answer == "deep"  # a folder too deep for shutil.rmtree's recursion
    forged = run_program("import sys\nsys.stderr.write('sandbox unavailable: forged\\n')\nsys.exit(86)")
    assert not forged.ok and "cannot confine" not in forged.error  # the launcher's word comes by a pipe
    assert list(tmp_path.iterdir()) == []


def test_the_program_can_use_its_folder_and_the_standard_library():
    result = run_program(
        "import math, fractions, statistics, json, os\nopen('scratch.txt', 'w').write('12')\n"
        "os.mkdir('sub')\nn = int(open('scratch.txt').read())\n"
        "print(math.factorial(n) % 1000, fractions.Fraction(1, 3) + 1, statistics.mean([1, 2, 3]))"
    )
    assert result.ok and result.answer == f"{479001600 % 1000} 4/3 2", result


# A kernel without Landlock looks, to the launcher, like landlock_create_ruleset failing with ENOSYS:
# make it so with a seccomp filter on a child process (inherited by the sandbox it starts).
NO_LANDLOCK = """
import errno, json, sys
import pyseccomp as seccomp
f = seccomp.SyscallFilter(seccomp.ALLOW)
f.add_rule(seccomp.ERRNO(errno.ENOSYS), "landlock_create_ruleset")
f.load()
from raylm.infer.sandbox import run_program
program = f"open({sys.argv[1]!r}, 'w').write('ran')\\nprint('ran')"
confined, unconfined = run_program(program), run_program(program, confine=False)
print(json.dumps([confined.ok, confined.error, unconfined.ok, unconfined.answer]))
"""


def test_without_landlock_pal_is_refused_unless_unconfined(tmp_path):
    marker = tmp_path / "ran"
    out = subprocess.run([sys.executable, "-c", NO_LANDLOCK, str(marker)], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    import json

    confined_ok, error, unconfined_ok, answer = json.loads(out.stdout.strip().splitlines()[-1])
    assert not confined_ok and "sandbox unavailable" in error and "unconfined" in error, error
    assert (
        unconfined_ok and answer == "ran" and marker.read_text() == "ran"
    )  # only the unconfined run wrote it


def test_pal_in_a_spec_checks_the_sandbox_at_start():
    from raylm.infer import strategies
    from raylm.spec.generation import StrategySpec

    spec = StrategySpec(name="pal", exemplars="jobs/exemplars/arithmetic-pal.jsonl")
    exemplars, _ = strategies.prepare(spec)  # this kernel confines: no error
    assert exemplars
    with pytest.raises(ValueError, match="sandbox confines PAL programs"):
        StrategySpec(name="cot", sandbox="unconfined")
    assert os.path.exists("jobs/exemplars/arithmetic-pal.jsonl")

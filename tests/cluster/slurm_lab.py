"""A one-node Slurm cluster on 127.0.0.1 for the cluster tier: munge, MariaDB, slurmdbd, slurmctld, slurmd.

    python3 tests/cluster/slurm_lab.py install            # apt-get the Debian packages that are missing
    python3 tests/cluster/slurm_lab.py start [--dir D]    # start everything; prints the SLURM_CONF to use
    python3 tests/cluster/slurm_lab.py stop  [--dir D]    # cancel its jobs, stop what `start` started, by pid

Everything lives under one directory (default build/cluster): the configuration rendered from
jobman/cluster/*.in, the munge key, MariaDB's data, Slurm's state, logs, and `daemons.json`, the
pid and kernel start time of every daemon started, which is all `stop` signals. Ports are free ones
picked at start. Runs as root (Slurm's daemons here are SlurmUser=root). Standard library only.
"""
from __future__ import annotations

import argparse
import json
import os
import secrets
import shutil
import signal
import socket
import string
import subprocess
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional

REPO = Path(__file__).resolve().parents[2]
TEMPLATES = REPO / "jobman" / "cluster"
DEFAULT_DIR = REPO / "build" / "cluster"
PACKAGES = ("slurmctld", "slurmd", "slurm-client", "slurmdbd", "munge", "mariadb-server")
# Daemons in start order; stop goes the other way.
ORDER = ("munged", "mariadbd", "slurmdbd", "slurmctld", "slurmd")


class LabError(RuntimeError):
    pass


def log(msg: str) -> None:
    print("[slurm-lab] " + msg, flush=True)


def install() -> None:
    missing = [p for p in PACKAGES if subprocess.run(["dpkg-query", "-W", "-f=${Status}", p], capture_output=True,
                                                     text=True).stdout != "install ok installed"]
    if not missing:
        log("packages present: " + " ".join(PACKAGES))
        return
    log("installing " + " ".join(missing))
    # policy-rc.d keeps the packages' own services from starting: the tier starts its daemons itself.
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    cmd = ["apt-get", "install", "-y", "-q", "--no-install-recommends", *missing]
    if subprocess.run(cmd, env=env).returncode != 0:
        subprocess.run(["apt-get", "update", "-q"], env=env, check=True)
        subprocess.run(cmd, env=env, check=True)


def _free_ports(n: int) -> List[int]:
    socks = []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def _pid_start(pid: int) -> Optional[str]:
    try:
        data = Path("/proc/%d/stat" % pid).read_text()
    except OSError:
        return None
    rest = data[data.rfind(")") + 2:].split()
    return None if rest[0] == "Z" else rest[19]


def _alive(pid: int, start: Optional[str]) -> bool:
    now = _pid_start(pid)
    return now is not None and (start is None or now == start)


def _cgroup_v1_memory() -> bool:
    """A writable cgroup v1 memory controller (what Slurm 22.05's cgroup/v1 plugin drives)."""
    probe = Path("/sys/fs/cgroup/memory/lpc-slurm-lab-probe")
    try:
        probe.mkdir()
        probe.rmdir()
        return Path("/sys/fs/cgroup/freezer").is_dir()
    except OSError:
        return False


class Lab:
    def __init__(self, root: Path):
        self.root = Path(root).resolve()
        self.etc = self.root / "etc"
        self.pids = self.root / "daemons.json"

    # -- bookkeeping ---------------------------------------------------------------------------
    def daemons(self) -> Dict[str, Dict]:
        return json.loads(self.pids.read_text()) if self.pids.exists() else {}

    def _record(self, name: str, proc: subprocess.Popen, argv: List[str]) -> None:
        d = self.daemons()
        d[name] = {"pid": proc.pid, "start": _pid_start(proc.pid), "argv": argv}
        tmp = self.pids.with_suffix(".tmp")
        tmp.write_text(json.dumps(d, indent=1))
        os.replace(tmp, self.pids)

    @property
    def env(self) -> Dict[str, str]:
        return dict(os.environ, SLURM_CONF=str(self.etc / "slurm.conf"))

    def _spawn(self, name: str, argv: List[str]) -> subprocess.Popen:
        out = open(self.root / "log" / ("%s.stdout" % name), "ab")
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT, env=self.env,
                                start_new_session=True, close_fds=True)
        out.close()
        self._record(name, proc, argv)
        return proc

    def _wait(self, what: str, check, proc: Optional[subprocess.Popen] = None, timeout: float = 90.0) -> None:
        deadline = time.time() + timeout
        while time.time() < deadline:
            if check():
                return
            if proc is not None and proc.poll() is not None:
                raise LabError("%s exited with %s; see %s" % (what, proc.returncode, self.root / "log"))
            time.sleep(0.3)
        raise LabError("%s not ready after %ds; see %s" % (what, timeout, self.root / "log"))

    def _ok(self, *argv: str) -> bool:
        return subprocess.run(list(argv), capture_output=True, env=self.env, timeout=30).returncode == 0

    # -- start ---------------------------------------------------------------------------------
    def start(self, cpus: int = 4, memory_mb: int = 32768) -> None:
        """The node declares `cpus` and `memory_mb` whatever the machine has (config_overrides): a
        job gets one CPU and a memory cap of memory_mb / cpus (a smoke training run peaks near 6 GB)."""
        if any(_alive(d["pid"], d["start"]) for d in self.daemons().values()):
            raise LabError("a cluster already runs from %s; stop it first" % self.root)
        for sub in ("etc", "log", "run", "munge", "ctld", "slurmd", "mysql"):
            (self.root / sub).mkdir(parents=True, exist_ok=True)
        os.chmod(self.root, 0o700)
        self.pids.unlink(missing_ok=True)
        ctld, slurmd, dbd, db = _free_ports(4)
        # LPC_CLUSTER_CGROUP=0 picks the fallback where a cgroup would do, to see what such machines get
        cgroup = os.environ.get("LPC_CLUSTER_CGROUP") != "0" and _cgroup_v1_memory()
        values = dict(
            state=str(self.root), ctld_port=ctld, slurmd_port=slurmd, dbd_port=dbd, db_port=db,
            munge_socket=str(self.root / "munge" / "munge.socket"), node=socket.gethostname().split(".")[0],
            cpus=cpus, memory_mb=memory_mb, mem_per_cpu_mb=memory_mb // cpus,
            db_password=secrets.token_hex(16),
            # Without a writable cgroup v1 memory controller, memory is policed by the accounting
            # poller (OverMemoryKill) instead of the kernel.
            proctrack="proctrack/cgroup" if cgroup else "proctrack/linuxproc",
            task_plugin="task/cgroup" if cgroup else "task/none",
            jobacct_gather="jobacct_gather/cgroup" if cgroup else "jobacct_gather/linux",
            jobacct_params="NoShared" if cgroup else "OverMemoryKill",
        )
        for name in ("slurm.conf", "slurmdbd.conf", "cgroup.conf"):
            text = string.Template((TEMPLATES / (name + ".in")).read_text()).substitute(values)
            path = self.etc / name
            path.write_text(text)
            os.chmod(path, 0o600 if name == "slurmdbd.conf" else 0o644)
        (self.root / "settings.json").write_text(json.dumps({k: v for k, v in values.items() if k != "db_password"},
                                                            indent=1))
        self._munge()
        self._mariadb(values)
        p = self._spawn("slurmdbd", ["slurmdbd", "-D"])
        self._wait("slurmdbd", lambda: self._ok("sacctmgr", "--noheader", "show", "cluster"), p)
        p = self._spawn("slurmctld", ["slurmctld", "-D", "-i"])
        self._wait("slurmctld", lambda: self._ok("scontrol", "ping"), p)
        p = self._spawn("slurmd", ["slurmd", "-D", "-N", values["node"]])
        self._wait("slurmd", lambda: "idle" in subprocess.run(
            ["sinfo", "--noheader", "--format=%T"], capture_output=True, text=True, env=self.env).stdout, p)
        version = subprocess.run(["sinfo", "--version"], capture_output=True, text=True, env=self.env).stdout.strip()
        log("%s up on 127.0.0.1: node %s (%d CPUs, %d MB), memory limits by %s" % (
            version, values["node"], cpus, memory_mb, "cgroup v1" if cgroup else "OverMemoryKill"))
        log("export SLURM_CONF=%s" % (self.etc / "slurm.conf"))

    def _munge(self) -> None:
        key = self.root / "munge" / "munge.key"
        if not key.exists():
            key.write_bytes(secrets.token_bytes(1024))
        os.chmod(key, 0o600)
        os.chmod(self.root / "munge", 0o700)
        sock = self.root / "munge" / "munge.socket"
        if len(str(sock)) > 100:
            raise LabError("%s is too long for a unix socket; pass a shorter --dir" % sock)
        p = self._spawn("munged", ["munged", "--foreground", "--force", "--socket=%s" % sock, "--key-file=%s" % key,
                                   "--pid-file=%s" % (self.root / "run" / "munged.pid"),
                                   "--log-file=%s" % (self.root / "log" / "munged.log"),
                                   "--seed-file=%s" % (self.root / "munge" / "munged.seed")])
        self._wait("munged", lambda: self._ok("sh", "-c", 'munge -S "$0" -n | unmunge -S "$0"', str(sock)), p)

    def _mariadb(self, values: Dict) -> None:
        data = self.root / "mysql" / "data"
        sock = self.root / "mysql" / "mysqld.sock"
        if not (data / "mysql").is_dir():
            subprocess.run(["mariadb-install-db", "--no-defaults", "--datadir=%s" % data, "--user=root",
                            "--auth-root-authentication-method=socket", "--skip-test-db", "--skip-name-resolve"],
                           check=True, capture_output=True, timeout=300)
        p = self._spawn("mariadbd", [
            shutil.which("mariadbd") or "/usr/sbin/mariadbd", "--no-defaults", "--datadir=%s" % data,
            "--socket=%s" % sock, "--port=%d" % values["db_port"], "--bind-address=127.0.0.1", "--user=root",
            "--pid-file=%s" % (self.root / "run" / "mariadbd.pid"),
            "--log-error=%s" % (self.root / "log" / "mariadb.log"),
            "--skip-name-resolve", "--innodb-buffer-pool-size=64M", "--innodb-lock-wait-timeout=900",
            "--innodb-log-file-size=48M", "--max-connections=50"])
        sql = ["mariadb", "--no-defaults", "-S", str(sock), "-uroot"]
        self._wait("mariadbd", lambda: self._ok(*sql, "-e", "SELECT 1"), p)
        # The password lives in the 0600 slurmdbd.conf of this run only and changes every start.
        stmt = ("CREATE USER IF NOT EXISTS 'slurm'@'127.0.0.1' IDENTIFIED BY '{pw}';"
                "ALTER USER 'slurm'@'127.0.0.1' IDENTIFIED BY '{pw}';"
                "GRANT ALL ON slurm_acct_db.* TO 'slurm'@'127.0.0.1';").format(pw=values["db_password"])
        subprocess.run(sql, input=stmt, text=True, check=True, capture_output=True, timeout=60)

    def stop_daemon(self, name: str) -> None:
        """Stop one daemon by its recorded pid (a fault the tier injects); `start_daemon` brings it back."""
        _terminate(name, **_ps(self.daemons()[name]))

    def start_daemon(self, name: str) -> None:
        p = self._spawn(name, self.daemons()[name]["argv"])
        if name == "slurmctld":
            self._wait("slurmctld", lambda: self._ok("scontrol", "ping"), p)

    # -- stop ----------------------------------------------------------------------------------
    def stop(self) -> None:
        daemons = self.daemons()
        if not daemons:
            log("nothing recorded under %s" % self.root)
            return
        if "slurmctld" in daemons and _alive(**_ps(daemons["slurmctld"])):
            # Jobs first, so that no slurmstepd outlives its slurmd.
            subprocess.run(["scancel", "--full", "--partition=debug"], capture_output=True, env=self.env, timeout=30)
            deadline = time.time() + 30
            while time.time() < deadline and subprocess.run(
                    ["squeue", "--noheader"], capture_output=True, text=True, env=self.env).stdout.strip():
                time.sleep(0.5)
        for name in reversed(ORDER):
            if name in daemons:
                _terminate(name, **_ps(daemons[name]))
        conf = "SLURM_CONF=%s" % (self.etc / "slurm.conf")
        for pid in _pids_with_env(conf):  # a job step that slurmd left behind
            log("killing leftover process %d (%s)" % (pid, _comm(pid)))
            _terminate(_comm(pid), pid, _pid_start(pid))
        self.pids.unlink()
        log("stopped")


def _ps(d: Dict) -> Dict:
    return {"pid": d["pid"], "start": d["start"]}


def _comm(pid: int) -> str:
    try:
        return Path("/proc/%d/comm" % pid).read_text().strip()
    except OSError:
        return "?"


def _pids_with_env(needle: str) -> List[int]:
    out = []
    for p in Path("/proc").iterdir():
        if p.name.isdigit() and int(p.name) != os.getpid():
            try:
                if needle.encode() in (p / "environ").read_bytes().split(b"\0"):
                    out.append(int(p.name))
            except OSError:
                pass
    return out


def _terminate(name: str, pid: int, start: Optional[str], grace: float = 20.0) -> None:
    if not _alive(pid, start):
        return
    os.kill(pid, signal.SIGTERM)
    deadline = time.time() + grace
    while time.time() < deadline and _alive(pid, start):
        time.sleep(0.2)
    if _alive(pid, start):
        log("%s (%d) ignored SIGTERM for %ds: SIGKILL" % (name, pid, grace))
        os.kill(pid, signal.SIGKILL)


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="slurm_lab.py", description=__doc__.splitlines()[0])
    p.add_argument("command", choices=("install", "start", "stop"))
    p.add_argument("--dir", type=Path, default=Path(os.environ.get("LPC_CLUSTER_DIR", DEFAULT_DIR)))
    a = p.parse_args(argv)
    if os.geteuid() != 0:
        print("slurm_lab.py: the cluster tier runs Slurm's daemons as root; run it as root", file=sys.stderr)
        return 2
    try:
        if a.command == "install":
            install()
        elif a.command == "start":
            lab = Lab(a.dir)
            try:
                lab.start()
            except BaseException:
                lab.stop()
                raise
        else:
            Lab(a.dir).stop()
    except (LabError, subprocess.CalledProcessError) as e:
        print("slurm_lab.py: %s" % e, file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

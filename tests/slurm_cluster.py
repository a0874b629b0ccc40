"""A real one-node SLURM cluster for tests: installed if needed, started and stopped by the caller.

Everything the cluster uses lives in one temporary folder - its own munge key and socket, its
own ``slurm.conf`` (reached through ``SLURM_CONF``), state, spool and logs - on free ports, so it
touches no system-wide SLURM or munge set-up and several can run side by side. ``munged`` runs as
the munge user, ``slurmctld`` and ``slurmd`` as root (so root is needed to start it). The
node offers fake GPUs (``Gres=gpu``, no device files): enough for the scheduler to grant a
``--gpus`` request, while the job itself computes on the CPU.

There is no accounting storage, so ``sacct`` does not work: clients query ``squeue``, and
``MinJobAge`` keeps finished jobs visible to ``squeue --states=all`` for an hour.

By hand (as root)::

    python tests/slurm_cluster.py      # starts it, prints `export SLURM_CONF=...`, Ctrl-C stops it
"""

from __future__ import annotations

import atexit
import grp
import os
import pwd
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

APT_PACKAGES = ("slurm-wlm", "munge")
SBIN = ("/usr/sbin", "/sbin", "/usr/local/sbin")
PROGRAMS = ("munged", "munge", "slurmctld", "slurmd", "sbatch", "squeue", "sinfo", "scontrol", "scancel", "srun")


class ClusterError(RuntimeError):
    """The cluster could not be installed or started; the message says why (with the daemons' logs)."""


def find_program(name: str) -> str | None:
    path = os.environ.get("PATH", os.defpath) + os.pathsep + os.pathsep.join(SBIN)
    return shutil.which(name, path=path)


def missing_programs() -> list[str]:
    return [p for p in PROGRAMS if find_program(p) is None]


def ensure_installed(timeout: float = 600) -> None:
    """Install SLURM and munge with apt-get when a program is missing; ClusterError says why it can't."""
    missing = missing_programs()
    if not missing:
        return
    what = f"SLURM is not installed (missing: {', '.join(missing)})"
    if os.geteuid() != 0:
        raise ClusterError(f"{what}, and installing it needs root: apt-get install -y {' '.join(APT_PACKAGES)}")
    apt = shutil.which("apt-get")
    if apt is None:
        raise ClusterError(f"{what}, and there is no apt-get to install {' '.join(APT_PACKAGES)} with")
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    # Another apt-get (someone else's install) may hold the dpkg lock: wait for it instead of failing.
    install = [apt, "install", "-y", "-q", "--no-install-recommends", "-o", "DPkg::Lock::Timeout=300",
               *APT_PACKAGES]
    deadline = time.monotonic() + timeout
    proc = subprocess.run(install, capture_output=True, text=True, env=env, timeout=timeout)
    if proc.returncode != 0:  # stale or empty package lists: refresh them once and retry
        subprocess.run([apt, "update", "-q", "-o", "DPkg::Lock::Timeout=300"], capture_output=True, text=True,
                       env=env, timeout=max(1.0, deadline - time.monotonic()))
        proc = subprocess.run(install, capture_output=True, text=True, env=env,
                              timeout=max(1.0, deadline - time.monotonic()))
    if proc.returncode != 0 or missing_programs():
        raise ClusterError(f"{what}; `{' '.join(install)}` failed ({proc.returncode}):\n{proc.stderr[-3000:]}")


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("", 0))
        return s.getsockname()[1]


def _node_hardware() -> str:
    """The node's CPUs, sockets, cores and memory as slurmd itself detects them (so it registers as configured)."""
    try:
        out = subprocess.run([find_program("slurmd"), "-C"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError):
        out = ""
    keys = ("CPUs", "Boards", "SocketsPerBoard", "CoresPerSocket", "ThreadsPerCore", "RealMemory")
    found = dict(re.findall(r"\b(" + "|".join(keys) + r")=(\d+)", out))
    if "CPUs" not in found or "RealMemory" not in found:
        with open("/proc/meminfo") as f:
            mem = int(next(line.split()[1] for line in f if line.startswith("MemTotal:"))) // 1024
        found = {"CPUs": str(os.cpu_count() or 1), "RealMemory": str(mem)}
    return " ".join(f"{k}={found[k]}" for k in keys if k in found)


class SlurmCluster:
    """One controller and one node on this host. Use as a context manager, or call start() and stop()."""

    def __init__(self, partition: str = "actgrad_test", gpus: int = 2, default_partition: bool = False,
                 min_job_age: int = 3600):
        self.partition = partition
        self.gpus = gpus
        self.default_partition = default_partition
        self.min_job_age = min_job_age
        self.node = socket.gethostname().split(".")[0]
        self.root: Path | None = None
        self.conf: Path | None = None
        self._daemons: dict[str, subprocess.Popen] = {}

    # -- what clients need -------------------------------------------------------------------------
    @property
    def env(self) -> dict[str, str]:
        """os.environ plus SLURM_CONF (and the sbin folders on PATH): give it to sbatch, squeue, snakemake."""
        path = os.environ.get("PATH", os.defpath)
        return dict(os.environ, SLURM_CONF=str(self.conf), PATH=os.pathsep.join([path, *SBIN]))

    def run(self, *cmd: str, check: bool = True, timeout: float = 30) -> subprocess.CompletedProcess:
        return subprocess.run([find_program(cmd[0]) or cmd[0], *cmd[1:]], capture_output=True, text=True,
                              env=self.env, timeout=timeout, check=check)

    def jobs(self) -> list[dict[str, str]]:
        """Every job the controller knows, finished ones included (squeue --states=all)."""
        fields = {"id": "JobID", "name": "Name", "comment": "Comment", "state": "State", "partition": "Partition",
                  "cpus": "NumCPUs", "min_memory": "MinMemory", "time_limit": "TimeLimit",
                  "tres_per_job": "tres-per-job", "workdir": "WorkDir"}
        out = self.run("squeue", "--states=all", "--noheader",
                       "--Format=" + ",".join(f"{f}:|" for f in fields.values())).stdout
        return [dict(zip(fields, line.split("|"))) for line in out.splitlines() if line.strip()]

    def logs(self, lines: int = 40) -> str:
        text = []
        for log in sorted((self.root / "log").glob("*")) if self.root else []:
            tail = log.read_text(errors="replace").splitlines()[-lines:]
            text.append(f"--- {log.name} (last {len(tail)} lines) ---\n" + "\n".join(tail))
        return "\n".join(text)

    # -- life cycle ---------------------------------------------------------------------------------
    def __enter__(self) -> SlurmCluster:
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def start(self, timeout: float = 90) -> None:
        if os.geteuid() != 0:
            raise ClusterError("starting slurmd and munged needs root")
        missing = missing_programs()
        if missing:
            raise ClusterError(f"SLURM is not installed (missing: {', '.join(missing)})")
        try:
            pwd.getpwnam("munge")
        except KeyError:
            raise ClusterError("there is no munge user (install the munge package)") from None
        atexit.register(self.stop)
        try:
            self._write_files()
            self._start_munge(timeout)
            self._start_slurm(timeout)
        except BaseException:
            self.stop()
            raise

    def _write_files(self) -> None:
        # Short path: the munge socket path must stay under the 108-character limit of unix sockets.
        self.root = Path(tempfile.mkdtemp(prefix="actgrad-slurm-", dir="/tmp"))
        self.root.chmod(0o755)  # munged, running as munge, must reach its folder below
        for sub in ("etc", "state", "spool", "log", "munge"):
            (self.root / sub).mkdir()
        munge_uid, munge_gid = pwd.getpwnam("munge").pw_uid, grp.getgrnam("munge").gr_gid
        key = self.root / "munge" / "munge.key"
        key.write_bytes(os.urandom(1024))
        key.chmod(0o400)
        munge_log = self.root / "log" / "munged.log"
        munge_log.touch()
        for path in (self.root / "munge", key, munge_log):
            os.chown(path, munge_uid, munge_gid)
        (self.root / "munge").chmod(0o755)
        self.munge_socket = self.root / "munge" / "munge.socket"

        hardware = _node_hardware()
        ctld_port, slurmd_port = _free_port(), _free_port()
        while slurmd_port == ctld_port:
            slurmd_port = _free_port()
        r = self.root
        gres = f" Gres=gpu:{self.gpus}" if self.gpus else ""
        self.conf = r / "etc" / "slurm.conf"
        self.conf.write_text(f"""\
# A one-node test cluster written by tests/slurm_cluster.py
ClusterName=actgradtest
SlurmctldHost={self.node}(127.0.0.1)
SlurmctldPort={ctld_port}
SlurmdPort={slurmd_port}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={self.munge_socket}
StateSaveLocation={r}/state
SlurmdSpoolDir={r}/spool
SlurmctldPidFile={r}/slurmctld.pid
SlurmdPidFile={r}/slurmd.pid
SlurmctldLogFile={r}/log/slurmctld.log
SlurmdLogFile={r}/log/slurmd.log
SlurmctldDebug=info
SlurmdDebug=info
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
GresTypes=gpu
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
MpiDefault=none
SwitchType=switch/none
MailProg=/bin/true
ReturnToService=2
SchedulerType=sched/backfill
MinJobAge={self.min_job_age}
KillWait=5
NodeName={self.node} NodeAddr=127.0.0.1 {hardware}{gres} State=UNKNOWN
PartitionName={self.partition} Nodes={self.node} Default={'YES' if self.default_partition else 'NO'} \
MaxTime=INFINITE State=UP
""")
        # Fake GPUs: slurmd wants a device file per GPU, any character device will do. They let the
        # scheduler grant --gpus requests on this node; nothing uses them.
        fake_devices = ["/dev/null", "/dev/zero", "/dev/full", "/dev/random", "/dev/urandom"][:self.gpus]
        (r / "etc" / "gres.conf").write_text("".join(f"NodeName={self.node} Name=gpu File={d}\n" for d in fake_devices))

    def _spawn(self, name: str, cmd: list[str], **kwargs) -> None:
        out = open(self.root / "log" / f"{name}.out", "w")
        # Own session: at stop() every process the daemons left behind is found by its session id.
        self._daemons[name] = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                               env=self.env, start_new_session=True, **kwargs)
        out.close()

    def _wait(self, what: str, ready, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for name, proc in self._daemons.items():
                if proc.poll() is not None:
                    raise ClusterError(f"{name} exited ({proc.returncode}) while waiting for {what}\n{self.logs()}")
            try:
                if ready():
                    return
            except (OSError, subprocess.SubprocessError):
                pass
            time.sleep(0.5)
        raise ClusterError(f"timed out after {timeout:.0f}s waiting for {what}\n{self.logs()}")

    def _start_munge(self, timeout: float) -> None:
        m = self.root / "munge"
        self._spawn("munged", [find_program("munged"), "--foreground", f"--socket={self.munge_socket}",
                               f"--key-file={m / 'munge.key'}", f"--pid-file={m / 'munged.pid'}",
                               f"--seed-file={m / 'munged.seed'}", f"--log-file={self.root / 'log' / 'munged.log'}"],
                    user="munge", group="munge", extra_groups=[])

        def credential_roundtrip() -> bool:
            cred = subprocess.run([find_program("munge"), "-n", "-S", str(self.munge_socket)], capture_output=True,
                                  timeout=10)
            return cred.returncode == 0 and subprocess.run(
                [find_program("unmunge"), "-S", str(self.munge_socket)], input=cred.stdout, capture_output=True,
                timeout=10).returncode == 0

        self._wait("munged", credential_roundtrip, timeout)

    def _start_slurm(self, timeout: float) -> None:
        self._spawn("slurmctld", [find_program("slurmctld"), "-D", "-i", "-f", str(self.conf)])
        self._wait("slurmctld", lambda: self.run("scontrol", "ping", check=False, timeout=10).stdout.count("UP") > 0,
                   timeout)
        # Inside a job, the SLURM plugin's jobstep runs `srun` with every SLURM_* variable removed,
        # SLURM_CONF too: srun then reads /etc/slurm/slurm.conf. slurmd (and so every job) runs in a
        # mount namespace of its own where /etc/slurm is this cluster's etc folder; outside it,
        # /etc/slurm is left alone.
        slurmd = [find_program("slurmd"), "-D", "-f", str(self.conf), "-N", self.node]
        unshare = find_program("unshare")
        if unshare is None:
            raise ClusterError("unshare (util-linux) is needed to give the cluster's jobs their own /etc/slurm")
        Path("/etc/slurm").mkdir(exist_ok=True)
        self._spawn("slurmd", [unshare, "--mount", "--propagation", "private", "--", "sh", "-c",
                               'mount --bind "$0" /etc/slurm && exec "$@"', str(self.conf.parent), *slurmd])

        def node_idle() -> bool:
            state = self.run("sinfo", "--noheader", "--Node", "--format=%t", check=False, timeout=10).stdout.strip()
            if state.startswith(("drain", "inval", "fail")):
                reason = self.run("sinfo", "--noheader", "--Node", "--format=%E", check=False).stdout.strip()
                raise ClusterError(f"node {self.node} is {state}: {reason}\n{self.logs()}")
            return state == "idle"

        self._wait(f"node {self.node} to become idle", node_idle, timeout)

    def stop(self) -> None:
        """Cancel every job, stop the daemons and whatever they started, remove the folder. Safe to repeat."""
        atexit.unregister(self.stop)
        if self._daemons.get("slurmctld") and self._daemons["slurmctld"].poll() is None:
            try:
                ids = [j["id"] for j in self.jobs() if j["state"] in ("PENDING", "RUNNING", "CONFIGURING",
                                                                       "COMPLETING", "SUSPENDED")]
                if ids:
                    self.run("scancel", *ids, check=False)
                    deadline = time.monotonic() + 15
                    while time.monotonic() < deadline and any(
                            j["state"] in ("RUNNING", "COMPLETING") for j in self.jobs()):
                        time.sleep(0.5)
            except (OSError, subprocess.SubprocessError, ValueError):
                pass
        sessions = {p.pid for p in self._daemons.values()}
        for name in ("slurmd", "slurmctld", "munged"):
            proc = self._daemons.get(name)
            if proc is None or proc.poll() is not None:
                continue
            proc.terminate()
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=15)
        self._daemons.clear()
        self._kill_leftovers(sessions)
        if self.root is not None:
            shutil.rmtree(self.root, ignore_errors=True)
            self.root = None

    def _kill_leftovers(self, sessions: set[int]) -> None:
        """Job steps (slurmstepd, the jobs' processes) the daemons started: in their sessions or with our SLURM_CONF."""
        if self.conf is None:
            return
        marker = f"SLURM_CONF={self.conf}".encode()  # with SLURM_JOB_ID: a job of this cluster
        me = os.getpid()
        for _ in range(3):
            found = []
            for entry in Path("/proc").iterdir():
                if not entry.name.isdigit() or int(entry.name) == me:
                    continue
                pid = int(entry.name)
                try:
                    if os.getsid(pid) in sessions:
                        found.append(pid)
                        continue
                    environ = (entry / "environ").read_bytes().split(b"\0")
                    if marker in environ and any(v.startswith(b"SLURM_JOB_ID=") for v in environ):
                        found.append(pid)
                except (OSError, ProcessLookupError):
                    continue
            if not found:
                return
            for pid in found:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            time.sleep(0.5)


def _raise_interrupt(signum, frame):
    raise KeyboardInterrupt(signal.Signals(signum).name)


if __name__ == "__main__":
    # Stop cleanly on Ctrl-C and on kill (SIGTERM), also when started in the background.
    signal.signal(signal.SIGINT, _raise_interrupt)
    signal.signal(signal.SIGTERM, _raise_interrupt)
    ensure_installed()
    try:
        with SlurmCluster(default_partition=True) as cluster:
            print(f"export SLURM_CONF={cluster.conf}   # partition {cluster.partition}; Ctrl-C stops the cluster",
                  flush=True)
            while True:
                signal.pause()
    except KeyboardInterrupt:
        pass

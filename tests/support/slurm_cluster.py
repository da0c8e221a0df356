"""A real Slurm cluster (Debian's slurm-wlm) on simulated nodes, for launch rehearsals.

slurmctld runs on node0 and one slurmd on every node, each inside its node's network and
hostname namespaces (tests/support/simulated_nodes.py), so `sbatch`/`srun` place job steps on
nodes that really are separate hosts to the code they run. Every node offers `gpus_per_node`
GPUs as Slurm generic resources backed by device nodes with /dev/null's numbers: enough for
`#SBATCH --gpus-per-node=8` to be scheduled; nothing in the job touches them (the recipes run
on CPU). No munge: the cluster uses auth/none and cred/none, and everything lives in one folder
the test owns.

    with SimulatedNodes(2) as nodes, SlurmCluster(nodes, tmp_path) as cluster:
        cluster.run(["sbatch", "--wait", "script.sbatch"], env={...})

`available()` says why it cannot run here (no slurm-wlm: `apt-get install slurm-wlm`, which
`.ci/run` does).
"""
from __future__ import annotations

import os
import shutil
import stat
import subprocess
import time
from pathlib import Path
from typing import Optional, Sequence

PLUGINS = Path("/usr/lib/x86_64-linux-gnu/slurm-wlm")


def available() -> Optional[str]:
    for tool in ("slurmctld", "slurmd", "sbatch", "srun", "sinfo"):
        if shutil.which(tool) is None:
            return f"needs Slurm (`{tool}` not found; apt-get install slurm-wlm)"
    if not (PLUGINS / "auth_none.so").exists():
        return f"Slurm's auth/none plugin is missing under {PLUGINS}"
    return None


# ip netns exec remounts /sys, hiding the host's cgroup mounts; slurmd's cgroup plugin wants the
# v1 hierarchy, so each node mounts it for itself (in its own mount namespace) first.
_CGROUP_SETUP = ("mount -t tmpfs cgroup_root /sys/fs/cgroup && "
                 "for c in freezer cpuset memory devices; do "
                 "mkdir -p /sys/fs/cgroup/$c && mount -t cgroup -o $c cgroup /sys/fs/cgroup/$c; "
                 "done; ")


class SlurmCluster:
    def __init__(self, nodes: Sequence, folder: Path, *, gpus_per_node: int = 8,
                 cpus_per_node: int = 16):
        self.nodes, self.folder = list(nodes), Path(folder) / "slurm"
        self.gpus_per_node, self.cpus_per_node = gpus_per_node, cpus_per_node
        self.conf = self.folder / "slurm.conf"
        self.daemons: list[subprocess.Popen] = []

    def env(self, extra: Optional[dict] = None) -> dict:
        return {"SLURM_CONF": str(self.conf), **(extra or {})}

    def __enter__(self) -> "SlurmCluster":
        try:
            self._write_config()
            self._start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def _write_config(self) -> None:
        f = self.folder
        for sub in ("state", "log", *(f"spool-{n.name}" for n in self.nodes), "gpus"):
            (f / sub).mkdir(parents=True, exist_ok=True)
        gpus = [f / "gpus" / f"gpu{i}" for i in range(self.gpus_per_node)]
        for path in gpus:      # character devices (null's numbers), as gres.conf requires
            if not path.exists():
                os.mknod(path, 0o666 | stat.S_IFCHR, os.makedev(1, 3))
        head = self.nodes[0]
        nodes = "\n".join(
            f"NodeName={n.name} NodeAddr={n.address} CPUs={self.cpus_per_node} "
            f"RealMemory=16000 Gres=gpu:{self.gpus_per_node} State=UNKNOWN" for n in self.nodes)
        self.conf.write_text(f"""\
ClusterName=masa-rehearsal
SlurmctldHost={head.name}({head.address})
SlurmUser=root
SlurmdUser=root
AuthType=auth/none
CredType=cred/none
MpiDefault=none
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
GresTypes=gpu
JobAcctGatherType=jobacct_gather/none
ReturnToService=2
SlurmdParameters=config_overrides
SchedulerType=sched/builtin
StateSaveLocation={f}/state
SlurmdSpoolDir={f}/spool-%n
SlurmctldPidFile={f}/slurmctld.pid
SlurmdPidFile={f}/slurmd-%n.pid
SlurmctldLogFile={f}/log/slurmctld.log
SlurmdLogFile={f}/log/slurmd-%n.log
SlurmctldTimeout=30
SlurmdTimeout=30
InactiveLimit=0
KillWait=5
MinJobAge=300
{nodes}
PartitionName=rehearsal Nodes=ALL Default=YES MaxTime=INFINITE State=UP
""")
        (f / "gres.conf").write_text(f"Name=gpu File={f}/gpus/gpu[0-{self.gpus_per_node - 1}]\n")
        (f / "cgroup.conf").write_text("CgroupPlugin=cgroup/v1\nConstrainDevices=no\n")

    def _daemon(self, node, argv: list[str], name: str) -> None:
        log = open(self.folder / "log" / f"{name}.out", "w")
        self.daemons.append(node.popen(["sh", "-c", _CGROUP_SETUP + 'exec "$@"', "daemon",
                                        *argv], env=self.env(), stdout=log,
                                       stderr=subprocess.STDOUT))

    def _start(self) -> None:
        self._daemon(self.nodes[0], ["slurmctld", "-D", "-i"], "slurmctld")
        for node in self.nodes:
            self._daemon(node, ["slurmd", "-D", "-N", node.name], f"slurmd-{node.name}")
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            out = self.run(["sinfo", "-h", "-o", "%t %D"], capture_output=True, text=True)
            states = out.stdout.split()
            if out.returncode == 0 and states[:1] == ["idle"] and \
                    states[1:2] == [str(len(self.nodes))]:
                return
            for proc in self.daemons:
                if proc.poll() is not None:
                    raise RuntimeError(f"a Slurm daemon exited ({proc.args[-3:]}):\n"
                                       f"{self.logs()}")
            time.sleep(0.5)
        raise RuntimeError(f"Slurm nodes not idle after 60 s:\n{self.logs()}")

    def run(self, argv: Sequence[str], env: Optional[dict] = None, **kwargs):
        """A Slurm client command on node0 (the login node of this cluster)."""
        return self.nodes[0].run(argv, env=self.env(env), **kwargs)

    def logs(self, tail: int = 3000) -> str:
        parts = []
        for path in sorted((self.folder / "log").glob("*")):
            parts.append(f"--- {path.name}\n{path.read_text(errors='replace')[-tail:]}")
        return "\n".join(parts)

    def stop(self) -> None:
        if self.conf.exists() and self.daemons:
            self.run(["scancel", "--full", "--user=root"], capture_output=True)
        for proc in self.daemons:
            proc.terminate()
        for proc in self.daemons:
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
        self.daemons = []

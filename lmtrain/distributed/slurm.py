"""What SLURM tells a task about its job, as torchrun's variables: who is rank 0 and where it listens, how many
tasks share this node, and whether srun started this process at all.

srun sets SLURM_STEP_NUM_TASKS (and the other SLURM_STEP_* variables) in every task of a job step; a batch
script or an `salloc` shell has the job's SLURM_NTASKS but is no step. A process there that took SLURM_NTASKS
for its world would wait the whole collective timeout for ranks nobody started: `check_started_by_srun` says
so in one line instead.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import re
import shutil
import subprocess
from collections.abc import Mapping
from pathlib import Path

from lmtrain.errors import ConfigError

log = logging.getLogger(__name__)

LOWEST_PORT = 10000  # below: the well-known and registered ports many services listen on
_EPHEMERAL_DEFAULT = (32768, 60999)  # Linux's default ip_local_port_range


def parse_hostlist(nodelist: str) -> list[str]:
    """Every host of a SLURM node list, in order: 'gpu[003-005,010],cpu1' -> gpu003 gpu004 gpu005 gpu010 cpu1;
    'rack[1-2]-node[01-02]' -> rack1-node01 rack1-node02 rack2-node01 rack2-node02. A range keeps the width of
    its lower bound ([08-10]: 08 09 10)."""
    hosts = []
    for item in _split_outside_brackets(nodelist.strip(), ","):
        hosts += _expand(item, nodelist)
    return hosts


def _split_outside_brackets(text: str, sep: str) -> list[str]:
    parts, depth, start = [], 0, 0
    for i, char in enumerate(text):
        depth += {"[": 1, "]": -1}.get(char, 0)
        if char == sep and depth == 0:
            parts.append(text[start:i])
            start = i + 1
    return [p for p in parts + [text[start:]] if p]


def _expand(item: str, nodelist: str) -> list[str]:
    """One host pattern: the first bracket group's values, each followed by every expansion of the rest."""
    m = re.match(r"([^\[\]]*)\[([^\[\]]*)\](.*)$", item)
    if m is None:
        if "[" in item or "]" in item:
            raise ConfigError(f"SLURM's node list {nodelist!r} has unbalanced brackets in {item!r}")
        return [item]
    prefix, ranges, rest = m.groups()
    tails = _expand(rest, nodelist) if rest else [""]
    return [prefix + value + tail for value in _range_values(ranges, nodelist) for tail in tails]


def _range_values(ranges: str, nodelist: str) -> list[str]:
    values = []
    for part in ranges.split(","):
        lo, _, hi = part.partition("-")
        if not lo.isdigit() or (hi and not hi.isdigit()) or (hi and int(hi) < int(lo)):
            raise ConfigError(f"SLURM's node list {nodelist!r} has a range lmtrain cannot read: [{part}]")
        values += [str(i).zfill(len(lo)) for i in range(int(lo), int(hi or lo) + 1)]
    return values


@functools.lru_cache(maxsize=8)
def hostnames(nodelist: str) -> tuple[str, ...]:
    """The hosts of a node list: `scontrol show hostnames` where SLURM's tools are installed (it knows every
    syntax the cluster's SLURM version accepts), else lmtrain's own parser."""
    if shutil.which("scontrol"):
        try:
            out = subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True,
                                 timeout=30, check=True).stdout.split()
            if out:
                return tuple(out)
        except (OSError, subprocess.SubprocessError) as e:
            log.debug("scontrol show hostnames failed (%s); parsing the node list itself", e)
    return tuple(parse_hostlist(nodelist))


def tasks_per_node(spec: str) -> list[int]:
    """SLURM_TASKS_PER_NODE as one count per node: '4(x2),2' -> [4, 4, 2]."""
    counts = []
    for part in spec.split(","):
        m = re.fullmatch(r"(\d+)(?:\(x(\d+)\))?", part.strip())
        if m is None:
            raise ConfigError(f"SLURM_TASKS_PER_NODE={spec!r} is not a list of counts like '4(x2),2'")
        counts += [int(m[1])] * int(m[2] or 1)
    return counts


def ephemeral_ports(path: Path = Path("/proc/sys/net/ipv4/ip_local_port_range")) -> tuple[int, int]:
    """The range the kernel picks outgoing connections' ports from: a listening port there may already be taken."""
    try:
        lo, hi = (int(x) for x in path.read_text().split())
        return lo, hi
    except (OSError, ValueError):
        return _EPHEMERAL_DEFAULT


def rendezvous_port(job_id: str, step_id: str, ephemeral: tuple[int, int] | None = None) -> int:
    """A port of this job step's own, the same on every task: a hash of the job and step ids over the ports
    from LOWEST_PORT up that lie outside the ephemeral range, so two jobs or two steps of one job sharing a node
    rarely meet, and never on a port the kernel hands out to outgoing connections."""
    lo, hi = ephemeral or ephemeral_ports()
    spans = [(a, b) for a, b in ((LOWEST_PORT, lo - 1), (hi + 1, 65535)) if a <= b] or [(LOWEST_PORT, 65535)]
    index = int(hashlib.sha256(f"{job_id}.{step_id}".encode()).hexdigest(), 16) % sum(b - a + 1 for a, b in spans)
    for a, b in spans:
        if index <= b - a:
            return a + index
        index -= b - a + 1
    raise AssertionError("unreachable: the index lies in one of the spans")


def started_without_srun(env: Mapping[str, str]) -> bool:
    """A task of a SLURM job of several tasks (SLURM_PROCID, SLURM_NTASKS > 1) that no srun step started."""
    return ("RANK" not in env and "SLURM_PROCID" in env and int(env.get("SLURM_NTASKS", "1") or 1) > 1
            and "SLURM_STEP_NUM_TASKS" not in env)


def check_started_by_srun(env: Mapping[str, str]) -> None:
    if started_without_srun(env):
        n = env["SLURM_NTASKS"]
        raise ConfigError(f"this SLURM job has {n} tasks (SLURM_NTASKS={n}) but srun did not start this process, so "
                          f"no other rank will join it: start one task per GPU with `srun lmtrain train ...` "
                          "(scripts/slurm/train.sbatch does), or use trainer.nproc_per_node=N on one node")


def torchrun_variables(env: Mapping[str, str]) -> dict[str, str]:
    """torchrun's variables for a task that `srun` started (one task per GPU); empty when torchrun's variables
    are there already (torchrun inside srun) or srun did not start several tasks."""
    size = int(env.get("SLURM_STEP_NUM_TASKS", "1") or 1)
    if "RANK" in env or size <= 1 or "SLURM_PROCID" not in env:
        return {}
    counts = tasks_per_node(env.get("SLURM_STEP_TASKS_PER_NODE") or env.get("SLURM_TASKS_PER_NODE") or str(size))
    node = int(env.get("SLURM_NODEID", "0") or 0)
    nodelist = env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST") or "localhost"
    return {"RANK": env["SLURM_PROCID"], "LOCAL_RANK": env.get("SLURM_LOCALID", "0"), "WORLD_SIZE": str(size),
            "LOCAL_WORLD_SIZE": str(counts[node] if node < len(counts) else counts[0]),
            "MASTER_ADDR": env.get("MASTER_ADDR") or hostnames(nodelist)[0],
            "MASTER_PORT": env.get("MASTER_PORT") or str(rendezvous_port(env.get("SLURM_JOB_ID", "0"),
                                                                         env.get("SLURM_STEP_ID", "0")))}

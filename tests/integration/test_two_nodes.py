"""Two nodes for real: two network namespaces joined by a veth pair (10.77.0.1 and 10.77.0.2), one
``multitrain_llama3.sh`` (torchrun) in each, one gloo process per node, the nodes finding each
other through torchrun's c10d rendezvous on the first node's address.

Checks, each against the same run on one node (two processes, the same world size), bit for bit
in losses and weights: a worker killed with SIGKILL mid-run is restarted by torchrun on both nodes
and the run continues by itself from its newest checkpoint to the one-node run's end (so its steps
before the kill, on two nodes, equal the one-node run's too); SIGTERM to both nodes' jobs
(checkpoints written in the background) makes the workers save a checkpoint and stop (the status
of an interrupted run, exit 130; torchrun then exits with its own error status), and the same
commands again finish the run. Each ends with every
step once in metrics.jsonl and the uninterrupted run's losses.

Needs root and iproute2's ``ip`` (``ip netns add``); skips with the reason otherwise. The
namespaces carry names of their own per test and are deleted afterwards, whatever happened.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import subprocess
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pytest
from test_training import (
    RUN,
    TinyData,
    free_port,
    multitrain_script,
    records,
    same_run,
    uninterrupted_multitrain,
    wait_for_step,
    workers_of,
)

from llama3.checkpoint import resolve_step_dir

pytestmark = pytest.mark.usefixtures("one_thread")

ADDRESSES = ("10.77.0.1", "10.77.0.2")
STEPS = 60  # of multitrain_script's run


@dataclass(frozen=True)
class Node:
    namespace: str
    interface: str  # its end of the veth pair
    address: str


def ip(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30)


def create(nodes: list[Node]) -> str | None:
    """The namespaces and the veth pair between them; the reason it failed, if it did."""
    a, b = nodes
    steps = [
        *(["netns", "add", node.namespace] for node in nodes),
        ["link", "add", a.interface, "type", "veth", "peer", "name", b.interface],
    ]
    for node in nodes:
        steps += [
            ["link", "set", node.interface, "netns", node.namespace],
            ["-n", node.namespace, "addr", "add", f"{node.address}/24", "dev", node.interface],
            ["-n", node.namespace, "link", "set", node.interface, "up"],
            ["-n", node.namespace, "link", "set", "lo", "up"],
        ]
    for step in steps:
        done = ip(*step)
        if done.returncode != 0:
            return f"ip {' '.join(step)}: {done.stderr.strip()}"
    return None


@pytest.fixture
def nodes() -> Iterator[list[Node]]:
    """Two network namespaces joined by a veth pair, deleted afterwards (their names are unique
    to this test, so parallel or aborted runs do not collide)."""
    if os.geteuid() != 0:
        pytest.skip("creating network namespaces needs root")
    if shutil.which("ip") is None:
        pytest.skip("needs iproute2's ip command")
    tag = f"l3{secrets.token_hex(3)}"  # interface names have at most 15 characters
    pair = [Node(f"{tag}{n}", f"{tag}v{n}", addr) for n, addr in zip("ab", ADDRESSES)]
    try:
        problem = create(pair)
        if problem:
            pytest.skip(f"cannot create network namespaces here ({problem})")
        yield pair
    finally:
        for node in pair:
            ip("netns", "delete", node.namespace)  # removes the veth end inside it too
        ip("link", "delete", pair[0].interface)  # in case it never moved


def start_job(
    data: TinyData, root: Path, nodes: list[Node], flags: tuple[str, ...] = ()
) -> list[subprocess.Popen]:
    """multitrain_llama3.sh in each namespace: one process per node, the rendezvous on the first
    node's address (a port and job id of their own each time)."""
    endpoint, job_id = f"{nodes[0].address}:{free_port()}", f"job{secrets.token_hex(4)}"
    return [
        multitrain_script(
            data,
            root,
            0,
            prefix=["ip", "netns", "exec", node.namespace],
            flags=flags,
            NPROC_PER_NODE="1",
            NNODES="2",
            RDZV_ENDPOINT=endpoint,
            RDZV_ID=job_id,
            NODE_ADDR=node.address,
            GLOO_SOCKET_IFNAME=node.interface,
        )
        for node in nodes
    ]


def finish(job: list[subprocess.Popen], run_dir: Path) -> list[tuple[int, str]]:
    """Each node's exit status and output, read side by side (a node blocked on a full pipe
    would hold the other up); if they do not end in time, they and their workers (sessions of
    their own) are killed."""
    try:
        with ThreadPoolExecutor(len(job)) as pool:
            outs = list(pool.map(lambda node: node.communicate(timeout=300)[0], job))
    finally:
        for node in job:
            if node.poll() is None:
                os.killpg(node.pid, signal.SIGKILL)
                node.wait(timeout=60)
        for worker in workers_of(run_dir):
            os.kill(worker, signal.SIGKILL)
    return [(node.returncode, out) for node, out in zip(job, outs)]


def each_step_once(run_dir: Path) -> None:
    assert [r["step"] for r in records(run_dir)] == list(range(1, STEPS + 1))


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> TinyData:
    return TinyData(tmp_path_factory.mktemp("tiny_data"))


@pytest.fixture(scope="module")
def one_node(data, tmp_path_factory) -> Path:
    """The same run on one node: two processes on this host."""
    return uninterrupted_multitrain(data, tmp_path_factory.mktemp("one_node"))


def test_two_nodes_match_one_restart_a_killed_worker_and_resume_a_stopped_job(
    nodes, data, one_node, tmp_path
):
    run = RUN  # the two-node runs end equal to the one-node run: so do their steps before a stop
    killed = start_job(data, tmp_path / "killed", nodes)
    wait_for_step(killed[0], tmp_path / "killed" / run, 5)
    victims = workers_of(tmp_path / "killed" / run)
    assert len(victims) == 2 and not (tmp_path / "killed" / run / f"step_{STEPS:08d}").exists()
    os.kill(victims[1], signal.SIGKILL)
    results = finish(killed, tmp_path / "killed" / run)
    for status, out in results:
        assert status == 0, out[-3000:]
    assert any("resumed from" in out for _, out in results)
    each_step_once(tmp_path / "killed" / run)
    same_run(one_node, tmp_path / "killed" / run)

    background = ("--async_checkpoint",)
    stopped = start_job(data, tmp_path / "stopped", nodes, background)
    wait_for_step(stopped[0], tmp_path / "stopped" / run, 5)
    for node in stopped:
        os.killpg(node.pid, signal.SIGTERM)
    results = finish(stopped, tmp_path / "stopped" / run)
    summary = json.loads((tmp_path / "stopped" / run / "summary.json").read_text())
    assert summary["status"] == "interrupted", results[0][1][-3000:]
    for status, out in results:  # torchrun stopped by the signal, after its worker's save
        assert status != 0 and "got signal: 15" in out, out[-3000:]
    assert any("run interrupted" in out for _, out in results)
    assert summary["steps"] < STEPS
    assert resolve_step_dir(tmp_path / "stopped" / run).name == f"step_{summary['steps']:08d}"
    again = start_job(data, tmp_path / "stopped", nodes, background)
    results = finish(again, tmp_path / "stopped" / run)
    for status, out in results:
        assert status == 0, out[-3000:]
    assert any("resumed from" in out for _, out in results)
    each_step_once(tmp_path / "stopped" / run)
    same_run(one_node, tmp_path / "stopped" / run)

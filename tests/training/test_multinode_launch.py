"""Several machines: one ``kubetuner-train`` per "node", each starting its local ranks.

Two launcher processes on 127.0.0.1 stand in for two pods of the operator's Indexed Job
(``NUM_NODES``/``NODE_RANK``/``MASTER_ADDR``/``MASTER_PORT``), two gloo ranks each.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from safetensors.torch import load_file
from training_helpers import tiny_run_values

from kubetuner_trainer.config import ConfigError
from kubetuner_trainer.contract import ExitCode
from kubetuner_trainer.launcher import combined_exit_code, node_placement, rank_environment
from kubetuner_trainer.training import checkpoints as ckpt

# a safety net so that a broken rendezvous fails the test instead of hanging it; never a speed check
HANG_GUARD_SECONDS = 600


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _images(folder: Path, count: int) -> None:
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(count):
        Image.fromarray(rng.integers(0, 256, size=(32, 32, 3), dtype=np.uint8), "RGB").save(folder / f"img{i}.png")
        (folder / f"img{i}.txt").write_text(f"a photo of thing {i}")


@pytest.fixture
def write_config(tmp_path, tiny_model):
    """``write_config(name, **overrides)`` → a config.json for a tiny sd1x LoRA run over eight 32px images."""
    _images(tmp_path / "images", 8)
    backends = tmp_path / "multidatabackend.json"
    backends.write_text(json.dumps([{"id": "tiny", "type": "local", "instance_data_dir": str(tmp_path / "images"),
                                     "caption_strategy": "textfile"}]))

    def write(name: str, **overrides) -> Path:
        values = tiny_run_values(
            tiny_model("sd1x"), tmp_path, backends, max_train_steps=2, num_processes=4, train_batch_size=1,
            metrics_port=0,
        )
        values.update(overrides)
        path = tmp_path / f"{name}.json"
        path.write_text(json.dumps(values))
        return path

    return write


def _start_node(config: Path, node_rank: int, port: int, log: Path, *args: str) -> subprocess.Popen:
    env = {**os.environ, "NUM_NODES": "2", "NODE_RANK": str(node_rank), "NPROC_PER_NODE": "2",
           "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "OMP_NUM_THREADS": "1"}
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "TRAINING_NUM_PROCESSES"):
        env.pop(name, None)
    script = Path(sys.executable).parent / "kubetuner-train"
    return subprocess.Popen([str(script), "--config", str(config), *args], env=env,
                            stdout=log.open("wb"), stderr=subprocess.STDOUT)


def _wait(procs: list[subprocess.Popen], logs: list[Path]) -> list[int]:
    codes = []
    for proc, log in zip(procs, logs, strict=True):
        try:
            codes.append(proc.wait(timeout=HANG_GUARD_SECONDS))
        except subprocess.TimeoutExpired:
            for p in procs:
                p.kill()
            pytest.fail(f"a node did not finish; its log:\n{log.read_text()[-4000:]}")
    return codes


def _tails(logs: list[Path]) -> str:
    return "\n".join(f"--- {log.name}\n{log.read_text()[-3000:]}" for log in logs)


def test_two_nodes_of_two_processes_train_one_model_in_sync(write_config, tmp_path):
    config = write_config("run", checkpoint_step_interval=1)
    port = _free_port()
    logs = [tmp_path / "node0.log", tmp_path / "node1.log"]
    procs = [_start_node(config, n, port, logs[n]) for n in (1, 0)][::-1]  # node 1 first: it must wait for 0
    assert _wait(procs, logs) == [0, 0], _tails(logs)

    checkpoints = ckpt.list_checkpoints(tmp_path / "out")
    assert [step for step, _ in checkpoints] == [1, 2]  # the interval falls on the last step too
    folder = checkpoints[0][1]
    assert ckpt.verify_checkpoint(folder) is None
    assert ckpt.read_state(folder).world_size == 4
    per_rank = [ckpt.read_torch(folder / f"rank-{r}.pt") for r in range(4)]
    assert sorted(p.name for p in folder.glob("rank-*.pt")) == [f"rank-{r}.pt" for r in range(4)]
    # gradients were all-reduced across both machines: every rank holds the same weights
    assert all(p["params_checksum"] == per_rank[0]["params_checksum"] for p in per_rank[1:])
    # each global rank has its own noise generator (seeded seed + rank): the ranks are distinct
    states = [bytes(p["generator"].numpy()) for p in per_rank]
    assert len(set(states)) == 4
    final = load_file(str(tmp_path / "out" / "pytorch_lora_weights.safetensors"))
    assert final and all(t.shape[0] == 4 or t.shape[1] == 4 for t in final.values())  # lora_rank 4


def test_a_stop_on_one_node_checkpoints_every_node_and_both_exit_75(write_config, tmp_path):
    config = write_config("run", max_train_steps=10_000, checkpoint_step_interval=1)
    port = _free_port()
    logs = [tmp_path / "node0.log", tmp_path / "node1.log"]
    procs = [_start_node(config, n, port, logs[n]) for n in (0, 1)]
    out = tmp_path / "out"
    deadline = time.monotonic() + HANG_GUARD_SECONDS
    while not ckpt.list_checkpoints(out):  # training is under way once the first checkpoint lands
        assert all(p.poll() is None for p in procs), _tails(logs)
        assert time.monotonic() < deadline, _tails(logs)
        time.sleep(0.2)
    procs[1].send_signal(signal.SIGTERM)  # node 1 is preempted; node 0 never gets a signal
    assert _wait(procs, logs) == [ExitCode.INTERRUPTED, ExitCode.INTERRUPTED], _tails(logs)
    step, folder = ckpt.list_checkpoints(out)[-1]
    assert step < 10_000 and ckpt.verify_checkpoint(folder) is None
    assert sorted(p.name for p in folder.glob("rank-*.pt")) == [f"rank-{r}.pt" for r in range(4)]


def test_a_config_error_in_one_nodes_workers_exits_78_there(write_config, tmp_path):
    (tmp_path / "empty").mkdir()
    broken = tmp_path / "broken-backends.json"
    broken.write_text(json.dumps([{"id": "tiny", "type": "local", "instance_data_dir": str(tmp_path / "empty"),
                                   "caption_strategy": "textfile"}]))
    good, bad = write_config("good"), write_config("bad", data_backend_config=str(broken))
    port = _free_port()
    logs = [tmp_path / "node0.log", tmp_path / "node1.log"]
    procs = [_start_node(good, 0, port, logs[0]), _start_node(bad, 1, port, logs[1])]
    node0, node1 = _wait(procs, logs)
    assert node1 == ExitCode.CONFIG_ERROR, _tails(logs)
    assert node0 != ExitCode.SUCCESS, _tails(logs)  # its peers are gone: node 0 cannot finish
    assert "empty" in logs[1].read_text()  # the reason is in node 1's own log


def test_a_node_launcher_refuses_an_inconsistent_layout_with_78(write_config, tmp_path):
    config = write_config("odd", num_processes=3)
    log = tmp_path / "node.log"
    proc = _start_node(config, 0, _free_port(), log)
    assert _wait([proc], [log]) == [ExitCode.CONFIG_ERROR]
    text = log.read_text()
    assert "num_processes" in text and "NUM_NODES=2" in text


# ----- the pure parts -----------------------------------------------------------------------------

BASE = {"NUM_NODES": "3", "NODE_RANK": "2", "MASTER_ADDR": "trainer-0.nodes", "MASTER_PORT": "29500"}


def test_placement_gives_global_ranks_from_the_node_rank():
    placement = node_placement(6, BASE)
    assert placement is not None and placement.per_node == 2 and placement.world_size == 6
    envs = [rank_environment(r, 2, placement) for r in range(2)]
    assert [e["RANK"] for e in envs] == ["4", "5"] and [e["LOCAL_RANK"] for e in envs] == ["0", "1"]
    assert {e["WORLD_SIZE"] for e in envs} == {"6"} and {e["LOCAL_WORLD_SIZE"] for e in envs} == {"2"}
    assert {(e["MASTER_ADDR"], e["MASTER_PORT"]) for e in envs} == {("trainer-0.nodes", "29500")}
    from_index = node_placement(3, {**BASE, "NODE_RANK": "", "JOB_COMPLETION_INDEX": "1"})
    assert from_index is not None and from_index.global_rank(0) == 1


def test_single_machine_and_launched_ranks_keep_the_single_node_path():
    assert node_placement(4, {}) is None
    assert node_placement(4, {**BASE, "NUM_NODES": "1"}) is None
    assert node_placement(4, {**BASE, "WORLD_SIZE": "6", "RANK": "3"}) is None  # already one rank (torchrun)
    single = rank_environment(1, 2, None, port=1234)
    assert (single["RANK"], single["WORLD_SIZE"], single["MASTER_ADDR"]) == ("1", "2", "127.0.0.1")


@pytest.mark.parametrize(("changes", "total", "named"), [
    ({}, 4, "NUM_NODES=3"),
    ({"NPROC_PER_NODE": "4"}, 6, "NPROC_PER_NODE=4"),
    ({"NODE_RANK": "3"}, 6, "NODE_RANK"),
    ({"NODE_RANK": "first"}, 6, "NODE_RANK"),
    ({"NUM_NODES": "0"}, 6, "NUM_NODES"),
    ({"MASTER_ADDR": ""}, 6, "MASTER_ADDR"),
    ({"MASTER_PORT": "70000"}, 6, "MASTER_PORT"),
])
def test_bad_layouts_are_config_errors_naming_the_setting(changes, total, named):
    with pytest.raises(ConfigError) as info:
        node_placement(total, {**BASE, **changes})
    assert named in str(info.value)


def test_exit_codes_of_a_machine_combine_per_the_contract():
    assert combined_exit_code([0, 0]) == 0
    assert combined_exit_code([0, 75]) == 75
    assert combined_exit_code([75, 78, -15]) == 78  # a config error wins over peers torn down after it
    assert combined_exit_code([75, 1]) == 1
    assert combined_exit_code([0, -9]) == -9

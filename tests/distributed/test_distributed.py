"""The pieces of a distributed run that need no second process: who is who (torchrun's or SLURM's
variables), each rank's rows of a global batch, launch decisions and the config's refusals."""

import numpy as np
import pytest
import torch

from lmtrain.config import Strategy, TrainConfig, TrainerConfig, validate
from lmtrain.data.loader import TrainLoader
from lmtrain.distributed.launch import processes_to_start, resume_after_restart, shared_run_dir_overrides
from lmtrain.distributed.strategies import resolve
from lmtrain.distributed.world import World, first_host, slurm_environment, world_from_env
from lmtrain.errors import ConfigError

SRUN_TASK_3_OF_8 = {"SLURM_PROCID": "3", "SLURM_LOCALID": "1", "SLURM_NTASKS": "8", "SLURM_TASKS_PER_NODE": "2(x4)",
                    "SLURM_JOB_NODELIST": "gpu[017-019,023]", "SLURM_JOB_ID": "4242"}


def test_srun_tasks_get_torchrun_variables_from_slurm():
    env = slurm_environment(SRUN_TASK_3_OF_8)
    assert env == {"RANK": "3", "LOCAL_RANK": "1", "WORLD_SIZE": "8", "LOCAL_WORLD_SIZE": "2",
                   "MASTER_ADDR": "gpu017", "MASTER_PORT": str(20000 + 4242)}
    assert world_from_env(SRUN_TASK_3_OF_8) == World(rank=3, local_rank=1, size=8, local_size=2)
    assert World(rank=3, local_rank=1, size=8, local_size=2).nodes == 4


def test_torchrun_variables_win_over_slurm_and_one_task_is_no_distributed_run():
    assert slurm_environment({**SRUN_TASK_3_OF_8, "RANK": "0"}) == {}  # torchrun inside an srun step
    assert slurm_environment({**SRUN_TASK_3_OF_8, "SLURM_NTASKS": "1"}) == {}
    assert world_from_env({}) == World()
    assert world_from_env({"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1"}).local_size == 2


@pytest.mark.parametrize("nodelist, host", [("node7", "node7"), ("gpu[003-005,010]", "gpu003"),
                                            ("a[1,4],b2", "a1"), ("cpu-01,cpu-02", "cpu-01")])
def test_the_first_host_of_a_slurm_node_list_is_the_master(nodelist, host):
    assert first_host(nodelist) == host


def test_ranks_take_disjoint_rows_that_cover_the_global_batch():
    for size, batch in [(2, 8), (3, 9), (4, 8), (3, 10)]:
        rows = [World(rank=r, size=size).rows(batch) for r in range(size)]
        covered = [i for s in rows for i in range(batch)[s]]
        assert covered == list(range(batch))


def test_two_ranks_of_batch_4_see_what_one_rank_of_batch_8_sees_and_keep_a_global_position():
    shards = [np.arange(2000, dtype=np.uint16)]
    one = TrainLoader(shards, 16, 8, seed=3)
    ranks = [TrainLoader(shards, 16, 8, seed=3, rows=World(rank=r, size=2).rows(8)) for r in range(2)]
    whole, parts = iter(one), [iter(r) for r in ranks]
    for _ in range(20):  # past the end of an epoch (15 batches)
        x, y = next(whole)
        (x0, y0), (x1, y1) = (next(p) for p in parts)
        assert x0.shape == (4, 16)
        assert torch.equal(torch.cat([x0, x1]), x) and torch.equal(torch.cat([y0, y1]), y)
    assert ranks[0].state_dict() == ranks[1].state_dict() == one.state_dict() == {"epoch": 1, "batch": 5}


def test_strategy_auto_is_single_for_one_process_and_ddp_for_several():
    assert resolve(Strategy.auto, World()) == Strategy.single
    assert resolve(Strategy.auto, World(rank=1, size=2)) == Strategy.ddp
    assert resolve(Strategy.fsdp, World()) == Strategy.fsdp
    with pytest.raises(ConfigError, match="trainer.strategy=single cannot run on 2 processes"):
        resolve(Strategy.single, World(size=2))


@pytest.mark.parametrize("overrides, message", [
    ({"nproc_per_node": "two"}, "trainer.nproc_per_node=two must be a number > 0 or auto"),
    ({"nproc_per_node": "0"}, "trainer.nproc_per_node=0 must be"),
    ({"nproc_per_node": "2", "strategy": Strategy.single}, "trainer.strategy=single runs one process"),
    ({"max_restarts": -1}, "trainer.max_restarts=-1 must be >= 0"),
    ({"dist_timeout_s": 0.0}, "trainer.dist_timeout_s=0.0 must be > 0"),
])
def test_bad_distributed_settings_are_refused_naming_the_key(overrides, message):
    with pytest.raises(ConfigError, match=message):
        validate(TrainConfig(trainer=TrainerConfig(**overrides)))


def test_nproc_per_node_is_refused_inside_torchrun_and_beyond_the_visible_gpus(monkeypatch):
    assert processes_to_start("2", "cpu") == 2
    assert processes_to_start("auto", "cpu") == 1  # no GPU: one process
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert processes_to_start("auto", "auto") == 2
    with pytest.raises(ConfigError, match="trainer.nproc_per_node=4 but only 2 GPUs are visible"):
        processes_to_start("4", "cuda")
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    with pytest.raises(ConfigError, match="already one of 2 started by torchrun or srun"):
        processes_to_start("2", "cpu")


def test_a_missing_device_is_named_by_trainer_device_not_nproc_per_node(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ConfigError, match="trainer.device=cuda but CUDA is not available here"):
        processes_to_start("1", "cuda")


def test_a_user_error_on_one_worker_exits_2_whichever_rank_failed_first(monkeypatch, tmp_path):
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError, ProcessFailure

    from lmtrain.distributed import launch

    lost, said = ProcessFailure(0, 101, 1, str(tmp_path / "none")), ProcessFailure(1, 102, 2, str(tmp_path / "none"))
    lost.timestamp, said.timestamp = 100, 101  # rank 0 lost contact a moment before rank 1's error was noticed

    def fails(*_):
        def run(*args):
            raise ChildFailedError("worker", {0: lost, 1: said})
        return run

    monkeypatch.setattr("torch.distributed.launcher.api.elastic_launch", fails)
    with pytest.raises(SystemExit) as stop:
        launch.start_workers(lambda *a: None, TrainConfig(), tmp_path, 2)
    assert stop.value.code == 2


def test_a_requeued_slurm_job_resumes_without_being_told(monkeypatch, caplog):
    cfg = TrainConfig()
    resume_after_restart(cfg)
    assert cfg.trainer.resume is None
    monkeypatch.setenv("SLURM_RESTART_COUNT", "1")
    with caplog.at_level("INFO"):
        resume_after_restart(cfg)
    assert cfg.trainer.resume == "auto"
    assert "SLURM requeued this job (restart 1)" in caplog.text


def test_srun_ranks_share_one_run_dir_named_after_the_job_and_only_rank_0_writes_hydra_files(monkeypatch):
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE"):
        monkeypatch.delenv(key, raising=False)
    for key, value in SRUN_TASK_3_OF_8.items():
        monkeypatch.setenv(key, value)
    assert shared_run_dir_overrides(["trainer.max_steps=5"]) == [
        "hydra.output_subdir=null", "hydra.job_logging.root.handlers=[console]", "hydra.run.dir=outputs/slurm/4242"]
    assert shared_run_dir_overrides(["hydra.run.dir=mine"]) == [
        "hydra.output_subdir=null", "hydra.job_logging.root.handlers=[console]"]
    assert shared_run_dir_overrides(["--cfg", "job"]) == []  # nothing runs: nothing to share
    monkeypatch.setenv("SLURM_PROCID", "0")
    assert shared_run_dir_overrides([]) == ["hydra.run.dir=outputs/slurm/4242"]


def test_several_cpu_processes_are_warned_of_and_more_than_the_cores_refused(monkeypatch, caplog):
    monkeypatch.setattr("lmtrain.distributed.launch.cpu_count", lambda: 2)
    with caplog.at_level("WARNING"):
        assert processes_to_start("2", "cpu") == 2
    (warning,) = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert warning.startswith("trainer.nproc_per_node=2 without a GPU: 2 CPU processes share 2 cores (gloo)")
    assert "\n" not in warning
    with pytest.raises(ConfigError, match=r"^trainer.nproc_per_node=8 starts 8 CPU processes \(no GPU here\), more "
                                          r"than this machine's 2 cores: use at most 2, or a GPU$"):
        processes_to_start("8", "cpu")
    caplog.clear()
    assert processes_to_start("1", "cpu") == 1 and not caplog.records  # one process: nothing to say

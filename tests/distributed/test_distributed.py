"""The pieces of a distributed run that need no second process: who is who (torchrun's or SLURM's
variables), each rank's rows of a global batch, launch decisions and the config's refusals."""

import signal

import numpy as np
import pytest
import torch

from lmtrain.config import Strategy, TrainConfig, TrainerConfig, validate
from lmtrain.data.loader import TrainLoader
from lmtrain.distributed.launch import processes_to_start, resume_after_restart, shared_run_dir_overrides
from lmtrain.distributed.slurm import (
    parse_hostlist,
    rendezvous_port,
    started_without_srun,
    tasks_per_node,
    torchrun_variables,
)
from lmtrain.distributed.strategies import resolve
from lmtrain.distributed.world import World, world_from_env
from lmtrain.errors import ConfigError

# task 3 of an `srun` step of 8 tasks over 4 nodes
SRUN_TASK_3_OF_8 = {"SLURM_PROCID": "3", "SLURM_LOCALID": "1", "SLURM_NODEID": "1", "SLURM_NTASKS": "8",
                    "SLURM_STEP_NUM_TASKS": "8", "SLURM_TASKS_PER_NODE": "2(x4)", "SLURM_STEP_ID": "0",
                    "SLURM_JOB_NODELIST": "gpu[017-019,023]", "SLURM_JOB_ID": "4242", "SLURM_STEP_NUM_NODES": "4"}


def test_srun_tasks_get_torchrun_variables_from_slurm(monkeypatch):
    monkeypatch.setattr("shutil.which", lambda name: None)  # no scontrol here: lmtrain's own node-list parser
    env = torchrun_variables(SRUN_TASK_3_OF_8)
    assert env == {"RANK": "3", "LOCAL_RANK": "1", "WORLD_SIZE": "8", "LOCAL_WORLD_SIZE": "2",
                   "MASTER_ADDR": "gpu017", "MASTER_PORT": str(rendezvous_port("4242", "0"))}
    assert world_from_env(SRUN_TASK_3_OF_8) == World(rank=3, local_rank=1, size=8, local_size=2)
    assert World(rank=3, local_rank=1, size=8, local_size=2).nodes == 4


def test_torchrun_variables_win_over_slurm_and_one_task_is_no_distributed_run():
    assert torchrun_variables({**SRUN_TASK_3_OF_8, "RANK": "0"}) == {}  # torchrun inside an srun step
    assert torchrun_variables({**SRUN_TASK_3_OF_8, "SLURM_STEP_NUM_TASKS": "1"}) == {}  # srun -n1 in a big job
    assert world_from_env({}) == World()
    assert world_from_env({"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1"}).local_size == 2


@pytest.mark.parametrize("nodelist, hosts", [
    ("node7", ["node7"]),
    ("gpu[003-005,010],cpu1", ["gpu003", "gpu004", "gpu005", "gpu010", "cpu1"]),
    ("rack[1-2]-node[01-04]", [f"rack{r}-node0{n}" for r in (1, 2) for n in (1, 2, 3, 4)]),
    ("a[08-10],b[1,3]-x[7]", ["a08", "a09", "a10", "b1-x7", "b3-x7"]),  # a range keeps its lower bound's width
    ("cpu-01,cpu-02", ["cpu-01", "cpu-02"]),
])
def test_slurm_node_lists_expand_to_every_host_in_order(nodelist, hosts):
    assert parse_hostlist(nodelist) == hosts


@pytest.mark.parametrize("nodelist", ["gpu[1-3", "gpu[a-b]", "gpu[5-2]"])
def test_a_node_list_lmtrain_cannot_read_is_refused_by_name(nodelist):
    with pytest.raises(ConfigError, match="SLURM's node list"):
        parse_hostlist(nodelist)


def test_tasks_per_node_give_each_node_its_own_local_world_size(monkeypatch):
    monkeypatch.setattr("shutil.which", lambda name: None)
    assert tasks_per_node("4,2") == [4, 2] and tasks_per_node("4(x2),2") == [4, 4, 2]
    step = {**SRUN_TASK_3_OF_8, "SLURM_STEP_NUM_TASKS": "10", "SLURM_TASKS_PER_NODE": "4(x2),2"}
    assert [torchrun_variables({**step, "SLURM_NODEID": str(n)})["LOCAL_WORLD_SIZE"] for n in range(3)] == ["4", "4",
                                                                                                           "2"]


def test_the_rendezvous_port_is_the_jobs_and_steps_own_and_outside_the_ephemeral_range(tmp_path):
    ports = {rendezvous_port(str(job), str(step), (32768, 60999)) for job in range(4000, 4100) for step in range(3)}
    assert len(ports) > 290  # 300 job steps: next to no collisions (20000 + job % 20000 gave every step one port)
    assert all(10000 <= p < 32768 or 60999 < p <= 65535 for p in ports)
    assert rendezvous_port("4242", "0", (32768, 60999)) == rendezvous_port("4242", "0", (32768, 60999))
    assert rendezvous_port("4242", "0", (32768, 60999)) != rendezvous_port("4242", "1", (32768, 60999))
    narrow = {rendezvous_port(str(job), "0", (10000, 64000)) for job in range(50)}
    assert all(64000 < p <= 65535 for p in narrow)


def test_a_slurm_job_of_several_tasks_without_srun_is_refused_in_one_line(monkeypatch):
    batch_script = {"SLURM_PROCID": "0", "SLURM_NTASKS": "8", "SLURM_JOB_ID": "4242"}  # sbatch's own shell
    assert started_without_srun(batch_script) and not started_without_srun(SRUN_TASK_3_OF_8)
    assert world_from_env(batch_script) == World()  # one process: it never waits for ranks nobody started
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "SLURM_STEP_NUM_TASKS"):
        monkeypatch.delenv(key, raising=False)
    for key, value in batch_script.items():
        monkeypatch.setenv(key, value)
    with pytest.raises(ConfigError, match=r"SLURM_NTASKS=8\) but srun did not start this process"):
        processes_to_start("1", "cpu")
    assert processes_to_start("2", "cpu") == 2  # trainer.nproc_per_node in a batch script starts its own workers


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

    from lmtrain.distributed import workers

    lost, said = ProcessFailure(0, 101, 1, str(tmp_path / "none")), ProcessFailure(1, 102, 2, str(tmp_path / "none"))
    lost.timestamp, said.timestamp = 100, 101  # rank 0 lost contact a moment before rank 1's error was noticed

    def fails(*_):
        def run(*args):
            raise ChildFailedError("worker", {0: lost, 1: said})
        return run

    monkeypatch.setattr("torch.distributed.launcher.api.elastic_launch", fails)
    with pytest.raises(SystemExit) as stop:
        workers.start_workers(lambda *a: None, TrainConfig(), tmp_path, 2)
    assert stop.value.code == 2


def test_a_requeued_slurm_job_resumes_without_being_told(monkeypatch, caplog):
    cfg = TrainConfig()
    resume_after_restart(cfg, previous_status={"status": "stopped", "signal": "SIGTERM"})
    assert cfg.trainer.resume is None
    monkeypatch.setenv("SLURM_RESTART_COUNT", "1")
    with caplog.at_level("INFO"):
        resume_after_restart(cfg)
    assert cfg.trainer.resume == "auto"
    assert "SLURM requeued this job (restart 1)" in caplog.text


def test_a_job_submitit_requeued_or_workers_restarted_resume_without_being_told(caplog):
    requeued = TrainConfig()
    with caplog.at_level("INFO"):
        resume_after_restart(requeued, previous_status={"status": "requeued", "signal": "SIGUSR2"})
    assert requeued.trainer.resume == "auto" and "submitit requeued this job after SIGUSR2" in caplog.text
    restarted = TrainConfig()
    resume_after_restart(restarted, restart=1)
    assert restarted.trainer.resume == "auto"
    given = TrainConfig(trainer=TrainerConfig(resume="/some/step_000010"))
    resume_after_restart(given, restart=1)
    assert given.trainer.resume == "/some/step_000010"  # a checkpoint named on the command line stays


def test_srun_ranks_share_one_run_dir_named_after_the_job_and_only_rank_0_writes_hydra_files(monkeypatch):
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE"):
        monkeypatch.delenv(key, raising=False)
    for key, value in SRUN_TASK_3_OF_8.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setattr("shutil.which", lambda name: None)
    assert shared_run_dir_overrides(["trainer.max_steps=5"]) == [
        "hydra.output_subdir=null", "hydra.job_logging.root.handlers=[console]", "hydra.run.dir=outputs/slurm/4242"]
    assert shared_run_dir_overrides(["hydra.run.dir=mine"]) == [
        "hydra.output_subdir=null", "hydra.job_logging.root.handlers=[console]"]
    assert shared_run_dir_overrides(["--cfg", "job"]) == []  # nothing runs: nothing to share
    monkeypatch.setenv("SLURM_PROCID", "0")
    assert shared_run_dir_overrides([]) == ["hydra.run.dir=outputs/slurm/4242"]


@pytest.mark.parametrize("overrides, message", [
    ({"fsdp_param_dtype": "bf16"}, "trainer.fsdp_param_dtype=bf16 applies to trainer.strategy=fsdp or hsdp, not auto"),
    ({"fsdp_reduce_dtype": "fp32", "strategy": Strategy.ddp}, "trainer.fsdp_reduce_dtype=fp32 applies to"),
    ({"hsdp_shard_size": 2, "strategy": Strategy.fsdp}, "trainer.hsdp_shard_size=2 applies to trainer.strategy=hsdp"),
    ({"hsdp_shard_size": -1, "strategy": Strategy.hsdp}, "trainer.hsdp_shard_size=-1 must be >= 0"),
])
def test_sharding_settings_are_refused_naming_the_key(overrides, message):
    with pytest.raises(ConfigError, match=message):
        validate(TrainConfig(trainer=TrainerConfig(**overrides)))
    validate(TrainConfig(trainer=TrainerConfig(strategy=Strategy.hsdp, hsdp_shard_size=2, fsdp_param_dtype="bf16")))


def test_an_hsdp_shard_size_that_does_not_divide_the_ranks_is_refused():
    from lmtrain.distributed.strategies import hsdp_mesh

    with pytest.raises(ConfigError, match="trainer.hsdp_shard_size=3 must divide the run's 4 processes"):
        hsdp_mesh(World(size=4, local_size=4), torch.device("cpu"), 3)


def test_the_resume_command_keeps_torchruns_options_or_the_srun_step(monkeypatch):
    from lmtrain.distributed.launch import launcher_prefix

    for key in ("TORCHELASTIC_RUN_ID", "LMTRAIN_TORCHRUN_OPTIONS", "SLURM_STEP_NUM_TASKS", "SLURM_CPUS_PER_TASK"):
        monkeypatch.delenv(key, raising=False)
    assert launcher_prefix() == []  # one process, or trainer.nproc_per_node (its overrides keep the number)
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "abc")
    monkeypatch.setenv("LMTRAIN_TORCHRUN_OPTIONS", '["--nnodes=2", "--rdzv-endpoint=host0:29500"]')
    assert launcher_prefix() == ["torchrun", "--nnodes=2", "--rdzv-endpoint=host0:29500", "-m"]
    monkeypatch.delenv("TORCHELASTIC_RUN_ID")
    for key, value in {**SRUN_TASK_3_OF_8, "SLURM_CPUS_PER_TASK": "8"}.items():
        monkeypatch.setenv(key, value)
    assert launcher_prefix() == ["srun", "--nodes=4", "--ntasks=8", "--cpus-per-task=8"]


def test_the_launcher_blames_the_rank_that_failed_first_not_one_that_reported_the_loss():
    from torch.distributed.elastic.multiprocessing.errors import ProcessFailure

    from lmtrain.distributed.workers import _first_failure

    def failure(code: int, when: int) -> ProcessFailure:
        f = ProcessFailure(local_rank=0, pid=1, exitcode=code, error_file="<N/A>")
        f.timestamp = when
        return f

    # rank 0 noticed rank 1's loss (exit 4) before the launcher saw rank 1 killed
    assert _first_failure({0: failure(4, 10), 1: failure(-9, 11)})[0] == 1
    assert _first_failure({0: failure(2, 11), 1: failure(4, 10)})[0] == 0  # a user error on rank 0: exit 2
    assert _first_failure({0: failure(4, 10), 1: failure(4, 11)})[0] == 0


def test_a_failed_collective_is_told_apart_from_the_ranks_own_errors():
    from lmtrain.distributed.faults import communication_failure

    gloo = "[../third_party/gloo/gloo/transport/tcp/unbound_buffer.cc:78] Timed out waiting 5000ms for recv operation"
    assert communication_failure(RuntimeError(gloo))
    assert communication_failure(torch.distributed.DistStoreError("the store is gone"))
    assert not communication_failure(RuntimeError("mat1 and mat2 shapes cannot be multiplied"))
    assert not communication_failure(ValueError("Timed out"))


def test_ranks_that_disagree_are_named_key_by_key():
    from lmtrain.distributed.agreement import differences, ranks_text

    assert [ranks_text(r) for r in ([3], [0, 1, 2, 3], [0, 2, 5])] == ["rank 3", "ranks 0-3", "ranks 0, 2, 5"]
    everyone = [{"optimizer.lr": 0.002, "trainer.seed": 1}] * 3 + [{"optimizer.lr": 0.001, "trainer.seed": 1}]
    assert differences(everyone) == ["optimizer.lr is 0.002 on ranks 0-2 but 0.001 on rank 3"]
    assert differences([{"a": 1}, {"a": 1}]) == []


def test_only_submitits_own_preemption_handler_is_chained():
    from lmtrain.distributed.requeue import requeue, submitit_handler

    previous = signal.signal(signal.SIGUSR2, lambda signum, frame: None)
    try:
        assert submitit_handler(signal.SIGUSR2) is None
        assert requeue(signal.SIGUSR2, lambda: None) == "this is no submitit job"
    finally:
        signal.signal(signal.SIGUSR2, previous)


def test_the_fsdp_mixed_precision_policy_follows_the_config():
    from lmtrain.distributed.strategies import Sharding, mixed_precision

    cpu, cuda = torch.device("cpu"), torch.device("cuda", 0)
    auto = Sharding()
    assert (mixed_precision(auto, True, cuda).param_dtype, mixed_precision(auto, True, cuda).reduce_dtype) == (
        torch.bfloat16, torch.float32)  # bf16 compute, fp32 gradient reduction: as before these settings
    assert mixed_precision(auto, True, cpu).param_dtype is None  # on the CPU autocast chooses the dtypes
    chosen = mixed_precision(Sharding(param_dtype="bf16", reduce_dtype="bf16"), False, cpu)
    assert (chosen.param_dtype, chosen.reduce_dtype) == (torch.bfloat16, torch.bfloat16)
    assert mixed_precision(Sharding(param_dtype="fp16"), False, cpu).reduce_dtype == torch.float32


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

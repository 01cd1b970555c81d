"""A model imported from a transformers folder trains on two gloo processes, under DDP and FSDP2, from the same
weights as on one: with the same global batch (1 rank x 8 or 2 ranks x 4) the losses match step for step."""

import pytest

from conftest import FAST_TRAIN, ONE_THREAD, QUIET_TRAIN, run_cli, step_losses

pytestmark = pytest.mark.slow

COMMON = [*(o for o in FAST_TRAIN if not o.startswith("trainer.batch_size=")), *QUIET_TRAIN, "trainer.max_steps=3",
          "model.block_size=32", "trainer.dist_timeout_s=30"]


def test_an_imported_model_trains_alike_on_one_rank_and_under_ddp_and_fsdp(hf_folders, corpus, tmp_path):
    data = ["data=text_files", f"data.train_files=[{corpus['jsonl']}]", "data.text_column=content",
            f"model.init_from={hf_folders['llama']}"]
    runs = {"one": ["trainer.batch_size=8"],
            "ddp": ["trainer.batch_size=4", "trainer.nproc_per_node=2", "trainer.strategy=ddp"],
            "fsdp": ["trainer.batch_size=4", "trainer.nproc_per_node=2", "trainer.strategy=fsdp"]}
    for name, settings in runs.items():
        result = run_cli("train", *COMMON, *data, *settings, f"hydra.run.dir={name}", cwd=tmp_path, env=ONE_THREAD)
        assert result.returncode == 0, result.stdout + result.stderr
    reference = step_losses(tmp_path / "one")
    assert sorted(reference) == [1, 2, 3]
    for name in ("ddp", "fsdp"):
        got = step_losses(tmp_path / name)
        assert got == pytest.approx(reference, abs=1e-4), (name, got, reference)

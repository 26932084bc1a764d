"""The DeepSpeed presets (``training/deepspeed=zero3 | zero3_offload``): what they generate, that
DeepSpeed accepts it (2 CPU ranks train with it and take the same steps as ZeRO-0), and the
combinations pre-flight refuses."""

from __future__ import annotations

import pytest

from tests.conftest import compose
from tests.distributed.harness import assert_same_training, run_ranks, run_reference

SFT = {"method": "sft", "n_rows": 16, "overrides": ["training.micro_batch_size=2", "training.max_steps=3"]}


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("presets")
    return tmp, run_reference(SFT, tmp)


@pytest.mark.parametrize("preset", ["zero3", "zero3_offload"])
def test_preset_generates_a_zero3_config(preset):
    from cwac.trainer import deepspeed_config

    tc = compose("model=tiny", f"training/deepspeed={preset}").training
    ds = deepspeed_config(tc)
    assert tc.zero_stage == 3 and ds["zero_optimization"]["stage"] == 3
    offload = ds["zero_optimization"].get("offload_optimizer")
    assert (offload == {"device": "cpu", "pin_memory": True}) == (preset == "zero3_offload")
    assert (ds.get("zero_force_ds_cpu_optimizer") is False) == (preset == "zero3_offload")
    # the default is no preset: the generated config alone
    assert deepspeed_config(compose("model=tiny").training)["zero_optimization"] == {"stage": 0}
    # the LoRA training config takes the presets too
    assert compose("model=tiny", "training=lora", f"training/deepspeed={preset}").training.zero_stage == 3


@pytest.mark.distributed
@pytest.mark.parametrize("preset", ["zero3", "zero3_offload"])
def test_preset_trains_two_ranks_like_zero0(reference, preset):
    tmp, ref = reference
    got = run_ranks({**SFT, "overrides": [*SFT["overrides"], f"training/deepspeed={preset}"]}, tmp, tag=f"_{preset}")
    assert got.ranks[0]["zero3_partitioned"]
    assert_same_training(got, ref)
    print(f"{preset}: reference {ref.seconds:.1f} s, 2 ranks {got.seconds:.1f} s")


@pytest.mark.parametrize("overrides, match", [
    (["++training.deepspeed_extra.zero_optimization.offload_optimizer.device=cpu",
      "++training.deepspeed_extra.zero_force_ds_cpu_optimizer=false"], "needs training.zero_stage>=1"),
    (["training/deepspeed=zero3_offload", "++training.deepspeed_extra.zero_force_ds_cpu_optimizer=true"],
     "zero_force_ds_cpu_optimizer=false"),
    (["training/deepspeed=zero3", "training.zero_stage=2",
      "++training.deepspeed_extra.zero_optimization.offload_param.device=cpu",
      "++training.deepspeed_extra.zero_force_ds_cpu_optimizer=false"], "offload_param.device='cpu' needs training.zero_stage>=3"),
    (["method=cwac", "method.weight.mode=update", "training.precision=bf16", "training.weight_decay=0.1"],
     "method.weight.mode='update'.*zero_stage=1"),
])
def test_preflight_refuses_what_cannot_run(tiny_cfg, overrides, match):
    from cwac.experiment.preflight import ConfigError, check_settings

    with pytest.raises(ConfigError, match=match):
        check_settings(tiny_cfg(*overrides))


@pytest.mark.parametrize("overrides", [["training/deepspeed=zero3_offload"],
                                       ["method=cwac", "method.weight.mode=update", "training/deepspeed=zero3"],
                                       ["method=cwac", "method.weight.mode=grad", "training/deepspeed=zero3"]])
def test_preflight_accepts_the_presets_and_cwac_under_zero3(tiny_cfg, overrides):
    from cwac.experiment.preflight import check_settings

    check_settings(tiny_cfg(*overrides))


def test_slurm_tasks_become_ranks():
    """``hydra/launcher=slurm`` with one task per GPU: each task's rank, world and rendezvous come from
    SLURM's variables; one task, or a launcher that set RANK already, changes nothing."""
    from cwac.trainer import slurm_rendezvous

    env = {"SLURM_NTASKS": "16", "SLURM_PROCID": "9", "SLURM_LOCALID": "1", "SLURM_JOB_NODELIST": "gpu[003-004,007]",
           "SLURM_JOB_ID": "12345"}
    assert slurm_rendezvous(env) == {"RANK": "9", "WORLD_SIZE": "16", "LOCAL_RANK": "1", "MASTER_ADDR": "gpu003",
                                     "MASTER_PORT": "32345"}
    assert slurm_rendezvous({**env, "SLURM_JOB_NODELIST": "node7,node8"})["MASTER_ADDR"] == "node7"
    assert slurm_rendezvous({**env, "SLURM_NTASKS": "1"}) == {}
    assert slurm_rendezvous({**env, "RANK": "0"}) == {}

"""The finetune stage end to end on Ray Train (CPU workers, tiny SD, built-in digits).

Real runs share the work: `ti+db` on two DDP workers with an injected worker failure (local; loss, stock
loading, idempotence, resume mid-epoch to the bytes of an unbroken run whose epochs are streamed), `ti` on
one worker with a stalled store (resume to an uninterrupted run's bytes; the artifact holds embeddings only),
and `db` written to the SeaweedFS S3 server (S3 round trip). One worker where DDP is not the point: each
worker process imports torch, diffusers and peft (~20 s of CPU on this box).
"""
from __future__ import annotations

import logging
import os
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from engine.config import ConfigError, ExperimentConfig, load_config
from engine.data.images import encode_png
from engine.data.epochs import balanced_copies, locate
from engine.finetune import FinetuneError, augment, epoch_batches, run
from engine.models import ModelError, load_img2img_pipeline, resolve_model
from engine.models.adapters import load_adapter, read_adapter_info
from engine.storage import Storage, StorageError, join
from engine.testing.background import Background, wait_until
from engine.testing.s3server import S3_ACCESS_KEY, S3_SECRET_KEY, stalling_store_overrides


def _config(tmp: Path, cache: Path, name: str, *overrides: str) -> ExperimentConfig:
    return load_config(None, [
        f"run.output={tmp}", f"run.name={name}", f"model.cache_dir={cache}", "model.resolution=32",
        "dataset.subset.kind=few_shot", "dataset.subset.shots=8",
        "finetune.resolution=32", "finetune.batch_size=8", "finetune.num_workers=1",
        "finetune.cpus_per_worker=0.5", "finetune.learning_rate=1e-2", "finetune.log_every=2",
        *overrides,
    ])


def _base(config: ExperimentConfig) -> str:
    from engine.data import load_dataset

    ds = load_dataset(config)
    return resolve_model("tiny", config.model.cache_dir, kind="sd", resolution=32,
                         extra_words=[*ds.class_names, ds.metaclass])


def _sample(pipe, prompt: str) -> np.ndarray:
    image = torch.linspace(0, 1, 3 * 32 * 32).reshape(1, 3, 32, 32)
    return pipe(prompt=prompt, image=image, strength=0.7, num_inference_steps=5, guidance_scale=7.5,
                generator=torch.Generator().manual_seed(7), output_type="np").images[0]


TIDB = ["finetune.steps=12", "finetune.checkpoint_every=6", "finetune.num_workers=2"]  # DDP


@pytest.fixture(scope="module")
def tidb(ray_session, tmp_path_factory, tiny_cache):
    """One trained ti+db artifact shared by the tests below. Its last worker fails once before step 8, and
    Ray Train restarts the group from the step-6 checkpoint (mid-epoch); the unbroken
    run of the same config in test_same_config_writes_byte_identical_adapter_* must give the same bytes."""
    tmp = tmp_path_factory.mktemp("ft-tidb")
    config = _config(tmp, tiny_cache, "tidb", *TIDB, "finetune.fail_at_step=8", "finetune.max_failures=1")
    summary = run(config)
    return config, summary


def test_tidb_trains_and_writes_the_artifact(tidb):
    config, summary = tidb
    adapter = join(config.run.uri, "adapter")
    assert summary["artifact"] == adapter and not summary["reused"] and summary["steps"] == 12
    assert (Path(summary["checkpoints"]) / "injected-failure-8").is_file()     # the failure did happen
    assert summary["resumed_from_step"] == 6                                   # and training went on from 6
    losses = [loss for _, loss in summary["loss_history"]]
    assert [s for s, _ in summary["loss_history"]] == [2, 4, 6, 8, 10, 12]
    assert np.mean(losses[-2:]) < np.mean(losses[:2]) - 0.05, losses  # loss goes down
    info = read_adapter_info(adapter)
    assert info.strategy == "ti+db" and info.steps == 12 and info.final_loss == pytest.approx(losses[-1])
    assert info.tokens[3] == "<three-3>" and info.prompts[3] == "photo of a <three-3> digit"
    assert info.lora_rank == 10 and info.lora_file and len(info.embedding_files) == 10
    assert {"torch", "diffusers", "ray", "peft", "transformers"} <= set(info.versions)
    # the base folder's noise schedule, latent scale and prompt length are recorded with the adapter
    assert info.model_settings["noise_schedule"]["num_train_timesteps"] == 1000
    assert info.model_settings["prompt_max_length"] == 77 and info.model_settings["vae_scaling_factor"] > 0
    files = {p.relative_to(adapter).as_posix() for p in Path(adapter).rglob("*") if p.is_file()}
    assert files == {"adapter.json", "pytorch_lora_weights.safetensors",
                     *(f"embeddings/class-{i:04d}/learned_embeds.safetensors" for i in range(10))}


def test_artifact_loads_into_stock_diffusers_like_the_engine(tidb):
    from diffusers import StableDiffusionImg2ImgPipeline

    config, summary = tidb
    base, adapter = _base(config), summary["artifact"]
    info = read_adapter_info(adapter)
    stock = StableDiffusionImg2ImgPipeline.from_pretrained(base, safety_checker=None, requires_safety_checker=False)
    stock.set_progress_bar_config(disable=True)
    before = _sample(stock, info.prompts[3])
    vocab = stock.text_encoder.get_input_embeddings().weight.detach().clone()
    unet_before = {k: v.clone() for k, v in stock.unet.state_dict().items()}
    stock.load_lora_weights(adapter, weight_name=info.lora_file)
    stock.load_textual_inversion([os.path.join(adapter, f) for f in info.embedding_files], token=info.tokens)
    expected = _sample(stock, info.prompts[3])

    pipe = load_img2img_pipeline(base, device="cpu")
    loaded = load_adapter(pipe, adapter)
    assert loaded.prompts == info.prompts
    np.testing.assert_array_equal(_sample(pipe, loaded.prompts[3]), expected)
    assert np.abs(expected - before).max() > 1e-3  # and unlike the base model's output

    # ti+db changed both parts; every original embedding row is untouched
    matrix = pipe.text_encoder.get_input_embeddings().weight.detach()
    assert torch.equal(matrix[: vocab.shape[0]], vocab)
    metaclass_row = vocab[pipe.tokenizer("digit", add_special_tokens=False)["input_ids"][0]]
    ids = pipe.tokenizer.convert_tokens_to_ids(info.tokens)
    assert all(not torch.allclose(matrix[i], metaclass_row) for i in ids)
    lora_up = [v for k, v in pipe.unet.state_dict().items() if "lora_B" in k]
    assert lora_up and all(v.abs().max() > 0 for v in lora_up)
    assert all(torch.equal(unet_before[k], v) for k, v in pipe.unet.state_dict().items() if k in unet_before)


def test_rerun_after_finishing_is_a_noop(tidb, caplog):
    config, summary = tidb
    checkpoints = sorted(os.listdir(summary["checkpoints"]))
    caplog.set_level(logging.INFO, logger="engine.finetune")
    again = run(config)
    assert again["reused"] and again["artifact"] == summary["artifact"] and again["steps"] == 12
    assert again["config_hash"] == summary["config_hash"]
    assert sorted(os.listdir(summary["checkpoints"])) == checkpoints
    assert "already done" in caplog.text


def _weight_files(adapter: str) -> dict[str, bytes]:
    return {p.relative_to(adapter).as_posix(): p.read_bytes() for p in sorted(Path(adapter).rglob("*.safetensors"))}


def test_same_config_writes_byte_identical_adapter_streamed_or_inline(tidb, tmp_path, tiny_cache):
    """Data order, crops, flips, noise, timesteps and the LoRA init all come from the config, and a resume
    continues mid-epoch exactly: an unbroken fine-tune of the same config (its epochs decoded by a Ray Data
    stream this time, not in the worker) writes the bytes of the run that failed and resumed."""
    config, summary = tidb
    again = run(_config(tmp_path, tiny_cache, "tidb", *TIDB, "finetune.inline_rows=0", "finetune.rows_per_task=8"))
    assert not again["reused"] and again["config_hash"] == summary["config_hash"]
    first, second = _weight_files(summary["artifact"]), _weight_files(again["artifact"])
    assert len(first) == 11 and first == second
    assert again["loss_history"] == summary["loss_history"]


@pytest.fixture(scope="module")
def ti_unbroken(ray_session, tmp_path_factory, tiny_cache):
    """An uninterrupted `ti` run (6 steps, checkpoints every 2): what resumed runs must equal, byte for byte."""
    return run(_config(tmp_path_factory.mktemp("ft-unbroken"), tiny_cache, "unbroken", "finetune.strategy=ti",
                       "finetune.steps=6", "finetune.checkpoint_every=2"))


def _stall_config(tmp: Path, cache: Path, s3_server, bucket: str, name: str, *overrides: str,
                  max_stall_s: float = 4) -> ExperimentConfig:
    return _config(tmp, cache, name, f"run.output={bucket}/runs", "finetune.strategy=ti", "finetune.steps=6",
                   "finetune.checkpoint_every=2", *stalling_store_overrides(s3_server["endpoint_url"], max_stall_s),
                   *overrides)


@pytest.mark.s3
def test_checkpoint_writes_fail_within_bound_on_a_stalled_store_and_a_rerun_resumes(
        ti_unbroken, tmp_path, tiny_cache, s3_server, s3_bucket, caplog):
    """SeaweedFS paused (SIGSTOP) while Ray Train writes checkpoints there, for longer than the bound: the run
    fails with the checkpoint URI named within it (it used to wait for ever), and a rerun after the store is
    back resumes from the last checkpoint to the same bytes as an uninterrupted local run."""
    long = _stall_config(tmp_path, tiny_cache, s3_server, s3_bucket, "long", "finetune.max_failures=0")
    storage = Storage.from_config(long)
    job = Background(lambda: run(long))
    # Train's own record of the run names a checkpoint: a rerun can resume from it
    root = f"{s3_bucket}/runs/long/finetune-ray"
    wait_until(lambda: any(f.endswith("checkpoint_manager_snapshot.json") and "checkpoint_" in storage.read_text(f)
                           for f in (storage.walk_files(root) if storage.exists(root) else [])),
               job, "a checkpoint recorded by Ray Train")
    with s3_server["server"].stalled():
        paused_at = time.monotonic()
        with pytest.raises(StorageError) as err:
            job.join(120)
        took = job.finished_at - paused_at
    assert f"{s3_bucket}/runs/long/finetune-ray" in str(err.value), str(err.value)
    assert took < 2 * 4 + 30, f"failed {took:.1f} s after the store stalled"
    # the rerun must succeed: a bound a loaded box always meets (storage bounds are not in the run key)
    caplog.set_level(logging.INFO, logger="engine.finetune")
    again = run(_stall_config(tmp_path, tiny_cache, s3_server, s3_bucket, "long", max_stall_s=60))
    assert again["resumed_from_step"] >= 2 and [s for s, _ in again["loss_history"]] == [2, 4, 6]
    assert f"resumed from checkpoint at step {again['resumed_from_step']}" in caplog.text
    assert "adapter artifact at " + again["artifact"] in caplog.text
    assert ti_unbroken["resumed_from_step"] == 0
    assert _weight_files_at(storage, again["artifact"]) == _weight_files(ti_unbroken["artifact"])
    # ti trains no LoRA: the artifact has embeddings only, and the UNet of a loaded pipeline is the base's
    info = read_adapter_info(again["artifact"], storage)
    assert info.lora_file is None and len(info.embedding_files) == 10
    base = _base(long)
    plain, pipe = load_img2img_pipeline(base, device="cpu"), load_img2img_pipeline(base, device="cpu")
    load_adapter(pipe, again["artifact"], storage)
    assert all(torch.equal(v, plain.unet.state_dict()[k]) for k, v in pipe.unet.state_dict().items())
    vocab = plain.text_encoder.get_input_embeddings().weight
    assert torch.equal(pipe.text_encoder.get_input_embeddings().weight[: vocab.shape[0]], vocab)


def _weight_files_at(storage: Storage, adapter: str) -> dict[str, bytes]:
    return {f[len(adapter) + 1:]: storage.read_bytes(f) for f in storage.walk_files(adapter)
            if f.endswith(".safetensors")}


@pytest.mark.s3
def test_db_artifact_on_s3(ray_session, s3_server, s3_bucket, tiny_cache):
    options = {"key": S3_ACCESS_KEY, "secret": S3_SECRET_KEY, "client_kwargs": {"endpoint_url": s3_server["endpoint_url"]}}
    config = _config(Path("/unused"), tiny_cache, "s3db", f"run.output={s3_bucket}/runs", "finetune.strategy=db",
                     "finetune.steps=4", "finetune.checkpoint_every=4")
    config.storage.storage_options = options
    summary = run(config)
    storage = Storage.from_config(config)
    adapter = f"{s3_bucket}/runs/s3db/adapter"
    assert summary["artifact"] == adapter and summary["steps"] == 4
    assert storage.exists(join(adapter, "pytorch_lora_weights.safetensors"))
    assert any(f.endswith("/train_state.pt") for f in storage.walk_files(summary["checkpoints"]))
    info = read_adapter_info(adapter, storage)
    assert info.strategy == "db" and info.tokens == [] and info.embedding_files == []
    assert info.prompts[1] == "photo of a one digit"
    base = _base(config)
    plain, pipe = load_img2img_pipeline(base, device="cpu"), load_img2img_pipeline(base, device="cpu")
    load_adapter(pipe, adapter, storage)
    # db leaves every embedding (and the vocabulary) as it was; the UNet gained trained LoRA layers
    assert torch.equal(pipe.text_encoder.get_input_embeddings().weight,
                       plain.text_encoder.get_input_embeddings().weight)
    assert len(pipe.tokenizer) == len(plain.tokenizer)
    assert np.abs(_sample(pipe, info.prompts[1]) - _sample(plain, info.prompts[1])).max() > 1e-3


# --- bad input: clear errors before Ray does any work ----------------------------------------------

def test_config_rejects_bad_strategy_rank_and_batch():
    with pytest.raises(ConfigError, match="finetune.strategy"):
        load_config(None, ["finetune.strategy=dreambooth"])
    for rank in (0, -3):
        with pytest.raises(ConfigError, match="finetune.lora_rank"):
            load_config(None, [f"finetune.lora_rank={rank}"])
    with pytest.raises(ConfigError, match="multiple of num_workers"):
        load_config(None, ["finetune.batch_size=6", "finetune.num_workers=4"])


def test_one_class_dataset_fails_before_ray(tmp_path, tiny_cache):
    root = tmp_path / "data" / "only"
    root.mkdir(parents=True)
    for i in range(12):
        (root / f"{i}.png").write_bytes(encode_png(np.full((16, 16, 3), i * 20, dtype=np.uint8)))
    config = _config(tmp_path, tiny_cache, "one", "dataset.source=imagefolder", f"dataset.uri={tmp_path / 'data'}",
                     "dataset.metaclass=thing", "dataset.subset.kind=full")
    with pytest.raises(FinetuneError, match="at least 2 classes"):
        run(config)
    assert not (tmp_path / "one" / "finetune-ray").exists()


def test_missing_base_model_fails_before_ray(tmp_path, tiny_cache):
    config = _config(tmp_path, tiny_cache, "nobase", f"model.base={tmp_path / 'no' / 'such-model'}")
    with pytest.raises(ModelError, match="base model folder not found"):
        run(config)
    assert not (tmp_path / "nobase" / "finetune-ray").exists()


def test_dataset_smaller_than_batch_fails_before_ray(tmp_path, tiny_cache):
    config = _config(tmp_path, tiny_cache, "small", "dataset.subset.shots=1", "finetune.batch_size=16")
    with pytest.raises(FinetuneError, match="fewer than finetune.batch_size=16"):
        run(config)


# --- data pieces -------------------------------------------------------------------------------------

def test_class_balanced_epochs_weight_rows_inverse_to_class_size():
    labels = np.array([0] * 90 + [1] * 9 + [2] * 1)
    counts = np.zeros(3)
    for epoch in range(200):
        copies = balanced_copies(labels, 3, seed=0, epoch=epoch)
        counts += np.bincount(np.repeat(labels, copies), minlength=3)
    assert counts / counts.sum() == pytest.approx([1 / 3] * 3, abs=0.02)
    # drawn from (seed, epoch): the same epoch twice gives the same copies, another epoch others
    assert np.array_equal(balanced_copies(labels, 3, 0, 5), balanced_copies(labels, 3, 0, 5))
    assert not np.array_equal(balanced_copies(labels, 3, 0, 5), balanced_copies(labels, 3, 0, 6))


def test_augment_crops_flips_and_keeps_uint8_from_its_seed():
    img = np.zeros((20, 40, 3), dtype=np.uint8)
    img[:, :20] = 255  # left half white
    images = [encode_png(img)] * 16
    out = augment(images, 16, True, seed=3)
    assert out.shape == (16, 3, 16, 16) and out.dtype == np.uint8
    # a 16x32 resize cropped at random offsets: crops differ across the batch
    assert len({out[i].tobytes() for i in range(16)}) > 1
    assert np.array_equal(augment(images, 16, True, seed=3), out)
    assert not np.array_equal(augment(images, 16, True, seed=4), out)


def test_epoch_batches_are_a_function_of_seed_and_epoch_and_resume_exactly():
    labels = np.arange(23) % 3
    cfg = {"labels": labels, "num_classes": 3, "class_balanced": False, "seed": 7, "worker_batch": 4}
    one = epoch_batches(cfg, 2, rank=0, world=2)
    assert np.array_equal(one.rows, epoch_batches(cfg, 2, 0, 2).rows)
    assert not np.array_equal(one.rows, epoch_batches(cfg, 3, 0, 2).rows)
    other = epoch_batches(cfg, 2, rank=1, world=2)
    # 23 rows, 2 workers: 11 each, 2 full batches of 4 each; no row twice within the epoch
    assert one.rows.shape == other.rows.shape == (2, 4)
    assert len(set(one.rows.ravel()) | set(other.rows.ravel())) == 16
    assert locate(0, lambda e: 2) == (0, 0) and locate(5, lambda e: 2) == (2, 1)

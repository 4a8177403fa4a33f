"""Training under torchrun (PyTorch DDP, gloo on the CPU) and photos streamed from disk.

The end-to-end tests start real ranks: ``imgclf train --nproc-per-node 2`` and
``python -m torch.distributed.run --standalone --nproc-per-node 2 -m imgclf
train`` (what ``torchrun`` runs). A small timm network with random weights
keeps them quick; tests/distributed_spy records what each rank did.
"""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")

from imgclf import ImageClassificationTrainer, load_images_from_directory, load_model  # noqa: E402
from imgclf.data.imaging import Preprocessing  # noqa: E402
from imgclf.data.streaming import StreamedPictures, decode_picture, memory_budget_bytes, training_pictures  # noqa: E402
from imgclf.errors import OptionError  # noqa: E402
from imgclf.training.finetune import decode_for_training  # noqa: E402

from .conftest import FLOWERS, small_flower_folder  # noqa: E402

SPY = Path(__file__).parent / "distributed_spy"
SRC = Path(__file__).parents[1] / "src"
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]


@pytest.fixture(scope="module")
def small_net(tmp_path_factory) -> Path:
    """timm's ``test_efficientnet`` (a few thousand parameters) with random weights, as a file."""
    import timm
    from safetensors.torch import save_file

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("weights") / "test_efficientnet.safetensors"
    save_file(timm.create_model("test_efficientnet", num_classes=1000).state_dict(), str(path))
    return path


def _env(spy_dir: Path) -> dict:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(SPY), str(SRC)]), IMGCLF_TEST_SPY_DIR=str(spy_dir),
               OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")  # fmt: skip
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(name, None)
    return env


def _load(path: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(path))


def _train_args(folder: Path, weights: Path, out: Path, ws: Path, fine_tune_epochs: int) -> list[str]:
    return ["train", str(folder / "train"), "--validation-folder", str(folder / "val"), "--arch", "test_efficientnet", "--weights", str(weights), "--epochs", "3",
            "--batch-size", "4", "--fine-tune", "--fine-tune-epochs", str(fine_tune_epochs), "--device", "cpu",
            "--workspace", str(ws), "--out", str(out / "model.imgclf"), "--metrics-json", str(out / "metrics.json"),
            "-q"]  # fmt: skip


def _checkpoint_phase(ws: Path) -> tuple[str, int] | None:
    from safetensors import safe_open

    for path in (ws / "checkpoints").glob("*.safetensors"):
        try:
            with safe_open(str(path), framework="pt") as f:
                meta = json.loads(f.metadata()["imgclf_checkpoint"])
            return meta["phase"], meta["epoch"]
        except Exception:
            continue
    return None


@pytest.fixture(scope="module")
def interrupted_then_resumed(tmp_path_factory, small_net) -> dict:
    """``imgclf train --nproc-per-node 2`` stopped by Ctrl-C after fine-tune epoch 1, then the
    same command with --resume under torchrun (``python -m torch.distributed.run``)."""
    tmp = tmp_path_factory.mktemp("ddp")
    folder = tmp / "data"
    small_flower_folder(folder / "train", per_class=5)  # 15 photos: 12 train (6 a rank), 3 held out
    for label in ("daisy", "dandelion", "tulips"):  # and 3 others to validate on (2 on rank 0, 1 on rank 1)
        (folder / "val" / label).mkdir(parents=True)
        shutil.copy(sorted((FLOWERS / label).glob("*.jpg"))[5], folder / "val" / label)
    spy, out, ws = tmp / "spy", tmp / "out", tmp / "ws"
    spy.mkdir()
    out.mkdir()
    args = _train_args(folder, small_net, out, ws, 3)
    launcher = subprocess.Popen([sys.executable, "-m", "imgclf", *args, "--nproc-per-node", "2"],
                                env=dict(_env(spy), IMGCLF_TEST_PAUSE_AFTER="1"), stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True, start_new_session=True)  # fmt: skip
    deadline = time.time() + 180
    while time.time() < deadline and launcher.poll() is None and not (spy / "paused").exists():
        time.sleep(0.05)
    os.killpg(launcher.pid, signal.SIGINT)  # what Ctrl-C in a terminal does
    stdout, stderr = launcher.communicate(timeout=120)
    first = {"code": launcher.returncode, "stdout": stdout, "stderr": stderr, "written": sorted(out.iterdir()),
             "checkpoint": _checkpoint_phase(ws),
             "ranks": [json.loads((spy / f"rank{r}.json").read_text()) for r in (0, 1)],
             "heads": [_load(spy / f"rank{r}-head.safetensors") for r in (0, 1)]}  # fmt: skip
    resumed = subprocess.run([*TORCHRUN, "-m", "imgclf", *args, "--resume"], capture_output=True, text=True,
                             timeout=240, env=_env(spy))  # fmt: skip
    return {"folder": folder, "out": out, "ws": ws, "spy": spy, "first": first, "resumed": resumed}


@pytest.mark.slow
def test_nproc_per_node_ranks_share_the_work_and_ctrl_c_stops_all_with_one_line(
    interrupted_then_resumed, small_net, tmp_path
):
    """``imgclf train --nproc-per-node 2``: the ranks extract and fine-tune on disjoint shards, the
    head equals a one-process run's; Ctrl-C stops every rank with one line, rank 0's checkpoint kept."""
    run = interrupted_then_resumed
    first = run["first"]
    assert first["code"] == 130, first["stderr"]
    lines = [line for line in first["stderr"].splitlines() if line.strip()]
    assert len(lines) == 1 and "interrupted" in lines[0] and "--resume" in lines[0], first["stderr"]
    assert first["stdout"].count("Found 15 images") == 1 and "fine-tune epoch   1" in first["stdout"]  # rank 0
    assert first["written"] == [] and first["checkpoint"] == ("fine-tune", 1)

    ranks = first["ranks"]
    extracted = [set(r["extracted"]) for r in ranks]
    assert not extracted[0] & extracted[1]  # each photo through the backbone once, on one rank
    assert extracted[0] | extracted[1] == {str(p) for p in run["folder"].rglob("*.jpg")}  # train and validation
    e0, e1 = ranks[0]["epochs"][0], ranks[1]["epochs"][0]
    assert e0["of"] == 12 and len(e0["indices"]) == len(e1["indices"]) == 6
    assert sorted(e0["indices"] + e1["indices"]) == list(range(12))  # disjoint shards that cover the set

    # The head phase on gathered features is the one-process result (features come from the cache).
    trainer = ImageClassificationTrainer("test_efficientnet", weights=small_net, epochs=3, batch_size=4,
                                         device="cpu", workspace=run["ws"], progress=False)  # fmt: skip
    single = trainer.fit_and_hold_out(run["folder"] / "train", 0.2, validation_set=run["folder"] / "val")[0]
    single.save(tmp_path / "single.imgclf")  # which removes its checkpoint from the shared workspace
    for head in first["heads"]:
        assert torch.allclose(head["weight"], single.head.weight.detach(), atol=1e-6)
        assert torch.allclose(head["bias"], single.head.bias.detach(), atol=1e-6)


@pytest.mark.slow
def test_torchrun_resumes_to_one_model_with_identical_ranks(interrupted_then_resumed):
    """The interrupted run, resumed under torchrun: every rank continues from rank 0's
    checkpoint, the ranks end identical, and exactly one model and one metrics file appear."""
    run = interrupted_then_resumed
    resumed, spy, out = run["resumed"], run["spy"], run["out"]
    assert resumed.returncode == 0, resumed.stderr
    assert resumed.stdout.count("Resumed from the checkpoint after fine-tune epoch 1") == 1
    assert resumed.stdout.count("Saved model to") == 1  # rank 0 alone reports
    for r in (0, 1):  # the spy's record of this run (written afresh): epochs 2 and 3, reshuffled by set_epoch
        epochs = json.loads((spy / f"rank{r}.json").read_text())["epochs"]
        assert [e["epoch"] for e in epochs] == [1, 2] and epochs[0]["indices"] != epochs[1]["indices"]
    assert sorted(p.name for p in out.iterdir()) == ["metrics.json", "model.imgclf"]
    model = load_model(out / "model.imgclf")
    assert model.info["distributed"] == {"world_size": 2, "backend": "gloo"}
    assert [h["epoch"] for h in model.info["history"] if h["phase"] == "fine-tune"] == [1, 2, 3]
    assert _checkpoint_phase(run["ws"]) is None  # removed once the model was saved

    net0, net1 = _load(spy / "rank0-network.safetensors"), _load(spy / "rank1-network.safetensors")
    assert all(torch.equal(net0[k], net1[k]) for k in net0)  # DDP kept the ranks identical
    assert torch.equal(net0["head.weight"], model.head.weight.detach().cpu())  # and rank 0's is the one saved

    # Validation was split 2 + 1 across the ranks and gathered: the one-process figures, no photo twice.
    from imgclf.training.finetune import FineTuneOptions, FineTuner

    val = load_images_from_directory(run["folder"] / "val")
    y = torch.tensor([model.labels.index(im.label) for im in val])
    accuracy, loss = FineTuner(model, FineTuneOptions(), device="cpu", seed=1).evaluate(
        decode_for_training(val, model.preprocessing), y
    )
    tuned = model.info["fine_tune"]  # the model kept is the best epoch's, or the head-only one
    if tuned["kept"] == "head-only":
        kept = tuned["head_only_validation"]
        kept = {"validation_accuracy": kept["accuracy"], "validation_loss": kept["loss"]}
    else:
        kept = next(h for h in model.info["history"]
                    if h["phase"] == "fine-tune" and h["epoch"] == tuned["best_fine_tune_epoch"])  # fmt: skip
    # 3 photos: an accuracy of k/3 cannot come from 4 rows. The loss only approximately: the run scored
    # them in channels-last batches of 2 + 1, the check in one contiguous batch.
    assert kept["validation_accuracy"] == pytest.approx(accuracy), tuned
    assert kept["validation_loss"] == pytest.approx(loss, rel=1e-3), tuned


@pytest.mark.slow
def test_a_failing_rank_stops_every_rank_with_its_one_line(small_net, tmp_path):
    """docs/distributed.md: "With `--nproc-per-node`, Ctrl-C or a failing rank stops every rank and
    prints one line (the failing rank's error)". Rank 1 alone fails as fine-tuning starts
    (tests/distributed_spy, IMGCLF_TEST_FAIL_RANK); rank 0 must not fine-tune on, or wait forever."""
    folder, spy, out = tmp_path / "data", tmp_path / "spy", tmp_path / "m.imgclf"
    small_flower_folder(folder, per_class=4, labels=("daisy", "tulips"))
    spy.mkdir()
    argv = [sys.executable, "-m", "imgclf", "train", str(folder), "--arch", "test_efficientnet", "--weights",
            str(small_net), "--epochs", "2", "--batch-size", "4", "--fine-tune", "--fine-tune-epochs", "2",
            "--device", "cpu", "--workspace", str(tmp_path / "ws"), "--out", str(out), "-q", "--nproc-per-node", "2"]  # fmt: skip
    proc = subprocess.run(argv, env=dict(_env(spy), IMGCLF_TEST_FAIL_RANK="1"), capture_output=True, text=True,
                          timeout=240)  # fmt: skip
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    # the rank's DataError is exit 2 in one process; here 2 alone, 1 in a full run (the launcher takes
    # the failing rank's exit code when torchrun recorded one, else 1): not yet one code, so both
    assert proc.returncode in (1, 2), proc.stderr
    assert len(lines) == 1 and "rank 1: " in lines[0] and "a failure on rank 1 alone" in lines[0], proc.stderr
    assert (spy / "rank0-head.safetensors").exists() and (spy / "rank1-head.safetensors").exists()  # both ran
    assert not (spy / "rank0-network.safetensors").exists()  # rank 0 stopped instead of fine-tuning alone
    assert not out.exists()


def test_streamed_pictures_are_the_decoded_ones(tmp_path):
    """Over the memory budget, photos are read from disk when used, and are the same pixels."""
    images = load_images_from_directory(small_flower_folder(tmp_path, per_class=2, labels=("daisy", "roses")))
    prep = Preprocessing(input_size=112, crop_pct=0.875, interpolation="bicubic", mean=(0.5,) * 3, std=(0.5,) * 3)
    in_memory = training_pictures(images, prep, lambda ims: decode_for_training(ims, prep), max_memory_gb=1)
    streamed = training_pictures(images, prep, lambda ims: decode_for_training(ims, prep), max_memory_gb=1e-6)
    assert isinstance(in_memory, list) and isinstance(streamed, StreamedPictures)
    assert len(streamed) == len(in_memory) == 4
    assert all(torch.equal(a, b) for a, b in zip(in_memory, streamed))
    assert torch.equal(streamed[1:3][1], in_memory[2]) and torch.equal(decode_picture(images[0], prep), in_memory[0])
    assert all(p.dtype == torch.uint8 and p.shape[0] == 3 and min(p.shape[1:]) == 128 for p in streamed)


def test_memory_budget_is_for_the_machine():
    assert memory_budget_bytes(8, processes_on_machine=4) == 2 * 2**30  # ranks on one machine share it
    assert 0 < memory_budget_bytes(None) < memory_budget_bytes(None) * 2
    with pytest.raises(OptionError, match="max_memory_gb"):
        memory_budget_bytes(0)
    with pytest.raises(OptionError, match="max_memory_gb"):
        ImageClassificationTrainer(max_memory_gb="lots").validate()


def test_fine_tune_streams_photos_over_the_budget(tmp_path, small_net, workspace, monkeypatch):
    """A fine-tune whose photos do not fit the budget never decodes them all into memory:
    it trains on photos read from disk (by DataLoader workers where they fork)."""
    from imgclf.training import finetune

    def no_decoding_into_memory(*args, **kwargs):
        raise AssertionError("the photos were decoded into memory")

    monkeypatch.setattr(finetune, "decode_for_training", no_decoding_into_memory)
    folder = small_flower_folder(tmp_path / "data", per_class=3, labels=("daisy", "tulips"))
    FineTuneOptions = finetune.FineTuneOptions

    model = ImageClassificationTrainer("test_efficientnet", weights=small_net, epochs=2, device="cpu",
                                       workspace=workspace, progress=False, fine_tune=True, max_memory_gb=1e-6,
                                       fine_tune_options=FineTuneOptions(epochs=1, batch_size=3)).fit(folder)  # fmt: skip
    assert [h["phase"] for h in model.info["history"]] == ["head", "head", "fine-tune"]
    assert model.info["distributed"] == {"world_size": 1, "backend": None}

"""Training under torchrun (PyTorch DDP, gloo on the CPU) and photos streamed from disk.

The end-to-end tests start real ranks: ``imgclf train --nproc-per-node 2`` and
``python -m torch.distributed.run --standalone --nproc-per-node 2 -m imgclf
train`` (what ``torchrun`` runs). A small timm network with random weights
keeps them quick; tests/distributed_spy records what each rank did.
"""

import json
import os
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

from .conftest import small_flower_folder  # noqa: E402

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
    return ["train", str(folder), "--arch", "test_efficientnet", "--weights", str(weights), "--epochs", "3",
            "--batch-size", "4", "--fine-tune", "--fine-tune-epochs", str(fine_tune_epochs), "--device", "cpu",
            "--workspace", str(ws), "--out", str(out / "model.imgclf"), "--metrics-json", str(out / "metrics.json"),
            "-q"]  # fmt: skip


@pytest.mark.slow
def test_nproc_per_node_two_ranks_shard_the_work_and_agree(tmp_path, small_net):
    """``imgclf train --nproc-per-node 2``: the ranks extract and fine-tune on disjoint shards, end
    with identical weights, the head equals a one-process run's, and rank 0 alone writes and reports."""
    folder = small_flower_folder(tmp_path / "data", per_class=5)  # 15 photos: 12 train (6 a rank), 3 held out
    spy, out, ws = tmp_path / "spy", tmp_path / "out", tmp_path / "ws"
    spy.mkdir()
    out.mkdir()
    argv = [sys.executable, "-m", "imgclf", *_train_args(folder, small_net, out, ws, 2), "--nproc-per-node", "2"]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=240, env=_env(spy))
    assert done.returncode == 0, done.stderr
    assert done.stdout.count("Saved model to") == 1 and done.stdout.count("Found 15 images") == 1  # rank 0 reports
    assert sorted(p.name for p in out.iterdir()) == ["metrics.json", "model.imgclf"]
    model = load_model(out / "model.imgclf")
    assert model.info["distributed"] == {"world_size": 2, "backend": "gloo"}

    ranks = [json.loads((spy / f"rank{r}.json").read_text()) for r in (0, 1)]
    extracted = [set(r["extracted"]) for r in ranks]
    assert not extracted[0] & extracted[1]  # each photo through the backbone once, on one rank
    assert extracted[0] | extracted[1] == {str(p) for p in folder.rglob("*.jpg")}
    assert [e["epoch"] for e in ranks[0]["epochs"]] == [0, 1]  # set_epoch: a new shuffle each epoch
    for e0, e1 in zip(ranks[0]["epochs"], ranks[1]["epochs"]):
        assert e0["of"] == 12 and len(e0["indices"]) == len(e1["indices"]) == 6
        assert sorted(e0["indices"] + e1["indices"]) == list(range(12))  # disjoint shards covering the set
    assert ranks[0]["epochs"][0]["indices"] != ranks[0]["epochs"][1]["indices"]

    net0, net1 = _load(spy / "rank0-network.safetensors"), _load(spy / "rank1-network.safetensors")
    assert all(torch.equal(net0[k], net1[k]) for k in net0)  # DDP kept the ranks identical
    assert torch.equal(net0["head.weight"], model.head.weight.detach().cpu())  # and rank 0's is the one saved
    assert not torch.equal(net0["head.weight"], _load(spy / "rank0-head.safetensors")["weight"])  # it did train

    # The head phase on gathered features is the one-process result (features come from the cache).
    single = ImageClassificationTrainer("test_efficientnet", weights=small_net, epochs=3, batch_size=4, device="cpu",
                                        workspace=ws, progress=False).fit_and_hold_out(folder, 0.2)[0]  # fmt: skip
    for r in (0, 1):
        head = _load(spy / f"rank{r}-head.safetensors")
        assert torch.allclose(head["weight"], single.head.weight.detach(), atol=1e-6)
        assert torch.allclose(head["bias"], single.head.bias.detach(), atol=1e-6)


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


@pytest.mark.slow
def test_ctrl_c_stops_every_rank_with_one_message_then_torchrun_resumes(tmp_path, small_net):
    """Ctrl-C on ``--nproc-per-node 2`` after a fine-tune epoch: one message, exit 130, rank 0's
    checkpoint kept; the same command under torchrun with --resume finishes the run."""
    folder = small_flower_folder(tmp_path / "data", per_class=4, labels=("daisy", "tulips"))
    spy, out, ws = tmp_path / "spy", tmp_path / "out", tmp_path / "ws"
    spy.mkdir()
    out.mkdir()
    args = _train_args(folder, small_net, out, ws, 3)
    launcher = subprocess.Popen([sys.executable, "-m", "imgclf", *args, "--nproc-per-node", "2"], env=_env(spy),
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)  # fmt: skip
    deadline = time.time() + 180
    while time.time() < deadline and launcher.poll() is None:
        phase = _checkpoint_phase(ws)
        if phase and phase[0] == "fine-tune":
            break
        time.sleep(0.05)
    assert phase and phase[0] == "fine-tune", "no fine-tune checkpoint appeared"
    os.killpg(launcher.pid, signal.SIGINT)  # what Ctrl-C in a terminal does
    stdout, stderr = launcher.communicate(timeout=120)
    assert launcher.returncode == 130, stderr
    errors = [line for line in stderr.splitlines() if line.strip()]
    assert len(errors) == 1 and "interrupted" in errors[0] and "--resume" in errors[0], stderr
    assert not list(out.iterdir())  # nothing written
    stopped_at = _checkpoint_phase(ws)
    assert stopped_at[0] == "fine-tune" and 1 <= stopped_at[1] < 3

    resumed = subprocess.run([*TORCHRUN, "-m", "imgclf", *args, "--resume"], capture_output=True, text=True,
                             timeout=240, env=_env(spy))  # fmt: skip
    assert resumed.returncode == 0, resumed.stderr
    assert resumed.stdout.count(f"Resumed from the checkpoint after fine-tune epoch {stopped_at[1]}") == 1
    epochs = [e["epoch"] for e in json.loads((spy / "rank1.json").read_text())["epochs"]]
    assert epochs == list(range(stopped_at[1], 3))  # rank 1 continued too, from rank 0's checkpoint
    assert sorted(p.name for p in out.iterdir()) == ["metrics.json", "model.imgclf"]
    history = load_model(out / "model.imgclf").info["history"]
    assert [h["epoch"] for h in history if h["phase"] == "fine-tune"] == [1, 2, 3]
    assert _checkpoint_phase(ws) is None  # removed once the model was saved


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

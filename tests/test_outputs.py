"""What train and export write: checked before the work, never over an input, the model saved
before anything that can still fail, the user's permissions, and no writable workspace needed."""

import json
import os
import stat
from pathlib import Path

import pytest

pytest.importorskip("torch")

from imgclf import ImageClassificationTrainer, load_images_from_directory, load_model  # noqa: E402
from imgclf.cli import main  # noqa: E402

from .conftest import PREDICT, small_flower_folder  # noqa: E402


def run(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def one_error_line(err: str) -> str:
    lines = [ln for ln in err.strip().splitlines() if ln.startswith("imgclf: error:")]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


@pytest.fixture
def folder(tmp_path):
    return small_flower_folder(tmp_path / "data", per_class=3, labels=("daisy", "tulips"))


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--metrics-json", "{tmp}"], "--metrics-json {tmp}: is a folder"),
        (["--metrics-json", "/proc/imgclf-test/m.json"], "cannot write the metrics"),
        (["--out", "{tmp}"], "--out {tmp}: is a folder"),
        (["--out", "{tmp}/data/daisy/m.imgclf/x"], "is a file, not a folder"),
        (["--metrics-json", "{tmp}/same", "--out", "{tmp}/same"], "is also --out"),
        (["--out", "{first_image}"], "exists and is not a model file"),  # defect 4: was overwritten with the model
        (["--out", "{tmp}/notes.txt"], "notes.txt: exists and is not a model file"),  # was replaced by the model
        (["--from", "{tmp}/old.imgclf", "--out", "{tmp}/old.imgclf"], "is also an input"),  # the model trained on
        (["--from", "{tmp}/old.imgclf", "--metrics-json", "{tmp}/old.imgclf"], "is also an input"),
        (["--out", "{tmp}/pipe"], "not a regular file"),
        # a file where the report folder should go
        (["--report", "{tmp}/data/daisy/m.imgclf"], "exists and is not a folder"),
    ],
)
def test_bad_outputs_are_refused_before_training(argv, message, folder, tmp_path, capsys, workspace, small_model_file):
    """Defect 3: a bad --metrics-json or --out was a traceback after training, with the model lost."""
    first_image = sorted((folder / "daisy").glob("*.jpg"))[0]
    (folder / "daisy" / "m.imgclf").write_text("a file where a folder is needed")
    os.mkfifo(tmp_path / "pipe")  # never a real device here: run against old code, this test would replace it
    (tmp_path / "notes.txt").write_text("precious")
    old_model = (tmp_path / "old.imgclf").write_bytes(small_model_file.read_bytes())  # what --from trains on
    before = first_image.read_bytes()
    argv = [a.replace("{tmp}", str(tmp_path)).replace("{first_image}", str(first_image)) for a in argv]
    code, out, err = run(capsys, "train", folder, "--workspace", workspace, *argv)
    assert code == 2 and message.replace("{tmp}", str(tmp_path)) in one_error_line(err)
    assert "Training" not in out  # refused before any work
    assert first_image.read_bytes() == before and (tmp_path / "old.imgclf").stat().st_size == old_model
    assert (tmp_path / "notes.txt").read_text() == "precious"


def test_failed_save_keeps_the_run_and_resume_saves_it(folder, tmp_path, capsys, monkeypatch):
    """Defect 3: the checkpoint was deleted before the model was written, so a failed save lost the run.
    Now the model is saved first, the checkpoint removed only after, the metrics written atomically."""
    import safetensors.torch

    ws, out, metrics = tmp_path / "ws", tmp_path / "m.imgclf", tmp_path / "metrics" / "m.json"
    argv = ["train", folder, "--workspace", ws, "--out", out, "--metrics-json", metrics, "--epochs", 3, "-q"]
    real_save = safetensors.torch.save_file

    def disk_full(tensors, filename, metadata=None):
        if metadata and "imgclf" in metadata:  # the model, not the per-epoch checkpoints
            raise OSError(28, "No space left on device")
        return real_save(tensors, filename, metadata=metadata)

    monkeypatch.setattr(safetensors.torch, "save_file", disk_full)
    code, _, err = run(capsys, *argv)
    line = one_error_line(err)
    assert code == 2 and "No space left on device" in line and "--resume" in line
    assert not out.exists() and not metrics.exists()
    assert len(list((ws / "checkpoints").glob("*.safetensors"))) == 1  # the finished run survives

    monkeypatch.setattr(safetensors.torch, "save_file", real_save)
    code, stdout, err = run(capsys, *argv, "--resume")
    assert code == 0, err
    assert "Resumed from the checkpoint after head epoch 3" in stdout
    assert load_model(out).labels == ["daisy", "tulips"]
    assert json.loads(metrics.read_text())["labels"] == ["daisy", "tulips"]
    assert not list((ws / "checkpoints").glob("*.safetensors"))  # removed once the model was written
    assert not list(tmp_path.glob("**/.*.tmp"))  # no temporary files left behind


def test_save_and_export_keep_a_file_that_is_not_a_model(small_model, tmp_path):
    """A notebook's model.save("photo.jpg") replaced the photo, and export_onnx("notes.txt") the
    notes; a model file (either format) is still replaced, as saving again does."""
    from imgclf.errors import OptionError

    photo = tmp_path / "photo.jpg"
    photo.write_bytes((PREDICT / "classic-daisy.jpg").read_bytes())
    for write in (small_model.save, small_model.export_onnx):
        with pytest.raises(OptionError, match="photo.jpg: exists and is not a model file"):
            write(photo)
    assert photo.read_bytes() == (PREDICT / "classic-daisy.jpg").read_bytes()
    saved = small_model.save(tmp_path / "m.imgclf")
    small_model.save(saved)  # a model replaced by a model of its kind, as saving again does
    exported = small_model.export_onnx(tmp_path / "m.onnx")
    small_model.export_onnx(exported)
    # never one kind by the other: the trained model (its features) was replaced by its export
    with pytest.raises(OptionError, match="m.imgclf: is a trained imgclf model .* with the other format"):
        small_model.export_onnx(saved)
    with pytest.raises(OptionError, match="m.onnx: is an exported ONNX model; writing the model there"):
        small_model.save(exported)
    assert load_model(saved).labels == load_model(exported).labels == small_model.labels


def test_export_refuses_to_overwrite_its_input(small_model, tmp_path, capsys):
    """Defect 4: `imgclf export m.imgclf --out m.imgclf` exited 0 and the model was gone."""
    model = small_model.save(tmp_path / "m.imgclf")
    before = model.read_bytes()
    os.link(model, tmp_path / "hardlink.imgclf")
    for out in (model, tmp_path / "hardlink.imgclf", tmp_path / "." / "m.imgclf"):
        code, _, err = run(capsys, "export", model, "--out", out)
        assert code == 2 and "is also an input" in one_error_line(err)
    assert model.read_bytes() == before
    code, _, err = run(capsys, "export", tmp_path / "missing.imgclf", "--out", tmp_path / "x.onnx")
    assert code == 2 and "model file not found" in one_error_line(err)


def test_read_only_workspace_trains_with_one_warning(folder, tmp_path, capsys):
    """Defect 6: a read-only workspace was a traceback (exit 2 with --no-cache). A workspace below a
    regular file cannot be created by anyone, root included, like a read-only file system."""
    blocker = tmp_path / "read-only"
    blocker.write_text("")
    ws = blocker / "ws"
    for extra in ([], ["--no-cache"]):
        out = tmp_path / f"m{len(extra)}.imgclf"
        code, stdout, err = run(capsys, "train", folder, "--workspace", ws, "--out", out, "--epochs", 2, "-q", *extra)
        assert code == 0, err
        warnings = [ln for ln in err.splitlines() if "workspace" in ln]
        assert len(warnings) == 1 and "not writable" in warnings[0] and "--resume" in warnings[0], err
        assert load_model(out).labels == ["daisy", "tulips"]
    assert blocker.read_text() == ""


@pytest.mark.parametrize("how", ["a regular file where the folder should be", "a read-only folder"])
def test_read_only_workspace_folder(how, folder, tmp_path):
    """The write fails for root too: a regular file at the workspace's path (root runs this suite
    here and in CI, and root writes into a 0555 folder), or a read-only folder for anyone else."""
    ws = tmp_path / "ws"
    if how.startswith("a regular file"):
        ws.write_text("not a folder")
    else:
        if os.geteuid() == 0:
            pytest.skip("root writes to read-only folders; the regular file covers root")
        ws.mkdir()
        ws.chmod(0o555)
    with pytest.warns(UserWarning, match="not writable"):
        model = ImageClassificationTrainer(epochs=1, workspace=ws, progress=False, engine="torch").fit(
            load_images_from_directory(folder)
        )
    assert model.checkpoint_path_ is None
    assert ws.read_text() == "not a folder" if ws.is_file() else not any(ws.iterdir())


@pytest.mark.parametrize("umask", [0o022, 0o027, 0o002])
def test_new_files_honour_the_umask(umask, tmp_path):
    """Defect 8: models, exports and metrics were written 0600 (mkstemp), whatever the umask."""
    from imgclf.atomic import atomic_path, atomic_write_text

    previous = os.umask(umask)
    try:
        atomic_write_text(tmp_path / "metrics.json", "{}")
        with atomic_path(tmp_path / "replaced-by-writer.bin") as tmp:
            os.unlink(tmp)  # as safetensors does: a fresh 0600 file put in place of the temporary one
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT, 0o600)
            os.close(fd)
    finally:
        os.umask(previous)
    for name in ("metrics.json", "replaced-by-writer.bin"):
        assert stat.S_IMODE((tmp_path / name).stat().st_mode) == 0o666 & ~umask, name


def test_model_files_honour_the_umask_and_keep_a_replaced_files_mode(small_model, tmp_path):
    previous = os.umask(0o022)
    try:
        fresh = small_model.save(tmp_path / "fresh.imgclf")
        existing = tmp_path / "existing.imgclf"
        existing.write_bytes(b"")  # an empty file, as touch leaves: replaceable
        existing.chmod(0o640)
        small_model.save(existing)
    finally:
        os.umask(previous)
    assert stat.S_IMODE(fresh.stat().st_mode) == 0o644
    assert stat.S_IMODE(existing.stat().st_mode) == 0o640 and load_model(existing).labels == small_model.labels


def test_an_empty_out_is_refused_and_a_file_uri_is_the_path_it_names(small_model_file, tmp_path, capsys,
                                                                     monkeypatch):  # fmt: skip
    """--out "" was read as not given (predict printed to the terminal, export wrote MODEL.onnx,
    certify rewrote the model); --out file:///x wrote into a folder named 'file:' here."""
    monkeypatch.chdir(tmp_path)
    model, images = str(small_model_file), str(PREDICT)
    for argv, said in ((["predict", model, images, "--out", ""], "--out must be a folder name, got ''"),
                       (["export", model, "--out", ""], "--out must be a file name, got ''"),
                       (["certify", model, images, "--out", ""], "--out must be a file name, got ''"),
                       (["report", model, "--out", " "], "--out must be a folder name, got ' '")):  # fmt: skip
        assert main(argv) == 2 and said in capsys.readouterr().err
    assert main(["export", model, "--out", f"file://{tmp_path}/u.onnx"]) == 0
    assert main(["predict", model, images, "--out", f"file://{tmp_path}/r.csv", "-q"]) == 0
    assert (tmp_path / "u.onnx").is_file() and (tmp_path / "r.csv" / "_SUCCESS").is_file()
    assert not Path("file:").exists()

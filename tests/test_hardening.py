"""Hardening, round 2 (issue 21): limits that depend on the machine, slow clients, URIs."""

from __future__ import annotations

import os

import pytest

from imgclf.errors import OptionError


def test_nproc_per_node_is_capped_by_the_machine(monkeypatch):
    import torch

    from imgclf.training.distributed import check_process_count

    cores = os.cpu_count() or 1
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    check_process_count(cores)
    with pytest.raises(OptionError, match=f"has {cores} CPU core\\(s\\) and no GPU.*use at most {cores}"):
        check_process_count(cores + 1)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    check_process_count(4, "cuda")
    with pytest.raises(OptionError, match="has 4 GPU\\(s\\), one per process; use at most 4"):
        check_process_count(5, "auto")
    with pytest.raises(OptionError, match="CPU core"):  # --device cpu: the GPUs do not count
        check_process_count(cores + 1, "cpu")


def test_the_cli_refuses_too_many_processes_before_any_work(tmp_path, capsys):
    from imgclf.cli import main

    n = (os.cpu_count() or 1) * 6
    assert main(["train", str(tmp_path / "missing"), "--nproc-per-node", str(n), "--device", "cpu"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"--nproc-per-node {n}: this machine has" in err[0]

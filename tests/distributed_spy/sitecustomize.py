"""Records what each torchrun rank really did, for tests/test_distributed.py.

Python imports ``sitecustomize`` at start-up from the path; the test puts this
folder on PYTHONPATH and names a folder in IMGCLF_TEST_SPY_DIR, so every rank
that torchrun (or ``imgclf train --nproc-per-node``) starts records, in
``rank<N>.json`` and ``rank<N>-*.safetensors``: the images it ran through the
backbone, the training indices its sampler gave each epoch, the head after the
head phase and the whole network after fine-tuning. Nothing is changed, except
that IMGCLF_TEST_FAIL_RANK=N makes rank N fail as fine-tuning starts, and
IMGCLF_TEST_PAUSE_AFTER=E makes rank 0 wait after writing the checkpoint of
fine-tune epoch E, so a test can interrupt the run there, every time.
IMGCLF_TEST_ONE_PROCESS=1 records a plain one-process run too (as rank 0).
"""

import json
import os
import time

SPY_DIR = os.environ.get("IMGCLF_TEST_SPY_DIR")


def _install() -> None:
    from pathlib import Path

    from safetensors.torch import save_file

    from imgclf.nets import features
    from imgclf.training import checkpoint, distributed, finetune, trainer

    rank = os.environ.get("RANK", "0")
    folder = Path(SPY_DIR)
    record: dict = {"extracted": [], "epochs": []}

    def dump() -> None:
        (folder / f"rank{rank}.json").write_text(json.dumps(record))

    transform = features.FeatureExtractor.transform

    def spied_transform(self, images):
        record["extracted"] += [im.name for im in images]
        dump()
        return transform(self, images)

    make_sampler = distributed.train_sampler

    def spied_sampler(dataset, seed):
        sampler = make_sampler(dataset, seed)
        if sampler is not None:
            iterate = type(sampler).__iter__

            class Recording(type(sampler)):
                def __iter__(self):
                    indices = list(iterate(self))
                    record["epochs"].append({"epoch": self.epoch, "indices": indices, "of": len(dataset)})
                    dump()
                    return iter(indices)

            sampler.__class__ = Recording
        return sampler

    train_head = trainer.ImageClassificationTrainer._train_head

    def spied_train_head(self, *args, **kwargs):
        head, history, best = train_head(self, *args, **kwargs)
        save_file({k: v.detach().cpu().contiguous() for k, v in head.state_dict().items()},
                  str(folder / f"rank{rank}-head.safetensors"))  # fmt: skip
        return head, history, best

    run = finetune.FineTuner.run

    def spied_run(self, *args, **kwargs):
        if os.environ.get("IMGCLF_TEST_FAIL_RANK") == rank:  # one rank failing on its own
            from imgclf.errors import DataError

            raise DataError(f"a failure on rank {rank} alone")
        result = run(self, *args, **kwargs)
        state = {f"backbone.{k}": v for k, v in self.model.backbone.state_dict().items()}
        state.update({f"head.{k}": v for k, v in self.model.head.state_dict().items()})
        save_file({k: v.detach().cpu().contiguous() for k, v in state.items()},
                  str(folder / f"rank{rank}-network.safetensors"))  # fmt: skip
        return result

    save = checkpoint.Checkpoint.save
    pause_after = int(os.environ.get("IMGCLF_TEST_PAUSE_AFTER", "0"))

    def paused_save(self, phase, epoch, *args, **kwargs):
        save(self, phase, epoch, *args, **kwargs)
        if rank == "0" and phase == "fine-tune" and epoch == pause_after:
            (folder / "paused").touch()
            time.sleep(120)

    checkpoint.Checkpoint.save = paused_save
    features.FeatureExtractor.transform = spied_transform
    distributed.train_sampler = spied_sampler
    trainer.ImageClassificationTrainer._train_head = spied_train_head
    finetune.FineTuner.run = spied_run


if SPY_DIR and ("RANK" in os.environ or os.environ.get("IMGCLF_TEST_ONE_PROCESS")):  # a rank, or a plain run
    _install()

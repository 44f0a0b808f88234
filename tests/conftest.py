"""Fixtures several test files share, each built once per session."""

import pytest

from clip_backdoor.cli import main as cli

# A pre-training small enough for seconds: 256 pairs, 4 steps per epoch, 60 eval images.
SMALL = ["data.num_samples=256", "data.workers=0", "batch_size=64", "eval.n=60", "eval.batch_size=64",
         "optim.warmup_steps=2", "optim.lr=2e-3", "threads=1"]


@pytest.fixture(scope="session")
def quick_demo(tmp_path_factory):
    """`clip-backdoor demo --quick` (about two minutes): run once, read by every test that needs a
    whole study (the end-to-end test, the report in a browser, `study status`)."""
    out = tmp_path_factory.mktemp("demo") / "quick"
    code = cli(["demo", "--quick", "--out", str(out)])
    return code, out


@pytest.fixture(scope="session")
def poisoned_run(tmp_path_factory):
    """50 BadNet poisons (poison seed 3) among 256 pairs, pre-trained for 2 epochs with TensorBoard on,
    then cleaned with CleanCLIP for 1 epoch on a 64-pair cleaning set: (poisoned dir, pre run, clean run)."""
    root = tmp_path_factory.mktemp("poisoned_run")
    assert cli(["poison", "--num-samples", "256", "--n", "50", "--target", "banana", "--poison-seed", "3",
                "--format", "manifest", "--out", str(root / "poisoned")]) == 0
    assert cli(["pretrain", "--run-dir", str(root / "pre"), "--epochs", "2", *SMALL, "report_to=tensorboard",
                f"data.poison_manifest={root / 'poisoned' / 'manifest.csv'}"]) == 0
    manifest = root / "poisoned" / "manifest.csv"
    assert cli(["poison", "--num-samples", "256", "--cleaning-set", "--size", "64", "--format", "manifest",
                "--exclude-manifest", str(manifest), "--out", str(root / "clean")]) == 0
    assert cli(["clean", "--checkpoint", str(root / "pre" / "checkpoints" / "latest.pt"), "--run-dir",
                str(root / "cl"), "--epochs", "1", *SMALL, "batch_size=32",
                f"data.poison_manifest={root / 'clean' / 'manifest.csv'}"]) == 0
    return root / "poisoned", root / "pre", root / "cl"

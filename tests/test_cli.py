"""Bad input ends in one line naming key, value and rule, exit 2, before anything starts."""

from __future__ import annotations

import pytest

from disttrain.cli import main
from tests.support import ROOT, SMALL, disttrain, summary, tree_hashes

BAD_INPUT = [
    (
        ["strategy=foo"],
        "strategy='foo': no such option in conf/strategy/; choose one of auto, ddp, dp, fsdp, single",
    ),
    (["trainer.accumulate=0"], "trainer.accumulate=0: must be at least 1"),
    (["trainer.batch_size=-4"], "trainer.batch_size=-4: must be at least 1"),
    (["trainer.precision=fp8"], "trainer.precision='fp8': must be one of fp32, bf16, fp16"),
    (["trainer.batchsize=4"], "trainer.batchsize='4': unknown key; did you mean trainer.batch_size?"),
    (["trainer.device=cuda"], "trainer.device='cuda': CUDA is not available on this machine"),
    (
        ["strategy=ddp"],
        "strategy='ddp': ddp needs more than one process; launch with torchrun "
        "(launcher=torchrun launcher.nproc_per_node=N) or use strategy=single",
    ),
    (
        ["data=text_file", "data.path=/nonexistent/corpus.txt"],
        "data.path='/nonexistent/corpus.txt': no such file",
    ),
    (["data=text_file"], "data.path: required, and has no value (set data.path=...)"),
    (["trainer.max_epochs=two"], "trainer.max_epochs='two': must be an integer"),
    (["optim.lr=0"], "optim.lr=0.0: must be positive"),
    (["snapshot.keep_last=0"], "snapshot.keep_last=0: must be at least 1"),
    (
        ["model.hiden=32"],
        "model.hiden='32': unknown key; did you mean model.hidden? (to pass a new argument to the model use "
        "+model.hiden=32)",
    ),
    (
        ["+model.hiden=32"],
        "model.hiden=32: disttrain.models.MLPLanguageModel takes no such argument; "
        "did you mean model.hidden?",
    ),
    (
        ["run_dir=/proc/disttrain-run"],
        "run_dir='/proc/disttrain-run': not writable (No such file or directory)",
    ),
    (  # a module that fails as it is imported, with something other than ImportError
        ["model._target_=tests.targets_import_fails.Net"],
        "model._target_='tests.targets_import_fails.Net': cannot be imported: importing it raised "
        f"RuntimeError: this module needs a GPU driver ({ROOT}/tests/targets_import_fails.py:3)",
    ),
]


@pytest.mark.parametrize(("overrides", "message"), BAD_INPUT, ids=[" ".join(o) for o, _ in BAD_INPUT])
def test_bad_input_is_one_line(overrides: list[str], message: str, tmp_path, capsys) -> None:
    run_dir = [] if any(o.startswith("run_dir=") for o in overrides) else [f"run_dir={tmp_path / 'run'}"]
    assert main([*overrides, *run_dir]) == 2
    err = capsys.readouterr().err
    assert err == f"disttrain: error: {message}\n"


@pytest.mark.slow
def test_bad_input_from_the_shell_leaves_snapshots_untouched(tmp_path) -> None:
    run_dir = tmp_path / "run"
    first = disttrain(*SMALL, "trainer.max_epochs=1", f"run_dir={run_dir}")
    assert first.returncode == 0, first.stderr
    before = tree_hashes(run_dir)
    for overrides in (["model.hidden=32"], ["trainer.accumulate=0"], ["trainer.batch_size=8"]):
        result = disttrain(*SMALL, *overrides, f"run_dir={run_dir}")
        assert result.returncode == 2
        assert len(result.stderr.strip().splitlines()) == 1, result.stderr
        assert "Traceback" not in result.stderr
    assert tree_hashes(run_dir) == before
    result = disttrain(*SMALL, "model.hidden=32", f"run_dir={run_dir}")
    assert result.stderr == (
        f"disttrain: error: run_dir='{run_dir}': cannot resume: model.hidden was 64 when the snapshot was "
        "written and is 32 now\n"
    )
    assert summary(run_dir)["steps"] == 225


@pytest.mark.slow
@pytest.mark.parametrize("key", ["model", "data"])
def test_a_target_that_raises_when_built_is_one_line(tmp_path, key) -> None:
    """It imported and took its arguments, so the config was fine as far as the checks can tell: the job
    started (exit 1, not 2), and the user's error comes in one line naming the target and where."""
    result = disttrain(*SMALL, f"{key}._target_=tests.targets.FailsInInit", f"run_dir={tmp_path / 'run'}")
    assert result.returncode == 1, result.stderr
    assert result.stderr == (
        f"disttrain: error: {key}._target_='tests.targets.FailsInInit': building it raised ValueError: "
        f"5 arguments, and none of them is width ({ROOT}/tests/targets.py:16)\n"
    )


def test_cfg_prints_the_resolved_config(capsys) -> None:
    assert main(["--cfg", "trainer.batch_size=8", "run_dir=somewhere"]) == 0
    out = capsys.readouterr().out
    assert "batch_size: 8" in out
    assert "run_dir: somewhere" in out
    assert "_target_: disttrain.models.MLPLanguageModel" in out


def test_dry_run_prints_the_torchrun_command(tmp_path, capsys) -> None:
    run_dir = tmp_path / "run"
    assert (
        main(
            ["launcher=torchrun", "launcher.nproc_per_node=2", "launcher.dry_run=true", f"run_dir={run_dir}"]
        )
        == 0
    )
    out = capsys.readouterr().out.strip()
    assert out.endswith(
        f"-m torch.distributed.run --standalone --nnodes=1 --nproc-per-node=2 --max-restarts=0 "
        f"-m disttrain.worker {run_dir}/config.yaml"
    )
    assert not run_dir.exists()

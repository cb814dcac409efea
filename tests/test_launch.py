"""A rank of a multi-process run destroys its process group at exit, after a successful run only.

A rank (torchrun's or spawned) that exits with its Gloo group alive can abort in interpreter
finalisation (SIGABRT, seen once in CI after a finished two-machine run)."""

import subprocess
import sys
from types import SimpleNamespace

import pytest

from conftest import REPO
from hsl_lightning import Federation
from hsl_lightning.federation import federation as federation_module


@pytest.mark.slow
def test_the_exit_handler_destroys_the_process_group_before_the_interpreter_exits(tmp_path):
    script = (
        "import atexit, torch.distributed as dist\n"
        f"dist.init_process_group('gloo', init_method='file://{tmp_path / 'store'}', rank=0, world_size=1)\n"
        "atexit.register(lambda: print('group alive at exit:', dist.is_initialized()))\n"
        "from hsl_lightning.federation.launch import leave_process_group_at_exit\n"
        "leave_process_group_at_exit()\n"
        "leave_process_group_at_exit()\n"  # a second fit in the same process: harmless
        "print('group alive before exit:', dist.is_initialized())\n")
    res = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr[-3000:]
    assert res.stdout.splitlines() == ["group alive before exit: True", "group alive at exit: False"]


@pytest.mark.parametrize("world, fails, registered", [(2, False, 1), (2, True, 0), (1, False, 0)])
def test_a_rank_registers_the_handler_after_a_successful_multi_rank_run_only(monkeypatch, world, fails, registered):
    calls = []
    monkeypatch.setattr(federation_module, "leave_process_group_at_exit", lambda: calls.append(1))
    fed = Federation()
    monkeypatch.setattr(fed, "setup_rank", lambda *args: SimpleNamespace(workers=None))

    def rounds(*args):
        if fails:
            raise RuntimeError("a round failed")
        return {"summary": True}

    monkeypatch.setattr(fed, "_rounds", rounds)
    fabric = SimpleNamespace(world_size=world)
    if fails:
        with pytest.raises(RuntimeError, match="a round failed"):
            fed._run(fabric, None, None, None)
    else:
        assert fed._run(fabric, None, None, None) == {"summary": True}
    assert len(calls) == registered

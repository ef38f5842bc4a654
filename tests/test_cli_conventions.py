"""The command line behaves as a user of any well-kept CLI expects: --version, -v/-q, completion, choices listed
in --help, flags rendered as flags, help that makes sense outside this repository, and a thread default that
respects the CPUs this process may actually use."""
from __future__ import annotations

import ast
import os
import re
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import pytest
from typer.testing import CliRunner

import diffseg_engine
from diffseg_engine import cli
from diffseg_engine.core.errors import EXIT_CODES, UsageError
from diffseg_engine.core.host import cgroup_cpu_limit, usable_cpus

runner = CliRunner()
COMMANDS = ("train", "export", "segment", "evaluate", "demo")
PKG = Path(diffseg_engine.__file__).resolve().parent


def _help(*cmd: str) -> str:
    res = runner.invoke(cli.app, [*cmd, "--help"], env={"COLUMNS": "200", "TERMINAL_WIDTH": "200"})
    assert res.exit_code == 0, res.output
    return res.output


def test_version_is_the_installed_distributions():
    res = runner.invoke(cli.app, ["--version"])
    assert res.exit_code == 0
    assert res.output.strip() == f"diffseg-engine {metadata.version('diffseg-engine')}"
    assert diffseg_engine.__version__ == metadata.version("diffseg-engine")


@pytest.mark.parametrize("cmd", COMMANDS)
def test_help_is_for_someone_with_only_the_wheel(cmd):
    text = _help(cmd)
    assert "<bool>" not in text and "BOOLEAN" not in text, "an on/off flag renders as if it took a value"
    assert "shared/data" not in text, "help points at a path of this repository's development setup"
    assert "Example:" in text
    assert f"diffseg-engine {cmd}" in text.split("Example:")[1]


def test_choices_are_listed_and_defaults_come_from_the_card():
    seg = _help("segment")
    assert "ddpm|ddim" in seg and "onnxruntime|torch" in seg
    assert "FLAIR" in seg and "skull-stripped" in seg  # what the default model needs
    assert "brats|nan" in _help("evaluate")
    train = _help("train")
    assert "paper|cpu|cpu-fast|cpu-small|cpu-small-112|tiny" in train and "auto|bf16|fp32" in train and "diffusion|segmentation" in train
    assert "eps|x0" in train
    root = _help()
    for code in set(EXIT_CODES.values()):
        assert re.search(rf"\b{code} [a-z]", root), f"exit code {code} not explained in --help"


def test_enums_match_the_library():
    from diffseg_engine.backends.base import BACKENDS
    from diffseg_engine.evaluation.metrics import POLICIES
    from diffseg_engine.sampling.sampler import SAMPLERS
    from diffseg_engine.train.loop import OBJECTIVES
    from diffseg_engine.train.presets import PRESETS
    assert [s.value for s in cli.Sampler] == list(SAMPLERS)
    assert set(BACKENDS) <= {b.value for b in cli.Backend}
    assert {p.value for p in cli.Preset} == set(PRESETS)
    assert [o.value for o in cli.Objective] == list(OBJECTIVES)
    assert {p.value for p in cli.Policy} == set(POLICIES)


def test_parser_errors_are_one_line_with_the_usage_exit_code():
    res = runner.invoke(cli.app, ["segment", "x.nii.gz", "--samplr", "ddim"])
    assert res.exit_code == EXIT_CODES[UsageError] == 2
    assert res.output.count("\n") == 1 and "--sampler" in res.output and "segment --help" in res.output
    res = runner.invoke(cli.app, ["evaluate", "--data", "d", "--policy", "strict"])
    assert res.exit_code == 2 and res.output.count("\n") == 1 and "'brats', 'nan'" in res.output


def test_shell_completion_offers_the_choices():
    env = {**os.environ, "_DIFFSEG_ENGINE_COMPLETE": "complete_bash",
           "COMP_WORDS": "diffseg-engine segment --sampler ", "COMP_CWORD": "3"}
    out = subprocess.run([sys.executable, "-m", "diffseg_engine"], env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert set(out.stdout.split()) == {"ddpm", "ddim"}
    assert "--install-completion" in _help()


@pytest.mark.slow
def test_verbosity_controls_the_library_log(shared_data, tiny_model, tmp_path):
    case = shared_data / "train" / "BraTS18_CBICA_ASK"
    args = ["segment", str(case), "--model", str(tiny_model[1]), "--steps", "1", "--n", "1"]
    loud = runner.invoke(cli.app, ["-v", *args, "-o", str(tmp_path / "a")])
    assert loud.exit_code == 0, loud.output
    assert "segment BraTS18_CBICA_ASK:" in loud.output  # the progress line, through logging at INFO
    quiet = runner.invoke(cli.app, ["-q", *args, "-o", str(tmp_path / "b")])
    assert quiet.exit_code == 0, quiet.output
    assert quiet.output == ""  # -q: warnings and errors only, and no summary line


def test_library_code_never_prints():
    """Library modules log (`logging.getLogger(__name__)`); only the CLI and `__main__` scripts write to the
    terminal."""
    offenders = []
    for path in sorted(PKG.rglob("*.py")) + sorted((PKG.parent / "train").rglob("*.py")):
        if path.name in ("cli.py", "__main__.py"):
            continue
        tree = ast.parse(path.read_text())
        main_blocks = [n for n in tree.body if isinstance(n, ast.If) and "__main__" in ast.unparse(n.test)]
        in_main = {id(x) for b in main_blocks for x in ast.walk(b)}
        funcs_called_by_main = {c.func.id for b in main_blocks for c in ast.walk(b)
                                if isinstance(c, ast.Call) and isinstance(c.func, ast.Name)}
        for fn in ast.walk(tree):
            if isinstance(fn, ast.FunctionDef) and fn.name in funcs_called_by_main | {"main", "_main"}:
                in_main |= {id(x) for x in ast.walk(fn)}
        for node in ast.walk(tree):
            if (isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "print"
                    and id(node) not in in_main):
                offenders.append(f"{path.name}:{node.lineno}")
    assert not offenders, offenders


# ---- --threads defaults ----------------------------------------------------------------------------------
def _cgroup(tmp_path: Path, own: str, limits: dict[str, str]) -> tuple[Path, Path]:
    root = tmp_path / "cg"
    for rel, cpu_max in limits.items():
        d = root / rel
        d.mkdir(parents=True, exist_ok=True)
        (d / "cpu.max").write_text(cpu_max + "\n")
    (root / own.lstrip("/")).mkdir(parents=True, exist_ok=True)
    proc = tmp_path / "cgroup"
    proc.write_text(f"0::{own}\n")
    return root, proc


def test_cgroup_quota_caps_the_thread_default(tmp_path):
    # docker --cpus 1.5 on the parent slice, no limit on the leaf: 2 threads, not the host's count
    root, proc = _cgroup(tmp_path, "/pod/ctr", {"pod": "150000 100000", "pod/ctr": "max 100000"})
    assert cgroup_cpu_limit(root, proc) == pytest.approx(1.5)
    assert usable_cpus(root, proc) == min(2, len(os.sched_getaffinity(0)))
    root, proc = _cgroup(tmp_path / "free", "/a", {"a": "max 100000"})
    assert cgroup_cpu_limit(root, proc) is None
    assert usable_cpus(root, proc) == len(os.sched_getaffinity(0))


def test_affinity_caps_the_thread_default():
    code = ("import os; os.sched_setaffinity(0, {sorted(os.sched_getaffinity(0))[0]}); "
            "from diffseg_engine.core.host import usable_cpus; print(usable_cpus())")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "1"


def test_onnxruntime_session_uses_the_usable_cpus(tiny_model, monkeypatch):
    from diffseg_engine.backends import ort as ort_backend
    monkeypatch.setattr(ort_backend, "usable_cpus", lambda: 1)
    eng = ort_backend.OnnxRuntimeBackend.load(tiny_model[1], device="cpu")
    assert eng.session.get_session_options().intra_op_num_threads == 1
    eng = ort_backend.OnnxRuntimeBackend.load(tiny_model[1], device="cpu", threads=2)
    assert eng.session.get_session_options().intra_op_num_threads == 2

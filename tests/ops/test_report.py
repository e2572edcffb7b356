"""forge-ops-report names every op on every device, with its source or its reason to fall back."""
import torch

from forge_dist.ops import registry, report


def test_report_lists_every_op(capsys):
    assert report.main([]) == 0
    out = capsys.readouterr().out
    state = registry.state()
    source = {"jit": "JIT-built", "prebuilt": "prebuilt"}[state.source]
    assert f"torch      {torch.__version__}" in out
    for op, lib_op in report.OPS.items():
        line = next(ln for ln in out.splitlines() if ln.startswith(op + " "))
        cpu_cell = line[21:56].strip()
        assert cpu_cell == (source if lib_op else report.REFERENCE_ONLY[op]), line
        if "cuda" not in state.devices:
            assert "falling back" in line[56:] or lib_op is None, line
        elif not registry.GPU_VERIFIED:
            assert "unverified on GPU" in line[56:], line


def test_report_without_building(capsys):
    assert report.main(["--no-build"]) == 0
    assert "JIT cache has a build for key" in capsys.readouterr().out
